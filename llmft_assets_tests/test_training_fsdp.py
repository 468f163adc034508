"""FSDP: `strategy` selects the accelerate config, and the adapter is saved whole from sharded state.

What runs here and what does not: accelerate 1.15's FSDP plugin refuses to start without an accelerator
device ("no available devices found, must be one of 'XPU', 'CUDA', ..."), so a full `strategy: fsdp`
training run needs GPUs (benchmarks/gpu_suite.sh runs one). On CPU this file covers (1) the launch
command and the environment accelerate derives from the selected config (parsed by accelerate's own
launcher code, no process started), and (2) the save path under real sharding: two processes over gloo
wrap a LoRA model in torch FSDP (use_orig_params), train two steps, and `fsdp_full_state_dict` +
`save_pretrained` on rank 0 must write exactly the trained adapter, where rank 0 saving its own view
(the planted defect) does not.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmft_assets.training.launch import (
    ENV_ACCELERATE_CONFIG_DIR,
    TRAINING_MODULE,
    accelerate_config_dir,
    accelerate_launch_command,
)
from llmft_assets_tests.test_training_support import tiny_model_dir_fixture  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accelerate_env(command: list[str]) -> tuple[Any, dict[str, str]]:
    """What `accelerate launch` would export to the ranks for this command (its own parser and code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    launch_args = command[command.index("accelerate.commands.launch") + 1 :]
    args = launch_command_parser().parse_args(launch_args)
    args, *_ = _validate_launch_command(args)
    return args, prepare_multi_gpu_env(args)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_strategy_selects_its_accelerate_config(strategy: str) -> None:
    command = accelerate_launch_command(
        strategy=strategy, num_processes=2, precision="fp32", main_process_port=29999, cli_args=["--x", "1"]
    )
    config_file = Path(command[command.index("--config_file") + 1])
    assert config_file == REPO / "deploy" / "accelerate" / f"{strategy}.yaml"
    assert command[-4:] == ["-m", TRAINING_MODULE, "--x", "1"]
    args, env = _accelerate_env(command)
    assert args.num_processes == 2 and args.main_process_port == 29999
    # both strategies start the ranks through torchrun (gloo on CPU), never the one-process CPU path
    assert not args.cpu and (args.multi_gpu or args.use_fsdp)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # the run's precision overrides the file's bf16
    if strategy == "fsdp":
        assert env["ACCELERATE_USE_FSDP"] == "true"
        assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
        assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "Qwen2DecoderLayer"
        assert env["FSDP_USE_ORIG_PARAMS"] == "true"
    else:
        assert env.get("ACCELERATE_USE_FSDP", "false") != "true"


def test_launch_command_errors_and_config_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"strategy 'fsdp'.*LLMFT_ACCELERATE_CONFIG_DIR"):
        accelerate_launch_command(
            strategy="fsdp", num_processes=2, precision="fp32", cli_args=[], config_dir=tmp_path
        )
    with pytest.raises(ValueError, match="num_processes"):
        accelerate_launch_command(strategy="ddp", num_processes=1, precision="fp32", cli_args=[])
    with pytest.raises(ValueError, match="precision"):
        accelerate_launch_command(strategy="ddp", num_processes=2, precision="auto", cli_args=[])
    assert accelerate_config_dir({ENV_ACCELERATE_CONFIG_DIR: str(tmp_path)}) == tmp_path
    command = accelerate_launch_command(strategy="ddp", num_processes=4, precision="bf16", cli_args=[])
    assert command[command.index("--mixed_precision") + 1] == "bf16"
    assert command[command.index("--num_processes") + 1] == "4"


_WORKER = r"""
import json, sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import StateDictType
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers import AutoModelForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from llmft_assets.training.trainer import fsdp_full_state_dict, save_fsdp_adapter

dist.init_process_group("gloo")
rank = dist.get_rank()
model_dir, out = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)  # same base + LoRA init on both ranks
model = get_peft_model(
    AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
)
wrapped = FSDP(
    model,
    device_id=torch.device("cpu"),
    use_orig_params=True,
    auto_wrap_policy=partial(transformer_auto_wrap_policy, transformer_layer_cls={Qwen2DecoderLayer}),
)
# what deploy/accelerate/fsdp.yaml configures (fsdp_state_dict_type) for the Trainer's checkpoints
FSDP.set_state_dict_type(wrapped, StateDictType.SHARDED_STATE_DICT)
optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
torch.manual_seed(100 + rank)  # each rank its own data
batch = torch.randint(3, 500, (2, 40))
for _ in range(2):
    wrapped(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
local = {n: p.numel() for n, p in model.named_parameters() if "lora_" in n}
with FSDP.summon_full_params(wrapped):  # the reference: every shard gathered, whole parameters
    expected = {
        n.replace(".default", "").replace("_fsdp_wrapped_module.", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if "lora_" in n
    }
state = fsdp_full_state_dict(wrapped, offload_to_cpu=False)
if rank == 0:
    save_file(expected, str(out / "expected.safetensors"))
    save_fsdp_adapter(model, state, out / "gathered")
# the defect: each rank saves the model as it stands (its configured, sharded state dict)
try:
    model.save_pretrained(str(out / f"naive-rank{rank}"))
except Exception as error:  # noqa: BLE001 - recorded for the test
    (out / f"naive_error-rank{rank}.txt").write_text(repr(error))
if rank == 0:
    full = {n: t.numel() for n, t in expected.items()}
    (out / "sizes.json").write_text(json.dumps({"local": local, "full": full}))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_sharded_adapter_is_saved_whole(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(_WORKER)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(worker), str(tiny_model_dir), str(tmp_path),
    ]  # fmt: skip
    completed = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, start_new_session=True
    )
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-4000:]

    sizes = json.loads((tmp_path / "sizes.json").read_text())
    # the parameters really were sharded: rank 0 held only part of the adapter
    assert sum(sizes["local"].values()) < sum(sizes["full"].values())
    expected = load_file(str(tmp_path / "expected.safetensors"))
    saved = load_file(str(tmp_path / "gathered" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(expected) and len(saved) > 0
    for name, tensor in expected.items():
        assert saved[name].shape == tensor.shape, name
        assert bool((saved[name] == tensor).all()), name
    # it loads as a peft adapter onto the plain base model, with the trained weights
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "gathered"
    )
    loaded_lora = {n.replace(".default", ""): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert sorted(loaded_lora) == sorted(expected)
    assert all(bool((loaded_lora[n] == t).all()) for n, t in expected.items())
    # trained, not the initial zeros of lora_B
    assert any(float(t.abs().sum()) > 0 for n, t in saved.items() if "lora_B" in n)
    # the planted defect: saving the sharded model as it stands writes fragments (or fails)
    naive = tmp_path / "naive-rank0" / "adapter_model.safetensors"
    if naive.exists():
        fragments = load_file(str(naive))
        assert any(fragments.get(n) is None or fragments[n].shape != t.shape for n, t in expected.items())
    else:
        assert (tmp_path / "naive_error-rank0.txt").exists()


def test_save_adapter_gathers_only_under_fsdp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Which save path each distributed type takes (the FSDP path itself runs in the test above)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from llmft_assets.training import trainer as trainer_module

    calls: list[tuple[str, Any]] = []

    class Model:
        def save_pretrained(self, path: str) -> None:
            calls.append(("save_pretrained", path))

    monkeypatch.setattr(
        trainer_module, "save_fsdp_adapter", lambda model, state, path: calls.append(("fsdp", state))
    )

    def gather(model: Any, offload_to_cpu: bool) -> dict[str, bool]:
        calls.append(("gather", offload_to_cpu))  # the collective: every rank takes part
        return {"offload": offload_to_cpu}

    monkeypatch.setattr(trainer_module, "fsdp_full_state_dict", gather)

    def fake_trainer(kind: DistributedType, fsdp2: bool = False) -> Any:
        accelerator = SimpleNamespace(
            distributed_type=kind,
            is_fsdp2=fsdp2,
            unwrap_model=lambda model: model,
            get_state_dict=lambda model: {"fsdp2": True},
        )
        return SimpleNamespace(accelerator=accelerator, model=Model())

    trainer_module.save_adapter(
        fake_trainer(DistributedType.FSDP), tmp_path, is_main=True, device_type="cuda"
    )
    trainer_module.save_adapter(
        fake_trainer(DistributedType.FSDP), tmp_path, is_main=False, device_type="cpu"
    )
    trainer_module.save_adapter(
        fake_trainer(DistributedType.FSDP, True), tmp_path, is_main=True, device_type="cuda"
    )
    trainer_module.save_adapter(
        fake_trainer(DistributedType.MULTI_GPU), tmp_path, is_main=True, device_type="cpu"
    )
    trainer_module.save_adapter(
        fake_trainer(DistributedType.MULTI_GPU), tmp_path, is_main=False, device_type="cpu"
    )
    assert calls == [
        ("gather", True),  # GPU shards are gathered into host memory ...
        ("fsdp", {"offload": True}),  # ... and rank 0 writes
        ("gather", False),  # rank 1 (CPU shards) gathers too and writes nothing
        ("fsdp", {"fsdp2": True}),  # FSDP2 through accelerate's gather
        ("save_pretrained", str(tmp_path)),  # DDP: the whole model on rank 0, no gather; rank 1 nothing
    ]
