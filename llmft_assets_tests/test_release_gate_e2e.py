"""The release path end to end (Dagster, tiny model, a real `mlflow server`, a temporary BentoML store):

- the licence policy check and `model_bento` refuse a model whose licences the policy does not allow;
- the champion is packaged, with its model card and licence, and no path of the build machine inside;
- a broken adapter (scrambled LoRA weights) is refused by the gate with its exact reasons, `model_bento`
  packages nothing, and the champion (MLflow alias, BentoML store's latest) stays.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from llmft_assets.definitions import defs
from llmft_assets_tests.servers import mlflow_server

pytestmark = pytest.mark.slow

ALL = [*defs.assets, *defs.asset_checks]
DATA_CONFIG = {
    "raw_dataset": {"config": {"source": "sample", "config": "all", "max_rows": 120}},
    # A little pretraining makes the base model's predictions confident, so scrambled weights really hurt.
    "base_model": {"config": {"pretrain_steps": 40}},
    "tokenized_dataset": {"config": {"max_seq_len": 256}},
    "dataset_splits": {"config": {"validation_fraction": 0.1, "test_fraction": 0.15}},
}
TRAIN_CONFIG = {
    "lora_adapter": {"config": {"max_steps": 2, "max_seq_len": 256, "per_device_train_batch_size": 4}}
}
EVAL_CONFIG = {"eval_report": {"config": {"max_rows": 6, "max_new_tokens": 16, "batch_size": 6}}}

# Runs Dagster steps that touch BentoML in a fresh process, so that BENTOML_HOME is this test's store.
RUNNER = """
import json, os, sys, dagster as dg, bentoml
from llmft_assets.definitions import defs
out = []
for step in json.loads(sys.argv[1]):
    os.environ.pop("LLMFT_LICENSE_POLICY", None)
    os.environ.update(step.get("env", {}))
    selection = dg.AssetSelection.assets(*step.get("assets", []))
    if step.get("checks"):
        selection = dg.AssetSelection.checks(*[dg.AssetCheckKey(dg.AssetKey(a), c) for a, c in step["checks"]])
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks], resources=defs.resources,
        selection=selection, run_config={"ops": step.get("config", {})},
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
    )
    out.append({
        "success": result.success,
        "materialized": sorted(e.event_specific_data.materialization.asset_key.to_user_string()
                               for e in result.get_asset_materialization_events()),
        "failures": [e.event_specific_data.error.message for e in result.get_step_failure_events()],
        "checks": {e.check_name: {"passed": e.passed, "metadata": {k: getattr(v, "value", v) for k, v in e.metadata.items()}}
                   for e in result.get_asset_check_evaluations()},
        "store": {"models": sorted(str(m.tag) for m in bentoml.models.list()),
                  "bentos": sorted(str(b.tag) for b in bentoml.bentos.list())},
    })
print("RESULT " + json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("release_home")
    with pytest.MonkeyPatch.context() as patch, mlflow_server(home / "mlflow_server") as tracking_uri:
        env = {
            "LLMFT_HOME": str(home),
            "MLFLOW_TRACKING_URI": tracking_uri,
            "BENTOML_HOME": str(home / "bentoml"),
        }
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("LLMFT_STORAGE", raising=False)
        patch.delenv("LLMFT_LICENSE_POLICY", raising=False)
        yield env


def _materialize(assets: list[str], config: dict) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        ALL,
        resources=defs.resources,
        selection=dg.AssetSelection.assets(*assets),
        run_config={"ops": config},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def _run_steps(workspace: dict[str, str], steps: list[dict]) -> list[dict]:
    env = {**os.environ, **workspace}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    completed = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(steps)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    line = next((ln for ln in completed.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(line[len("RESULT ") :])


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        if materialization.asset_key.to_user_string() == asset:
            return {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}
    raise AssertionError(f"{asset} not materialized")


def _publish_scrambled_adapter(workspace: dict[str, str], adapter_uri: str) -> str:
    """A copy of the adapter with its LoRA weights replaced by large random numbers, registered in MLflow
    and published as the newest `lora_adapter` (what a diverged or corrupted training run leaves)."""
    import torch
    from safetensors.torch import load_file, save_file

    from llmft_assets.defs.mlflow_resource import MlflowResource
    from llmft_assets.storage import open_storage, publish_directory

    staging = Path(workspace["LLMFT_HOME"]) / "broken_adapter"
    shutil.copytree(adapter_uri, staging)
    weights = staging / "adapter" / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: 5 * torch.randn(t.shape, generator=generator) for name, t in load_file(str(weights)).items()
    }
    save_file(tensors, str(weights))
    mlflow = MlflowResource()
    run_id = mlflow.start_training_run(run_name="scrambled", params={"scrambled": True})
    mlflow.log_adapter(run_id, staging / "adapter")
    version = mlflow.register_adapter_version(run_id)
    mlflow.set_alias("candidate", version)
    mlflow.finish_run(run_id)
    storage = open_storage(str(Path(workspace["LLMFT_HOME"]) / "storage"))
    published = publish_directory(
        storage,
        "assets/lora_adapter",
        staging,
        # The copy's own record of what it was trained on: eval_report scores it on that test split.
        metadata={
            "mlflow_run_id": run_id,
            "registered_version": str(version),
            "train_loss": 0.0,
            "dataset_version": json.loads((Path(adapter_uri) / "_MANIFEST.json").read_text())["metadata"][
                "dataset_version"
            ],
        },
    )
    return published.version


def _text_files(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".yaml", ".yml", ".md", ".txt", ""}:
            yield path


def test_licence_policy_champion_packaging_and_broken_adapter_refused(workspace: dict[str, str]) -> None:
    from mlflow import MlflowClient

    home = Path(workspace["LLMFT_HOME"])
    data = _materialize(["raw_dataset", "cleaned_dataset", "validated_dataset", "base_model",
                         "tokenized_dataset", "dataset_splits"], DATA_CONFIG)  # fmt: skip
    assert data.success
    trained = _materialize(["lora_adapter"], TRAIN_CONFIG)
    assert trained.success
    adapter = _metadata(trained, "lora_adapter")
    champion_version = adapter["registered_version"]
    assert adapter["bill_of_materials"]["dataset"]["license"] == "apache-2.0"
    assert adapter["bill_of_materials"]["dataset"]["license_source"] == "per-source table (sample)"
    card = (Path(str(adapter["uri"])) / "adapter" / "README.md").read_text()
    assert 'base_model: "llmft/tiny-qwen2-chat"' in card and "Not evaluated yet" in card

    # The first adapter: evaluated (an untrained model is refused), then made champion by an operator.
    evaluated = _materialize(["eval_report"], EVAL_CONFIG)
    assert [c.check_name for c in evaluated.get_asset_check_evaluations() if not c.passed] == ["eval_gate"]
    checks = {c.check_name: c for c in evaluated.get_asset_check_evaluations()}
    assert checks["license_policy"].passed  # no policy set
    client = MlflowClient(workspace["MLFLOW_TRACKING_URI"])
    client.set_registered_model_alias("llmft-adapter", "champion", champion_version)

    # Licence policy: refused by the check (both outcomes) and by model_bento; then packaged without it.
    not_allowed = (
        "the dataset licence apache-2.0 (from per-source table (sample)) is not in the allowed licences "
        "(mit, cc-by-4.0)",
        "the base model licence apache-2.0 (from per-model table (llmft/tiny-qwen2-chat)) is not in the allowed "
        "licences (mit, cc-by-4.0)",
    )
    first, check_refuses, refused, packaged = _run_steps(
        workspace,
        [
            {"checks": [["eval_report", "license_policy"]], "env": {"LLMFT_LICENSE_POLICY": "commercial"}},
            {"checks": [["eval_report", "license_policy"]], "env": {"LLMFT_LICENSE_POLICY": "mit,cc-by-4.0"}},
            {"assets": ["model_bento"], "env": {"LLMFT_LICENSE_POLICY": "mit,cc-by-4.0"}},
            {"assets": ["model_bento"]},
        ],
    )
    assert (
        first["checks"]["license_policy"]["passed"] is True
    )  # apache-2.0 data and model: commercial is fine
    assert first["checks"]["license_policy"]["metadata"]["dataset_license"] == "apache-2.0"
    licence_check = check_refuses["checks"]["license_policy"]
    assert licence_check["passed"] is False
    assert licence_check["metadata"]["problems"] == "\n".join(f"- {problem}" for problem in not_allowed)
    assert refused["success"] is False and refused["store"]["models"] == []
    assert len(refused["failures"]) == 1
    assert f"Failure: licence policy: {'; '.join(not_allowed)}\n" in refused["failures"][0]
    assert packaged["success"], packaged["failures"]
    champion_tag = packaged["store"]["models"][0]
    champion_bentos = packaged["store"]["bentos"]
    assert len(champion_bentos) == 1

    # The bento, its labels, BOM and model card hold no path of the build machine.
    import bentoml  # noqa: F401  # only for its store layout below; BENTOML_HOME is this test's

    store = Path(workspace["BENTOML_HOME"])
    # This session's temp root (LLMFT_HOME, staging, caches are under it), the home and the checkout.
    forbidden = {str(home.parent), str(Path.home()), str(Path(__file__).resolve().parents[1])}
    bento_files = list(_text_files(store / "bentos")) + list(_text_files(store / "models"))
    assert any(p.name == "README.md" and "models" in p.parts for p in bento_files)
    offenders = {
        str(path.relative_to(store)): sorted(f for f in forbidden if f in path.read_text(errors="ignore"))
        for path in bento_files
    }
    assert {path: found for path, found in offenders.items() if found} == {}
    model_card = next(p for p in bento_files if p.name == "README.md" and "models" in p.parts).read_text()
    assert 'license: "apache-2.0"' in model_card and "Decision: **refused**" in model_card
    bento_readme = next(p for p in bento_files if p.name == "README.md" and "bentos" in p.parts).read_text()
    assert bento_readme == model_card

    # A broken adapter: refused with exact reasons; nothing new packaged; the champion stays.
    broken_version = _publish_scrambled_adapter(workspace, str(adapter["uri"]))
    (release,) = _run_steps(workspace, [{"assets": ["eval_report", "model_bento"], "config": EVAL_CONFIG}])
    assert release["success"] is False
    # model_bento never ran: the only failure is the blocking gate (not model_bento refusing by itself).
    assert release["materialized"] == ["eval_report"]
    assert len(release["failures"]) == 1 and "blocking asset check failed" in release["failures"][0]
    assert "eval_report: eval_gate" in release["failures"][0]
    gate = release["checks"]["eval_gate"]
    assert gate["passed"] is False and gate["metadata"]["promoted"] is False
    assert gate["metadata"]["previous_champion"] == str(champion_version)
    report_dir = home / "storage" / "assets" / "eval_report"
    report = json.loads(
        max(report_dir.glob("*/eval_report.json"), key=lambda p: p.stat().st_mtime).read_text()
    )
    assert report["adapter"] == f"adapter {broken_version}"
    base, broken, champion = (report["models"][name] for name in ("base", "adapter", "champion"))
    reasons = report["gate"]["reasons"]
    paired = sum(
        1
        for row in report["rows"]
        if row["correct"]["adapter"] is not None and row["correct"]["base"] is not None
    )
    assert (
        broken["accuracy"] == base["accuracy"] == 0.0
    )  # neither the tiny base nor the broken adapter answers
    assert reasons[0] == f"accuracy_gain: 0 <= 0 (adapter 0 - base 0 on {paired} paired rows) -> fail"
    assert reasons[1] == (
        f"accuracy_significance: 1 > 0.05 (exact McNemar, one-sided: adapter alone right on 0, "
        f"base alone right on 0 of {paired} rows) -> fail"
    )
    assert reasons[4] == (
        f"perplexity: {broken['perplexity']:.4g} > {base['perplexity']:.4g} "
        f"(base perplexity {base['perplexity']:.4g} x 1) -> fail"
    )
    assert reasons[8] == (
        f"champion_perplexity: {broken['perplexity']:.4g} > {champion['perplexity'] * 1.05:.4g} "
        f"(champion's perplexity {champion['perplexity']:.4g} x (1 + 0.05)) -> fail"
    )
    assert report["gate"]["champion"] == f"llmft-adapter v{champion_version}"
    assert {"accuracy_gain", "accuracy_significance", "perplexity", "champion_perplexity"} <= {
        c["name"] for c in report["gate"]["criteria"] if c["verdict"] == "fail"
    }
    assert client.get_model_version_by_alias("llmft-adapter", "champion").version == str(champion_version)
    assert release["store"] == {"models": [champion_tag], "bentos": champion_bentos}
