"""The one place domain results become Dagster metadata: what a person reads on an asset or check in the UI.

Each `*_metadata` function takes the typed result of one domain step and returns the metadata dict of
its materialization (or check). Tables carry Dagster's own `dagster/row_count` and
`dagster/column_schema`, the loss curve is an image, the rest are plain values, JSON and Markdown.
"""

import base64
import json
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq

from llmft_assets.data.shards import AssemblyResult
from llmft_assets.data.splits import SplitSettings
from llmft_assets.data.stage import SPLIT_NAMES, SplitResult, StageResult, TokenizeResult, split_path

NAN = float("nan")


def _number(value: float | None) -> float:
    return NAN if value is None else value


def link(uri: str) -> dg.MetadataValue:
    return dg.MetadataValue.url(uri) if "://" in uri else dg.MetadataValue.path(uri)


def markdown_table(header: list[str], rows: list[list[Any]]) -> dg.MetadataValue:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


# ------------------------------------------------------------------------------------------------ tables


def column_schema(path: Path) -> dg.TableSchema:
    """The Parquet file's columns and Arrow types, as Dagster's column schema."""
    schema = pq.read_schema(path)
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=item.name,
                type=str(item.type),
                constraints=dg.TableColumnConstraints(nullable=item.nullable),
            )
            for item in schema
        ]
    )


def table_metadata(path: Path, row_count: int) -> dict[str, Any]:
    """`dagster/row_count` and `dagster/column_schema` of the table an asset wrote (the UI shows them
    on the asset's overview and plots the row count over materializations)."""
    return {
        "dagster/row_count": dg.MetadataValue.int(row_count),
        "dagster/column_schema": dg.MetadataValue.table_schema(column_schema(path)),
    }


# -------------------------------------------------------------------------------------------------- data


def counts_metadata(result: StageResult) -> dict[str, Any]:
    data = result.counts.to_metadata()
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


def stage_metadata(result: StageResult, staging: Path, upstream_version: str | None = None) -> dict[str, Any]:
    """A data stage: its row accounting, its table's row count and schema, and what the stage recorded."""
    manifest = result.manifest
    metadata = {
        **counts_metadata(result),
        **table_metadata(staging / result.table_file, result.counts.rows_out),
    }
    if manifest.formats is not None:
        metadata["rows_per_format"] = dg.MetadataValue.json(manifest.formats)
    if manifest.dropped_null_columns is not None:
        metadata["dropped_always_null_columns"] = dg.MetadataValue.json(manifest.dropped_null_columns)
    if result.preview:
        metadata["preview"] = preview_metadata(result.preview)
    if upstream_version is not None:
        metadata["upstream_version"] = upstream_version
    return metadata


def preview_metadata(rows: list[dict[str, Any]]) -> dg.MetadataValue:
    table = []
    for row in rows:
        user = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
        table.append([row["id"], row["source"], user[:100].replace("\n", " ")])
    return markdown_table(["id", "source", "first user turn"], table)


def tokenized_metadata(result: TokenizeResult, staging: Path, upstream_version: str) -> dict[str, Any]:
    from llmft_assets.data.stats import token_length_histogram

    lengths = result.lengths
    total = sum(lengths)
    histogram = token_length_histogram(lengths, bins=20)
    return {
        **stage_metadata(result, staging, upstream_version),
        "total_tokens": total,
        "assistant_tokens": result.assistant_tokens,
        "assistant_token_share": result.assistant_tokens / total if total else 0.0,
        "truncated_rows": result.truncated,
        "max_seq_len": result.manifest.max_seq_len,
        "mean_tokens": total / len(lengths) if lengths else 0.0,
        "max_tokens": max(lengths, default=0),
        "token_length_histogram": dg.MetadataValue.json(histogram),
        "token_length_histogram_md": histogram_markdown(histogram),
        "base_model_version": result.manifest.base_model_version,
    }


def histogram_markdown(histogram: dict[str, Any]) -> dg.MetadataValue:
    edges, counts = histogram["edges"], histogram["counts"]
    peak = max(counts, default=0) or 1
    rows = [
        [f"{edges[i]:.0f}-{edges[i + 1]:.0f}", count, "█" * max(1, round(20 * count / peak)) if count else ""]
        for i, count in enumerate(counts)
    ]
    return markdown_table(["tokens", "rows", ""], rows)


def splits_metadata(
    result: SplitResult, staging: Path, rule: SplitSettings, upstream_version: str
) -> dict[str, Any]:
    manifest = result.manifest
    train_file = split_path(staging, "train")
    return {
        # The row count of the asset is all rows across the three split tables (same schema).
        **table_metadata(train_file, sum(manifest.rows.values())),
        **{f"{name}_rows": manifest.rows[name] for name in SPLIT_NAMES},
        **{f"{name}_tokens": manifest.tokens[name] for name in SPLIT_NAMES},
        "rows_in": result.rows_in,
        "split_rule": f"sha256(salt={rule.salt!r}, normalized first user turn): test {rule.test_fraction}, "
        f"validation {rule.validation_fraction}; near duplicates kept together",
        "near_duplicates_moved_to_train": manifest.near_duplicates_moved_to_train,
        "near_duplicates_joined_eval_split": result.near_duplicates_joined_eval_split,
        "upstream_version": upstream_version,
    }


def sharded_splits_metadata(result: AssemblyResult, staging: Path, rule: SplitSettings) -> dict[str, Any]:
    """sharded_dataset_splits (`llmft_assets.data.shards.AssemblyResult`): the splits, plus the cross-shard
    accounting (rows in = kept + repeated ids quarantined + cross-shard duplicates) and rows per shard."""
    counts = result.counts
    manifest = result.manifest
    return {
        **table_metadata(split_path(staging, "train"), sum(manifest.rows.values())),
        **{f"{name}_rows": manifest.rows[name] for name in SPLIT_NAMES},
        **{f"{name}_tokens": manifest.tokens[name] for name in SPLIT_NAMES},
        "shards": len(result.rows_per_shard),
        "rows_in": counts.rows_in,
        "rows_out": counts.rows_out,
        "cross_shard_duplicates": counts.duplicates,
        "repeated_ids_quarantined": counts.quarantined,
        "counts_balance": dg.MetadataValue.md(
            f"**{counts.rows_in}** rows from the shards = **{counts.rows_out}** split + **{counts.quarantined}**"
            f" repeated ids quarantined + **{counts.duplicates}** cross-shard duplicates dropped"
        ),
        "rows_per_shard": markdown_table(
            ["shard", "tokenized version", "rows kept"],
            [[key, manifest.shards[key], rows] for key, rows in result.rows_per_shard.items()],
        ),
        "split_rule": f"sha256(salt={rule.salt!r}, normalized first user turn): test {rule.test_fraction}, "
        f"validation {rule.validation_fraction}; near duplicates kept together",
        "near_duplicates_moved_to_train": manifest.near_duplicates_moved_to_train,
        "near_duplicates_joined_eval_split": result.near_duplicates_joined_eval_split,
    }


def base_model_metadata(info: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        key: value
        for key, value in info.items()
        if isinstance(value, str | int | float) and value is not None
    }
    metadata["info"] = dg.MetadataValue.json(info)
    return metadata


# ---------------------------------------------------------------------------------------------- training


def loss_curve_image(png: bytes) -> dg.MetadataValue:
    """The loss curve PNG inline in the UI (Markdown with a data URI: no file server needed)."""
    return dg.MetadataValue.md(f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})")


def adapter_metadata(run: Any) -> dict[str, Any]:
    """lora_adapter: a fresh training (loss, throughput, MLflow links, BOM, loss curve) or a reused one."""
    if run.reused:
        return {**run.summary, "reused": True, "skip_reason": run.reuse_reason, "run_key": run.run_key}
    from llmft_assets.training.tracking import LOSS_CURVE_ARTIFACT_FILE

    result = run.result
    metadata: dict[str, Any] = {
        **run.summary,
        "mlflow_run_url": dg.MetadataValue.url(run.mlflow_run_url)
        if run.mlflow_run_url
        else run.summary["mlflow_run_id"],
        "tokens_per_second": result.tokens_per_second,
        "train_tokens": result.num_train_tokens,
        "train_runtime_s": result.train_runtime_s,
        "trainable_params": result.num_trainable_params,
        "total_params": result.num_total_params,
        "resumed_from_step": result.resumed_from_step if result.resumed_from_step is not None else -1,
        "world_size": result.world_size,
        "device": result.device,
        "precision": result.precision,
        "loss_history": dg.MetadataValue.json(result.to_dict()["loss_history"]),
        "bill_of_materials": dg.MetadataValue.json(json.loads(json.dumps(run.bom, default=str))),
        "reused": False,
    }
    if run.launch_reports:  # a multi-process run: what rank 0 reported over Dagster Pipes
        metadata["pipes_loss_reports"] = dg.MetadataValue.json(run.launch_reports)
    if run.loss_png:
        metadata["loss_curve"] = loss_curve_image(run.loss_png)
        metadata["loss_curve_artifact"] = LOSS_CURVE_ARTIFACT_FILE
    else:
        metadata["loss_curve"] = dg.MetadataValue.md("no loss logged")
    return metadata


# -------------------------------------------------------------------------------------------- evaluation


def gate_metadata(gate: dict[str, Any]) -> dict[str, Any]:
    """Flat metadata: the decision and each criterion's value, threshold and verdict (+ a table)."""
    from llmft_assets.evaluation.gate import Criterion, criteria_table

    rows = [
        [
            row["criterion"],
            "-" if row["value"] is None else f"{row['value']:.4g}",
            row["threshold"] or "-",
            row["verdict"],
        ]
        for row in criteria_table([Criterion(**criterion) for criterion in gate["criteria"]])
    ]
    table = markdown_table(["criterion", "value", "threshold", "verdict"], rows)
    decision = f"**{'PROMOTE' if gate['passed'] else 'REFUSE'}** (champion: {gate.get('champion') or 'none'})"
    metadata: dict[str, Any] = {
        "gate_passed": bool(gate["passed"]),
        "gate": dg.MetadataValue.md(f"{decision}\n\n{table.value}"),
    }
    for criterion in gate["criteria"]:
        name = criterion["name"]
        metadata[f"{name}_value"] = _number(criterion["value"])
        metadata[f"{name}_threshold"] = _number(criterion["threshold"])
        metadata[f"{name}_verdict"] = criterion["verdict"]
    return metadata


def eval_metadata(outcome: Any, test_data: Any) -> dict[str, Any]:
    """eval_report: headline metrics, the per-model table, the gate's decision on every criterion, and
    whose test split was scored (`test_data`: the adapter's TrainingData)."""
    report, manifest = outcome.report, outcome.manifest
    metrics = ["accuracy", "format_compliance", "finished_rate", "perplexity", "mean_response_tokens"]
    rows = []
    for name in report.models:
        scores = report.metrics_for(name)
        rows.append(
            [name, *(f"{scores[m]:.4g}" if isinstance(scores.get(m), int | float) else "-" for m in metrics)]
        )
    return {
        **{key: _number(value) for key, value in manifest.headline.items()},
        "adapter_version": manifest.adapter_version,
        "registered_version": str(manifest.registered_version),
        "report_preview": markdown_table(["model", *metrics], rows),
        "test_data": test_data.asset,
        "test_data_version": test_data.version,
        **gate_metadata(report.gate),
        **traffic_metadata(outcome),
    }


def traffic_metadata(outcome: Any) -> dict[str, Any]:
    """A retrained adapter's scores on its retraining dataset's traffic slice (none for other adapters)."""
    if outcome.traffic_report is None:
        return {}
    headline = outcome.traffic_report.headline()
    return {
        "retraining_dataset_version": outcome.retraining_dataset_version,
        **{f"traffic_slice_{key}": _number(value) for key, value in headline.items()},
    }


def promotion_metadata(gate: dict[str, Any], promotion: Any) -> dict[str, Any]:
    """eval_gate: the gate's criteria, the reasons, and whether the candidate became champion."""
    return {
        **gate_metadata(gate),
        "reasons": dg.MetadataValue.md("\n".join(f"- {reason}" for reason in promotion.reasons)),
        "candidate_version": str(promotion.candidate),
        "previous_champion": promotion.previous_champion or "none",
        "promoted": promotion.promoted,
    }


# ----------------------------------------------------------------------------------------------- serving


def license_metadata(policy: Any, licenses: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    return {
        "policy": policy.describe(),
        "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none"),
        **{f"{what.replace(' ', '_')}_license": lic.license for what, lic in licenses.items()},
        **{f"{what.replace(' ', '_')}_license_source": lic.source for what, lic in licenses.items()},
    }


def bento_metadata(packaged: Any, release: Any) -> dict[str, Any]:
    target = packaged.bento_tag or "bentos.service:LLMChatService"
    return {
        "model_tag": packaged.model_tag,
        "bento_tag": packaged.bento_tag or "not built",
        "model_version": release.adapter_version,
        "mlflow_model_version": release.registered_version,
        "serve": dg.MetadataValue.md(f"`make serve` (or `bentoml serve {target}`)"),
    }


def merged_model_metadata(export: Any) -> dict[str, Any]:
    return {
        **{key: value for key, value in export.info.items() if isinstance(value, str | int)},
        "weight_files": dg.MetadataValue.json(export.weight_files),
        "base_model_version": export.base_model_version,
        "model_card": dg.MetadataValue.md(export.model_card),
    }


# -------------------------------------------------------------------------------------------- monitoring


def drift_columns_markdown(summary: dict[str, Any]) -> dg.MetadataValue:
    rows = []
    for name, column in sorted(summary.get("columns", {}).items()):
        score = "n/a" if column["score"] is None else f"{column['score']:.4g}"
        threshold = "n/a" if column["threshold"] is None else f"{column['threshold']:.4g}"
        drifted = "**yes**" if column["drifted"] else "no"
        rows.append([name, column["kind"], column["method"], score, threshold, drifted])
    return markdown_table(["column", "kind", "method", "score", "threshold", "drifted"], rows)


def drift_metadata(outcome: Any) -> dict[str, Any]:
    """drift_report: the verdict, the windows compared, the drifted columns and links to the report."""
    result, window, manifest = outcome.result, outcome.window, outcome.manifest
    metadata: dict[str, Any] = {
        "status": result.status,
        "message": result.message,
        "drifted_columns": dg.MetadataValue.json(result.drifted_columns),
        "drifted_column_count": len(result.drifted_columns),
        "number_of_columns": result.number_of_columns,
        "drift_share_threshold": result.drift_share_threshold,
        "reference_rows": result.reference_rows,
        "current_rows": result.current_rows,
        "current_rows_logged": outcome.current_rows_logged,
        "min_rows": result.min_rows,
        "window_start": window.start.isoformat(),
        "window_end": window.end.isoformat(),
        "request_log_batches": window.batches_read,
        "request_log_batches_skipped": len(window.skipped_batches),
        "report_html": link(str(manifest.report_html)),
        "report_json": link(str(manifest.report_json)),
        "dataset_splits_version": outcome.splits_version,
    }
    if result.drift_share is not None:
        metadata["drift_share"] = result.drift_share
    if result.columns:
        metadata["columns"] = drift_columns_markdown(manifest.summary)
    if result.notes:
        metadata["notes"] = dg.MetadataValue.json(result.notes)
    return metadata


def drift_check_metadata(
    summary: dict[str, Any], verdict: Any, report_version: str, report_uri: str
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "status": verdict.status,
        "report_version": report_version,
        "report_html": link(str(report_uri)),
        "drifted_columns": dg.MetadataValue.json(summary.get("drifted_columns", [])),
        "reference_rows": int(summary.get("reference_rows", 0) or 0),
        "current_rows": int(summary.get("current_rows", 0) or 0),
    }
    if summary.get("drift_share") is not None:
        metadata["drift_share"] = float(summary["drift_share"])
    if summary.get("drift_share_threshold") is not None:
        metadata["drift_share_threshold"] = float(summary["drift_share_threshold"])
    return metadata


def retraining_metadata(result: Any) -> dict[str, Any]:
    """retraining_dataset: rows per split, what the selection kept and dropped, per traffic cluster; or,
    without served traffic, that the current splits were carried over (rows in = rows out)."""
    stats, manifest = result.stats, result.manifest
    lineage = {
        "drift_report_version": manifest.drift_report_version,
        "dataset_splits_version": manifest.dataset_splits_version,
        "pool_version": manifest.pool_version,
        "request_log_window": manifest.request_log_window,
    }
    if result.carried_over:
        return {
            **{f"{name}_rows": count for name, count in manifest.rows.items()},
            "carried_over": result.carried_over,
            "traffic_prompts": result.traffic_prompts,
            "selected_rows": 0,
            "current_train_rows_kept": result.current_train_rows_kept,
            **lineage,
        }
    clusters = [
        [
            item.cluster.index,
            f"{item.cluster.share:.1%}",
            ", ".join(item.cluster.top_terms),
            item.quota,
            item.selected,
            "n/a" if item.mean_similarity is None else f"{item.mean_similarity:.3f}",
        ]
        for item in stats.clusters
    ]
    edges = stats.histogram_edges
    histogram = [
        [f"{edges[i]:.1f}-{edges[i + 1]:.1f}", pool, selected]
        for i, (pool, selected) in enumerate(zip(stats.histogram_pool, stats.histogram_selected, strict=True))
    ]
    return {
        **{f"{name}_rows": count for name, count in manifest.rows.items()},
        "traffic_prompts": result.traffic_prompts,
        "pool_rows": stats.pool_rows,
        "selected_rows": stats.selected_rows,
        "current_train_rows_kept": result.current_train_rows_kept,
        "dropped_in_held_out_splits": stats.dropped_in_test_split,
        "dropped_duplicate_problem": stats.dropped_duplicate_problem,
        "below_min_similarity": stats.below_min_similarity,
        "index_mb": round(stats.index_bytes / 2**20, 2),
        "rows_per_traffic_cluster": markdown_table(
            ["cluster", "traffic share", "top words", "quota", "selected", "mean similarity"], clusters
        ),
        "similarity_histogram": markdown_table(["similarity", "pool rows", "selected"], histogram),
        **lineage,
        **pool_preparation_metadata(result.pool_preparation),
    }


def pool_preparation_metadata(preparation: dict[str, Any] | None) -> dict[str, Any]:
    """A raw pool's rows that never reached the selection (parse, clean, validate), by stage and reason."""
    if not preparation:
        return {}
    return {
        "pool_raw_rows": preparation["raw_rows"],
        "pool_rejected_rows": preparation["rejected_rows"],
        "pool_duplicate_rows": preparation["duplicate_rows"],
        "pool_reject_reasons": markdown_table(
            ["stage.reason", "rows"], [[reason, n] for reason, n in preparation["reject_reasons"].items()]
        ),
    }
