"""MLflow as a Dagster resource: tracking runs, the adapter registry and its aliases.

A small ``ConfigurableResource`` around :mod:`llmft_assets.training.tracking` rather than
dagster-mlflow's ``mlflow_tracking`` (a legacy function resource that sets the process-wide tracking
URI and active run; not a dependency). Every call goes through an ``MlflowClient`` bound to this resource's URI.
mlflow itself is imported only inside the tracking functions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import dagster as dg
from pydantic import Field

from llmft_assets.training import tracking

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking + registry for llmft.

    ``tracking_uri`` empty means: ``$MLFLOW_TRACKING_URI`` when set, else the embedded SQLite store
    ``sqlite:///$LLMFT_HOME/mlflow/mlflow.db`` (artifacts in ``$LLMFT_HOME/mlflow/artifacts``).
    """

    tracking_uri: str = Field(
        default="",
        description="MLflow tracking/registry URI; empty = $MLFLOW_TRACKING_URI or the embedded SQLite store.",
    )
    experiment_name: str = Field(default="llmft", description="MLflow experiment for training runs.")
    registered_model_name: str = Field(
        default="llmft-adapter", description="Registered model that adapter versions are added to."
    )

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri.strip() or tracking.default_tracking_uri()

    # -- runs ---------------------------------------------------------------------------------------

    def start_training_run(
        self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any] | None = None
    ) -> str:
        return tracking.start_training_run(
            self.resolved_tracking_uri(), self.experiment_name, run_name, params, tags or {}
        )

    def training_callback(self, run_id: str) -> Any:
        """A transformers ``TrainerCallback`` logging per-step metrics and the loss curve into ``run_id``."""
        return tracking.MlflowTrainingCallback(run_id, self.resolved_tracking_uri())

    def finish_run(self, run_id: str, status: str = "FINISHED") -> None:
        tracking.finish_run(run_id, status, tracking_uri=self.resolved_tracking_uri())

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        tracking.log_metrics(run_id, metrics, step=step, tracking_uri=self.resolved_tracking_uri())

    def log_bill_of_materials(self, run_id: str, bom: Mapping[str, Any]) -> None:
        tracking.log_bill_of_materials(run_id, bom, tracking_uri=self.resolved_tracking_uri())

    def log_adapter(
        self, run_id: str, adapter_dir: str | os.PathLike[str], artifact_path: str = "adapter"
    ) -> str:
        """Upload the adapter folder; returns ``runs:/<run_id>/<artifact_path>``."""
        return tracking.log_adapter(
            run_id, adapter_dir, artifact_path=artifact_path, tracking_uri=self.resolved_tracking_uri()
        )

    def log_artifacts(self, run_id: str, local_dir: str | os.PathLike[str], artifact_path: str) -> None:
        """Upload any folder (e.g. the eval report's JSON + HTML) under ``artifact_path`` of the run."""
        tracking.make_client(self.resolved_tracking_uri()).log_artifacts(
            run_id, str(local_dir), artifact_path=artifact_path
        )

    # -- registry -----------------------------------------------------------------------------------

    def register_adapter_version(
        self, run_id: str, artifact_path: str = "adapter", tags: Mapping[str, Any] | None = None
    ) -> str:
        return tracking.register_adapter_version(
            self.resolved_tracking_uri(), self.registered_model_name, run_id, artifact_path, tags or {}
        )

    def set_alias(self, alias: str, version: str | int) -> None:
        tracking.set_alias(
            self.registered_model_name, alias, version, tracking_uri=self.resolved_tracking_uri()
        )

    def get_version_by_alias(self, alias: str) -> ModelVersion | None:
        return tracking.get_version_by_alias(
            self.registered_model_name, alias, tracking_uri=self.resolved_tracking_uri()
        )

    def set_version_tags(self, version: str | int, tags: Mapping[str, Any]) -> None:
        tracking.set_version_tags(
            self.registered_model_name, version, tags, tracking_uri=self.resolved_tracking_uri()
        )

    def download_version(self, version: str | int, dst_dir: str | os.PathLike[str]) -> Path:
        return tracking.download_model_version(
            self.registered_model_name, version, dst_dir, tracking_uri=self.resolved_tracking_uri()
        )

    # -- links for asset metadata -------------------------------------------------------------------

    def _ui_base(self) -> str | None:
        uri = self.resolved_tracking_uri()
        # Only a tracking server has a UI to link to; file and SQLite stores do not.
        if uri.startswith(("http://", "https://")):
            return uri.rstrip("/")
        return None

    def run_url(self, run_id: str, experiment_id: str | None = None) -> str | None:
        """``<uri>/#/experiments/<exp>/runs/<run>`` for a tracking server; None for embedded stores."""
        base = self._ui_base()
        if base is None:
            return None
        if experiment_id is None:
            experiment_id = (
                tracking.make_client(self.resolved_tracking_uri()).get_run(run_id).info.experiment_id
            )
        return f"{base}/#/experiments/{quote(str(experiment_id))}/runs/{quote(run_id)}"

    def model_version_url(self, version: str | int) -> str | None:
        base = self._ui_base()
        if base is None:
            return None
        return f"{base}/#/models/{quote(self.registered_model_name)}/versions/{quote(str(version))}"
