"""Kill training with SIGKILL after its 2nd checkpoint, run it again, and prove an exact resume.

Three runs of `python -m llmft_assets.training.cli` on the tiny model: an uninterrupted reference,
one killed (whole process group) once the 2nd checkpoint is published, and its rerun. The rerun must
report `resumed_from_step` = the newest published checkpoint, replay the same rows per step (traced
in JSONL), and end with the same adapter weights as the reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmft_assets.training.checkpoints import LocalCheckpointStore, checkpoint_step
from llmft_assets.training.config import TrainingConfig
from llmft_assets_tests.test_training_support import tiny_model_dir_fixture, tiny_splits_fixture  # noqa: F401 - fixtures

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 8
SAVE_STEPS = 2


def _cli_command(model: Path, splits: dict[str, Path], out: Path, config: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llmft_assets.training.cli",
        "--base-model",
        str(model),
        "--train",
        str(splits["train"]),
        "--output",
        str(out),
        "--config",
        str(config),
        "--checkpoint-dir",
        str(out / "store"),
        "--sample-trace",
        str(out / "trace.jsonl"),
    ]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _run(command: list[str], log: Path) -> None:
    with open(log, "w") as handle:
        completed = subprocess.run(
            command, cwd=REPO_ROOT, env=_env(), stdout=handle, stderr=subprocess.STDOUT, timeout=300
        )
    assert completed.returncode == 0, log.read_text()[-4000:]


def _trace(path: Path) -> dict[int, list[str]]:
    steps: dict[int, list[str]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record["ids"]  # a step replayed after resume overwrites the killed one
    return steps


def _adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_exactly(
    tiny_model_dir: Path, tiny_splits: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    config = TrainingConfig(
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.1,  # dropout draws from the RNG: the RNG state must be restored too
        max_seq_len=256,
        max_tokens_per_batch=384,
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        logging_steps=1,
        learning_rate=1e-3,
    ).to_json_file(tmp_path / "config.json")

    reference = tmp_path / "reference"
    _run(_cli_command(tiny_model_dir, tiny_splits, reference, config), tmp_path / "reference.log")

    interrupted = tmp_path / "interrupted"
    store = LocalCheckpointStore(interrupted / "store")
    with open(tmp_path / "killed.log", "w") as handle:
        process = subprocess.Popen(
            _cli_command(tiny_model_dir, tiny_splits, interrupted, config),
            cwd=REPO_ROOT,
            env=_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so the kill reaches only what we started
        )
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and process.poll() is None:
                latest = store.latest()
                if latest is not None and checkpoint_step(latest) >= 2 * SAVE_STEPS:
                    break
                time.sleep(0.05)
            assert process.poll() is None, "training finished before it could be killed"
            os.killpg(process.pid, signal.SIGKILL)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (interrupted / "adapter").exists()
    killed_at = checkpoint_step(store.latest())
    assert killed_at >= 2 * SAVE_STEPS and killed_at < MAX_STEPS

    _run(_cli_command(tiny_model_dir, tiny_splits, interrupted, config), tmp_path / "resumed.log")
    result = json.loads((interrupted / "train_result.json").read_text())
    assert result["resumed_from_step"] == killed_at
    assert result["global_step"] == MAX_STEPS

    # same rows in every step as the uninterrupted run, before and after the kill
    reference_trace = _trace(reference / "trace.jsonl")
    assert sorted(reference_trace) == list(range(1, MAX_STEPS + 1))
    assert _trace(interrupted / "trace.jsonl") == reference_trace

    # and the same final adapter
    expected = _adapter_tensors(reference / "adapter")
    actual = _adapter_tensors(interrupted / "adapter")
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    reference_loss = json.loads((reference / "train_result.json").read_text())["loss_history"]
    assert result["loss_history"][-1][1] == pytest.approx(reference_loss[-1][1], rel=1e-5)
