"""Asset checks on the data assets: schema, unique ids, reject rate, loss masks, split isolation."""

from collections.abc import Iterator

import dagster as dg
import pyarrow.parquet as pq

from llmft_assets import settings
from llmft_assets.data.schema import CONVERSATION_SCHEMA, TOKENIZED_SCHEMA
from llmft_assets.data.stage import DATA_FILE, SPLIT_NAMES
from llmft_assets.data.uniqueness import duplicated_values
from llmft_assets.defs.data.assets import split_file
from llmft_assets.defs.storage_resources import ArtifactHandle
from llmft_assets.manifests import SplitsManifest, StageManifest
from llmft_assets.storage.tables import iter_parquet_batches, iter_parquet_rows


def _schema_problems(path, expected) -> list[str]:
    actual = pq.read_schema(path)
    problems = []
    for field in expected:
        if field.name not in actual.names:
            problems.append(f"missing column {field.name}")
        elif not actual.field(field.name).type.equals(field.type):
            problems.append(f"{field.name}: {actual.field(field.name).type} != {field.type}")
    return problems


@dg.asset_check(
    asset="validated_dataset", blocking=True, description="Columns and types match the conversation schema."
)
def validated_schema(validated_dataset: ArtifactHandle) -> dg.AssetCheckResult:
    problems = _schema_problems(validated_dataset.file(DATA_FILE), CONVERSATION_SCHEMA)
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": dg.MetadataValue.json(problems)})


@dg.asset_check(asset="validated_dataset", blocking=True, description="No conversation id appears twice.")
def validated_unique_ids(validated_dataset: ArtifactHandle) -> dg.AssetCheckResult:
    rows, duplicates, examples = duplicated_values(validated_dataset.file(DATA_FILE), "id")
    return dg.AssetCheckResult(
        passed=duplicates == 0,
        metadata={"rows": rows, "duplicate_ids": duplicates, "examples": dg.MetadataValue.json(examples)},
    )


@dg.asset_check(
    asset="validated_dataset",
    blocking=True,
    description="Validation rejects at most LLMFT_MAX_REJECT_RATE (default 20%) of its input.",
)
def validated_reject_rate(validated_dataset: ArtifactHandle) -> dg.AssetCheckResult:
    counts = validated_dataset.manifest(StageManifest).counts
    rate = counts["quarantined"] / counts["rows_in"] if counts["rows_in"] else 0.0
    max_reject_rate = settings.get().max_reject_rate
    return dg.AssetCheckResult(
        passed=counts["rows_in"] > 0 and rate <= max_reject_rate,
        metadata={
            "reject_rate": rate,
            "max_reject_rate": max_reject_rate,
            "rows_in": counts["rows_in"],
            "quarantine_reasons": dg.MetadataValue.json(counts["quarantine_reasons"]),
        },
        description=None if counts["rows_in"] else "validation received no rows",
    )


@dg.asset_check(
    asset="tokenized_dataset",
    additional_ins={"base_model": dg.AssetIn("base_model")},
    blocking=True,
    description="Rendered samples: the loss mask covers exactly the assistant turns, sequences end with the end token.",
)
def tokenized_masks(tokenized_dataset: ArtifactHandle, base_model: ArtifactHandle) -> dg.AssetCheckResult:
    from transformers import AutoTokenizer

    from llmft_assets.data.tokenization import verify_masks

    tokenizer = AutoTokenizer.from_pretrained(base_model.path)
    sample = next(
        iter_parquet_rows(tokenized_dataset.file(DATA_FILE), batch_size=settings.get().mask_check_rows), []
    )
    problems = verify_masks(sample, tokenizer)
    problems += _schema_problems(tokenized_dataset.file(DATA_FILE), TOKENIZED_SCHEMA)
    return dg.AssetCheckResult(
        passed=bool(sample) and not problems,
        metadata={"rows_checked": len(sample), "problems": dg.MetadataValue.json(problems[:20])},
    )


@dg.asset_check(
    asset="dataset_splits",
    blocking=True,
    description="No problem crosses splits: normalized first user turns, content hashes and near-duplicate "
    "prompts (MinHash) are each in one split only.",
)
def splits_disjoint(dataset_splits: ArtifactHandle) -> dg.AssetCheckResult:
    from llmft_assets.data.split_isolation import isolation_problems
    from llmft_assets.data.split_tables import first_user_turns
    from llmft_assets.data.splits import NEAR_DUPLICATE_JACCARD

    rows = dict.fromkeys(SPLIT_NAMES, 0)

    def read_split(name: str) -> Iterator[tuple[list[str], list[str]]]:
        # Only each row's first user turn becomes a Python string (in Arrow), not its messages.
        for batch in iter_parquet_batches(
            split_file(dataset_splits, name), columns=["messages", "content_hash"]
        ):
            rows[name] += batch.num_rows
            yield first_user_turns(batch.column("messages")), batch.column("content_hash").to_pylist()

    recorded = dataset_splits.manifest(SplitsManifest).near_duplicate_jaccard
    threshold = float(recorded if recorded is not None else NEAR_DUPLICATE_JACCARD)
    report = isolation_problems(read_split, SPLIT_NAMES, threshold=threshold)
    return dg.AssetCheckResult(
        passed=not any(report["counts"].values()),
        metadata={
            "shared_problem_keys": report["counts"]["shared_problem_keys"],
            "shared_content_hashes": report["counts"]["shared_content_hashes"],
            "near_duplicates": report["counts"]["near_duplicates"],
            "rows": dg.MetadataValue.json(rows),
            "examples": dg.MetadataValue.json(report["examples"]),
        },
    )


DATA_CHECKS = [
    validated_schema,
    validated_unique_ids,
    validated_reject_rate,
    tokenized_masks,
    splits_disjoint,
]
