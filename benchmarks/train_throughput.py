"""Training throughput: our path (padding-free token-budget batches) vs plain HF Trainer + PEFT
(pad-to-longest) vs TRL `SFTTrainer` with padding-free batches (the peer a user would pick).

All paths train the same randomly initialised Qwen2 model, with the same LoRA config, seed and rows
(R1-like log-normal lengths), for one epoch, each in its own worker process of this process tree (so
peak memory is per path). Prints one JSON line per run and, last, a summary JSON object with a
top-level `speedup` = ours / HF baseline real (non-pad) tokens per second and `speedup_vs_trl`.

    python benchmarks/train_throughput.py                      # tiny model, CPU
    python benchmarks/train_throughput.py --model-size 0.5b    # Qwen2.5-0.5B shape (on CUDA: MFU too)
    python benchmarks/train_throughput.py --model-size 7b --paths ours,qlora   # QLoRA peak memory

Loss check: the final models are scored on the same rows (per-token mean loss over assistant tokens);
after one epoch over the same tokens they must agree within `--loss-tolerance` (relative).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# bf16 dense peak FLOP/s by GPU name fragment
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {
        "vocab_size": 2048,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "0.5b": {
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
    },
    "7b": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
    },
}
# the 0.5B shape ties its embeddings, the 7B shape does not (as the real models)
TIED_EMBEDDINGS = {"tiny": True, "0.5b": True, "7b": False}
PATHS = ("ours", "baseline", "trl", "qlora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-size", choices=sorted(MODEL_SHAPES), default="tiny")
    parser.add_argument("--rows", type=int, default=96, help="training rows (one epoch each path)")
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--median-len", type=int, default=400, help="median of the log-normal lengths")
    parser.add_argument("--sigma", type=float, default=0.9, help="log-normal sigma of the lengths")
    parser.add_argument("--batch-size", type=int, default=8, help="baseline rows per micro-batch")
    parser.add_argument(
        "--max-tokens-per-batch", type=int, default=1024, help="ours: token budget per micro-batch"
    )
    parser.add_argument(
        "--ours-packing",
        choices=["packed", "grouped"],
        default="packed",
        help="ours: padding-free flattened batches, or length-grouped pad-to-longest token-budget batches",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (same for both)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per path; best is kept")
    parser.add_argument("--loss-tolerance", type=float, default=0.02)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--paths",
        default="ours,baseline,trl",
        help="comma-separated: ours, baseline (HF Trainer + PEFT, pad-to-longest), trl (SFTTrainer "
        "padding-free), qlora (ours with 4-bit NF4 base weights)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="all paths (large shapes)")
    parser.add_argument("--worker", choices=PATHS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- setup (main process) ------------------------------------------------------------------------


def build_model_dir(out: Path, model_size: str, seed: int) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = MODEL_SHAPES[model_size]
    config = Qwen2Config(
        **shape,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=TIED_EMBEDDINGS[model_size],
        pad_token_id=0,
        use_cache=False,
    )
    torch.manual_seed(seed)
    # bf16 on disk for the large shapes (a 7B fp32 checkpoint would be 30 GB); every path loads the same
    dtype = torch.float32 if model_size == "tiny" else torch.bfloat16
    with torch.device("cuda" if torch.cuda.is_available() and model_size != "tiny" else "cpu"):
        model = Qwen2ForCausalLM(config).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    del model  # the workers need the GPU: give this process's cached blocks back
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def write_rows(path: Path, args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(args.seed)
    lengths = np.clip(
        rng.lognormal(np.log(args.median_len), args.sigma, size=args.rows), args.min_len, args.max_len
    ).astype(int)
    rows = []
    for index, length in enumerate(lengths):
        ids = rng.integers(1, vocab_size, int(length)).astype(np.int32)
        labels = ids.copy()
        labels[: max(1, int(length * 0.3))] = -100  # prompt part: no loss, like the real tokenized splits
        rows.append({"id": f"bench-{index}", "input_ids": ids.tolist(), "labels": labels.tolist()})
    schema = pa.schema(
        [("id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return {
        "rows": len(lengths),
        "tokens": int(lengths.sum()),
        "mean_len": float(lengths.mean()),
        "p50_len": float(np.median(lengths)),
        "max_len": int(lengths.max()),
    }


# ---- workers --------------------------------------------------------------------------------------


def _peak_memory_mb(device_type: str) -> float:
    import torch

    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def per_token_loss(model: Any, split: Any, rows: int) -> float:
    """Per-token mean loss over assistant tokens of the first `rows` rows (exact, packed, no cache)."""
    import torch

    from llmft_assets.training.data import IGNORE_INDEX, PackedCollator

    collator = PackedCollator()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, min(rows, len(split)), 4):
            batch = collator([split[index] for index in range(start, min(start + 4, rows, len(split)))])
            batch.pop("row_index", None)
            batch = {key: value.to(device) for key, value in batch.items()}
            n_targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss = model(**batch, use_cache=False).loss
            total += float(loss) * n_targets
            count += n_targets
    return total / max(count, 1)


def _eval_dtype(device_type: str) -> Any:
    import torch

    return torch.bfloat16 if device_type == "cuda" else torch.float32


def _lora_flops_per_token(model: Any, num_trainable: int, lengths: list[int]) -> float:
    """4 N_frozen + 6 N_lora + 12 L d T_eff, T_eff = token-weighted mean sequence length."""
    config = model.config
    num_total = sum(parameter.numel() for parameter in model.parameters())
    t_eff = sum(length * length for length in lengths) / max(sum(lengths), 1)
    return (
        4 * (num_total - num_trainable)
        + 6 * num_trainable
        + 12 * config.num_hidden_layers * config.hidden_size * t_eff
    )


def _mfu(tokens_per_s: float, flops_per_token: float) -> tuple[float | None, str | None]:
    import torch

    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name()
    peak = next((value for key, value in PEAK_FLOPS.items() if key in name), None)
    return (tokens_per_s * flops_per_token / peak if peak else None), name


def run_ours(args: argparse.Namespace, workdir: Path, qlora: bool = False) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmft_assets.training.config import TrainingConfig
    from llmft_assets.training.data import TokenizedSplit
    from llmft_assets.training.trainer import train_lora

    config = TrainingConfig(
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        learning_rate=args.learning_rate,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        num_train_epochs=1,
        max_seq_len=args.max_len,
        packing=args.ours_packing == "packed",
        max_tokens_per_batch=args.max_tokens_per_batch,
        seed=args.seed,
        save_steps=1_000_000,
        logging_steps=1_000_000,
        qlora=qlora,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    out = Path(tempfile.mkdtemp(prefix="ours-", dir=workdir))
    result = train_lora(
        base_model_dir=workdir / "model",
        train_path=workdir / "train.parquet",
        eval_path=None,
        output_dir=out,
        config=config,
        log=lambda message: print(message, file=sys.stderr),
    )
    device_type = result.device
    peak = _peak_memory_mb(device_type)
    split = TokenizedSplit(workdir / "train.parquet", args.max_len)
    base = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=_eval_dtype(device_type))
    model = PeftModel.from_pretrained(base, result.adapter_dir).to(device_type)
    flops = _lora_flops_per_token(model, result.num_trainable_params, split.lengths.tolist())
    mfu, gpu = _mfu(result.tokens_per_second, flops)
    return {
        "path": "qlora" if qlora else "ours",
        "collation": "padding-free token-budget batches (DataCollatorWithFlattening)"
        + (", 4-bit NF4 base" if qlora else ""),
        "real_tokens_per_s": result.tokens_per_second,
        "s_per_step": result.train_runtime_s / max(result.global_step, 1),
        "steps": result.global_step,
        "real_tokens": result.num_train_tokens,
        "train_runtime_s": result.train_runtime_s,
        "train_loss": result.train_loss,
        "final_loss": per_token_loss(model, split, args.eval_rows),
        "peak_memory_mb": peak,
        "memory_kind": "cuda_max_allocated" if device_type == "cuda" else "rss",
        "device": device_type,
        "gpu": gpu,
        "mfu": mfu,
    }


def run_baseline(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Plain HF Trainer + PEFT, fixed batch size, random sampler, pad-to-longest collator."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from torch.utils.data import Dataset
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        PreTrainedTokenizerFast,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from llmft_assets.training.data import TokenizedSplit

    split = TokenizedSplit(workdir / "train.parquet", args.max_len)

    class Rows(Dataset):
        def __len__(self) -> int:
            return len(split)

        def __getitem__(self, index: int) -> dict[str, list[int]]:
            item = split[index]
            return {"input_ids": item["input_ids"].tolist(), "labels": item["labels"].tolist()}

    # the random model has no tokenizer; the collator only needs the pad id (0)
    pad_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<pad>": 0}, unk_token="<pad>")), pad_token="<pad>"
    )
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(
        workdir / "model", dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation="sdpa"
    )
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    num_trainable, _ = model.get_nb_trainable_parameters()
    out = Path(tempfile.mkdtemp(prefix="baseline-", dir=workdir))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=args.batch_size,
            num_train_epochs=1,
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant",
            warmup_steps=0,
            seed=args.seed,
            bf16=bf16,
            save_strategy="no",
            logging_steps=1_000_000,
            report_to="none",
            disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
            use_cpu=device_type == "cpu",
            dataloader_pin_memory=device_type == "cuda",
            gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        ),
        train_dataset=Rows(),
        data_collator=DataCollatorForSeq2Seq(pad_tokenizer, label_pad_token_id=-100, padding="longest"),
    )
    output = trainer.train()
    runtime = float(output.metrics["train_runtime"])
    tokens = int(trainer.state.num_input_tokens_seen)
    peak = _peak_memory_mb(device_type)
    flops = _lora_flops_per_token(model, num_trainable, split.lengths.tolist())
    mfu, gpu = _mfu(tokens / runtime, flops)
    return {
        "path": "baseline",
        "collation": f"HF Trainer, batch {args.batch_size}, DataCollatorForSeq2Seq pad-to-longest",
        "real_tokens_per_s": tokens / runtime,
        "s_per_step": runtime / max(output.global_step, 1),
        "steps": int(output.global_step),
        "real_tokens": tokens,
        "train_runtime_s": runtime,
        "train_loss": float(output.training_loss),
        "final_loss": per_token_loss(model if bf16 else model.float(), split, args.eval_rows),
        "peak_memory_mb": peak,
        "memory_kind": "cuda_max_allocated" if device_type == "cuda" else "rss",
        "device": device_type,
        "gpu": gpu,
        "mfu": mfu,
    }


def run_trl(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """TRL `SFTTrainer`, padding-free batches (`padding_free=True`: each batch flattened into one row with
    restarting position ids), same rows as a pre-tokenized dataset with the same labels, same LoRA config."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, set_seed
    from trl import SFTConfig, SFTTrainer

    from llmft_assets.training.data import TokenizedSplit

    split = TokenizedSplit(workdir / "train.parquet", args.max_len)
    dataset = Dataset.from_list(
        [
            {"input_ids": split[i]["input_ids"].tolist(), "labels": split[i]["labels"].tolist()}
            for i in range(len(split))
        ]
    )
    # the random model has no tokenizer; TRL needs one for the pad / eos ids
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<pad>": 0}, unk_token="<pad>")),
        pad_token="<pad>",
        eos_token="<pad>",
    )
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(
        workdir / "model", dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation="sdpa"
    )
    model.config.use_cache = False
    out = Path(tempfile.mkdtemp(prefix="trl-", dir=workdir))
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out),
            padding_free=True,
            packing=False,
            max_length=None,  # rows are already cut to --max-len (TokenizedSplit)
            per_device_train_batch_size=args.batch_size,
            num_train_epochs=1,
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant",
            warmup_steps=0,
            seed=args.seed,
            bf16=bf16,
            gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
            save_strategy="no",
            logging_steps=1_000_000,
            report_to="none",
            disable_tqdm=True,
            include_num_input_tokens_seen="all",  # padding-free: every token is real
            use_cpu=device_type == "cpu",
            dataloader_pin_memory=device_type == "cuda",
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    num_trainable, _ = trainer.model.get_nb_trainable_parameters()
    output = trainer.train()
    runtime = float(output.metrics["train_runtime"])
    tokens = int(trainer.state.num_input_tokens_seen)
    peak = _peak_memory_mb(device_type)
    flops = _lora_flops_per_token(trainer.model, num_trainable, split.lengths.tolist())
    mfu, gpu = _mfu(tokens / runtime, flops)
    scored = trainer.model if bf16 else trainer.model.float()
    return {
        "path": "trl",
        "collation": f"TRL {_version('trl')} SFTTrainer, batch {args.batch_size}, padding_free=True",
        "real_tokens_per_s": tokens / runtime,
        "s_per_step": runtime / max(output.global_step, 1),
        "steps": int(output.global_step),
        "real_tokens": tokens,
        "train_runtime_s": runtime,
        "train_loss": float(output.training_loss),
        "final_loss": per_token_loss(scored, split, args.eval_rows),
        "peak_memory_mb": peak,
        "memory_kind": "cuda_max_allocated" if device_type == "cuda" else "rss",
        "device": device_type,
        "gpu": gpu,
        "mfu": mfu,
    }


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


# ---- driver ---------------------------------------------------------------------------------------


def _run_worker(kind: str, argv: list[str], workdir: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        *argv,
        "--worker",
        kind,
        "--workdir",
        str(workdir),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if completed.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{completed.stderr[-4000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        runners = {
            "ours": run_ours,
            "baseline": run_baseline,
            "trl": run_trl,
            "qlora": lambda a, w: run_ours(a, w, qlora=True),
        }
        print(json.dumps(runners[args.worker](args, args.workdir)), flush=True)
        return 0
    paths = [name.strip() for name in args.paths.split(",") if name.strip()]
    if not paths or any(name not in PATHS for name in paths) or "ours" not in paths:
        print(f"--paths: 'ours' plus any of {PATHS}, got {args.paths!r}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="llmft-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        build_model_dir(workdir / "model", args.model_size, args.seed)
        data = write_rows(workdir / "train.parquet", args, MODEL_SHAPES[args.model_size]["vocab_size"])
        print(json.dumps({"setup": {"model_size": args.model_size, **data, "seed": args.seed}}), flush=True)

        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        for repeat in range(args.repeats):
            # alternate the order so background load hits every path alike
            order = paths if repeat % 2 == 0 else paths[::-1]
            for kind in order:
                result = _run_worker(kind, argv, workdir)
                result["repeat"] = repeat
                runs[kind].append(result)
                print(json.dumps(result), flush=True)

    best = {kind: max(results, key=lambda r: r["real_tokens_per_s"]) for kind, results in runs.items()}
    ours = best["ours"]
    summary: dict[str, Any] = {
        "benchmark": "train_throughput",
        "model_size": args.model_size,
        "device": ours["device"],
        "gpu": ours["gpu"],
        "ours_real_tokens_per_s": ours["real_tokens_per_s"],
        "ours_s_per_step": ours["s_per_step"],
        "ours_peak_memory_mb": ours["peak_memory_mb"],
        "ours_final_loss": ours["final_loss"],
        "ours_mfu": ours["mfu"],
        "loss_tolerance": args.loss_tolerance,
        "repeats": args.repeats,
    }
    agree = True
    for kind, prefix, ratio in (("baseline", "baseline", "speedup"), ("trl", "trl", "speedup_vs_trl")):
        if kind not in best:
            continue
        other = best[kind]
        rel = abs(ours["final_loss"] - other["final_loss"]) / max(abs(other["final_loss"]), 1e-12)
        agree = agree and rel <= args.loss_tolerance
        summary.update(
            {
                ratio: ours["real_tokens_per_s"] / other["real_tokens_per_s"],
                f"{prefix}_real_tokens_per_s": other["real_tokens_per_s"],
                f"{prefix}_s_per_step": other["s_per_step"],
                f"{prefix}_peak_memory_mb": other["peak_memory_mb"],
                f"{prefix}_final_loss": other["final_loss"],
                f"{prefix}_mfu": other["mfu"],
                f"{'' if kind == 'baseline' else 'trl_'}loss_rel_diff": rel,
                f"{'' if kind == 'baseline' else 'trl_'}same_tokens": ours["real_tokens"]
                == other["real_tokens"],
            }
        )
    if "qlora" in best:
        summary["qlora_peak_memory_mb"] = best["qlora"]["peak_memory_mb"]
        summary["qlora_real_tokens_per_s"] = best["qlora"]["real_tokens_per_s"]
    summary["loss_agree"] = agree
    print(json.dumps(summary), flush=True)
    return 0 if summary["loss_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
