"""lora_adapter -> eval_report -> eval_gate through Dagster, tracked in a real `mlflow server`.

One module-scoped workspace: the data chain is materialized once (small), then training runs against it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from llmft_assets.definitions import DATA_ASSETS, TRAINING_ASSETS, build_resources
from llmft_assets.defs.data.checks import DATA_CHECKS
from llmft_assets.defs.evaluation.checks import eval_gate
from llmft_assets_tests.servers import mlflow_server

pytestmark = pytest.mark.slow

ALL = [*DATA_ASSETS, *TRAINING_ASSETS, *DATA_CHECKS, eval_gate]
DATA_CONFIG = {
    "raw_dataset": {"config": {"source": "sample", "config": "all", "max_rows": 240}},
    "base_model": {"config": {"pretrain_steps": 0}},
    "tokenized_dataset": {"config": {"max_seq_len": 384}},
    "dataset_splits": {"config": {"validation_fraction": 0.1, "test_fraction": 0.1}},
}
TRAIN_CONFIG = {  # no max_seq_len: training takes tokenized_dataset's (384)
    "max_steps": 8,
    "save_steps": 2,
    "per_device_train_batch_size": 4,
    "logging_steps": 1,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("train_home")
    with pytest.MonkeyPatch.context() as patch, mlflow_server(home / "mlflow_server") as tracking_uri:
        env = {"LLMFT_HOME": str(home), "MLFLOW_TRACKING_URI": tracking_uri}
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("LLMFT_STORAGE", raising=False)
        result = dg.materialize(
            ALL,
            resources=build_resources(),
            selection=dg.AssetSelection.groups("data", "model"),
            run_config={"ops": DATA_CONFIG},
            instance=dg.DagsterInstance.ephemeral(),
        )
        assert result.success
        yield env


def _materialize(selection: list[str], run_config: dict, instance: dg.DagsterInstance | None = None):
    return dg.materialize(
        ALL,
        resources=build_resources(),
        selection=dg.AssetSelection.assets(*selection),
        run_config={"ops": run_config},
        instance=instance or dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        if materialization.asset_key.to_user_string() == asset:
            return {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}
    raise AssertionError(f"{asset} not materialized")


def test_train_evaluate_gate_and_registry(workspace: dict[str, str]) -> None:
    from mlflow import MlflowClient

    result = _materialize(
        ["lora_adapter", "eval_report"],
        {
            "lora_adapter": {"config": TRAIN_CONFIG},
            "eval_report": {"config": {"max_rows": 6, "max_new_tokens": 24}},
        },
    )
    # The only failure is the blocking gate refusing the adapter (asserted in detail below).
    failures = [e.event_specific_data.error.message for e in result.get_step_failure_events()]
    assert len(failures) == 1 and "eval_gate" in failures[0], failures
    adapter = _metadata(result, "lora_adapter")
    assert adapter["global_step"] == 8
    assert adapter["tokens_per_second"] > 0 and adapter["train_tokens"] > 0
    assert adapter["trainable_params"] < adapter["total_params"]
    bom = adapter["bill_of_materials"]
    assert bom["dataset"] == {
        "asset": "dataset_splits",
        "version": adapter["dataset_version"],
        "source": "sample",
        "config": "all",
        "license": "apache-2.0",
        "license_source": "per-source table (sample)",
    }
    assert bom["base_model"]["license"] == "apache-2.0" and "path" not in bom["base_model"]
    assert bom["base_model"]["chat_template_sha256"] and bom["base_model"]["tokenizer_sha256"]
    assert bom["base_model"]["artifact_version"] == adapter["base_model_version"]
    assert bom["seed"] == 42 and bom["training_config"]["lora_r"] == 16
    assert bom["code_version"]
    adapter_dir = Path(str(adapter["uri"])) / "adapter"
    # peft's local base-model path is replaced by the base model's id: no build-machine path travels.
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (
        adapter_config["base_model_name_or_path"] == bom["base_model"]["model_id"] == "llmft/tiny-qwen2-chat"
    )
    for path in adapter_dir.iterdir():
        if path.suffix in {".json", ".md", ".jinja", ".txt"}:
            text = path.read_text()
            assert workspace["LLMFT_HOME"] not in text and tempfile.gettempdir() not in text, path.name
    assert (adapter_dir / "adapter_model.safetensors").is_file()

    client = MlflowClient(workspace["MLFLOW_TRACKING_URI"])
    run = client.get_run(adapter["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["lora_r"] == "16" and run.data.params["max_steps"] == "8"
    assert run.data.params["max_seq_len"] == "384"  # read from the tokenized manifest
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) >= 4 and all(point.step > 0 for point in losses)
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "bill_of_materials.json"} <= artifacts
    assert any("loss_curve" in path for path in _all_artifacts(client, run.info.run_id))

    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    report = _metadata(result, "eval_report")
    assert report["num_rows"] > 0
    assert "adapter_perplexity" in report and "base_perplexity" in report
    version = adapter["registered_version"]
    # Eight steps on an untrained tiny model answer nothing right: the gate refuses, nothing is promoted.
    written = json.loads((Path(str(report["uri"])) / "eval_report.json").read_text())
    gate = written["gate"]
    assert gate is not None and gate["passed"] is False
    failed = [c["name"] for c in gate["criteria"] if c["verdict"] == "fail"]
    assert {"accuracy_gain", "accuracy_significance"} <= set(failed)
    assert [c["verdict"] for c in gate["criteria"][-4:]] == ["skipped"] * 4  # no champion yet
    assert report["gate_passed"] is False and report["accuracy_gain_verdict"] == "fail"
    assert report["accuracy_significance_threshold"] == 0.05
    check = checks["eval_gate"]
    assert not check.passed
    check_metadata = {k: getattr(v, "value", v) for k, v in check.metadata.items()}
    assert check_metadata["promoted"] is False and check_metadata["previous_champion"] == "none"
    assert check_metadata["finish_rate_threshold"] == 0.8
    assert check_metadata["finish_rate_value"] == report["adapter_finished_rate"]
    assert check_metadata["accuracy_gain_verdict"] == "fail"
    tags = client.get_model_version("llmft-adapter", version).tags
    assert tags["llmft.gate.passed"] == "false"
    assert tags["llmft.gate.accuracy_gain"].startswith("fail: ")
    assert tags["llmft.gate.champion_accuracy"] == "skipped: n/a"
    assert client.get_model_version_by_alias("llmft-adapter", "candidate").version == version
    with pytest.raises(Exception, match="champion"):
        client.get_model_version_by_alias("llmft-adapter", "champion")


BENTO_RUN = """
import json, dagster as dg, bentoml
from llmft_assets.definitions import defs
from llmft_assets.defs.mlflow_resource import MlflowResource
champion = MlflowResource().get_version_by_alias("champion")
result = dg.materialize(
    list(defs.assets), resources=defs.resources, selection=dg.AssetSelection.assets("model_bento"),
    run_config={"ops": {"model_bento": {"config": {"require_champion": champion is not None}}}},
    instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
)
out = {"success": result.success, "champion": str(champion.version) if champion else None}
if result.success:
    event = result.get_asset_materialization_events()[0].event_specific_data.materialization
    meta = {k: getattr(v, "value", v) for k, v in event.metadata.items()}
    model = bentoml.models.get(meta["model_tag"])
    out.update(meta=meta, labels=dict(model.info.labels), bentos=[str(b.tag) for b in bentoml.bentos.list()])
else:
    out["errors"] = [e.event_specific_data.error.message for e in result.get_step_failure_events()]
print("RESULT " + json.dumps(out, default=str))
"""


def test_model_bento_packages_the_champion_with_lineage_labels(
    workspace: dict[str, str], tmp_path: Path
) -> None:
    """Runs after the training test (same module workspace): the adapter, its eval report and gate exist."""
    env = {**os.environ, **workspace, "BENTOML_HOME": str(tmp_path / "bentoml")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    completed = subprocess.run(
        [sys.executable, "-c", BENTO_RUN], env=env, capture_output=True, text=True, timeout=900
    )
    line = next((ln for ln in completed.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = json.loads(line[len("RESULT ") :])
    assert out["success"], out
    labels = out["labels"]
    assert labels["model_version"] == out["meta"]["model_version"]
    assert labels["license"] == "apache-2.0" and labels["base_model_license"] == "apache-2.0"
    assert labels["license_source"] == "per-source table (sample)"
    assert (
        labels["mlflow_run_id"] and labels["storage_uri"] == f"assets/lora_adapter/{labels['model_version']}"
    )
    assert "base_model" in labels["bill_of_materials"]
    assert out["meta"]["bento_tag"] in out["bentos"]
    exported = list((Path(workspace["LLMFT_HOME"]) / "storage" / "assets" / "model_bento").rglob("*.bento"))
    assert exported, "the bento archive was not exported into storage"


def _all_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _all_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def test_invalid_training_config_is_a_clear_failure(workspace: dict[str, str]) -> None:
    result = _materialize(["lora_adapter"], {"lora_adapter": {"config": {**TRAIN_CONFIG, "lora_r": 0}}})
    assert not result.success
    message = result.get_step_failure_events()[0].event_specific_data.error.message
    assert "lora_r" in message


def test_a_training_max_seq_len_other_than_the_tokenized_one_is_refused(workspace: dict[str, str]) -> None:
    result = _materialize(
        ["lora_adapter"], {"lora_adapter": {"config": {**TRAIN_CONFIG, "max_seq_len": 1024}}}
    )
    assert not result.success
    message = result.get_step_failure_events()[0].event_specific_data.error.message
    assert "asks for 1024 but tokenized_dataset was built with max_seq_len 384" in message


def test_same_inputs_and_config_reuse_the_adapter_and_never_reregister(workspace: dict[str, str]) -> None:
    from mlflow import MlflowClient

    from llmft_assets.storage import open_storage

    client = MlflowClient(workspace["MLFLOW_TRACKING_URI"])
    config = {**TRAIN_CONFIG, "max_steps": 4, "save_steps": 2, "seed": 11}
    first = _materialize(["lora_adapter"], {"lora_adapter": {"config": config}})
    assert first.success
    trained = _metadata(first, "lora_adapter")
    assert trained["reused"] is False and trained["global_step"] == 4
    versions_before = {v.version for v in client.search_model_versions("name='llmft-adapter'")}

    again = _materialize(["lora_adapter"], {"lora_adapter": {"config": config}})
    assert again.success
    reused = _metadata(again, "lora_adapter")
    assert reused["reused"] is True and "nothing trained or registered" in reused["skip_reason"]
    assert reused["version"] == trained["version"]  # the same bytes, the same data version
    assert reused["registered_version"] == trained["registered_version"]
    assert reused["mlflow_run_id"] == trained["mlflow_run_id"]
    assert {v.version for v in client.search_model_versions("name='llmft-adapter'")} == versions_before

    # Without the record of the finished run (a crash right after training), the finished checkpoint in
    # storage is not resumed into a zero-step run: training starts over and does all its steps.
    backend = open_storage(str(Path(workspace["LLMFT_HOME"]) / "storage"))
    backend.delete(f"checkpoints/lora_adapter/{reused['run_key']}/FINISHED.json")
    assert any(
        "checkpoint-4/" in key for key in backend.list(f"checkpoints/lora_adapter/{reused['run_key']}/")
    )
    retrained = _metadata(
        _materialize(["lora_adapter"], {"lora_adapter": {"config": config}}), "lora_adapter"
    )
    assert retrained["reused"] is False and retrained["resumed_from_step"] == -1
    assert retrained["global_step"] == 4


def test_two_process_training_through_the_asset(workspace: dict[str, str]) -> None:
    """`num_processes: 2` runs the same entry point under `accelerate launch` (DDP over gloo on CPU)."""
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(
        ["lora_adapter"],
        {"lora_adapter": {"config": {**TRAIN_CONFIG, "max_steps": 4, "num_processes": 2}}},
        instance=instance,
    )
    assert result.success, [e.event_specific_data.error.message for e in result.get_step_failure_events()]
    metadata = _metadata(result, "lora_adapter")
    assert metadata["world_size"] == 2
    assert metadata["global_step"] == 4
    assert (Path(str(metadata["uri"])) / "adapter" / "adapter_model.safetensors").is_file()
    from mlflow import MlflowClient

    # Per-step metrics reach MLflow from inside the accelerate processes too.
    losses = MlflowClient(workspace["MLFLOW_TRACKING_URI"]).get_metric_history(
        metadata["mlflow_run_id"], "loss"
    )
    assert {point.step for point in losses} >= {1, 2, 3, 4}
    # Dagster Pipes: rank 0 sent every logged loss back as a structured message (the same values MLflow
    # recorded), and its log lines arrive as Dagster log events; the other rank's do not.
    reported = metadata["pipes_loss_reports"]
    assert [report["step"] for report in reported] == [1, 2, 3, 4]
    by_step = {point.step: point.value for point in losses}
    assert all(abs(report["loss"] - by_step[report["step"]]) < 1e-6 for report in reported)
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("[rank 0/2] done: world size 2, 4 steps" in message for message in messages), messages
    assert not any("[rank 1/2]" in message for message in messages)


KILLABLE_RUN = """
import os, sys, dagster as dg
from llmft_assets.definitions import DATA_ASSETS, TRAINING_ASSETS, build_resources
config = {"ops": {"lora_adapter": {"config": %s}}}
dg.materialize([*DATA_ASSETS, *TRAINING_ASSETS], resources=build_resources(),
               selection=dg.AssetSelection.assets("lora_adapter"), run_config=config,
               instance=dg.DagsterInstance.ephemeral())
"""


def test_sigkilled_training_resumes_from_the_storage_checkpoint(workspace: dict[str, str]) -> None:
    config = {**TRAIN_CONFIG, "max_steps": 12, "save_steps": 3, "seed": 7}
    checkpoints = Path(workspace["LLMFT_HOME"]) / "storage" / "checkpoints" / "lora_adapter"
    before = set(checkpoints.rglob("_MANIFEST.json")) if checkpoints.exists() else set()
    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_RUN % json.dumps(config)],
        env={**os.environ, **workspace},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            new = set(checkpoints.rglob("_MANIFEST.json")) - before if checkpoints.exists() else set()
            if any("checkpoint-3/" in str(path) or "checkpoint-6/" in str(path) for path in new):
                break
            time.sleep(0.5)
        assert process.poll() is None, "training ended before a checkpoint could be interrupted"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    result = _materialize(["lora_adapter"], {"lora_adapter": {"config": config}})
    assert result.success
    metadata = _metadata(result, "lora_adapter")
    assert metadata["resumed_from_step"] in (3, 6, 9)
    assert metadata["global_step"] == 12


def test_killed_two_process_training_resumes_from_storage_in_a_fresh_working_directory(
    workspace: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`num_processes: 2` publishes checkpoints to storage (rank 0); a new pod, with nothing local, resumes."""
    config = {**TRAIN_CONFIG, "max_steps": 12, "save_steps": 3, "seed": 5, "num_processes": 2}
    storage_root = Path(workspace["LLMFT_HOME"]) / "storage"
    checkpoints = storage_root / "checkpoints" / "lora_adapter"
    before = set(checkpoints.rglob("_MANIFEST.json")) if checkpoints.exists() else set()
    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_RUN % json.dumps(config)],
        env={**os.environ, **workspace},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: accelerate and both ranks die together
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            new = set(checkpoints.rglob("_MANIFEST.json")) - before if checkpoints.exists() else set()
            if any("checkpoint-3/" in str(path) or "checkpoint-6/" in str(path) for path in new):
                break
            time.sleep(0.5)
        assert process.poll() is None, "training ended before a checkpoint could be interrupted"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    # A fresh working directory (a new pod): another LLMFT_HOME, no cache, no staging; only storage is shared.
    fresh_home = tmp_path / "fresh_home"
    fresh_home.mkdir()
    monkeypatch.setenv("LLMFT_HOME", str(fresh_home))
    monkeypatch.setenv("LLMFT_STORAGE", str(storage_root))
    result = _materialize(["lora_adapter"], {"lora_adapter": {"config": config}})
    assert result.success, [e.event_specific_data.error.message for e in result.get_step_failure_events()]
    metadata = _metadata(result, "lora_adapter")
    assert metadata["world_size"] == 2 and metadata["global_step"] == 12
    assert metadata["resumed_from_step"] in (3, 6, 9)
    assert str(metadata["checkpoints_uri"]).startswith(str(storage_root))


def test_training_on_a_retraining_dataset_records_it_and_the_gate_judges_its_traffic_slice(
    workspace: dict[str, str], tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    from llmft_assets.evaluation.gate import GateThresholds
    from llmft_assets.storage import fetch_artifact, open_storage
    from llmft_assets.storage.publish import publish_directory

    instance = dg.DagsterInstance.ephemeral()
    config = {**TRAIN_CONFIG, "max_steps": 2, "save_steps": 2, "training_data": "retraining_dataset"}
    # Nothing to train on yet: one clear reason, nothing trained.
    missing = _materialize(["lora_adapter"], {"lora_adapter": {"config": config}}, instance)
    assert not missing.success
    message = missing.get_step_failure_events()[0].event_specific_data.error.message
    assert "training_data=retraining_dataset but no retraining_dataset is materialized" in message

    # A retraining dataset in dataset_splits' layout (half its train rows) + a traffic slice, recorded in
    # Dagster the way retraining_dataset_job records it (the version in the materialization's metadata).
    backend = open_storage(str(Path(workspace["LLMFT_HOME"]) / "storage"))
    splits, splits_dir = fetch_artifact(backend, "assets/dataset_splits", tmp_path / "cache")
    folder = tmp_path / "retraining"
    folder.mkdir()
    train = pq.read_table(splits_dir / "train.parquet")
    pq.write_table(train.slice(0, train.num_rows // 2), folder / "train.parquet")
    for name in ("validation", "test"):
        pq.write_table(pq.read_table(splits_dir / f"{name}.parquet"), folder / f"{name}.parquet")
    pq.write_table(pq.read_table(splits_dir / "validation.parquet"), folder / "traffic_slice.parquet")
    published = publish_directory(
        backend,
        "assets/retraining_dataset",
        folder,
        metadata={"pool_version": splits.metadata["upstream"], "dataset_splits_version": splits.version},
    )
    instance.report_runless_asset_event(
        dg.AssetMaterialization("retraining_dataset", metadata={"version": published.version})
    )

    result = _materialize(
        ["lora_adapter", "eval_report"],
        {
            "lora_adapter": {"config": config},
            "eval_report": {"config": {"max_rows": 4, "max_new_tokens": 16, "compare_champion": False}},
        },
        instance,
    )
    adapter = _metadata(result, "lora_adapter")
    assert adapter["training_data"] == "retraining_dataset"
    assert adapter["dataset_version"] == published.version != splits.version
    assert adapter["bill_of_materials"]["dataset"]["version"] == published.version
    report = _metadata(result, "eval_report")
    assert report["retraining_dataset_version"] == published.version
    assert report["traffic_slice_num_rows"] == 4
    # No champion scored on the slice (compare_champion off): the traffic reference is the base model.
    gain = GateThresholds().traffic_min_perplexity_gain
    limit = report["traffic_slice_base_perplexity"] * (1 - gain)
    assert report["traffic_perplexity_threshold"] == pytest.approx(limit)
    assert report["traffic_perplexity_value"] == pytest.approx(report["traffic_slice_adapter_perplexity"])
    assert report["traffic_perplexity_verdict"] == (
        "pass" if report["traffic_perplexity_value"] < limit else "fail"
    )
    if report["traffic_perplexity_verdict"] == "fail":
        assert report["gate_passed"] is False
    folder_of_report = (
        Path(workspace["LLMFT_HOME"]) / "storage" / "assets" / "eval_report" / report["version"]
    )
    gate = json.loads((folder_of_report / "eval_report.json").read_text())["gate"]
    assert {"traffic_perplexity", "traffic_accuracy"} <= {criterion["name"] for criterion in gate["criteria"]}
    assert (folder_of_report / "traffic_slice" / "eval_report.json").exists()
    # The default path does not score a traffic slice: the adapter trained on dataset_splits has none.
    default = _metadata(
        _materialize(
            ["lora_adapter"], {"lora_adapter": {"config": {**TRAIN_CONFIG, "max_steps": 2}}}, instance
        ),
        "lora_adapter",
    )
    assert default["training_data"] == "dataset_splits" and default["dataset_version"] == splits.version
