"""Data pipeline benchmark: our raw -> splits chain vs the strong `datasets` baseline and the tokenizer's limit.

On the same R1-shaped synthetic rows (llmft_assets.data.sample_gen, parquet files on disk), in one run:

- ours: the project's own Definitions, `dagster.materialize` of raw_dataset -> cleaned_dataset ->
  validated_dataset -> tokenized_dataset -> dataset_splits on local storage (base_model is materialized
  first, outside the clock). Wall time from the first data step's start to the last one's end.
- baseline: what a user would write with `datasets`: `Dataset.from_parquet(files)` and one
  `map(batched=True, num_proc=<cores>)` that turns each raw row into a conversation (the same
  `to_conversation`), renders it with the chat template and tokenizes the batch with offsets, labels on
  the assistant turns found by prompt prefix (the same masks as ours, checked by the token totals).
- limit: the fast tokenizer alone, `backend_tokenizer.encode_batch` in chunks of 1,024 on all cores,
  on the same rendered and cut texts (prepared before the clock starts). Ours encodes byte-level BPE
  without offsets (`encode_batch_fast`, labels from token byte lengths), so the summary also gives
  that encoder alone on the same texts (`limit_fast_rows_per_s`, `ratio_to_fast_limit`).
- RSS: our peak memory (PSS summed over the process tree, sampled) at two row counts.

Each measurement runs in its own subprocess. Prints JSON lines; the last is the summary with `speedup`
(ours / baseline rows per second), `ratio_to_limit` (ours / limit) and `rss_ratio` (peak at the large
/ the small row count). On a shared machine compare the ratios, and read `load_average`.

    python benchmarks/data_pipeline.py                       # RSS at 20k and 200k, compared at 200k
    python benchmarks/data_pipeline.py --rows 20000,100000   # smaller
    python benchmarks/data_pipeline.py --quick               # 2k and 10k rows
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
LIMIT_CHUNK_ROWS = 1024
DATA_STEPS = ("raw_dataset", "cleaned_dataset", "validated_dataset", "tokenized_dataset", "dataset_splits")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _pss_mb(pid: int) -> float:
    """Proportional set size: pages shared with other processes count a share each, so a sum over the
    processes is the memory they hold together."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children_pids(pid: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def _descendants(pid: int) -> list[int]:
    children = _children_pids(pid)
    return children + [grandchild for child in children for grandchild in _descendants(child)]


class TreeMemorySampler:
    """Peak of the summed PSS of this process and all its descendants, sampled every ``interval_s``."""

    def __init__(self, interval_s: float = 0.1) -> None:
        import threading

        self.peak_mb = 0.0
        self.samples: list[tuple[float, float]] = []  # (wall time, summed PSS in MB)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [os.getpid(), *_descendants(os.getpid())]
            total = sum(_pss_mb(pid) for pid in pids)
            self.samples.append((time.time(), total))
            self.peak_mb = max(self.peak_mb, total)
            self._stop.wait(self._interval_s)

    def peak_between(self, start: float, end: float) -> float:
        return round(max((mb for at, mb in self.samples if start <= at <= end), default=0.0), 1)

    def __enter__(self) -> TreeMemorySampler:
        if Path("/proc/self/smaps_rollup").is_file():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (all threads); with `os.times` of live ones."""
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_usage.ru_utime + self_usage.ru_stime + reaped.ru_utime + reaped.ru_stime


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
        pq.write_table(table, path, row_group_size=1024)


def data_files(data_dir: Path, rows: int) -> list[Path]:
    """The files holding the first `rows` rows (every file but the last holds FILE_ROWS)."""
    return sorted(data_dir.glob("part-*.parquet"))[: -(-rows // FILE_ROWS)]


def load_tokenizer(tokenizer_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


# ------------------------------------------------------------------------------------------- ours


def run_ours(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """The five data assets through `dagster.materialize`, on local storage in `out_dir`."""
    from llmft_assets import settings

    os.environ[settings.env_name("home")] = str(out_dir)
    os.environ["DAGSTER_HOME"] = str(out_dir / "dagster")
    (out_dir / "dagster").mkdir()
    for variable in (settings.env_name("storage"), "MLFLOW_TRACKING_URI"):
        os.environ.pop(variable, None)
    import dagster as dg

    from llmft_assets.definitions import DATA_ASSETS, build_resources

    data_config = {
        "ops": {
            "raw_dataset": {"config": {"source": args.data_dir, "max_rows": args.rows}},
            "tokenized_dataset": {"config": {"max_seq_len": args.max_seq_len}},
        }
    }
    instance = dg.DagsterInstance.ephemeral()
    model = dg.materialize(
        DATA_ASSETS, selection=["base_model"], resources=build_resources(),
        run_config={"ops": {"base_model": {"config": {"pretrain_steps": 0}}}},
        instance=instance,
    )  # fmt: skip
    if not model.success:
        raise RuntimeError("base_model failed")
    cpu_started = cpu_seconds()
    result = dg.materialize(
        DATA_ASSETS, selection=list(DATA_STEPS), resources=build_resources(), run_config=data_config,
        instance=instance,
    )  # fmt: skip
    if not result.success:
        raise RuntimeError("the data chain failed")
    started: dict[str, float] = {}
    ended: dict[str, float] = {}
    for entry in instance.all_logs(result.run_id):
        event = entry.dagster_event
        if event is not None and event.event_type_value == "STEP_START":
            started[event.step_key] = entry.timestamp
        elif event is not None and event.event_type_value == "STEP_SUCCESS":
            ended[event.step_key] = entry.timestamp
    metadata = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        metadata[materialization.asset_key.to_user_string()] = {
            key: getattr(value, "value", value) for key, value in materialization.metadata.items()
        }
    tokenized = metadata["tokenized_dataset"]
    return {
        "rows_in": metadata["raw_dataset"]["rows_in"],
        "rows_out": sum(
            metadata["dataset_splits"][f"{name}_rows"] for name in ("train", "validation", "test")
        ),
        "tokens": tokenized["total_tokens"],
        "assistant_tokens": tokenized["assistant_tokens"],
        "seconds": round(max(ended.values()) - min(started.values()), 2),
        "step_seconds": {step: round(ended[step] - started[step], 2) for step in DATA_STEPS},
        # Wall-clock windows of each step, for the per-step memory peaks (`step_peak_mb`).
        "step_windows": {step: (started[step], ended[step]) for step in DATA_STEPS},
        "cpu_seconds": round(cpu_seconds() - cpu_started, 2),
    }


# -------------------------------------------------------------------------------------- baseline


def _checked_conversation(row: dict[str, Any], limits: Any) -> tuple[dict[str, Any] | None, bool]:
    """(the cleaned conversation or None when cleaning rejects the row, whether it passes validation)."""
    from llmft_assets.data.cleaning import RowRejected, to_conversation
    from llmft_assets.data.validation import conversation_problems

    try:
        conversation = to_conversation(row, prefer_reannotated=True)  # the cleaned_dataset default
    except RowRejected:
        return None, False
    return conversation, not conversation_problems(conversation, limits)


def run_baseline(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """`datasets.map(batched=True, num_proc=<cores>)` doing the same per-row work as ours (clean,
    validate, chat template, tokenize with offsets, prompt-prefix labels), then the same stream-wide
    dedup (first content hash, then first valid id, in file order) over the small result columns."""
    import datasets

    from llmft_assets.data.validation import ValidationLimits

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(args.tokenizer)
    max_seq_len = args.max_seq_len
    limits = ValidationLimits()

    def render_and_tokenize(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
        names = list(rows)
        out: dict[str, list[Any]] = {
            key: [] for key in ("order", "content_hash", "id", "cleaned", "valid", "input_ids", "labels",
                                "num_tokens", "num_assistant_tokens")
        }  # fmt: skip
        texts, spans = [], []
        for values in zip(*rows.values(), strict=True):
            row = dict(zip(names, values, strict=True))
            conversation, valid = _checked_conversation(row, limits)
            out["order"].append(row["order"])
            out["content_hash"].append(conversation["content_hash"] if conversation else "")
            out["id"].append(conversation["id"] if conversation else "")
            out["cleaned"].append(conversation is not None)
            out["valid"].append(valid)
            messages = (
                [{"role": m["role"], "content": m["content"]} for m in conversation["messages"]]
                if valid
                else []
            )
            full = tokenizer.apply_chat_template(messages, tokenize=False) if messages else ""
            row_spans = []
            for turn, message in enumerate(messages):
                if message["role"] == "assistant":
                    prompt = tokenizer.apply_chat_template(
                        messages[:turn], tokenize=False, add_generation_prompt=True
                    )
                    end = full.index("<|im_end|>", len(prompt)) + len("<|im_end|>")
                    row_spans.append((len(prompt), end))
            texts.append(
                full[: row_spans[-1][1]] if messages and messages[-1]["role"] == "assistant" else full
            )
            spans.append(row_spans)
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets, row_spans in zip(
            encoded["input_ids"], encoded["offset_mapping"], spans, strict=True
        ):
            labels = [
                token if any(start <= begin < end for start, end in row_spans) else -100
                for token, (begin, _) in zip(ids, offsets, strict=True)
            ]
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["num_tokens"].append(len(ids))
            out["num_assistant_tokens"].append(sum(label != -100 for label in labels))
        return out

    # v0 and v1 files have different columns: one dataset per schema, as a user loads each config.
    by_schema: dict[str, list[tuple[int, Path]]] = {}
    for index, path in enumerate(data_files(Path(args.data_dir), args.rows)):
        by_schema.setdefault(path.stem.rsplit("-", 1)[1], []).append((index, path))
    started, cpu_started = time.perf_counter(), cpu_seconds()
    results = []
    for files in by_schema.values():
        dataset = datasets.Dataset.from_parquet(
            [str(path) for _, path in files], cache_dir=str(out_dir / "hf_cache")
        )
        # The row's place in the whole stream, so the dedup below keeps the same first occurrences as ours.
        order = [index * FILE_ROWS + row for index, _ in files for row in range(FILE_ROWS)][: len(dataset)]
        dataset = dataset.add_column("order", order)
        if order[-1] >= args.rows:  # the last file is only partly used
            dataset = dataset.filter(lambda batch: [o < args.rows for o in batch["order"]], batched=True)
        results.append(
            dataset.map(
                render_and_tokenize,
                batched=True,
                num_proc=os.cpu_count(),
                remove_columns=dataset.column_names,
            )
        )
    result = datasets.concatenate_datasets(results).sort("order")
    columns = result.select_columns(
        ["content_hash", "id", "cleaned", "valid", "num_tokens", "num_assistant_tokens"]
    )
    seen_hashes: set[str] = set()
    seen_ids: set[str] = set()
    rows_out = tokens = assistant_tokens = 0
    for row in columns:
        if not row["cleaned"] or row["content_hash"] in seen_hashes:
            continue
        seen_hashes.add(row["content_hash"])
        if not row["valid"] or row["id"] in seen_ids:
            continue
        seen_ids.add(row["id"])
        rows_out += 1
        tokens += row["num_tokens"]
        assistant_tokens += row["num_assistant_tokens"]
    seconds = time.perf_counter() - started
    return {
        "rows_in": len(result),
        "rows_out": rows_out,
        "tokens": tokens,
        "assistant_tokens": assistant_tokens,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds() - cpu_started, 2),
        "num_proc": os.cpu_count(),
    }


# ----------------------------------------------------------------------------------------- limit


def run_limit(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """The Rust encoder alone on the rendered, cut texts (rendering happens before the clock)."""
    import pyarrow.parquet as pq

    from llmft_assets.data.cleaning import clean_rows
    from llmft_assets.data.schema import StageCounts
    from llmft_assets.data.tokenization import assistant_char_spans, assistant_end_marker
    from llmft_assets.data.validation import ValidationLimits, validate_rows

    tokenizer = load_tokenizer(args.tokenizer)
    marker = assistant_end_marker(tokenizer)
    texts: list[str] = []
    seen_hashes: set[str] = set()
    seen_ids: set[str] = set()
    rows_in = 0
    # The rows ours keeps, cleaned and validated the same way, rendered and cut: all before the clock.
    for path in data_files(Path(args.data_dir), args.rows):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=2048):
            rows = batch.to_pylist()[: args.rows - rows_in]
            rows_in += len(rows)
            cleaned, _ = clean_rows(
                rows, seen_hashes=seen_hashes, counts=StageCounts(stage="cleaned"), prefer_reannotated=True
            )
            valid, _ = validate_rows(
                cleaned, seen_ids=seen_ids, limits=ValidationLimits(), counts=StageCounts(stage="validated")
            )
            texts += assistant_char_spans(valid, tokenizer, marker)[0]
    backend = tokenizer.backend_tokenizer
    tokens = 0
    started, cpu_started = time.perf_counter(), cpu_seconds()
    for start in range(0, len(texts), LIMIT_CHUNK_ROWS):
        encodings = backend.encode_batch(texts[start : start + LIMIT_CHUNK_ROWS], add_special_tokens=False)
        tokens += sum(min(len(encoding.ids), args.max_seq_len) for encoding in encodings)
    seconds = time.perf_counter() - started
    cpu_used = cpu_seconds() - cpu_started
    # The same texts through the encoder without offsets, as ours encodes for a byte-level tokenizer
    # (labels from token byte lengths): reported beside the limit, which stays `encode_batch`.
    fast_tokens = 0
    fast_started, fast_cpu_started = time.perf_counter(), cpu_seconds()
    for start in range(0, len(texts), LIMIT_CHUNK_ROWS):
        encodings = backend.encode_batch_fast(
            texts[start : start + LIMIT_CHUNK_ROWS], add_special_tokens=False
        )
        fast_tokens += sum(min(len(encoding.ids), args.max_seq_len) for encoding in encodings)
    if fast_tokens != tokens:
        raise RuntimeError(f"encode_batch_fast gave {fast_tokens} tokens, encode_batch {tokens}")
    return {
        "rows_in": rows_in,
        "rows_out": len(texts),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_used, 2),
        "fast_seconds": round(time.perf_counter() - fast_started, 2),
        "fast_cpu_seconds": round(cpu_seconds() - fast_cpu_started, 2),
    }


# ----------------------------------------------------------------------------------------- driver

RUNS = {"ours": run_ours, "baseline": run_baseline, "limit": run_limit}


def run_child(path: str, rows: int, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in a fresh interpreter; returns its JSON report."""
    command = [
        sys.executable, __file__, "--child", path, "--data-dir", str(data_dir), "--child-rows", str(rows),
        "--tokenizer", args.tokenizer, "--max-seq-len", str(args.max_seq_len),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{path} run failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    report["rows_per_s"] = round(report["rows_in"] / report["seconds"], 1) if report["seconds"] else None
    return report


def child_main(args: argparse.Namespace) -> None:
    args.rows = args.child_rows
    out_dir = Path(tempfile.mkdtemp(prefix=f"llmft-bench-{args.child}-"))
    try:
        with TreeMemorySampler() as sampler:
            report = RUNS[args.child](args, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    # peak_rss_mb: this process (ru_maxrss); tree_peak_mb: it and its workers, PSS summed (sampled).
    report.update(path=args.child, peak_rss_mb=peak_rss_mb(), tree_peak_mb=round(sampler.peak_mb, 1))
    windows = report.pop("step_windows", {})
    if windows:  # where the peak is: the tree's peak within each step of ours
        report["step_peak_mb"] = {step: sampler.peak_between(*window) for step, window in windows.items()}
    print(json.dumps(report, sort_keys=True), flush=True)


def default_tokenizer_dir(work_dir: Path) -> str:
    from llmft_assets.modeling.tiny_model import build_tiny_model

    # The tokenizer base_model(tiny, pretrain_steps=0) publishes: byte-level BPE, Qwen's pre-tokenizer, ChatML.
    return str(build_tiny_model(work_dir / "tiny_model", pretrain_steps=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows",
        default="20000,200000",
        help="SMALL,LARGE: RSS at both; ours, baseline, limit compared at LARGE",
    )
    parser.add_argument("--quick", action="store_true", help="--rows 2000,10000 (make benchmarks)")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--tokenizer", default=None, help="a save_pretrained dir (default: the tiny model's)")
    parser.add_argument("--work-dir", default=None, help="where the synthetic parquet files go (kept)")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--child", choices=tuple(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--child-rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    small_rows, large_rows = (int(value) for value in ("2000,10000" if args.quick else args.rows).split(","))
    if not 0 < small_rows < large_rows:
        parser.error("--rows must be SMALL,LARGE with 0 < SMALL < LARGE")
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="llmft-bench-data-"))
    data_dir = work_dir / "raw"
    started = time.perf_counter()
    write_synthetic_rows(data_dir, large_rows, args.seed)
    args.tokenizer = args.tokenizer or default_tokenizer_dir(work_dir)
    emit({"event": "prepared", "rows": large_rows, "seconds": round(time.perf_counter() - started, 1),
          "cpus": os.cpu_count(), "load_average": os.getloadavg()})  # fmt: skip

    small = run_child("ours", small_rows, data_dir, args)
    emit({"event": "rss", **small})
    ours = run_child("ours", large_rows, data_dir, args)
    emit({"event": "compare", **ours})
    baseline = run_child("baseline", large_rows, data_dir, args)
    emit({"event": "compare", **baseline})
    limit = run_child("limit", large_rows, data_dir, args)
    emit({"event": "compare", **limit})
    emit(
        {
            "event": "summary",
            "rows": large_rows,
            "cpus": os.cpu_count(),
            "ours_rows_per_s": ours["rows_per_s"],
            "baseline_rows_per_s": baseline["rows_per_s"],
            "limit_rows_per_s": limit["rows_per_s"],
            "ours_step_seconds": ours["step_seconds"],
            "ours_step_peak_mb": [small["step_peak_mb"], ours["step_peak_mb"]],
            "speedup": round(ours["rows_per_s"] / baseline["rows_per_s"], 3),
            "ratio_to_limit": round(ours["rows_per_s"] / limit["rows_per_s"], 3),
            # The encoder without offsets (what ours calls for a byte-level BPE tokenizer), for reference.
            "limit_fast_rows_per_s": round(limit["rows_in"] / limit["fast_seconds"], 1),
            "ratio_to_fast_limit": round(ours["rows_per_s"] * limit["fast_seconds"] / limit["rows_in"], 3),
            # Same rows in, same tokens and labels out: the paths agree on what they produce.
            "outputs_match": (ours["rows_out"], ours["tokens"], ours["assistant_tokens"])
            == (baseline["rows_out"], baseline["tokens"], baseline["assistant_tokens"])
            and (ours["rows_out"], ours["tokens"]) == (limit["rows_out"], limit["tokens"]),
            "rss_rows": [small_rows, large_rows],
            "tree_peak_mb": [small["tree_peak_mb"], ours["tree_peak_mb"]],
            "rss_ratio": round(ours["tree_peak_mb"] / small["tree_peak_mb"], 3),
            "baseline_peak_mb": baseline["tree_peak_mb"],
            "load_average_after": os.getloadavg(),
        }
    )
    if not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
