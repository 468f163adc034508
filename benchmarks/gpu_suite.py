"""The GPU benchmark suite: one command, JSON lines out, last line a summary (see gpu_suite.sh).

Measured on random-initialised models of Qwen2.5-0.5B and Qwen2.5-7B shape (built from `Qwen2Config`, no
download), each comparison run side by side in the same run:

- train:  LoRA real tokens/s, peak memory and MFU, ours vs HF Trainer + PEFT (pad-to-longest) vs TRL
          `SFTTrainer` (padding-free), same rows (benchmarks/train_throughput.py); on the 7B shape also
          QLoRA (4-bit NF4) peak memory.
- serve:  generated tokens/s for 64 concurrent requests (fixed 128-token answers): vLLM's engine vs one
          batched HF `generate` call over the same 64 prompts.
- eval:   eval generation rows/s (base + adapter passes, greedy): the transformers path of
          `llmft_assets.evaluation.generate` vs the vLLM path of `llmft_assets.evaluation.vllm_generate`.

vLLM lives in the model server's own environment (bentos/requirements-gpu.txt), not in the training venv:
its half of `serve` and `eval` runs in a worker under LLMFT_VLLM_PYTHON (default .venv-serve/bin/python
when it exists). Where vLLM or a GPU is missing, that half is a JSON line saying why, never a silent gap.

    benchmarks/gpu_suite.sh             # CUDA machine, under 9 minutes on one H200
    benchmarks/gpu_suite.sh --dry-run   # the same code on CPU with tiny shapes (CI)

Only the standard library at import: the vLLM worker runs this file in the serving environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
ENV_VLLM_PYTHON = "LLMFT_VLLM_PYTHON"
DEFAULT_VLLM_PYTHON = REPO_ROOT / ".venv-serve" / "bin" / "python"

# Sizes per mode. The GPU sizes fit the 9-minute budget on one H200 (about 140 GB).
TRAIN_RUNS = {
    "gpu": [
        {"model_size": "0.5b", "rows": 256, "max_len": 2048, "median_len": 400, "batch_size": 8,
         "max_tokens_per_batch": 8192, "paths": "ours,baseline,trl", "extra": []},
        {"model_size": "7b", "rows": 64, "max_len": 2048, "median_len": 400, "batch_size": 4,
         "max_tokens_per_batch": 4096, "paths": "ours,baseline,trl,qlora", "extra": ["--gradient-checkpointing"]},
    ],
    "dry": [
        {"model_size": "tiny", "rows": 12, "max_len": 192, "median_len": 64, "batch_size": 4,
         "max_tokens_per_batch": 384, "paths": "ours,baseline,trl", "extra": []},
    ],
}  # fmt: skip
SERVE = {
    "gpu": {"requests": 64, "prompt_len": 128, "new_tokens": 128},
    "dry": {"requests": 8, "prompt_len": 16, "new_tokens": 8},
}
EVAL = {
    "gpu": {"rows": 64, "new_tokens": 256, "batch_size": 16},
    "dry": {"rows": 4, "new_tokens": 8, "batch_size": 4},
}
# Sizes above are estimates (never run on a GPU yet): each section records its wall time, and a section that
# would start after this many seconds is skipped with a JSON line instead of overrunning the 9 minutes.
BUDGET_S = {"gpu": 480.0, "dry": 600.0}
GOALS = {"train_speedup_vs_hf_7b": 2.0, "lora_mfu_7b": 0.40, "serve_vllm_speedup": 10.0}


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU; vLLM parts skipped")
    parser.add_argument("--sections", default="train,serve,eval", help="comma-separated subset")
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and data here")
    parser.add_argument("--worker", choices=["vllm-serve", "vllm-eval"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false"}


# ---- train ----------------------------------------------------------------------------------------


def _over_budget(mode: str, started: float, section: str, what: str) -> bool:
    elapsed = time.perf_counter() - started
    if elapsed < BUDGET_S[mode]:
        return False
    emit(
        {
            "section": section,
            "what": what,
            "skipped": f"time budget: {elapsed:.0f} s of {BUDGET_S[mode]:.0f} s used",
        }
    )
    return True


def _free_gpu_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_train(mode: str, workdir: Path, started: float) -> dict[str, Any]:
    summaries: dict[str, Any] = {}
    for run in TRAIN_RUNS[mode]:
        size = run["model_size"]
        if _over_budget(mode, started, "train", size):
            summaries[size] = {"skipped": "time budget"}
            continue
        run_started = time.perf_counter()
        command = [
            sys.executable, str(REPO_ROOT / "benchmarks" / "train_throughput.py"),
            "--model-size", size, "--rows", str(run["rows"]), "--max-len", str(run["max_len"]),
            "--median-len", str(run["median_len"]), "--batch-size", str(run["batch_size"]),
            "--max-tokens-per-batch", str(run["max_tokens_per_batch"]), "--paths", run["paths"],
            "--workdir", str(workdir / f"train-{size}"), *run["extra"],
        ]  # fmt: skip
        if mode == "dry":
            command += ["--threads", "1"]
        completed = subprocess.run(command, capture_output=True, text=True, env=_python_env(), timeout=3600)
        lines = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
        for line in lines:
            emit({"section": "train", "model_size": size, **line})
        if completed.returncode not in (0, 1) or not lines or "benchmark" not in lines[-1]:
            emit({"section": "train", "model_size": size, "error": completed.stderr[-2000:]})
            summaries[size] = {"error": f"exit {completed.returncode}"}
            continue
        summaries[size] = {**lines[-1], "wall_s": time.perf_counter() - run_started}
    return summaries


# ---- serve ----------------------------------------------------------------------------------------


def _prompts(spec: dict[str, Any], vocab_size: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [
        [rng.randrange(3, vocab_size) for _ in range(spec["prompt_len"])] for _ in range(spec["requests"])
    ]


def hf_serve(model_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """One batched `generate` over every concurrent request (fixed-length answers: no early stop)."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.bfloat16 if cuda else torch.float32
    ).to("cuda" if cuda else "cpu")
    model.eval()
    prompts = torch.tensor(_prompts(spec, model.config.vocab_size), device=model.device)
    with torch.inference_mode():
        model.generate(prompts[:1], max_new_tokens=2, do_sample=False)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        output = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=spec["new_tokens"],
            min_new_tokens=spec["new_tokens"],
            do_sample=False,
            pad_token_id=0,
        )
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    generated = int((output.shape[1] - prompts.shape[1]) * prompts.shape[0])
    return {"engine": "hf_generate", "generated_tokens": generated, "seconds": elapsed,
            "tokens_per_s": generated / elapsed, "requests_per_s": spec["requests"] / elapsed}  # fmt: skip


def vllm_serve_worker(model_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    llm = LLM(
        model=str(model_dir),
        skip_tokenizer_init=True,
        dtype="bfloat16",
        gpu_memory_utilization=0.5,
        max_model_len=spec["prompt_len"] + spec["new_tokens"] + 8,
        max_num_seqs=spec["requests"],
        seed=0,
    )
    params = SamplingParams(
        temperature=0.0,
        max_tokens=spec["new_tokens"],
        min_tokens=spec["new_tokens"],
        ignore_eos=True,
        detokenize=False,
    )
    requests = [{"prompt_token_ids": ids} for ids in _prompts(spec, vocab)]
    llm.generate(requests[:1], SamplingParams(max_tokens=2, detokenize=False), use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    return {"engine": "vllm", "generated_tokens": generated, "seconds": elapsed,
            "tokens_per_s": generated / elapsed, "requests_per_s": spec["requests"] / elapsed}  # fmt: skip


def _vllm_python(mode: str) -> tuple[str | None, str | None]:
    """(python with vLLM, None) or (None, why not)."""
    if mode == "dry":
        return None, "dry run: vLLM needs a CUDA device; skipped"
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA device: vLLM skipped"
    configured = os.environ.get(ENV_VLLM_PYTHON) or (
        str(DEFAULT_VLLM_PYTHON) if DEFAULT_VLLM_PYTHON.exists() else ""
    )
    candidates = [configured] if configured else [sys.executable]
    for python in candidates:
        probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
        if probe.returncode == 0:
            return python, None
    return None, (
        f"vLLM is not importable (tried {candidates}); install bentos/requirements-gpu.txt into its own "
        f"environment and set {ENV_VLLM_PYTHON}"
    )


def _run_vllm_worker(
    python: str, worker: str, model_dir: Path, spec: dict[str, Any], adapter: Path | None
) -> dict:
    command = [python, str(Path(__file__).resolve()), "--worker", worker, "--model-dir", str(model_dir),
               "--spec", json.dumps(spec)]  # fmt: skip
    if adapter is not None:
        command += ["--adapter-dir", str(adapter)]
    completed = subprocess.run(command, capture_output=True, text=True, env=_python_env(), timeout=900)
    if completed.returncode != 0:
        return {"error": completed.stderr[-2000:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_serve(mode: str, model_dir: Path) -> dict[str, Any]:
    spec = SERVE[mode]
    hf = hf_serve(model_dir, spec)
    _free_gpu_cache()
    emit({"section": "serve", "concurrency": spec["requests"], **hf})
    python, why = _vllm_python(mode)
    if python is None:
        emit({"section": "serve", "engine": "vllm", "skipped": why})
        return {
            "hf_tokens_per_s": hf["tokens_per_s"],
            "vllm_tokens_per_s": None,
            "speedup": None,
            "vllm": why,
        }
    vllm = _run_vllm_worker(python, "vllm-serve", model_dir, spec, None)
    emit({"section": "serve", "concurrency": spec["requests"], **vllm})
    speedup = vllm["tokens_per_s"] / hf["tokens_per_s"] if "tokens_per_s" in vllm else None
    return {
        "hf_tokens_per_s": hf["tokens_per_s"],
        "vllm_tokens_per_s": vllm.get("tokens_per_s"),
        "speedup": speedup,
    }


# ---- eval -----------------------------------------------------------------------------------------


def prepare_eval_model(model_dir: Path, workdir: Path) -> tuple[Path, Path]:
    """The shape model with the tiny chat tokenizer (its ids fit any Qwen vocabulary) and a random LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmft_assets.modeling.tiny_model import build_tiny_model

    tokenizer_dir = build_tiny_model(workdir / "tokenizer-model", pretrain_steps=0)
    eval_dir = workdir / "eval-model"
    if not eval_dir.exists():
        shutil.copytree(model_dir, eval_dir)
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
        ):
            if (tokenizer_dir / name).exists():
                shutil.copy2(tokenizer_dir / name, eval_dir / name)
    adapter_dir = workdir / "eval-adapter"
    if not adapter_dir.exists():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(eval_dir))
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(str(adapter_dir))
    return eval_dir, adapter_dir


def _eval_conversations(rows: int) -> list[list[dict[str, str]]]:
    from llmft_assets.data.sample_gen import generate_rows

    return [
        [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        for row in generate_rows(rows, schema="v1", seed=3)
    ]


def hf_eval(model_dir: Path, adapter_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from llmft_assets.evaluation import generate

    conversations = _eval_conversations(spec["rows"])
    tokenizer = generate.load_tokenizer(model_dir)
    model = generate.load_base_model(model_dir)
    started = time.perf_counter()
    kwargs = {"max_new_tokens": spec["new_tokens"], "batch_size": spec["batch_size"], "seed": 0}
    base = generate.generate_with_model(model, tokenizer, conversations, **kwargs)
    model = generate.attach_adapter(model, adapter_dir, adapter_name="adapter")
    tuned = generate.generate_with_model(model, tokenizer, conversations, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    rows = len(base) + len(tuned)
    return {"engine": "transformers", "rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed,
            "generated_tokens": sum(g.num_tokens for g in [*base, *tuned])}  # fmt: skip


def vllm_eval_worker(model_dir: Path, adapter_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    from llmft_assets.evaluation import generate, vllm_generate

    conversations = _eval_conversations(spec["rows"])
    tokenizer = generate.load_tokenizer(model_dir)
    started = time.perf_counter()
    outputs = vllm_generate.generate_all_with_vllm(
        model_dir, {"adapter": adapter_dir}, conversations, base_name="base", tokenizer=tokenizer,
        stop_ids=generate.end_token_ids(tokenizer), max_new_tokens=spec["new_tokens"], seed=0,
    )  # fmt: skip
    elapsed = time.perf_counter() - started  # engine start included: the eval pays it too
    rows = sum(len(generations) for generations in outputs.values())
    return {"engine": "vllm", "rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed,
            "generated_tokens": sum(g.num_tokens for gs in outputs.values() for g in gs)}  # fmt: skip


def run_eval(mode: str, model_dir: Path, workdir: Path) -> dict[str, Any]:
    spec = EVAL[mode]
    eval_dir, adapter_dir = prepare_eval_model(model_dir, workdir)
    hf = hf_eval(eval_dir, adapter_dir, spec)
    _free_gpu_cache()
    emit({"section": "eval", **hf})
    python, why = _vllm_python(mode)
    if python is None:
        emit({"section": "eval", "engine": "vllm", "skipped": why})
        return {"hf_rows_per_s": hf["rows_per_s"], "vllm_rows_per_s": None, "speedup": None, "vllm": why}
    vllm = _run_vllm_worker(python, "vllm-eval", eval_dir, spec, adapter_dir)
    emit({"section": "eval", **vllm})
    speedup = vllm["rows_per_s"] / hf["rows_per_s"] if "rows_per_s" in vllm else None
    return {"hf_rows_per_s": hf["rows_per_s"], "vllm_rows_per_s": vllm.get("rows_per_s"), "speedup": speedup}


# ---- driver ---------------------------------------------------------------------------------------


def _goals(summary: dict[str, Any]) -> dict[str, Any]:
    big = summary.get("train", {}).get("7b", {})
    serve = summary.get("serve", {})
    checks = {
        "train_speedup_vs_hf_7b": big.get("speedup"),
        "lora_mfu_7b": big.get("ours_mfu"),
        "serve_vllm_speedup": serve.get("speedup"),
    }
    return {
        name: {"value": value, "goal": GOALS[name], "met": None if value is None else value >= GOALS[name]}
        for name, value in checks.items()
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "vllm-serve":
        print(json.dumps(vllm_serve_worker(args.model_dir, json.loads(args.spec))), flush=True)
        return 0
    if args.worker == "vllm-eval":
        print(
            json.dumps(vllm_eval_worker(args.model_dir, args.adapter_dir, json.loads(args.spec))), flush=True
        )
        return 0

    mode = "dry" if args.dry_run else "gpu"
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    started = time.perf_counter()
    import torch

    if mode == "gpu" and not torch.cuda.is_available():
        emit({"benchmark": "gpu_suite", "error": "no CUDA device; use --dry-run for the CPU rehearsal"})
        return 2
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and mode == "gpu" else "cpu"
    emit({"setup": {"mode": mode, "device": device, "sections": sections, "torch": torch.__version__}})
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="llmft-gpu-suite-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        small = "tiny" if mode == "dry" else "0.5b"
        if "train" in sections:
            summary["train"] = run_train(mode, workdir, started)
        model_dir = workdir / f"train-{small}" / "model"
        if ("serve" in sections or "eval" in sections) and not (model_dir / "config.json").exists():
            from benchmarks.train_throughput import build_model_dir

            build_model_dir(model_dir, small, seed=0)
        if "serve" in sections and not _over_budget(mode, started, "serve", "all"):
            section_started = time.perf_counter()
            summary["serve"] = {**run_serve(mode, model_dir), "wall_s": time.perf_counter() - section_started}
        if "eval" in sections and not _over_budget(mode, started, "eval", "all"):
            section_started = time.perf_counter()
            summary["eval"] = {
                **run_eval(mode, model_dir, workdir),
                "wall_s": time.perf_counter() - section_started,
            }
    summary = {
        "benchmark": "gpu_suite",
        "mode": mode,
        "device": device,
        **summary,
        "goals": _goals(summary),
        "wall_s": time.perf_counter() - started,
    }
    emit(summary)
    failed = [size for size, result in summary.get("train", {}).items() if "error" in result]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
