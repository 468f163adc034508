"""`benchmarks/gpu_suite.sh --dry-run`: the GPU suite's own code on CPU with tiny shapes, in CI.

It must print JSON lines only, run every section (train: ours / HF Trainer + PEFT / TRL padding-free on the
same tokens; serve and eval: the HF half measured, the vLLM half a line saying why it was skipped), and end
with a summary that carries the goals (unmeasured on CPU: value None, never a made-up pass).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path: Path) -> None:
    import sys

    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "LLMFT_HOME": str(tmp_path / "home"),
        "LLMFT_SUITE_TIMEOUT": "600",
    }
    completed = subprocess.run(
        [str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--workdir", str(tmp_path / "work")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=660,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = [json.loads(line) for line in completed.stdout.splitlines()]  # every stdout line is JSON
    assert lines[0]["setup"]["mode"] == "dry"
    summary = lines[-1]
    assert summary["benchmark"] == "gpu_suite" and summary["mode"] == "dry" and summary["device"] == "cpu"

    runs = [line for line in lines if line.get("section") == "train" and "path" in line]
    assert sorted(run["path"] for run in runs) == ["baseline", "ours", "trl"]
    assert len({run["real_tokens"] for run in runs}) == 1  # same data, same tokens
    train = summary["train"]["tiny"]
    assert train["speedup"] > 0 and train["speedup_vs_trl"] > 0
    assert train["ours_mfu"] is None  # no MFU without a GPU's peak FLOP/s

    for section, rate in (("serve", "tokens_per_s"), ("eval", "rows_per_s")):
        measured = [line for line in lines if line.get("section") == section and rate in line]
        assert [line["engine"] for line in measured] == (
            ["hf_generate"] if section == "serve" else ["transformers"]
        )
        assert measured[0][rate] > 0
        [skipped] = [line for line in lines if line.get("section") == section and "skipped" in line]
        assert skipped["engine"] == "vllm" and "vLLM needs a CUDA device" in skipped["skipped"]
        assert summary[section]["speedup"] is None
    assert summary["eval"]["hf_rows_per_s"] > 0

    goals = summary["goals"]
    assert set(goals) == {"train_speedup_vs_hf_7b", "lora_mfu_7b", "serve_vllm_speedup"}
    assert all(goal["value"] is None and goal["met"] is None for goal in goals.values())
