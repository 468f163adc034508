"""Benchmark: drift-targeted selection over a raw pool (R1-Distill-SFT v1 parquet), rows/s and peak RSS.

What a raw pool adds to the selection is the data chain's preparation of every pool row (parse, clean,
validate; `monitoring.retrain_pool.RawPool`) and the tokenization of the rows selected. Both runs read
the same rows, each in its own subprocess (peak RSS from os.wait4):

- ``raw`` (measured): the raw v1 file through RawPool, the selection, the selected rows tokenized;
- ``prepared`` (baseline): the same rows already as conversations (what tokenized_dataset holds), the
  selection only.

The pool is 98% two-digit additions and 2% word problems (distinct base rows of ``data.sample_gen``
repeated with a case number in the prompt); the traffic is word problems.

    .venv/bin/python benchmarks/retrain_raw_pool.py [--size 20000] [--target 2000]

One JSON line per run, a last JSON line with the summary (load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RARE_EVERY = 50  # one word problem in 50 pool rows
BATCH_ROWS = 10_000
MAX_SEQ_LEN = 1024


def _case(row: dict[str, Any], index: int) -> dict[str, Any]:
    """The row with a distinct id and prompt (both conversations of a v1 row)."""

    def tagged(messages: list[dict[str, str]]) -> list[dict[str, str]]:
        user, *rest = messages
        return [{**user, "content": f"{user['content']} (case {index})"}, *rest]

    return {
        **row,
        "id": f"{row['id']}-{index}",
        "messages": tagged(row["messages"]),
        "reannotated_messages": tagged(row["reannotated_messages"]),
    }


def write_inputs(folder: Path, size: int) -> None:
    """raw.parquet (v1 columns), conversations.parquet (the same rows cleaned), traffic.json, tokenizer/."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmft_assets.data.cleaning import to_conversation
    from llmft_assets.data.sample_gen import generate_rows, rows_to_table
    from llmft_assets.data.schema import CONVERSATION_SCHEMA
    from llmft_assets.modeling.tiny_model import build_tiny_tokenizer

    arithmetic = generate_rows(1800, schema="v1", seed=1, family="arithmetic")
    word = generate_rows(2500, schema="v1", seed=1, family="word")
    traffic = [row["problem"] for row in generate_rows(500, schema="v0", seed=99, family="word")]
    (folder / "traffic.json").write_text(json.dumps(traffic), encoding="utf-8")
    build_tiny_tokenizer(
        [r["reannotated_assistant_content"] for r in word[:300]], vocab_size=800
    ).save_pretrained(folder / "tokenizer")
    raw_writer = pq.ParquetWriter(folder / "raw.parquet", rows_to_table(word[:1], "v1").schema)
    with raw_writer, pq.ParquetWriter(folder / "conversations.parquet", CONVERSATION_SCHEMA) as writer:
        for start in range(0, size, BATCH_ROWS):
            rows = [
                _case(word[i % len(word)] if i % RARE_EVERY == 0 else arithmetic[i % len(arithmetic)], i)
                for i in range(start, min(size, start + BATCH_ROWS))
            ]
            raw_writer.write_table(rows_to_table(rows, "v1"))
            writer.write_table(
                pa.Table.from_pylist(
                    [to_conversation(row, prefer_reannotated=True) for row in rows],
                    schema=CONVERSATION_SCHEMA,
                )
            )


def child(method: str, folder: Path, target: int) -> dict[str, Any]:
    from llmft_assets.data.parallel import load_tokenizer
    from llmft_assets.data.schema import QUARANTINE_SCHEMA, StageCounts
    from llmft_assets.monitoring.retrain_pool import PoolLocations, RawPool, tokenize_selected
    from llmft_assets.monitoring.retrain_selection import SelectionSettings, select_for_traffic
    from llmft_assets.storage.tables import ParquetSink, iter_parquet_batches

    traffic = json.loads((folder / "traffic.json").read_text(encoding="utf-8"))
    settings = SelectionSettings(target_rows=target)
    started = time.perf_counter()
    if method == "prepared":
        selection = select_for_traffic(
            traffic,
            iter_parquet_batches(folder / "conversations.parquet", batch_size=BATCH_ROWS),
            excluded_keys=set(),
            settings=settings,
        )
        extra: dict[str, Any] = {}
    else:
        with ParquetSink(folder / f"quarantine-{os.getpid()}.parquet", QUARANTINE_SCHEMA) as quarantine:
            pool = RawPool(
                PoolLocations("location", (str(folder / "raw.parquet"),)), quarantine, batch_rows=BATCH_ROWS
            )
            selection = select_for_traffic(traffic, pool.batches(), excluded_keys=set(), settings=settings)
        tokenizer, counts = load_tokenizer(folder / "tokenizer"), StageCounts(stage="tokenized")
        for table in (selection.training_rows, selection.traffic_slice):
            tokenize_selected(table, tokenizer, max_seq_len=MAX_SEQ_LEN, counts=counts)
        extra = {"rejected_rows": pool.stats()["rejected_rows"], "tokenized_rows": counts.rows_out}
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "selected": selection.stats.selected_rows, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--target", type=int, default=2000)
    parser.add_argument("--child", choices=("raw", "prepared"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.folder), args.target)))
        return
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="llmft-raw-pool-bench-") as temp:
        folder = Path(temp)
        write_inputs(folder, args.size)
        for method in ("prepared", "raw"):
            command = [
                sys.executable,
                __file__,
                "--child",
                method,
                "--folder",
                temp,
                "--target",
                str(args.target),
            ]
            process = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=REPO_ROOT, text=True)
            assert process.stdout is not None
            output = process.stdout.read()
            _, status, usage = os.wait4(process.pid, 0)
            if status != 0:
                raise SystemExit(f"{method} failed with status {status}")
            result = json.loads(output.strip().splitlines()[-1])
            result.update(
                method=method,
                size=args.size,
                rows_per_s=round(args.size / result["seconds"]),
                peak_rss_mb=round(usage.ru_maxrss / 1024),  # Linux: KiB
            )
            print(json.dumps(result), flush=True)
            results.append(result)
    prepared, raw = results
    print(
        json.dumps(
            {
                "size": args.size,
                "raw_rows_per_s": raw["rows_per_s"],
                "prepared_rows_per_s": prepared["rows_per_s"],
                "raw_over_prepared_time": round(raw["seconds"] / prepared["seconds"], 2),
                "raw_peak_rss_mb": raw["peak_rss_mb"],
                "prepared_peak_rss_mb": prepared["peak_rss_mb"],
                "load_before": [round(x, 2) for x in load_before],
                "load_after": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
