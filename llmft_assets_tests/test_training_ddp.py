"""The training CLI under `accelerate launch` with two CPU processes (DDP over gloo) trains one adapter.

Note: on a machine without GPUs, accelerate 1.15's `--cpu --num_processes 2` starts ONE process (its
simple launcher expects mpirun for multi-CPU); `--multi_gpu --num_processes 2` starts two through
torchrun, and the trainer (use_cpu) then picks DDP over gloo. That is the command tested here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmft_assets.training.config import TrainingConfig
from llmft_assets_tests.test_training_support import tiny_model_dir_fixture, tiny_splits_fixture  # noqa: F401 - fixtures

REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
def test_two_process_ddp_trains_one_adapter(
    tiny_model_dir: Path, tiny_splits: dict[str, Path], tmp_path: Path
) -> None:
    config = TrainingConfig(
        lora_r=4,
        lora_alpha=8,
        max_seq_len=256,
        max_tokens_per_batch=384,
        max_steps=4,
        save_steps=2,
        logging_steps=1,
    ).to_json_file(tmp_path / "config.json")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "llmft_assets.training.cli",
        "--base-model",
        str(tiny_model_dir),
        "--train",
        str(tiny_splits["train"]),
        "--output",
        str(out),
        "--config",
        str(config),
        "--sample-trace",
        str(out / "trace.jsonl"),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "CUDA_VISIBLE_DEVICES": "",  # CPU DDP even where a GPU exists
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    completed = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, start_new_session=True
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]

    result = json.loads((out / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 4
    assert "[rank 0/2] done: world size 2" in output and "[rank 1/2] done: world size 2" in output
    # one adapter, written by rank 0 only
    assert sorted(
        path.name for path in out.glob("**/adapter_model.safetensors") if "checkpoint" not in str(path)
    ) == ["adapter_model.safetensors"]
    assert "[rank 0/2] trained" in output and "[rank 1/2] trained" not in output
    # both ranks trained: each step, each rank saw different rows
    traces = [
        {
            json.loads(line)["step"]: json.loads(line)["ids"]
            for line in (out / f"trace.rank{rank}.jsonl").read_text().splitlines()
        }
        for rank in (0, 1)
    ]
    assert sorted(traces[0]) == sorted(traces[1]) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert traces[0][step] and traces[1][step]
        assert not set(traces[0][step]) & set(traces[1][step])
