"""The Dagster layer by domain and thin: what each defs/<domain>/ folder defines, the names the code
location keeps, the domain/orchestration boundary, the typed manifests, and Dagster's own machinery
(row count and column schema on tables, the loss curve as an image, the freshness check on drift_report)."""

from __future__ import annotations

import ast
import base64
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
from dagster._core.test_utils import freeze_time

from llmft_assets.definitions import DATA_ASSETS, build_resources, defs
from llmft_assets.defs import metadata
from llmft_assets.defs.monitoring.checks import drift_report_freshness
from llmft_assets.manifests import AdapterManifest, SplitsManifest, StageManifest

PACKAGE = Path(__file__).resolve().parents[1] / "llmft_assets"
DOMAINS = ("data", "training", "evaluation", "serving", "monitoring")

# Every name the tests, the demo and the UI test depend on: the move by domain must keep them all.
ASSET_KEYS = {
    "raw_dataset",
    "cleaned_dataset",
    "validated_dataset",
    "base_model",
    "tokenized_dataset",
    "dataset_splits",
    "lora_adapter",
    "eval_report",
    "model_bento",
    "merged_model",
    "drift_report",
    "retraining_dataset",
    # The data chain partitioned by source shard (defs/data/shards.py) and its assembly.
    "shard_raw_dataset",
    "shard_cleaned_dataset",
    "shard_validated_dataset",
    "shard_tokenized_dataset",
    "sharded_dataset_splits",
}
JOBS = {
    "data_job",
    "train_job",
    "release_job",
    "drift_job",
    "retraining_dataset_job",
    "shard_job",
    "register_shards_job",
}
SENSORS = {
    "default_automation_condition_sensor",  # evaluates model_bento's release-after-eval condition
    "train_sensor",
    "release_sensor",
    "drift_retrain_sensor",
    "incoming_data_sensor",
    "drift_freshness_sensor",
}
CHECKS = {
    ("validated_dataset", "validated_schema"),
    ("validated_dataset", "validated_unique_ids"),
    ("validated_dataset", "validated_reject_rate"),
    ("tokenized_dataset", "tokenized_masks"),
    ("dataset_splits", "splits_disjoint"),
    ("eval_report", "eval_gate"),
    ("eval_report", "license_policy"),
    ("drift_report", "drift_check"),
    ("drift_report", "freshness_check"),
}
# Where each asset lives: its domain folder.
ASSET_DOMAIN = {
    "raw_dataset": "data",
    "cleaned_dataset": "data",
    "validated_dataset": "data",
    "base_model": "data",
    "tokenized_dataset": "data",
    "dataset_splits": "data",
    "lora_adapter": "training",
    "eval_report": "evaluation",
    "model_bento": "serving",
    "merged_model": "serving",
    "drift_report": "monitoring",
    "retraining_dataset": "monitoring",
    "shard_raw_dataset": "data",
    "shard_cleaned_dataset": "data",
    "shard_validated_dataset": "data",
    "shard_tokenized_dataset": "data",
    "sharded_dataset_splits": "data",
}
MAX_ASSET_BODY_LINES = 30


def test_the_code_location_keeps_every_name() -> None:
    repo = defs.get_repository_def()
    assert {key.to_user_string() for key in repo.asset_graph.get_all_asset_keys()} == ASSET_KEYS
    assert {job.name for job in defs.resolve_all_job_defs()} - {"__ASSET_JOB"} == JOBS
    assert {sensor.name for sensor in repo.sensor_defs} == SENSORS
    assert {schedule.name for schedule in repo.schedule_defs} == {"drift_schedule"}
    assert {(key.asset_key.to_user_string(), key.name) for key in repo.asset_graph.asset_check_keys} == CHECKS


def test_each_asset_is_defined_in_its_domain_folder() -> None:
    found = {
        node.name: name.split("/")[1]
        for name, node in _asset_functions()
        if any(ast.unparse(decorator).startswith("dg.asset(") for decorator in node.decorator_list)
    }
    assert found == ASSET_DOMAIN


def _asset_functions() -> list[tuple[str, ast.FunctionDef]]:
    functions = []
    for path in sorted((PACKAGE / "defs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                "asset" in ast.unparse(decorator).split("(")[0] for decorator in node.decorator_list
            ):
                functions.append((f"{path.relative_to(PACKAGE)}::{node.name}", node))
    return functions


def test_asset_bodies_are_thin() -> None:
    """An asset (or check) body is wiring: at most about 30 lines after its docstring."""
    bodies = {}
    for name, node in _asset_functions():
        statements = node.body[1:] if isinstance(node.body[0], ast.Expr) else node.body
        bodies[name] = statements[-1].end_lineno - statements[0].lineno + 1
    assert len(bodies) == len(ASSET_KEYS) + 8  # every asset and every hand-written check
    too_long = {name: lines for name, lines in bodies.items() if lines > MAX_ASSET_BODY_LINES}
    assert too_long == {}


def test_domain_modules_never_import_dagster() -> None:
    """Only defs/, definitions.py and the demo (which drives the code location) may import Dagster."""
    allowed = {"definitions.py", "demo.py"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "defs" or str(relative) in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{relative}: {name}" for name in names if name.split(".")[0].startswith("dagster")]
    # The training CLI speaks Dagster Pipes (the protocol package, not Dagster) when Dagster launches it.
    offenders.remove("training/cli.py: dagster_pipes")
    assert offenders == []


def test_manifests_read_artifacts_published_before_them() -> None:
    """Keys an older writer added are ignored; fields it never wrote take their defaults."""
    old_splits = {"rows": {"train": 8, "validation": 1, "test": 1}, "upstream": "abc", "legacy_key": 1}
    splits = SplitsManifest.from_dict(old_splits)
    assert (splits.rows, splits.upstream, splits.dataset, splits.near_duplicate_jaccard) == (
        {"train": 8, "validation": 1, "test": 1},
        "abc",
        None,
        None,
    )
    assert SplitsManifest.from_dict(splits.to_dict()) == splits
    adapter = AdapterManifest.from_dict({"mlflow_run_id": "r1", "registered_version": "3"})
    assert (adapter.mlflow_run_id, adapter.registered_version, adapter.train_loss) == ("r1", "3", None)
    with pytest.raises(TypeError):
        StageManifest.from_dict({"formats": {}})  # a stage artifact without its counts is not one


def test_loss_curve_is_an_image_in_the_ui() -> None:
    from llmft_assets.training.tracking import render_loss_curve_png

    png = render_loss_curve_png([(1, 2.0), (2, 1.5), (3, 1.1)])
    assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n")
    markdown = metadata.loss_curve_image(png).value
    prefix = "![loss curve](data:image/png;base64,"
    assert markdown.startswith(prefix) and markdown.endswith(")")
    assert base64.b64decode(markdown[len(prefix) : -1]) == png
    assert render_loss_curve_png([]) is None


def _table_metadata(result: dg.ExecuteInProcessResult, asset: str) -> tuple[int, dg.TableSchema]:
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        if materialization.asset_key.to_user_string() == asset:
            values = materialization.metadata
            return values["dagster/row_count"].value, values["dagster/column_schema"].value
    raise AssertionError(f"{asset} was not materialized")


def test_table_assets_carry_row_count_and_column_schema(tmp_path: Path) -> None:
    """dagster/row_count is the rows written to the published table; dagster/column_schema its columns."""
    from llmft_assets.storage import open_storage
    from llmft_assets.storage.publish import fetch_artifact

    chain = [
        asset
        for asset in DATA_ASSETS
        if asset.key.to_user_string() in {"raw_dataset", "cleaned_dataset", "validated_dataset"}
    ]
    result = dg.materialize(
        chain,
        resources=build_resources(),
        run_config={
            "ops": {"raw_dataset": {"config": {"source": "sample", "config": "all", "max_rows": 40}}}
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    backend = open_storage(build_resources()["storage"].root_uri())
    for asset in ("raw_dataset", "cleaned_dataset", "validated_dataset"):
        row_count, schema = _table_metadata(result, asset)
        _, path = fetch_artifact(backend, f"assets/{asset}", tmp_path / asset)
        written = pq.ParquetFile(path / "data.parquet")
        assert row_count == written.metadata.num_rows
        assert [column.name for column in schema.columns] == written.schema_arrow.names
        assert [column.type for column in schema.columns] == [str(t) for t in written.schema_arrow.types]
    assert _table_metadata(result, "raw_dataset")[0] == 40


def _plant_drift_report(instance: dg.DagsterInstance, at: datetime, day: str) -> None:
    """A materialization of drift_report's partition `day` (any partition counts for freshness)."""
    with freeze_time(at):
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="drift_report", partition=day))


def _freshness(instance: dg.DagsterInstance, at: datetime) -> dg.AssetCheckEvaluation:
    with freeze_time(at):
        result = (
            dg.Definitions(asset_checks=drift_report_freshness)
            .resolve_implicit_global_asset_job_def()
            .execute_in_process(instance=instance)
        )
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def test_freshness_check_fails_on_a_stale_drift_report_and_passes_on_a_fresh_one() -> None:
    from llmft_assets import settings

    window = timedelta(hours=settings.get().drift_freshness_hours)
    published = datetime(2026, 3, 1, 6, 0, tzinfo=UTC)
    with dg.instance_for_test() as instance:
        _plant_drift_report(instance, published, "2026-02-28")
        fresh = _freshness(instance, published + window - timedelta(minutes=5))
        stale = _freshness(instance, published + window + timedelta(minutes=5))
        _plant_drift_report(instance, published + window, "2026-03-01")  # the next day's report
        refreshed = _freshness(instance, published + window + timedelta(minutes=10))
    assert (fresh.check_name, fresh.passed) == ("freshness_check", True)
    assert (stale.passed, stale.severity) == (False, dg.AssetCheckSeverity.WARN)
    assert refreshed.passed is True


def _bento_requested(instance: dg.DagsterInstance, cursor: object) -> tuple[int, object]:
    result = dg.evaluate_automation_conditions(
        defs, instance, asset_selection=dg.AssetSelection.assets("model_bento"), cursor=cursor
    )
    return result.get_num_requested(dg.AssetKey("model_bento")), result.cursor


def _evaluated(instance: dg.DagsterInstance, *, gate_passed: bool) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="eval_report"))
    for check, passed in (("eval_gate", gate_passed), ("license_policy", True)):
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(asset_key=dg.AssetKey("eval_report"), check_name=check, passed=passed)
        )


@pytest.mark.parametrize("gate_passed", [True, False])
def test_model_bento_is_packaged_after_a_passing_evaluation_only(gate_passed: bool) -> None:
    with dg.instance_for_test() as instance:
        for asset in ("base_model", "lora_adapter"):
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset))
        before, cursor = _bento_requested(instance, None)
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="lora_adapter"))
        new_adapter, cursor = _bento_requested(instance, cursor)  # not evaluated yet: release_sensor's job
        _evaluated(instance, gate_passed=gate_passed)
        after, _ = _bento_requested(instance, cursor)
    assert (before, new_adapter, after) == (0, 0, 1 if gate_passed else 0)


def test_readme_layout_names_files_that_exist() -> None:
    """Every `something.py` the README's Layout section names exists where the section puts it."""
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"\b([a-z_]+/[a-z_]+\.py|[a-z_]+\.py)\b", layout))
    missing = [
        name
        for name in sorted(named)
        if not any(path.as_posix().endswith(name) for path in PACKAGE.parent.glob("llmft_assets/**/*.py"))
    ]
    assert len(named) >= 10 and missing == []
    assert all(f"{domain}/" in layout for domain in DOMAINS)
