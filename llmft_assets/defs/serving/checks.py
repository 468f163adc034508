"""`license_policy`: the dataset and base-model licences allow the deployment; blocks packaging otherwise."""

import dagster as dg

from llmft_assets.defs import metadata
from llmft_assets.defs.evaluation.assets import eval_report
from llmft_assets.defs.storage_resources import ArtifactHandle
from llmft_assets.training.run import ADAPTER_SUBDIR


@dg.asset_check(
    asset=eval_report,
    name="license_policy",
    blocking=True,
    additional_ins={"lora_adapter": dg.AssetIn("lora_adapter")},
    description="The dataset and base-model licences allow the deployment LLMFT_LICENSE_POLICY describes "
    "(`commercial`, or a list of allowed licences); blocks packaging when they do not.",
)
def license_policy(lora_adapter: ArtifactHandle) -> dg.AssetCheckResult:
    from llmft_assets.serving.release import license_problems

    policy, licenses, problems = license_problems(lora_adapter.path / ADAPTER_SUBDIR)
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) if problems else f"allowed under {policy.describe()}",
        metadata=metadata.license_metadata(policy, licenses, problems),
    )
