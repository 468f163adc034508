"""Data pipeline benchmark: our batched streaming path vs a naive per-row `datasets.map` path.

Both paths do the same work on the same R1-shaped synthetic rows (llmft_assets.data.sample_gen), read
from parquet files on disk: clean -> validate -> tokenize with assistant-only labels -> write the result.

- ours: `iter_raw_batches` -> `clean_rows` -> `validate_rows` in this process, then
  `llmft_assets.data.parallel.iter_tokenized_tables`: batches tokenized in an ordered pool of worker
  processes (one per CPU by default, `--workers`), each rendering the templates with tokenize=False for
  the batch, encoding with the fast tokenizer and building an Arrow table from numpy arrays; tables
  streamed into a parquet file batch by batch. Pool start-up is inside the timed region.
- naive: `Dataset.from_parquet` + unbatched `datasets.map`/`filter` for cleaning and validation (the same
  row functions) and for tokenization per row with `apply_chat_template(tokenize=True)` (the full
  conversation, plus the prompt prefix of every assistant turn to mask it).

Each run happens in its own subprocess, which reports its own peak RSS (`resource.getrusage`), so the
numbers do not mix. Prints JSON lines; the last line is a summary with top-level `speedup` (rows/s of
ours / naive) and `rss_ratio` (our peak memory, PSS summed over the process and its workers, at the large
/ the small row count; streaming keeps it ~1).

    python benchmarks/data_pipeline.py            # 50k rows compared, RSS at 20k vs 200k (long)
    python benchmarks/data_pipeline.py --quick    # 5k rows compared, RSS at 2k vs 20k
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
FILE_ROWS = 5000  # rows per synthetic parquet file; files alternate v0 / v1


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _pss_mb(pid: int) -> float:
    """Proportional set size: pages shared with other processes (a fork server's preloaded modules)
    count a share each, so a sum over processes is the memory they really hold together."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    children = _children_pids(pid)
    return children + [grandchild for child in children for grandchild in _descendants(child)]


class TreeMemorySampler:
    """Peak of the summed PSS of this process and all its descendants (workers, fork server), sampled
    every ``interval_s``. ru_maxrss covers one process; with workers the memory is spread over several.
    """

    def __init__(self, interval_s: float = 0.1) -> None:
        import threading

        self.peak_mb = 0.0
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [os.getpid(), *_descendants(os.getpid())]
            self.peak_mb = max(self.peak_mb, sum(_pss_mb(pid) for pid in pids))
            self._stop.wait(self._interval_s)

    def __enter__(self) -> TreeMemorySampler:
        if Path("/proc/self/smaps_rollup").is_file():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _children_pids(pid: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime + its waited-for children's cutime + cstime, from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the ')' closing the command name: fields[11..14] are utime, stime, cutime, cstime.
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU time of this process tree (all threads, waited-for children, and live children with the
    children they reaped, e.g. the multiprocessing fork server and its finished workers). On a shared
    machine it is steadier than wall time."""
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = self_usage.ru_utime + self_usage.ru_stime + reaped.ru_utime + reaped.ru_stime
    if Path("/proc/self/task").is_dir():
        total += sum(_proc_cpu_seconds(pid) for pid in _children_pids(os.getpid()))
    return total


# ------------------------------------------------------------------------------------------- data


def write_synthetic_rows(data_dir: Path, total_rows: int, seed: int) -> None:
    """`total_rows` R1-shaped rows in parquet files of FILE_ROWS rows, alternating v0 and v1 files."""
    import pyarrow.parquet as pq

    from llmft_assets.data.sample_gen import generate_rows, rows_to_table

    data_dir.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, total_rows, FILE_ROWS)):
        schema = "v0" if index % 2 == 0 else "v1"
        path = data_dir / f"part-{index:05d}-{schema}.parquet"
        if path.is_file():
            continue
        count = min(FILE_ROWS, total_rows - start)
        table = rows_to_table(generate_rows(count, schema=schema, seed=seed + index), schema)
        # Default compression: the bundled sample's zstd-19 costs minutes at this size.
        pq.write_table(table, path, row_group_size=1024)


def data_files(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("part-*.parquet"))


def load_tokenizer(tokenizer_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


# ------------------------------------------------------------------------------------------- ours


def run_ours(
    data_dir: Path,
    rows: int,
    tokenizer_dir: str,
    out_dir: Path,
    batch_size: int,
    max_seq_len: int,
    workers: int,
) -> dict:
    import pyarrow.parquet as pq

    from llmft_assets.data.cleaning import clean_rows
    from llmft_assets.data.parallel import iter_tokenized_tables, resolve_workers
    from llmft_assets.data.raw_sources import iter_raw_batches
    from llmft_assets.data.schema import TOKENIZED_SCHEMA, StageCounts
    from llmft_assets.data.validation import ValidationLimits, validate_rows

    load_tokenizer(tokenizer_dir)  # the import, as the naive path pays it before its clock starts
    worker_count = resolve_workers(workers)
    limits = ValidationLimits()
    counts = {stage: StageCounts(stage=stage) for stage in ("raw", "cleaned", "validated", "tokenized")}
    seen_hashes: set[str] = set()
    seen_ids: set[str] = set()

    def valid_batches() -> Any:
        for batch in iter_raw_batches(
            str(data_dir), max_rows=rows, batch_size=batch_size, counts=counts["raw"]
        ):
            cleaned, _ = clean_rows(batch.rows, seen_hashes=seen_hashes, counts=counts["cleaned"])
            valid, _ = validate_rows(cleaned, seen_ids=seen_ids, limits=limits, counts=counts["validated"])
            yield valid

    started, cpu_started = time.perf_counter(), cpu_seconds()
    with pq.ParquetWriter(out_dir / "tokenized.parquet", TOKENIZED_SCHEMA) as writer:
        for table, delta in iter_tokenized_tables(
            valid_batches(), tokenizer_dir, max_seq_len=max_seq_len, workers=worker_count
        ):
            counts["tokenized"].merge(delta)
            if table.num_rows:
                writer.write_table(table)
    seconds = time.perf_counter() - started
    for stage_counts in counts.values():
        stage_counts.check_balanced()
    return {
        "rows_in": counts["raw"].rows_in,
        "rows_out": counts["tokenized"].rows_out,
        "tokens": counts["tokenized"].extra["tokens"],
        "assistant_tokens": counts["tokenized"].extra["assistant_tokens"],
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds() - cpu_started, 2),
        "workers": worker_count,
    }


# ------------------------------------------------------------------------------------------ naive


def run_naive(data_dir: Path, rows: int, tokenizer_dir: str, out_dir: Path, max_seq_len: int) -> dict:
    import datasets

    from llmft_assets.data.cleaning import RowRejected, to_conversation
    from llmft_assets.data.schema import IGNORE_INDEX
    from llmft_assets.data.validation import ValidationLimits, conversation_problems

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(tokenizer_dir)
    limits = ValidationLimits()
    seen_hashes: set[str] = set()
    seen_ids: set[str] = set()
    empty = {
        "id": "", "messages": [{"role": "user", "content": ""}], "source": "", "source_dataset": "",
        "schema_version": "", "source_format": "", "reference_answer": None, "content_hash": "", "origin": "",
    }  # fmt: skip

    def clean_one(row: dict[str, Any]) -> dict[str, Any]:
        try:
            return {**to_conversation(row), "ok": True}
        except RowRejected:
            return {**empty, "ok": False}

    def first_of_its_kind(row: dict[str, Any]) -> bool:
        if not row["ok"] or row["content_hash"] in seen_hashes:
            return False
        seen_hashes.add(row["content_hash"])
        return True

    def passes_validation(row: dict[str, Any]) -> bool:
        if conversation_problems(row, limits) or row["id"] in seen_ids:
            return False
        seen_ids.add(row["id"])
        return True

    def tokenize_one(row: dict[str, Any]) -> dict[str, Any]:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        input_ids = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
        labels = [IGNORE_INDEX] * len(input_ids)
        end = len(input_ids)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:turn], tokenize=True, add_generation_prompt=True)
            start = len(prompt["input_ids"])
            if turn + 1 < len(messages):
                through = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=True)["input_ids"]
                end = len(through) - 1  # the template's newline after <|im_end|> is not a label
            else:
                end = len(input_ids) - 1
            labels[start:end] = input_ids[start:end]
        input_ids, labels = input_ids[:end], labels[:end]  # end after the last <|im_end|>, like ours
        truncated = len(input_ids) > max_seq_len
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "num_tokens": len(input_ids),
            "num_assistant_tokens": sum(label != IGNORE_INDEX for label in labels),
            "truncated": truncated,
        }

    cache_dir = out_dir / "hf_cache"
    rows_in = rows_out = tokens = assistant_tokens = 0
    started, cpu_started = time.perf_counter(), cpu_seconds()
    for path in data_files(data_dir):
        if rows_in >= rows:
            break
        dataset = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache_dir))
        dataset = dataset.select(range(min(len(dataset), rows - rows_in)))
        rows_in += len(dataset)
        dataset = dataset.map(clean_one, remove_columns=dataset.column_names)
        dataset = dataset.filter(first_of_its_kind).filter(passes_validation)
        dataset = dataset.map(tokenize_one)
        rows_out += len(dataset)
        tokens += sum(dataset["num_tokens"])
        assistant_tokens += sum(dataset["num_assistant_tokens"])
    seconds = time.perf_counter() - started
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "tokens": tokens,
        "assistant_tokens": assistant_tokens,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds() - cpu_started, 2),
    }


# ----------------------------------------------------------------------------------------- driver


def run_child(path: str, data_dir: Path, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in a fresh interpreter; returns its JSON report."""
    command = [
        sys.executable, __file__, "--child", path, "--data-dir", str(data_dir), "--rows", str(rows),
        "--tokenizer", args.tokenizer, "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
        "--workers", str(args.workers),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{path} run failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    report["rows_per_s"] = round(report["rows_in"] / report["seconds"], 1) if report["seconds"] else None
    report["rows_per_cpu_s"] = (
        round(report["rows_in"] / report["cpu_seconds"], 1) if report["cpu_seconds"] else None
    )
    return report


def child_main(args: argparse.Namespace) -> None:
    out_dir = Path(tempfile.mkdtemp(prefix=f"llmft-bench-{args.child}-"))
    try:
        with TreeMemorySampler() as sampler:
            report = run_path(args, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    # peak_rss_mb: this process (ru_maxrss); tree_peak_mb: it and its workers, PSS summed (sampled).
    report.update(path=args.child, peak_rss_mb=peak_rss_mb(), tree_peak_mb=round(sampler.peak_mb, 1))
    print(json.dumps(report, sort_keys=True), flush=True)


def run_path(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    if args.child == "ours":
        return run_ours(
            Path(args.data_dir),
            args.rows,
            args.tokenizer,
            out_dir,
            args.batch_size,
            args.max_seq_len,
            args.workers,
        )
    return run_naive(Path(args.data_dir), args.rows, args.tokenizer, out_dir, args.max_seq_len)


def default_tokenizer_dir(work_dir: Path) -> str:
    from llmft_assets.modeling.tiny_model import build_tiny_model

    # The project's tiny Qwen2 tokenizer (byte-level BPE, Qwen's pre-tokenizer, ChatML template); cached.
    return str(build_tiny_model(work_dir / "tiny_model", pretrain_steps=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=None, help="rows compared ours vs naive (default 50000)")
    parser.add_argument(
        "--rss-rows", default=None, help="two row counts for the RSS check (default 20000,200000)"
    )
    parser.add_argument("--quick", action="store_true", help="5k rows compared, RSS at 2k vs 20k")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=0, help="tokenizer worker processes (0: one per CPU)")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--tokenizer", default=None, help="a save_pretrained dir (default: the tiny model's)")
    parser.add_argument("--work-dir", default=None, help="where the synthetic parquet files go (kept)")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--child", choices=("ours", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    compare_rows = args.rows or (5000 if args.quick else 50_000)
    small_rows, large_rows = (
        (int(value) for value in args.rss_rows.split(","))
        if args.rss_rows
        else ((2000, 20_000) if args.quick else (20_000, 200_000))
    )
    if min(compare_rows, small_rows, large_rows) <= 0 or small_rows >= large_rows:
        parser.error("row counts must be positive and --rss-rows must be SMALL,LARGE with SMALL < LARGE")
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="llmft-bench-data-"))
    data_dir = work_dir / "raw"
    started = time.perf_counter()
    write_synthetic_rows(data_dir, max(compare_rows, large_rows), args.seed)
    args.tokenizer = args.tokenizer or default_tokenizer_dir(work_dir)
    emit({"event": "prepared", "rows": max(compare_rows, large_rows), "files": len(data_files(data_dir)),
          "seconds": round(time.perf_counter() - started, 1), "cpus": os.cpu_count(),
          "load_average": os.getloadavg()})  # fmt: skip

    ours = run_child("ours", data_dir, compare_rows, args)
    emit({"event": "compare", **ours})
    naive = run_child("naive", data_dir, compare_rows, args)
    emit({"event": "compare", **naive})
    small = run_child("ours", data_dir, small_rows, args)
    emit({"event": "rss", **small})
    large = run_child("ours", data_dir, large_rows, args)
    emit({"event": "rss", **large})

    emit(
        {
            "event": "summary",
            "rows": compare_rows,
            "workers": ours["workers"],
            "cpus": os.cpu_count(),
            "ours_rows_per_s": ours["rows_per_s"],
            "naive_rows_per_s": naive["rows_per_s"],
            "ours_seconds": ours["seconds"],
            "naive_seconds": naive["seconds"],
            "ours_cpu_seconds": ours["cpu_seconds"],
            "naive_cpu_seconds": naive["cpu_seconds"],
            "speedup": round(ours["rows_per_s"] / naive["rows_per_s"], 2),
            # CPU work per row; wall-clock speedup also counts parallel tokenization on several cores.
            "cpu_speedup": round(ours["rows_per_cpu_s"] / naive["rows_per_cpu_s"], 2),
            "ours_peak_mb": ours["tree_peak_mb"],
            "naive_peak_mb": naive["tree_peak_mb"],
            # Same rows in, same tokens out: the two paths agree on what they produce.
            "outputs_match": (ours["rows_out"], ours["tokens"], ours["assistant_tokens"])
            == (naive["rows_out"], naive["tokens"], naive["assistant_tokens"]),
            "rss_rows": [small_rows, large_rows],
            "main_rss_mb": [small["peak_rss_mb"], large["peak_rss_mb"]],
            "rss_ratio": round(large["tree_peak_mb"] / small["tree_peak_mb"], 3),
            # Summed over the process and its workers (sampled); the main process alone below.
            "tree_peak_mb": [small["tree_peak_mb"], large["tree_peak_mb"]],
            "main_rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "load_average_after": os.getloadavg(),
        }
    )
    if not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
