"""train_lora end to end on the tiny model: adapter, result, logs, callbacks, checkpoints, resume, QLoRA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmft_assets.training.bom import BOM_FILENAME, bill_of_materials, detect_code_version
from llmft_assets.training.checkpoints import LocalCheckpointStore, checkpoint_step
from llmft_assets.training.config import TrainingConfig
from llmft_assets.training.trainer import TrainResult, train_lora
from llmft_assets_tests.test_training_support import (  # noqa: F401 - fixtures
    tiny_model_dir_fixture,
    tiny_splits_fixture,
    write_tokenized_split,
)

FAST = {
    "lora_r": 4,
    "lora_alpha": 8,
    "max_seq_len": 256,
    "max_tokens_per_batch": 512,
    "logging_steps": 1,
    "learning_rate": 1e-3,
    "warmup_ratio": 0.0,
}


def _lora_b_abs_sum(adapter_dir: Path) -> float:
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    b_weights = [tensor for name, tensor in tensors.items() if "lora_B" in name]
    assert b_weights, f"no lora_B tensors in {sorted(tensors)[:5]}"
    return float(sum(tensor.abs().sum() for tensor in b_weights))


def test_train_lora_writes_adapter_result_logs_and_checkpoints(
    tiny_model_dir: Path, tiny_splits: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import TrainerCallback

    class RecordingCallback(TrainerCallback):
        def __init__(self) -> None:
            self.logged: list[dict[str, Any]] = []

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
            self.logged.append(dict(logs or {}))

    recorder = RecordingCallback()
    lines: list[str] = []
    config = TrainingConfig(**FAST, max_steps=6, save_steps=3, eval_steps=3)
    result = train_lora(
        base_model_dir=tiny_model_dir,
        train_path=tiny_splits["train"],
        eval_path=tiny_splits["validation"],
        output_dir=tmp_path / "run",
        config=config,
        callbacks=[recorder],
        log=lines.append,
    )

    assert isinstance(result, TrainResult)
    assert result.global_step == 6 and result.resumed_from_step is None
    assert result.world_size == 1 and result.device == "cpu" and result.precision == "fp32"
    assert result.eval_loss is not None and 0 < result.eval_loss < 20
    assert [step for step, _ in result.loss_history] == [1, 2, 3, 4, 5, 6]
    assert all(loss > 0 for _, loss in result.loss_history)
    assert result.tokens_per_second > 0 and result.train_runtime_s > 0
    assert 0 < result.num_trainable_params < result.num_total_params
    assert result.num_train_tokens > 0

    adapter = Path(result.adapter_dir)
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "tokenizer_config.json").is_file()  # tokenizer copy
    assert _lora_b_abs_sum(adapter) > 0  # LoRA B starts at zero: non-zero means it trained
    saved = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert TrainResult.from_dict(saved) == TrainResult.from_dict(result.to_dict())

    # progress went through `log` and the caller's callback saw loss, lr, grad_norm
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == 6 and all("tokens/s" in line and "grad_norm" in line for line in step_lines)
    assert any({"loss", "learning_rate", "grad_norm"} <= set(entry) for entry in recorder.logged)
    assert any("eval_loss" in entry for entry in recorder.logged)

    # every save_steps the checkpoint was published to the (default) store
    latest = LocalCheckpointStore(tmp_path / "run" / "checkpoints").latest()
    assert latest is not None and checkpoint_step(latest) == 6
    assert any("published" in line and "checkpoint-3" in line for line in lines)

    # a second call with a higher step budget resumes from the store instead of starting over
    more = train_lora(
        base_model_dir=tiny_model_dir,
        train_path=tiny_splits["train"],
        eval_path=None,
        output_dir=tmp_path / "run",
        config=config.model_copy(update={"max_steps": 8}),
        log=lines.append,
    )
    assert more.resumed_from_step == 6 and more.global_step == 8
    assert any("resuming from step 6" in line for line in lines)


def test_pad_to_longest_path_trains(
    tiny_model_dir: Path, tiny_splits: dict[str, Path], tmp_path: Path
) -> None:
    config = TrainingConfig(
        **{**FAST, "max_tokens_per_batch": 1024}, packing=False, max_steps=2, save_steps=10
    )
    result = train_lora(
        base_model_dir=tiny_model_dir,
        train_path=tiny_splits["train"],
        eval_path=None,
        output_dir=tmp_path / "padded",
        config=config,
        log=lambda _: None,
    )
    assert result.global_step == 2 and result.train_loss > 0
    assert _lora_b_abs_sum(Path(result.adapter_dir)) > 0


def test_qlora_smoke_on_cpu(tiny_model_dir: Path, tiny_splits: dict[str, Path], tmp_path: Path) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # bitsandbytes raises various errors when its native library is missing
        pytest.skip(f"bitsandbytes does not import here: {error}")
    config = TrainingConfig(**FAST, qlora=True, max_steps=2, save_steps=10)
    result = train_lora(
        base_model_dir=tiny_model_dir,
        train_path=tiny_splits["train"],
        eval_path=None,
        output_dir=tmp_path / "qlora",
        config=config,
        log=lambda _: None,
    )
    assert result.global_step == 2 and result.train_loss > 0
    adapter_config = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert _lora_b_abs_sum(Path(result.adapter_dir)) > 0


def test_bad_inputs_fail_clearly(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = TrainingConfig(**FAST, max_steps=1)
    empty = write_tokenized_split(tmp_path / "empty.parquet", 0)
    with pytest.raises(ValueError, match="no usable rows"):
        train_lora(
            base_model_dir=tiny_model_dir,
            train_path=empty,
            eval_path=None,
            output_dir=tmp_path / "out",
            config=config,
        )
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        train_lora(
            base_model_dir=tmp_path / "nowhere",
            train_path=empty,
            eval_path=None,
            output_dir=tmp_path / "out",
            config=config,
        )


def test_bill_of_materials(tmp_path: Path) -> None:
    config = TrainingConfig(lora_r=8, qlora=False, seed=7)
    bom = bill_of_materials(
        base_model_info={
            "id": "Qwen/Qwen2.5-7B-Instruct",
            "revision": "abc123",
            "chat_template_sha256": "f00",
        },
        dataset_version="v-123",
        dataset={"source": "ServiceNow-AI/R1-Distill-SFT", "config": "v1", "license": "cc-by-nc-sa-4.0",
                 "license_source": "per-source table (ServiceNow-AI/R1-Distill-SFT)"},
        config=config,
        seed=7,
    )  # fmt: skip
    assert bom["base_model"]["revision"] == "abc123"
    assert bom["dataset"] == {
        "asset": "dataset_splits",
        "version": "v-123",
        "source": "ServiceNow-AI/R1-Distill-SFT",
        "config": "v1",
        "license": "cc-by-nc-sa-4.0",
        "license_source": "per-source table (ServiceNow-AI/R1-Distill-SFT)",
    }
    assert bom["training_config"]["lora_r"] == 8 and bom["method"] == "lora" and bom["seed"] == 7
    assert bom["libraries"]["torch"] and bom["libraries"]["transformers"] and bom["libraries"]["peft"]
    assert bom["code_version"].startswith(("git:", "llmft=="))
    json.dumps(bom)  # JSON-able
    assert BOM_FILENAME == "bill_of_materials.json"
    assert detect_code_version(tmp_path).startswith("llmft==")  # not a git checkout
    explicit = bill_of_materials(
        base_model_info={"id": "m"},
        dataset_version="v",
        dataset=None,
        config=config,
        seed=1,
        code_version="git:deadbeef",
    )
    assert explicit["code_version"] == "git:deadbeef"
    # Nothing recorded: unknown, never a guessed licence.
    assert explicit["dataset"]["license"] == "unknown" and explicit["base_model"]["license"] == "unknown"
    with pytest.raises(ValueError, match="dataset_version"):
        bill_of_materials(
            base_model_info={"id": "m"}, dataset_version="", dataset=None, config=config, seed=1
        )
