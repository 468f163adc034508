"""Benchmark: drift-targeted selection over 100k / 1M candidate pool rows, rows/s and peak RSS.

The pool is a Parquet file of conversations (the pipeline's schema) written in row groups: 98% two-digit
additions, 2% multi-step word problems (the rare kind); the served traffic is 500 unseen word problems
and 50 additions. Distinct base rows come from ``data.sample_gen`` and are repeated with a variant tag in
the prompt, so every pool row is a distinct problem. Each method runs in its own subprocess, so its
peak RSS (os.wait4's rusage of that child) is its own:

- ``ours``: ``monitoring.retrain_selection.select_for_traffic`` (hashed TF-IDF, traffic centroids,
  streamed pool, bounded per-cluster heaps);
- ``naive``: sklearn ``TfidfVectorizer`` fitted on the whole pool in memory, brute-force cosine of every
  pool row to every traffic prompt, top rows by their best similarity;
- ``minhash``: MinHash-LSH (``data.splits.minhash_signature``, 16 bands x 4) of the traffic prompts,
  each pool row scored by its best estimated Jaccard among the LSH candidates (run on the first
  ``--minhash-rows`` rows only: it is the slow one).

``recall`` is the share of the pool's word problems among the selected rows (the selection wants
``--target`` rows; the pool holds 2% x size word problems).

    .venv/bin/python benchmarks/retrain_selection.py [--sizes 100000,1000000] [--target 2000]

One JSON line per run, a last JSON line with the summary (with the load average before and after).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parent.parent
RARE_SHARE = 0.02
TRAFFIC_WORD, TRAFFIC_ARITHMETIC = 500, 50
BATCH_ROWS = 20_000
METHODS = ("ours", "naive", "minhash")


def _base_rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    from llmft_assets.data.cleaning import to_conversation
    from llmft_assets.data.sample_gen import generate_rows

    arithmetic = [to_conversation(r) for r in generate_rows(1800, schema="v1", seed=1, family="arithmetic")]
    word = [to_conversation(r) for r in generate_rows(2500, schema="v1", seed=1, family="word")]
    traffic_rows = generate_rows(TRAFFIC_WORD, schema="v0", seed=99, family="word")
    traffic_rows += generate_rows(TRAFFIC_ARITHMETIC, schema="v0", seed=99, family="arithmetic")
    return arithmetic, word, [row["problem"] for row in traffic_rows]


def _variant(row: dict[str, Any], index: int, kind: str) -> dict[str, Any]:
    user, *rest = row["messages"]
    return {
        **row,
        "id": f"{kind}-{index}",
        "messages": [{"role": "user", "content": f"{user['content']} (case {index})"}, *rest],
    }


def write_pool(path: Path, size: int) -> list[str]:
    """The pool file (row groups of BATCH_ROWS) and the traffic prompts; returns the traffic."""
    from llmft_assets.data.schema import CONVERSATION_SCHEMA

    arithmetic, word, traffic = _base_rows()
    every = round(1 / RARE_SHARE)
    with pq.ParquetWriter(path, CONVERSATION_SCHEMA) as writer:
        for start in range(0, size, BATCH_ROWS):
            rows = [
                _variant(word[i % len(word)], i, "word")
                if i % every == 0
                else _variant(arithmetic[i % len(arithmetic)], i, "arith")
                for i in range(start, min(size, start + BATCH_ROWS))
            ]
            writer.write_table(pa.Table.from_pylist(rows, schema=CONVERSATION_SCHEMA))
    return traffic


def _pool_batches(path: Path, limit: int | None = None) -> Any:
    read = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=None):
        if limit is not None and read >= limit:
            return
        yield batch if limit is None else batch.slice(0, limit - read)
        read += batch.num_rows


def run_ours(path: Path, traffic: list[str], target: int) -> list[str]:
    from llmft_assets.monitoring.retrain_selection import SelectionSettings, select_for_traffic

    selection = select_for_traffic(
        traffic,
        _pool_batches(path),
        excluded_keys=set(),
        settings=SelectionSettings(target_rows=target, traffic_slice_fraction=0.0),
    )
    run_ours.index_bytes = selection.stats.index_bytes  # type: ignore[attr-defined]
    return selection.training_rows.column("id").to_pylist()


def run_naive(path: Path, traffic: list[str], target: int) -> list[str]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    from llmft_assets.monitoring.retrain_selection import first_user_prompts, topic_text

    table = pq.read_table(path)  # the whole pool in memory
    prompts = [topic_text(p or "") for p in first_user_prompts(table)]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    pool = vectorizer.fit_transform(prompts)
    queries = vectorizer.transform([topic_text(p) for p in traffic])
    best = np.asarray((pool @ queries.T).max(axis=1).todense()).ravel()  # every pair: brute force
    chosen = np.argsort(-best, kind="stable")[:target]
    return [table.column("id")[int(i)].as_py() for i in chosen]


def run_minhash(path: Path, traffic: list[str], target: int, rows: int) -> list[str]:
    from llmft_assets.data.splits import MINHASH_BANDS, MINHASH_PERMUTATIONS, minhash_signature
    from llmft_assets.monitoring.retrain_selection import first_user_prompts, topic_text

    width = MINHASH_PERMUTATIONS // MINHASH_BANDS
    signatures = [minhash_signature(topic_text(p)) for p in traffic]
    buckets: dict[tuple[int, bytes], list[int]] = {}
    for i, signature in enumerate(signatures):
        for band in range(MINHASH_BANDS):
            buckets.setdefault((band, signature[band * width : (band + 1) * width].tobytes()), []).append(i)
    best: list[tuple[float, str]] = []
    for batch in _pool_batches(path, rows):
        for prompt, row_id in zip(first_user_prompts(batch), batch.column("id").to_pylist(), strict=True):
            signature = minhash_signature(topic_text(prompt or ""))
            candidates = {
                i
                for band in range(MINHASH_BANDS)
                for i in buckets.get((band, signature[band * width : (band + 1) * width].tobytes()), ())
            }
            if not candidates:
                continue
            score = max(float(np.mean(signature == signatures[i])) for i in candidates)
            if len(best) < target:
                heapq.heappush(best, (score, row_id))
            elif score > best[0][0]:
                heapq.heapreplace(best, (score, row_id))
    return [row_id for _, row_id in best]


def child_main(args: argparse.Namespace) -> None:
    path = Path(args.pool)
    traffic = json.loads(Path(args.traffic).read_text())
    rows = args.size if args.child != "minhash" else min(args.size, args.minhash_rows)
    started = time.perf_counter()
    if args.child == "ours":
        chosen = run_ours(path, traffic, args.target)
    elif args.child == "naive":
        chosen = run_naive(path, traffic, args.target)
    else:
        chosen = run_minhash(path, traffic, args.target, rows)
    seconds = time.perf_counter() - started
    rare_in_pool = sum(1 for i in range(rows) if i % round(1 / RARE_SHARE) == 0)
    rare_selected = sum(1 for row_id in chosen if row_id.startswith("word-"))
    import resource

    report = {
        "method": args.child,
        "pool_rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "selected": len(chosen),
        "rare_selected": rare_selected,
        "precision": round(rare_selected / max(1, len(chosen)), 4),
        "recall": round(rare_selected / max(1, min(rare_in_pool, args.target)), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.child == "ours":
        report["index_mb"] = round(run_ours.index_bytes / 2**20, 2)  # type: ignore[attr-defined]
    print(json.dumps(report, sort_keys=True), flush=True)


def run_child(method: str, pool: Path, traffic: Path, size: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--child", method, "--pool", str(pool), "--traffic", str(traffic),
        "--size", str(size), "--target", str(args.target), "--minhash-rows", str(args.minhash_rows),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout_s)
    if result.returncode != 0:
        return {"method": method, "pool_rows": size, "error": result.stderr.strip().splitlines()[-1:]}
    record = json.loads(result.stdout.strip().splitlines()[-1])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--target", type=int, default=2000)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--naive-max-rows", type=int, default=100_000, help="skip naive above this size")
    parser.add_argument("--minhash-rows", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout-s", type=int, default=900)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--pool", help=argparse.SUPPRESS)
    parser.add_argument("--traffic", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    load_before = os.getloadavg()
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="retrain-selection-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            pool, traffic_file = Path(tmp) / f"pool-{size}.parquet", Path(tmp) / "traffic.json"
            started = time.perf_counter()
            traffic_file.write_text(json.dumps(write_pool(pool, size)))
            print(json.dumps({"pool_rows": size, "write_pool_s": round(time.perf_counter() - started, 1),
                              "pool_mb": round(pool.stat().st_size / 2**20, 1)}), flush=True)  # fmt: skip
            for method in args.methods.split(","):
                if method == "naive" and size > args.naive_max_rows:
                    continue
                if method == "minhash" and size != int(args.sizes.split(",")[0]):
                    continue  # its rows/s does not depend on the pool size
                record = run_child(method, pool, traffic_file, size, args)
                records.append(record)
                print(json.dumps(record, sort_keys=True), flush=True)
            pool.unlink()
    summary = {
        "benchmark": "retrain_selection",
        "target_rows": args.target,
        "rare_share": RARE_SHARE,
        "traffic_prompts": TRAFFIC_WORD + TRAFFIC_ARITHMETIC,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "runs": records,
    }
    print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
