"""The good path end to end: the demo's training on the bundled (learnable) sample gives an adapter that
clearly beats the base model, and the gate promotes it, through Dagster and a real `mlflow server`.

The refused path (an adapter that learned nothing) is `test_training_assets.py::test_train_evaluate_gate_and_registry`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import dagster as dg
import pytest

from llmft_assets.definitions import DATA_ASSETS, TRAINING_ASSETS, build_resources
from llmft_assets.defs.data.checks import DATA_CHECKS
from llmft_assets.defs.evaluation.checks import eval_gate
from llmft_assets_tests.servers import mlflow_server

pytestmark = pytest.mark.slow

ALL = [*DATA_ASSETS, *TRAINING_ASSETS, *DATA_CHECKS, eval_gate]
PASSING = ["accuracy_gain", "accuracy_significance", "format_compliance", "finish_rate", "perplexity"]
CHAMPION_CRITERIA = [
    "champion_accuracy",
    "champion_format_compliance",
    "champion_finish_rate",
    "champion_perplexity",
]


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        if materialization.asset_key.to_user_string() == asset:
            return {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}
    raise AssertionError(f"{asset} not materialized")


def test_the_demo_training_is_promoted_by_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from llmft_assets.demo import DEMO_RUN_CONFIG

    data_ops = DEMO_RUN_CONFIG["data_job"]["ops"]
    train_ops = DEMO_RUN_CONFIG["train_job"]["ops"]
    # Fewer rows than the demo scores, to keep the test short; still enough for the paired test to mean it.
    eval_config = {**DEMO_RUN_CONFIG["release_job"]["ops"]["eval_report"]["config"], "max_rows": 32}
    with mlflow_server(tmp_path / "mlflow_server") as tracking_uri:
        monkeypatch.setenv("LLMFT_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        monkeypatch.delenv("LLMFT_STORAGE", raising=False)
        # The demo's graph: the whole bundled sample, the default (briefly pretrained) tiny model.
        result = dg.materialize(
            ALL,
            resources=build_resources(),
            selection=dg.AssetSelection.assets(
                *[asset.key for asset in DATA_ASSETS], "lora_adapter", "eval_report"
            ),
            run_config={"ops": {**data_ops, **train_ops, "eval_report": {"config": eval_config}}},
            instance=dg.DagsterInstance.ephemeral(),
            raise_on_error=False,
        )
        failures = [e.event_specific_data.error.message for e in result.get_step_failure_events()]
        # A refusal by the blocking eval_gate fails the run; any other step failure is a broken run.
        assert all("eval_gate" in failure for failure in failures), failures

        splits = _metadata(result, "dataset_splits")
        adapter = _metadata(result, "lora_adapter")
        report_meta = _metadata(result, "eval_report")
        report = json.loads((Path(str(report_meta["uri"])) / "eval_report.json").read_text())
        base, tuned = report["models"]["base"], report["models"]["adapter"]

        # Held out: no test problem was trained on (the sample never repeats a problem).
        assert splits["test_rows"] >= report["num_rows"] == 32
        # The adapter visibly learned: +30 points or more, and it finishes its answers.
        assert tuned["accuracy"] - base["accuracy"] >= 0.3, (base, tuned)
        assert tuned["finished_rate"] >= 0.9 and tuned["format_compliance"] >= 0.9, tuned
        assert tuned["perplexity"] < base["perplexity"]

        gate = report["gate"]
        assert gate["passed"] is True
        assert [c["name"] for c in gate["criteria"]] == PASSING + CHAMPION_CRITERIA
        assert [c["verdict"] for c in gate["criteria"]] == ["pass"] * 5 + ["skipped"] * 4
        paired = tuned["num_checkable"]
        gain = tuned["accuracy"] - base["accuracy"]
        expected = [
            rf"accuracy_gain: {gain:.4g} > 0 \(adapter {tuned['accuracy']:.4g} - base {base['accuracy']:.4g} "
            rf"on {paired} paired rows\) -> pass",
            r"accuracy_significance: [0-9.e-]+ <= 0\.05 \(exact McNemar, one-sided: adapter alone right on \d+, "
            rf"base alone right on \d+ of {paired} rows\) -> pass",
            rf"format_compliance: {tuned['format_compliance']:.4g} >= 0\.8 \(minimum format compliance\) -> pass",
            rf"finish_rate: {tuned['finished_rate']:.4g} >= 0\.8 \(minimum share of answers stopped at the end "
            r"token\) -> pass",
            rf"perplexity: {tuned['perplexity']:.4g} <= {base['perplexity']:.4g} \(base perplexity "
            rf"{base['perplexity']:.4g} x 1\) -> pass",
            *[rf"{name}: no champion yet -> skipped" for name in CHAMPION_CRITERIA],
        ]
        assert len(gate["reasons"]) == len(expected)
        for reason, pattern in zip(gate["reasons"], expected, strict=True):
            assert re.fullmatch(pattern, reason), (reason, pattern)

        # Promoted: the blocking check passed and the registry's champion is this very version.
        check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "eval_gate")
        check_metadata = {k: getattr(v, "value", v) for k, v in check.metadata.items()}
        assert check.passed and check_metadata["promoted"] is True
        assert check_metadata["previous_champion"] == "none"
        version = adapter["registered_version"]
        client = MlflowClient(tracking_uri)
        assert client.get_model_version_by_alias("llmft-adapter", "champion").version == version
        tags = client.get_model_version("llmft-adapter", version).tags
        assert tags["llmft.gate.passed"] == "true"
        assert tags["llmft.gate.accuracy_gain"].startswith("pass: ")
        assert report_meta["gate_passed"] is True
