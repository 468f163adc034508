"""`drift_check` (fails on drift and alerts the webhook) and the freshness check on drift_report."""

import warnings
from datetime import timedelta

import dagster as dg

from llmft_assets import settings
from llmft_assets.defs import metadata
from llmft_assets.defs.monitoring.assets import DRIFT_PARTITIONS, DRIFT_REPORT
from llmft_assets.defs.storage_resources import ArtifactHandle
from llmft_assets.manifests import DriftManifest

DRIFT_CHECK = "drift_check"
_SEVERITY = {"warn": dg.AssetCheckSeverity.WARN, "error": dg.AssetCheckSeverity.ERROR}


@dg.asset_check(
    asset=DRIFT_REPORT,
    name=DRIFT_CHECK,
    # One verdict per day, on that day's report: the retraining sensor acts on the newest day only.
    partitions_def=DRIFT_PARTITIONS,
    blocking=False,  # nothing downstream to protect; the retraining sensor reads the verdict
    description="Fails when the drift share of served traffic reaches the threshold (and alerts the "
    "webhook); passes with a WARN 'not enough data' when a window is too small to judge.",
)
def drift_check(context: dg.AssetCheckExecutionContext, drift_report: ArtifactHandle) -> dg.AssetCheckResult:
    from llmft_assets.monitoring.alerts import send_alert_if_configured
    from llmft_assets.monitoring.drift_verdict import drift_verdict

    manifest = drift_report.manifest(DriftManifest)
    report_uri = manifest.report_html or drift_report.uri
    verdict = drift_verdict(manifest.summary, drift_report.version)
    check_metadata = metadata.drift_check_metadata(
        manifest.summary, verdict, drift_report.version, report_uri
    )
    if verdict.alert:
        check_metadata["alert"] = send_alert_if_configured(manifest.summary, report_uri, context.log)
    return dg.AssetCheckResult(
        passed=verdict.passed,
        severity=_SEVERITY.get(verdict.severity or "", dg.AssetCheckSeverity.ERROR),
        description=verdict.description,
        metadata=check_metadata,
    )


# The daily schedule refreshes drift_report; a report older than LLMFT_DRIFT_FRESHNESS_HOURS means the
# schedule, the daemon or the run is broken, and the check says so on the asset. These factories are
# superseded by FreshnessPolicy, which is not an asset check: a check is what a person sees fail next to
# drift_check, and what a test can evaluate.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.SupersessionWarning)
    drift_report_freshness = dg.build_last_update_freshness_checks(
        assets=[DRIFT_REPORT], lower_bound_delta=timedelta(hours=settings.get().drift_freshness_hours)
    )
    # Evaluates the check between materializations, so a report that stops coming turns it red.
    drift_freshness_sensor = dg.build_sensor_for_freshness_checks(
        freshness_checks=drift_report_freshness,
        name="drift_freshness_sensor",
        minimum_interval_seconds=3600,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
