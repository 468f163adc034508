"""Eval generation benchmark: the eval's continuous batching vs static left-padded `generate` batches.

    .venv/bin/python benchmarks/eval_generation.py            # tiny model, 64 rows, CPU
    .venv/bin/python benchmarks/eval_generation.py --rows 128 --batch-size 32 --max-new-tokens 1024

R1-style answers are long and uneven. Each row gets its own answer length, drawn from a long-tailed
(log-normal) distribution like R1's; the untrained tiny model never emits the end token, so every row
generates exactly its length on both sides and the work is the same. The baseline is what the eval did
before: rows sorted by prompt length, static batches of `--batch-size` through `model.generate`, each
batch running until its longest row is done (`llmft_assets.evaluation.generate.generate_with_model`).
Ours: `generate_continuous` (the serving engine's continuous batching, same batch size), where a
finished row leaves the batch and the next one takes its place. Both run in this process, on the same
model, rows, lengths and torch thread count, greedy.

Prints one JSON line per side; the last line is the summary with `speedup` (ours rows/s / baseline
rows/s) and `identical` (both sides produced the same text for every row).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def answer_lengths(count: int, *, median: int, sigma: float, longest: int, seed: int) -> list[int]:
    """Long-tailed answer lengths (log-normal around ``median``, clipped to 8..``longest``)."""
    rng = random.Random(seed)
    return [max(8, min(longest, round(rng.lognormvariate(0.0, sigma) * median))) for _ in range(count)]


def conversations(count: int, seed: int) -> list[list[dict[str, str]]]:
    """Prompts of the bundled generator's word problems (their lengths vary too)."""
    from llmft_assets.data.sample_gen import generate_rows

    return [
        [{"role": "user", "content": row["problem"]}] for row in generate_rows(count, schema="v0", seed=seed)
    ]


def run_static(
    model: Any, tokenizer: Any, convs: list[list[dict[str, str]]], lengths: list[int], batch_size: int
) -> tuple[list[Any], int]:
    """The old eval (`generate_with_model`'s loop): batches of similar prompt length through
    `model.generate`, each running until its longest row is done; a row keeps its own ``lengths[i]``
    tokens. Returns the generations and the decode slots spent (rows x steps, padding included)."""
    import torch

    from llmft_assets.evaluation.generate import _padding_side, _to_generation, end_token_ids, prompt_messages

    prompts = [
        tokenizer.apply_chat_template(prompt_messages(c), tokenize=False, add_generation_prompt=True)
        for c in convs
    ]
    stop_ids = end_token_ids(tokenizer, model)
    prompt_lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=prompt_lengths.__getitem__)
    results: list[Any] = [None] * len(prompts)
    slots = 0
    with _padding_side(tokenizer, "left"), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            longest = max(lengths[index] for index in batch)
            slots += len(batch) * longest
            encoded = tokenizer(
                [prompts[index] for index in batch],
                add_special_tokens=False,
                padding=True,
                return_tensors="pt",
            )
            output = model.generate(
                **encoded,
                max_new_tokens=longest,
                do_sample=False,
                num_beams=1,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            continuations = output[:, encoded["input_ids"].shape[1] :].tolist()
            for index, token_ids in zip(batch, continuations, strict=True):
                results[index] = _to_generation(tokenizer, token_ids[: lengths[index]], stop_ids)
    return results, slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="rows decoded together, both sides")
    parser.add_argument("--median-new-tokens", type=int, default=96)
    parser.add_argument("--sigma", type=float, default=0.9, help="log-normal sigma of the answer lengths")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest answer")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from llmft_assets.evaluation.generate import generate_continuous, load_base_model, load_tokenizer
    from llmft_assets.modeling.tiny_model import build_tiny_model

    os.environ.setdefault("LLMFT_HOME", tempfile.mkdtemp(prefix="llmft-eval-generation-"))
    model_dir = build_tiny_model(
        Path(tempfile.mkdtemp(prefix="llmft-eval-generation-model-")), pretrain_steps=0
    )
    tokenizer, model = load_tokenizer(model_dir), load_base_model(model_dir)
    convs = conversations(args.rows, args.seed)
    lengths = answer_lengths(
        args.rows,
        median=args.median_new_tokens,
        sigma=args.sigma,
        longest=args.max_new_tokens,
        seed=args.seed,
    )
    total_tokens = sum(lengths)
    common = {"rows": args.rows, "batch_size": args.batch_size, "torch_threads": args.threads}

    torch.set_num_threads(args.threads)
    # Warm-up of both paths (first-call allocations and kernel selection are not what is measured).
    generate_continuous(model, model_dir, convs[:2], max_new_tokens=4, batch_size=2, seed=args.seed)
    run_static(model, tokenizer, convs[:2], [4, 4], 2)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ours = generate_continuous(
        model, model_dir, convs, max_new_tokens=lengths, batch_size=args.batch_size, seed=args.seed
    )
    ours_s = time.perf_counter() - started
    ours_line = {
        "side": "ours: continuous batching (serving engine)",
        **common,
        "seconds": round(ours_s, 3),
        "rows_per_s": round(args.rows / ours_s, 3),
        "tokens_per_s": round(total_tokens / ours_s, 1),
    }
    print(json.dumps({"ours": ours_line}), flush=True)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    static, slots = run_static(model, tokenizer, convs, lengths, args.batch_size)
    static_s = time.perf_counter() - started
    static_line = {
        "side": "baseline: static left-padded generate batches",
        **common,
        "seconds": round(static_s, 3),
        "rows_per_s": round(args.rows / static_s, 3),
        "tokens_per_s": round(total_tokens / static_s, 1),
        "decode_slots": slots,
        "useful_share": round(total_tokens / slots, 3),
    }
    print(json.dumps({"baseline": static_line}), flush=True)

    summary = {
        "benchmark": "eval_generation",
        "rows": args.rows,
        "answer_tokens": total_tokens,
        "answer_lengths": {
            "min": min(lengths),
            "median": sorted(lengths)[len(lengths) // 2],
            "max": max(lengths),
        },
        "ours": ours_line,
        "baseline": static_line,
        "identical": [g.text for g in ours] == [g.text for g in static]
        and [g.num_tokens for g in ours] == lengths,
        "speedup": round(ours_line["rows_per_s"] / static_line["rows_per_s"], 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
