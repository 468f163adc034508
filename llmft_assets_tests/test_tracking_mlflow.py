"""MLflow tracking + registry against a real ``mlflow server`` on loopback (and the embedded SQLite store)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from llmft_assets.defs.mlflow_resource import CANDIDATE_ALIAS, CHAMPION_ALIAS, MlflowResource
from llmft_assets.training import tracking
from llmft_assets_tests.servers import mlflow_server

EXPERIMENT = "llmft-tests"
MODEL_NAME = "llmft-test-adapter"


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


def _write_fake_adapter(adapter_dir: Path) -> Path:
    """A folder shaped like a peft save_pretrained output (tracking does not load it)."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\x00" * 128)
    (adapter_dir / "bill_of_materials.json").write_text(json.dumps({"seed": 7}))
    return adapter_dir


def _train_tiny_model_with_callback(callback: object, output_dir: Path, max_steps: int) -> None:
    """Run a real transformers Trainer for a few steps on a two-layer torch model."""
    import torch
    from transformers import Trainer, TrainingArguments

    class TinyTokenRegressor(torch.nn.Module):
        main_input_name = "input_ids"

        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(32, 8)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            prediction = self.head(self.embed(input_ids).mean(dim=1)).squeeze(-1)
            return {"loss": torch.nn.functional.mse_loss(prediction, labels)}

    torch.manual_seed(0)
    rows = [
        {"input_ids": torch.randint(0, 32, (6,)), "labels": torch.tensor(float(i % 3))} for i in range(16)
    ]
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen=True,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=TinyTokenRegressor(), args=args, train_dataset=rows, callbacks=[callback])
    trainer.train()


# ------------------------------------------------------------------------------------------------
# Pure helpers (no server)
# ------------------------------------------------------------------------------------------------


def test_default_tracking_uri_prefers_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.default_tracking_uri() == "http://mlflow.example:5000"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("LLMFT_HOME", str(tmp_path))
    uri = tracking.default_tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    assert tracking.embedded_artifact_root(uri) == (tmp_path.resolve() / "mlflow" / "artifacts").as_uri()
    assert tracking.embedded_artifact_root("http://127.0.0.1:5000") is None


def test_params_are_flattened_redacted_and_truncated() -> None:
    strings = tracking.to_mlflow_strings(
        {
            "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
            "max_new_tokens": 64,
            "openai_api_key": "sk-should-never-leave",
            "storage": {"aws_secret_access_key": "also-secret"},
            "long": "x" * 7000,
            "bad key!": None,
        },
        max_value_chars=6000,
    )
    assert strings["lora.r"] == "8"
    assert strings["lora.target_modules"] == '["q_proj", "v_proj"]'
    assert strings["max_new_tokens"] == "64"  # "token" inside a name is not a secret
    assert strings["openai_api_key"] == "***"
    assert strings["storage.aws_secret_access_key"] == "***"
    assert len(strings["long"]) == 6000 and strings["long"].endswith("[truncated]")
    assert strings["bad key_"] == "None"


def test_callback_module_import_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = "import sys, llmft_assets.training.tracking; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_embedded_sqlite_store_round_trip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The default (no server) store: run, adapter artifact, registry alias all under LLMFT_HOME."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LLMFT_HOME", str(tmp_path / "home"))
    uri = tracking.default_tracking_uri()

    run_id = tracking.start_training_run(uri, EXPERIMENT, "embedded", {"seed": 1}, {"stage": "test"})
    tracking.log_adapter(run_id, _write_fake_adapter(tmp_path / "adapter"), tracking_uri=uri)
    tracking.finish_run(run_id, tracking_uri=uri)
    version = tracking.register_adapter_version(uri, MODEL_NAME, run_id, "adapter", {"k": "v"})
    tracking.set_alias(MODEL_NAME, "candidate", version, tracking_uri=uri)

    artifacts_dir = tmp_path / "home" / "mlflow" / "artifacts"
    assert list(artifacts_dir.rglob("adapter_config.json")), "artifacts must live under LLMFT_HOME"
    found = tracking.get_version_by_alias(MODEL_NAME, "candidate", tracking_uri=uri)
    assert found is not None and str(found.version) == version and found.run_id == run_id


# ------------------------------------------------------------------------------------------------
# Against a real mlflow server
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_run_logs_params_step_metrics_and_loss_plot(mlflow_uri: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    params = {"lora": {"r": 8, "alpha": 16}, "learning_rate": 1e-2, "hf_token": "hf_secret"}
    run_id = tracking.start_training_run(mlflow_uri, EXPERIMENT, "train-tiny", params, {"dataset": "v1"})
    callback = tracking.MlflowTrainingCallback(run_id, mlflow_uri)
    max_steps = 4
    _train_tiny_model_with_callback(callback, tmp_path / "trainer", max_steps=max_steps)
    tracking.finish_run(run_id, tracking_uri=mlflow_uri)

    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train-tiny"
    assert run.data.params["lora.r"] == "8"
    assert run.data.params["lora.alpha"] == "16"
    assert run.data.params["hf_token"] == "***"
    assert run.data.tags["dataset"] == "v1"

    loss = tracking.run_metric_history(run_id, "loss", tracking_uri=mlflow_uri)
    assert [step for step, _ in loss] == list(range(1, max_steps + 1))
    assert [value for _, value in loss] == [value for _, value in callback.loss_history]
    for key in ("learning_rate", "grad_norm", "tokens_per_second"):
        history = tracking.run_metric_history(run_id, key, tracking_uri=mlflow_uri)
        assert history, f"{key} was not logged"
        assert all(value >= 0 for _, value in history)
    # The learning rate decays linearly to zero over max_steps.
    learning_rates = [
        value for _, value in tracking.run_metric_history(run_id, "learning_rate", tracking_uri=mlflow_uri)
    ]
    assert learning_rates == sorted(learning_rates, reverse=True)

    plot = Path(client.download_artifacts(run_id, tracking.LOSS_CURVE_ARTIFACT_FILE, str(tmp_path / "dl")))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 5000


@pytest.mark.slow
def test_bill_of_materials_is_json_artifact_and_flat_tags(mlflow_uri: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    bom = {
        "base_model": {"id": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "abc123"},
        "dataset": {"version": "20250101-deadbeef", "licence": "CC-BY-NC-SA-4.0"},
        "chat_template_sha256": "f" * 64,
        "seed": 7,
        "storage": {"api_key": "must-not-leak"},
    }
    run_id = tracking.start_training_run(mlflow_uri, EXPERIMENT, "bom", {}, {})
    tracking.log_bill_of_materials(run_id, bom, tracking_uri=mlflow_uri)

    client = MlflowClient(mlflow_uri)
    tags = client.get_run(run_id).data.tags
    assert tags["bom.base_model.id"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert tags["bom.dataset.licence"] == "CC-BY-NC-SA-4.0"
    assert tags["bom.seed"] == "7"
    assert tags["bom.storage.api_key"] == "***"
    local = client.download_artifacts(run_id, tracking.BOM_ARTIFACT_FILE, str(tmp_path))
    logged = json.loads(Path(local).read_text())
    assert logged["base_model"] == bom["base_model"]
    assert logged["storage"]["api_key"] == "***"


@pytest.mark.slow
def test_adapter_registration_and_aliases(mlflow_uri: str, tmp_path: Path) -> None:
    model_name = f"{MODEL_NAME}-registry"
    assert tracking.get_version_by_alias(model_name, "champion", tracking_uri=mlflow_uri) is None

    versions: list[str] = []
    for index in range(2):
        run_id = tracking.start_training_run(mlflow_uri, EXPERIMENT, f"adapter-{index}", {"i": index}, {})
        adapter_dir = _write_fake_adapter(tmp_path / f"adapter-{index}")
        source = tracking.log_adapter(run_id, adapter_dir, tracking_uri=mlflow_uri)
        assert source == f"runs:/{run_id}/adapter"
        tracking.finish_run(run_id, tracking_uri=mlflow_uri)
        versions.append(
            tracking.register_adapter_version(
                mlflow_uri, model_name, run_id, "adapter", {"eval.accuracy": 0.5}
            )
        )
    assert versions == ["1", "2"]

    # The registered model exists now, but the alias does not yet.
    assert tracking.get_version_by_alias(model_name, "champion", tracking_uri=mlflow_uri) is None
    tracking.set_alias(model_name, "candidate", versions[0], tracking_uri=mlflow_uri)
    candidate = tracking.get_version_by_alias(model_name, "candidate", tracking_uri=mlflow_uri)
    assert candidate is not None and str(candidate.version) == "1"
    assert candidate.tags["eval.accuracy"] == "0.5"

    tracking.set_alias(model_name, "champion", versions[0], tracking_uri=mlflow_uri)
    tracking.set_alias(model_name, "candidate", versions[1], tracking_uri=mlflow_uri)
    champion = tracking.get_version_by_alias(model_name, "champion", tracking_uri=mlflow_uri)
    candidate = tracking.get_version_by_alias(model_name, "candidate", tracking_uri=mlflow_uri)
    assert champion is not None and str(champion.version) == "1"
    assert candidate is not None and str(candidate.version) == "2"

    # Promotion moves the alias; the old champion loses it.
    tracking.set_alias(model_name, "champion", versions[1], tracking_uri=mlflow_uri)
    champion = tracking.get_version_by_alias(model_name, "champion", tracking_uri=mlflow_uri)
    assert champion is not None and str(champion.version) == "2"
    tracking.set_version_tags(model_name, versions[1], {"gate": {"passed": True}}, tracking_uri=mlflow_uri)

    downloaded = tracking.download_model_version(model_name, "2", tmp_path / "dl", tracking_uri=mlflow_uri)
    assert (downloaded / "adapter_config.json").is_file()
    assert (downloaded / "adapter_model.safetensors").read_bytes() == b"\x00" * 128


@pytest.mark.slow
def test_log_adapter_rejects_a_folder_that_is_not_an_adapter(mlflow_uri: str, tmp_path: Path) -> None:
    run_id = tracking.start_training_run(mlflow_uri, EXPERIMENT, "bad-adapter", {}, {})
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        tracking.log_adapter(run_id, tmp_path, tracking_uri=mlflow_uri)
    with pytest.raises(FileNotFoundError):
        tracking.log_adapter(run_id, tmp_path / "missing", tracking_uri=mlflow_uri)
    tracking.finish_run(run_id, "FAILED", tracking_uri=mlflow_uri)


@pytest.mark.slow
def test_dagster_resource_wraps_tracking_and_links_runs(mlflow_uri: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    resource = MlflowResource(
        tracking_uri=mlflow_uri,
        experiment_name="llmft-resource",
        registered_model_name="llmft-resource-adapter",
    )
    run_id = resource.start_training_run("resource-run", {"lora": {"r": 4}}, {"dataset_version": "v9"})
    callback = resource.training_callback(run_id)
    _train_tiny_model_with_callback(callback, tmp_path / "trainer", max_steps=2)
    resource.log_bill_of_materials(run_id, {"seed": 3})
    resource.log_adapter(run_id, _write_fake_adapter(tmp_path / "adapter"))
    resource.log_metrics(run_id, {"eval_accuracy": 0.5, "eval_perplexity": math.nan})
    resource.finish_run(run_id)
    version = resource.register_adapter_version(run_id, tags={"dataset_version": "v9"})
    resource.set_alias(CANDIDATE_ALIAS, version)
    assert resource.get_version_by_alias(CHAMPION_ALIAS) is None
    resource.set_alias(CHAMPION_ALIAS, version)
    champion = resource.get_version_by_alias(CHAMPION_ALIAS)
    assert champion is not None and champion.run_id == run_id

    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.data.metrics["eval_accuracy"] == 0.5
    assert "eval_perplexity" not in run.data.metrics  # NaN is not logged
    assert len(tracking.run_metric_history(run_id, "loss", tracking_uri=mlflow_uri)) == 2
    expected_url = f"{mlflow_uri}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    assert resource.run_url(run_id) == expected_url
    assert resource.run_url(run_id, run.info.experiment_id) == expected_url
    assert (
        resource.model_version_url(version)
        == f"{mlflow_uri}/#/models/llmft-resource-adapter/versions/{version}"
    )

    # It is a real Dagster resource: usable from an asset through Definitions.
    @dg.asset
    def registered_champion(mlflow: MlflowResource) -> dg.MaterializeResult:
        found = mlflow.get_version_by_alias(CHAMPION_ALIAS)
        assert found is not None
        return dg.MaterializeResult(metadata={"mlflow_version": str(found.version)})

    result = dg.materialize([registered_champion], resources={"mlflow": resource})
    assert result.success
    materialization = result.asset_materializations_for_node("registered_champion")[0]
    assert materialization.metadata["mlflow_version"].value == str(version)


def test_resource_defaults_to_the_embedded_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LLMFT_HOME", str(tmp_path))
    resource = MlflowResource()
    assert resource.resolved_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    assert resource.run_url("any-run", "1") is None  # no UI to link to for an embedded store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.internal/")
    assert MlflowResource().run_url("r1", "7") == "https://mlflow.internal/#/experiments/7/runs/r1"
