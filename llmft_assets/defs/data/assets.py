"""The data half of the graph: raw -> cleaned -> validated -> tokenized -> splits, plus the base model.

Each asset streams Parquet row groups through the pure functions in `llmft_assets.data`, writes its
table(s) into a staging folder and returns a `StagedArtifact`; the IO manager publishes it atomically.
Counts are kept so that rows in = rows out + quarantined + duplicates dropped, and shown as metadata.
"""

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa

from llmft_assets.data.schema import (
    CONVERSATION_SCHEMA,
    QUARANTINE_SCHEMA,
    TOKENIZED_SCHEMA,
    StageCounts,
)
from llmft_assets.data.splits import SplitSettings
from llmft_assets.data.validation import ValidationLimits
from llmft_assets.defs.config_models import dagster_config
from llmft_assets.defs.storage_resources import (
    ArtifactHandle,
    StagedArtifact,
    StorageResource,
    artifact_output,
)
from llmft_assets.storage.tables import ParquetSink, iter_parquet_rows

DATA_GROUP = "data"
MODEL_GROUP = "model"
OWNERS = ["team:llmft"]
# code_version on each asset: bump it when the step's output for the same inputs changes, so Dagster
# marks what was built by the old code as stale.
RAW_SCHEMA = pa.schema(
    [
        pa.field("origin", pa.string(), nullable=False),
        # Rows keep their own columns (v0 and v1 differ); JSON keeps both in one table without coercion.
        pa.field("payload", pa.string(), nullable=False),
    ]
)
DATA_FILE = "data.parquet"
QUARANTINE_FILE = "quarantine.parquet"
SPLIT_NAMES = ("train", "validation", "test")
PROGRESS_EVERY_ROWS = 20_000


class RawDatasetConfig(dg.Config):
    source: str = "sample"
    """`sample` (bundled), a local file/glob/folder (jsonl, json, parquet), s3://bucket/prefix, or a HF dataset id."""
    config: str | None = "all"
    """R1-Distill-SFT config: v0, v1, or all (bundled sample only)."""
    max_rows: int | None = None
    batch_size: int = 2048
    columns: dict[str, str] | None = None
    """Your column names mapped onto a known format's, e.g. {prompt: question, response: answer}."""
    license: str | None = None
    """The dataset's licence when the per-source table (llmft_assets/training/licenses.py) does not know it."""


class CleanConfig(dg.Config):
    prefer_reannotated: bool = True
    """v1 rows: train on `reannotated_messages` (the R1 reasoning traces) rather than the short `messages`."""


ValidationConfig = dagster_config(ValidationLimits, "ValidationConfig")


class BaseModelConfig(dg.Config):
    model: str = "tiny"
    """`tiny` (built offline, deterministic) or a Hugging Face id / local path, e.g. Qwen/Qwen2.5-7B-Instruct."""
    revision: str | None = None
    pretrain_steps: int | None = None
    """tiny only: causal-LM pretraining steps on plain text (None = the builder's default)."""
    license: str | None = None
    """The model's licence when the per-model table (llmft_assets/training/licenses.py) does not know it."""


class TokenizeConfig(dg.Config):
    max_seq_len: int = 1024
    batch_size: int = 1024
    workers: int = 0
    """Tokenizer worker processes: 0 = one per CPU, 1 = in the step's own process."""


SplitConfig = dagster_config(SplitSettings, "SplitConfig")


def _counts_metadata(counts: StageCounts) -> dict[str, Any]:
    counts.check_balanced()
    data = counts.to_metadata()
    return {
        "rows_in": data["rows_in"],
        "rows_out": data["rows_out"],
        "quarantined": data["quarantined"],
        "duplicates_dropped": data["duplicates"],
        "quarantine_reasons": dg.MetadataValue.json(data["quarantine_reasons"]),
        "counts_balance": dg.MetadataValue.md(
            f"**{data['rows_in']}** in = **{data['rows_out']}** out + **{data['quarantined']}** quarantined"
            f" + **{data['duplicates']}** duplicates dropped"
        ),
    }


def _preview(rows: list[dict[str, Any]], limit: int = 5) -> dg.MetadataValue:
    lines = ["| id | source | first user turn |", "|---|---|---|"]
    for row in rows[:limit]:
        user = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
        snippet = user[:100].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row['id']} | {row['source']} | {snippet} |")
    return dg.MetadataValue.md("\n".join(lines))


def _log_progress(context: dg.AssetExecutionContext, counts: StageCounts, last: list[int]) -> None:
    if counts.rows_in - last[0] >= PROGRESS_EVERY_ROWS:
        last[0] = counts.rows_in
        context.log.info(
            f"{counts.stage}: {counts.rows_in} rows read, {counts.rows_out} kept, "
            f"{counts.quarantined} quarantined, {counts.duplicates} duplicates"
        )


DATASET_KEY = "dataset"  # artifact metadata: {source, config, license, license_source}, carried downstream


def _license_fields(license_: Any) -> dict[str, str]:
    return {"license": license_.license, "license_source": license_.source}


def _carried(upstream: ArtifactHandle) -> dict[str, Any]:
    """The dataset description of the upstream artifact, for this one's metadata (absent on old artifacts)."""
    return {DATASET_KEY: upstream.metadata[DATASET_KEY]} if DATASET_KEY in upstream.metadata else {}


def _stage_result(
    staging: Path, counts: StageCounts, extra: dict[str, Any] | None = None
) -> tuple[StagedArtifact, dict[str, Any]]:
    counts_data = counts.to_metadata()
    artifact = StagedArtifact(staging, metadata={"counts": counts_data, **(extra or {})})
    return artifact, _counts_metadata(counts)


@dg.asset(group_name=DATA_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="2")
def raw_dataset(
    context: dg.AssetExecutionContext, config: RawDatasetConfig, storage: StorageResource
) -> dg.Output[StagedArtifact]:
    """R1-Distill-SFT rows as read from the source, one JSON payload per row; unparseable input quarantined."""
    from llmft_assets.data.raw_sources import DataSourceError, iter_raw_batches

    staging = storage.staging_dir("raw_dataset")
    counts = StageCounts(stage="raw")
    s3_client = storage.s3.get_client() if config.source.startswith("s3://") else None
    last = [0]
    try:
        batches = iter_raw_batches(
            config.source,
            config=config.config,
            max_rows=config.max_rows,
            batch_size=config.batch_size,
            s3_client=s3_client,
            counts=counts,
            columns=config.columns,
        )
    except (DataSourceError, ValueError) as exc:
        # One clear line for the person at the UI: which source, what is wrong. No retry can fix it.
        raise dg.Failure(description=f"raw_dataset: {exc}", allow_retries=False) from exc
    with (
        ParquetSink(staging / DATA_FILE, RAW_SCHEMA) as rows_out,
        ParquetSink(staging / QUARANTINE_FILE, QUARANTINE_SCHEMA) as quarantine_out,
    ):
        for batch in batches:
            rows_out.write_rows(
                [
                    {
                        "origin": row.get("origin", "unknown"),
                        "payload": json.dumps(row, ensure_ascii=False, default=str),
                    }
                    for row in batch.rows
                ]
            )
            quarantine_out.write_rows(batch.quarantine)
            _log_progress(context, counts, last)
    for warning in counts.warnings:
        context.log.warning(warning)
    from llmft_assets.training.licenses import dataset_license

    license_ = dataset_license(config.source, config.license)
    # Which data this is and under what licence travels with every derived artifact, to the BOM.
    dataset = {"source": config.source, "config": config.config, **_license_fields(license_)}
    artifact, metadata = _stage_result(
        staging, counts, {"source": config.source, "config": config.config, DATASET_KEY: dataset}
    )
    return artifact_output(
        artifact,
        metadata={
            **metadata,
            "source": config.source,
            "config": str(config.config),
            "license": license_.license,
        },
    )


@dg.asset(group_name=DATA_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="1")
def cleaned_dataset(
    context: dg.AssetExecutionContext,
    config: CleanConfig,
    raw_dataset: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """One canonical conversation schema for both configs: NFC, whitespace and control characters
    normalized, always-null columns dropped, exact duplicates removed by content hash."""
    from llmft_assets.data.cleaning import always_null_columns, clean_rows
    from llmft_assets.data.formats import format_counts

    staging = storage.staging_dir("cleaned_dataset")
    counts = StageCounts(stage="cleaned")
    seen_hashes: set[str] = set()
    preview: list[dict[str, Any]] = []
    last = [0]
    with (
        ParquetSink(staging / DATA_FILE, CONVERSATION_SCHEMA) as rows_out,
        ParquetSink(staging / QUARANTINE_FILE, QUARANTINE_SCHEMA) as quarantine_out,
    ):
        for raw_rows in iter_parquet_rows(raw_dataset.file(DATA_FILE)):
            rows = [{**json.loads(r["payload"]), "origin": r["origin"]} for r in raw_rows]
            cleaned, quarantine = clean_rows(
                rows, seen_hashes=seen_hashes, counts=counts, prefer_reannotated=config.prefer_reannotated
            )
            rows_out.write_rows(cleaned)
            quarantine_out.write_rows(quarantine)
            preview.extend(cleaned[: 5 - len(preview)])
            _log_progress(context, counts, last)
    dropped = always_null_columns(counts)
    formats = format_counts(counts)
    artifact, metadata = _stage_result(
        staging, counts, {"dropped_null_columns": dropped, "formats": formats, **_carried(raw_dataset)}
    )
    return artifact_output(
        artifact,
        metadata={
            **metadata,
            "rows_per_format": dg.MetadataValue.json(formats),
            "dropped_always_null_columns": dg.MetadataValue.json(dropped),
            "preview": _preview(preview),
            "upstream_version": raw_dataset.version,
        },
    )


@dg.asset(group_name=DATA_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="2")
def validated_dataset(
    context: dg.AssetExecutionContext,
    config: ValidationConfig,
    cleaned_dataset: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """Conversations that pass the rules (role order, non-empty turns, balanced <think>, length bounds,
    answer present, unique ids); every rejected row is in quarantine.parquet with its reason."""
    from llmft_assets.data.formats import format_counts
    from llmft_assets.data.validation import validate_rows

    limits = config.to_domain(asset="validated_dataset")
    staging = storage.staging_dir("validated_dataset")
    counts = StageCounts(stage="validated")
    seen_ids: set[str] = set()
    last = [0]
    with (
        ParquetSink(staging / DATA_FILE, CONVERSATION_SCHEMA) as rows_out,
        ParquetSink(staging / QUARANTINE_FILE, QUARANTINE_SCHEMA) as quarantine_out,
    ):
        for rows in iter_parquet_rows(cleaned_dataset.file(DATA_FILE)):
            valid, quarantine = validate_rows(rows, seen_ids=seen_ids, limits=limits, counts=counts)
            rows_out.write_rows(valid)
            quarantine_out.write_rows(quarantine)
            _log_progress(context, counts, last)
    formats = format_counts(counts)
    artifact, metadata = _stage_result(staging, counts, {"formats": formats, **_carried(cleaned_dataset)})
    reject_rate = counts.quarantined / counts.rows_in if counts.rows_in else 0.0
    return artifact_output(
        artifact,
        metadata={
            **metadata,
            "rows_per_format": dg.MetadataValue.json(formats),
            "reject_rate": reject_rate,
            "upstream_version": cleaned_dataset.version,
        },
    )


@dg.asset(group_name=MODEL_GROUP, owners=OWNERS, kinds={"pytorch", "safetensors"}, code_version="1")
def base_model(
    context: dg.AssetExecutionContext, config: BaseModelConfig, storage: StorageResource
) -> dg.Output[StagedArtifact]:
    """The model and tokenizer everything trains on, published into storage so training pods and
    servers never need the hub. `tiny` is built offline and deterministically."""
    from llmft_assets.modeling.base_model import materialize_base_model

    staging = storage.staging_dir("base_model")
    context.log.info(f"materializing base model {config.model!r}")
    from llmft_assets.training.licenses import base_model_license

    info = materialize_base_model(
        config.model, staging, revision=config.revision, pretrain_steps=config.pretrain_steps
    )
    info.update(_license_fields(base_model_license(info.get("model_id"), config.license)))
    metadata: dict[str, Any] = {
        key: value
        for key, value in info.items()
        if isinstance(value, str | int | float) and value is not None
    }
    metadata["info"] = dg.MetadataValue.json(info)
    return artifact_output(StagedArtifact(staging, metadata={"model_info": info}), metadata=metadata)


@dg.asset(group_name=DATA_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="1")
def tokenized_dataset(
    context: dg.AssetExecutionContext,
    config: TokenizeConfig,
    validated_dataset: ArtifactHandle,
    base_model: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """Conversations rendered with the base model's own chat template; labels are -100 everywhere
    except assistant turns (content + end token); sequences over max_seq_len truncated and counted."""
    from llmft_assets.data.parallel import iter_tokenized_tables, resolve_workers
    from llmft_assets.data.stats import token_length_histogram
    from llmft_assets.storage.tables import iter_parquet_batches

    workers = resolve_workers(config.workers)
    staging = storage.staging_dir("tokenized_dataset")
    counts = StageCounts(stage="tokenized")
    lengths: list[int] = []
    assistant_tokens = 0
    truncated = 0
    last = [0]
    context.log.info(f"tokenizing with {workers} worker process(es)")
    # Arrow batches go to the workers as they are: the conversation columns never become Python objects here.
    batches = iter_parquet_batches(validated_dataset.file(DATA_FILE), batch_size=config.batch_size)
    with ParquetSink(staging / DATA_FILE, TOKENIZED_SCHEMA) as rows_out:
        for table, batch_counts in iter_tokenized_tables(
            batches, base_model.path, max_seq_len=config.max_seq_len, workers=workers
        ):
            counts.merge(batch_counts)
            rows_out.write_table(table)
            lengths.extend(table.column("num_tokens").to_pylist())
            assistant_tokens += batch_counts.extra["assistant_tokens"]
            truncated += batch_counts.extra["truncated"]
            _log_progress(context, counts, last)
    histogram = token_length_histogram(lengths, bins=20)
    total_tokens = sum(lengths)
    artifact, metadata = _stage_result(
        staging,
        counts,
        {
            "max_seq_len": config.max_seq_len,
            "total_tokens": total_tokens,
            "base_model_version": base_model.version,
            **_carried(validated_dataset),
        },
    )
    return artifact_output(
        artifact,
        metadata={
            **metadata,
            "total_tokens": total_tokens,
            "assistant_tokens": assistant_tokens,
            "assistant_token_share": assistant_tokens / total_tokens if total_tokens else 0.0,
            "truncated_rows": truncated,
            "max_seq_len": config.max_seq_len,
            "mean_tokens": total_tokens / len(lengths) if lengths else 0.0,
            "max_tokens": max(lengths, default=0),
            "token_length_histogram": dg.MetadataValue.json(histogram),
            "token_length_histogram_md": dg.MetadataValue.md(_histogram_md(histogram)),
            "base_model_version": base_model.version,
            "upstream_version": validated_dataset.version,
        },
    )


def _histogram_md(histogram: dict[str, Any]) -> str:
    edges = histogram["edges"]
    counts = histogram["counts"]
    peak = max(counts, default=0) or 1
    lines = ["| tokens | rows | |", "|---|---|---|"]
    for index, count in enumerate(counts):
        lines.append(
            f"| {edges[index]:.0f}-{edges[index + 1]:.0f} | {count} | {'█' * max(1, round(20 * count / peak)) if count else ''} |"
        )
    return "\n".join(lines)


@dg.asset(group_name=DATA_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="2")
def dataset_splits(
    context: dg.AssetExecutionContext,
    config: SplitConfig,
    tokenized_dataset: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """train / validation / test by a stable hash of the normalized problem (the first user turn), so the
    same problem under two ids never crosses splits; near-duplicate prompts (MinHash) are kept together,
    with train winning. Adding rows never moves an existing row, except an evaluation row into train."""
    from llmft_assets.data.splits import first_user_turn, plan_leak_free_splits

    data_file = tokenized_dataset.file(DATA_FILE)

    def read_prompts():
        for rows in iter_parquet_rows(data_file, columns=["id", "messages"]):
            yield [(row["id"], first_user_turn(row["messages"])) for row in rows]

    rule = config.to_domain(asset="dataset_splits")
    plan = plan_leak_free_splits(
        read_prompts,
        validation_fraction=rule.validation_fraction,
        test_fraction=rule.test_fraction,
        salt=rule.salt,
        threshold=rule.near_duplicate_jaccard,
    )
    staging = storage.staging_dir("dataset_splits")
    sinks = {name: ParquetSink(staging / f"{name}.parquet", TOKENIZED_SCHEMA) for name in SPLIT_NAMES}
    tokens = dict.fromkeys(SPLIT_NAMES, 0)
    rows_in = 0
    try:
        for rows in iter_parquet_rows(data_file):
            by_split: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLIT_NAMES}
            for row in rows:
                split = plan.assignments[rows_in]
                by_split[split].append(row)
                tokens[split] += row["num_tokens"]
                rows_in += 1
            for name, split_rows in by_split.items():
                sinks[name].write_rows(split_rows)
    finally:
        for sink in sinks.values():
            sink.close()
    sizes = {name: sinks[name].rows_written for name in SPLIT_NAMES}
    if sum(sizes.values()) != rows_in:
        raise RuntimeError(f"split sizes {sizes} do not add up to {rows_in} tokenized rows")
    context.log.info(f"splits: {sizes}")
    artifact = StagedArtifact(
        staging,
        metadata={
            "rows": sizes,
            "tokens": tokens,
            "salt": rule.salt,
            "split_key": "normalized first user turn",
            "near_duplicate_jaccard": rule.near_duplicate_jaccard,
            "near_duplicates_moved_to_train": plan.moved_to_train,
            "upstream": tokenized_dataset.version,
            **_carried(tokenized_dataset),
        },
    )
    return artifact_output(
        artifact,
        metadata={
            **{f"{name}_rows": sizes[name] for name in SPLIT_NAMES},
            **{f"{name}_tokens": tokens[name] for name in SPLIT_NAMES},
            "rows_in": rows_in,
            "split_rule": f"sha256(salt={config.salt!r}, normalized first user turn): test "
            f"{config.test_fraction}, validation {config.validation_fraction}; near duplicates kept together",
            "near_duplicates_moved_to_train": plan.moved_to_train,
            "near_duplicates_joined_eval_split": plan.joined_eval_group,
            "upstream_version": tokenized_dataset.version,
        },
    )


def split_file(splits: ArtifactHandle, name: str) -> Path:
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
    return splits.file(f"{name}.parquet")
