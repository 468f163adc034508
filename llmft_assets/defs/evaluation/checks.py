"""`eval_gate`: the blocking promotion gate on eval_report; on pass the candidate becomes `champion`."""

import dagster as dg

from llmft_assets.defs import metadata
from llmft_assets.defs.evaluation.assets import eval_report
from llmft_assets.defs.mlflow_resource import MlflowResource
from llmft_assets.defs.storage_resources import ArtifactHandle
from llmft_assets.manifests import EvalManifest


@dg.asset_check(
    asset=eval_report,
    blocking=True,
    description=(
        "Promotion gate (decided in eval_report on every criterion: verified accuracy with an exact McNemar "
        "test against the base model, format compliance, finish rate, perplexity, no regression against the "
        "champion); on pass the version becomes `champion`."
    ),
)
def eval_gate(eval_report: ArtifactHandle, mlflow: MlflowResource) -> dg.AssetCheckResult:
    from llmft_assets.evaluation.report import REPORT_JSON, EvalReport
    from llmft_assets.training.registration import promote_if_passed

    report = EvalReport.from_json((eval_report.path / REPORT_JSON).read_text())
    gate = report.gate or {"passed": False, "criteria": [], "reasons": ["the report has no gate decision"]}
    promotion = promote_if_passed(mlflow, gate, eval_report.manifest(EvalManifest).registered_version)
    return dg.AssetCheckResult(passed=promotion.passed, metadata=metadata.promotion_metadata(gate, promotion))
