"""`eval_report`: the candidate adapter against the base model and the champion, with the gate's decision.

The evaluation step is `llmft_assets.evaluation.run`; this asset wires config, storage and MLflow to it.
"""

from pathlib import Path

import dagster as dg
from pydantic import Field

from llmft_assets.defs import metadata
from llmft_assets.defs.config_models import dagster_config
from llmft_assets.defs.mlflow_resource import MlflowResource
from llmft_assets.defs.owners import OWNERS
from llmft_assets.defs.storage_resources import (
    ArtifactHandle,
    StagedArtifact,
    StorageResource,
    artifact_output,
    published_version,
)
from llmft_assets.evaluation.answer_check import DEFAULT_TIMEOUT_S as DEFAULT_ANSWER_TIMEOUT_S
from llmft_assets.evaluation.gate import GateThresholds
from llmft_assets.evaluation.generate import DEFAULT_MAX_NEW_TOKENS
from llmft_assets.manifests import AdapterManifest, BaseModelManifest
from llmft_assets.training.run import ADAPTER_SUBDIR
from llmft_assets.training.training_data import DATASET_SPLITS, RETRAINING_DATASET, TrainingData

EVALUATION_GROUP = "evaluation"

# The gate's thresholds have one home, GateThresholds; this run config is derived from it.
GateConfig = dagster_config(
    GateThresholds, "GateConfig", doc="Thresholds of the promotion gate (GateThresholds)."
)


class EvalReportConfig(dg.Config):
    max_rows: int = Field(default=64, description="test rows scored (generation is the slow part)")
    max_new_tokens: int = Field(
        default=DEFAULT_MAX_NEW_TOKENS, description="generation budget per answer (reasoning traces are long)"
    )
    batch_size: int = Field(default=16, description="rows decoded together (continuous batching)")
    compare_champion: bool = Field(
        default=True, description="also score the current champion on the same rows"
    )
    answer_timeout_s: float = Field(
        default=DEFAULT_ANSWER_TIMEOUT_S, gt=0, description="deadline of one answer's math-verify check"
    )
    gate: GateConfig = Field(default_factory=GateConfig, description="the promotion gate's thresholds")  # type: ignore[valid-type]


def _trained_on(storage: StorageResource, adapter: AdapterManifest) -> TrainingData:
    """The dataset the adapter recorded it was trained on (dataset_splits, retraining_dataset or
    sharded_dataset_splits, at its version): its test split is the one the adapter is judged on."""
    from llmft_assets.training.training_data import TrainingDataMissing, resolve_training_data

    if adapter.dataset_version is None:  # every training records it; a hand-published adapter may not
        raise dg.Failure(
            description="eval_report: the lora_adapter records no dataset_version, so there is no test "
            "split of the data it was trained on to score it on",
            allow_retries=False,
        )
    try:
        return resolve_training_data(
            adapter.training_data or DATASET_SPLITS,
            adapter.dataset_version,
            lambda asset, version: published_version(storage, asset, version),
        )
    except (TrainingDataMissing, ValueError) as exc:
        raise dg.Failure(
            description=f"eval_report: no test split for the adapter: {exc}", allow_retries=False
        ) from exc


def _traffic_slice(data: TrainingData) -> tuple[str, Path | None] | None:
    """(retraining_dataset version, its traffic slice) for an adapter trained on a retraining dataset that
    selected for traffic; None for the splits or a retraining dataset that carried the splits over."""
    if data.asset != RETRAINING_DATASET or data.carried_over:
        return None
    return data.version, data.traffic_slice


@dg.asset(group_name=EVALUATION_GROUP, owners=OWNERS, kinds={"mlflow", "html"})
def eval_report(
    context: dg.AssetExecutionContext,
    config: EvalReportConfig,
    lora_adapter: ArtifactHandle,
    base_model: ArtifactHandle,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[StagedArtifact]:
    """Base model vs adapter (vs the champion) on the same test rows: verified accuracy, format compliance,
    finish rate, perplexity and response length, and the gate's decision on every criterion (JSON + HTML).
    The test rows are those of the dataset version the adapter was trained on; an adapter trained on a
    retraining_dataset is also scored on its traffic slice (traffic criteria)."""
    from llmft_assets.evaluation.run import Candidate, EmptyTestSplit, EvalSettings, evaluate_candidate

    data = _trained_on(storage, lora_adapter.manifest(AdapterManifest))
    candidate = Candidate(
        adapter_dir=lora_adapter.path / ADAPTER_SUBDIR,
        adapter_version=lora_adapter.version,
        adapter=lora_adapter.manifest(AdapterManifest),
        base_model_dir=base_model.path,
        base_model_name=base_model.manifest(BaseModelManifest).model_id,
        traffic_slice=_traffic_slice(data),
    )
    staging = storage.staging_dir("eval_report")
    try:
        outcome = evaluate_candidate(
            candidate,
            data.split("test"),
            settings=EvalSettings(**config.model_dump(exclude={"gate"})),
            thresholds=GateThresholds(**config.gate.model_dump()),
            tracker=mlflow,
            champion_adapter_dir=lambda version: (
                storage.artifact_dir("lora_adapter", version) / ADAPTER_SUBDIR
            ),
            staging=staging,
            log=context.log.info,
        )
    except EmptyTestSplit as error:
        raise dg.Failure(description=str(error), allow_retries=False) from error
    return artifact_output(
        StagedArtifact.of(staging, outcome.manifest), metadata=metadata.eval_metadata(outcome, data)
    )
