"""MLflow tracking and model registry for LoRA training runs (pure mlflow, no Dagster).

Everything goes through an explicit ``mlflow.MlflowClient(tracking_uri)`` instead of the fluent
``mlflow.start_run`` API: the fluent API keeps a process-global active run and tracking URI, which
leaks between Dagster steps and between tests. mlflow and transformers are imported inside the
functions so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmft_assets import settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

ADAPTER_ARTIFACT_PATH = "adapter"
BOM_ARTIFACT_FILE = "bill_of_materials.json"
LOSS_CURVE_ARTIFACT_FILE = "plots/loss_curve.png"
BOM_TAG_PREFIX = "bom."

# MLflow's server-side limits (mlflow.utils.validation); longer values are rejected, so we truncate.
_MAX_PARAM_VALUE_CHARS = 6000
_MAX_TAG_VALUE_CHARS = 8000
_MAX_KEY_CHARS = 250
_MAX_PARAMS_PER_BATCH = 100

# Keys that look like credentials are never sent to the tracking server.
_SECRET_KEY_PATTERN = re.compile(
    r"(api[_-]?key|password|passwd|secret|access[_-]?key|auth[_-]?token|bearer|credential|^token$|hf_token)",
    re.IGNORECASE,
)
_REDACTED = "***"
# MLflow metric/param names allow alphanumerics, underscores, dashes, periods, spaces, colons, slashes.
_INVALID_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. :/]")


# --------------------------------------------------------------------------------------------------
# Tracking URI
# --------------------------------------------------------------------------------------------------


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else the embedded SQLite store under the storage root."""
    from_env = os.environ.get(settings.ENV_MLFLOW_URI, "").strip()
    if from_env:
        return from_env
    return f"sqlite:///{settings.llmft_home() / 'mlflow' / 'mlflow.db'}"


def _sqlite_db_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path_part = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    # sqlite:////abs/path and sqlite:///rel/path are both valid SQLAlchemy forms.
    return Path(path_part).expanduser().resolve()


def embedded_artifact_root(tracking_uri: str) -> str | None:
    """For an embedded ``sqlite:///.../mlflow.db`` store: the sibling ``artifacts`` folder as a file URI.

    A tracking server decides its own artifact location, so this returns None for anything else.
    """
    db_path = _sqlite_db_path(tracking_uri)
    if db_path is None:
        return None
    return (db_path.parent / "artifacts").as_uri()


def make_client(tracking_uri: str | None = None) -> MlflowClient:
    """An MlflowClient bound to ``tracking_uri`` (default: :func:`default_tracking_uri`).

    For the embedded SQLite store the database folder is created first (SQLAlchemy will not).
    """
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    db_path = _sqlite_db_path(uri)
    if db_path is not None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    # The registry lives in the same store as tracking (Postgres/SQLite backend or the server).
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# --------------------------------------------------------------------------------------------------
# Flattening, sanitising
# --------------------------------------------------------------------------------------------------


def flatten_dict(nested: Mapping[str, Any], prefix: str = "", separator: str = ".") -> dict[str, Any]:
    """``{"lora": {"r": 8}}`` -> ``{"lora.r": 8}``; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        full_key = f"{prefix}{separator}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_dict(value, full_key, separator))
        else:
            flat[full_key] = value
    return flat


def is_secret_key(key: str) -> bool:
    return any(_SECRET_KEY_PATTERN.search(part) for part in re.split(r"[./]", key))


def _sanitize_key(key: str) -> str:
    return _INVALID_KEY_CHARS.sub("_", key)[:_MAX_KEY_CHARS]


def _value_as_text(value: Any, max_chars: int) -> str:
    if value is None:
        text = "None"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float):
        text = str(value)
    else:
        text = json.dumps(value, default=str, sort_keys=True)
    if len(text) > max_chars:
        marker = "...[truncated]"
        text = text[: max_chars - len(marker)] + marker
    return text


def to_mlflow_strings(values: Mapping[str, Any], max_value_chars: int) -> dict[str, str]:
    """Flatten, sanitise key names, redact secret-looking keys and truncate values to MLflow's limits."""
    result: dict[str, str] = {}
    for key, value in flatten_dict(values).items():
        clean_key = _sanitize_key(key)
        result[clean_key] = _REDACTED if is_secret_key(key) else _value_as_text(value, max_value_chars)
    return result


def _log_params_and_tags(
    client: MlflowClient, run_id: str, params: Mapping[str, str], tags: Mapping[str, str]
) -> None:
    from mlflow.entities import Param, RunTag

    param_items = [Param(k, v) for k, v in params.items()]
    tag_items = [RunTag(k, v) for k, v in tags.items()]
    # log_batch accepts at most 100 params per call.
    for start in range(0, max(len(param_items), len(tag_items)), _MAX_PARAMS_PER_BATCH):
        client.log_batch(
            run_id,
            params=param_items[start : start + _MAX_PARAMS_PER_BATCH],
            tags=tag_items[start : start + _MAX_PARAMS_PER_BATCH],
        )


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def get_or_create_experiment(experiment: str, tracking_uri: str | None = None) -> str:
    """The experiment id for ``experiment``, creating it (with the embedded artifact root) if missing."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or default_tracking_uri()
    client = make_client(uri)
    existing = client.get_experiment_by_name(experiment)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {experiment!r} is deleted; restore it or choose another name"
            )
        return str(existing.experiment_id)
    try:
        return str(client.create_experiment(experiment, artifact_location=embedded_artifact_root(uri)))
    except MlflowException as error:
        # Another process created it between our lookup and create.
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        raced = client.get_experiment_by_name(experiment)
        if raced is None:
            raise
        return str(raced.experiment_id)


def start_training_run(
    tracking_uri: str | None,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, Any],
) -> str:
    """Create a RUNNING run with ``params`` (flattened, ``lora.r``) and ``tags``; return its run id.

    The run stays open: the training callback logs into it and :func:`finish_run` closes it.
    """
    uri = tracking_uri or default_tracking_uri()
    client = make_client(uri)
    experiment_id = get_or_create_experiment(experiment, uri)
    tag_strings = to_mlflow_strings(tags, _MAX_TAG_VALUE_CHARS)
    run = client.create_run(experiment_id, run_name=run_name, tags=tag_strings)
    _log_params_and_tags(client, run.info.run_id, to_mlflow_strings(params, _MAX_PARAM_VALUE_CHARS), {})
    return str(run.info.run_id)


def finish_run(run_id: str, status: str = "FINISHED", *, tracking_uri: str | None = None) -> None:
    """Close a run: ``FINISHED``, ``FAILED`` or ``KILLED``."""
    if status not in {"FINISHED", "FAILED", "KILLED"}:
        raise ValueError(f"run status must be FINISHED, FAILED or KILLED, got {status!r}")
    make_client(tracking_uri).set_terminated(run_id, status=status)


def log_metrics(
    run_id: str, metrics: Mapping[str, float], *, step: int = 0, tracking_uri: str | None = None
) -> None:
    """Log finite numeric metrics (e.g. eval headline numbers) in one batch."""
    from mlflow.entities import Metric

    timestamp_ms = int(time.time() * 1000)
    items = [
        Metric(_sanitize_key(key), float(value), timestamp_ms, step)
        for key, value in metrics.items()
        if _is_finite_number(value)
    ]
    if items:
        make_client(tracking_uri).log_batch(run_id, metrics=items)


def log_bill_of_materials(run_id: str, bom: Mapping[str, Any], *, tracking_uri: str | None = None) -> None:
    """Log the bill of materials as a JSON artifact and as flattened ``bom.*`` run tags."""
    client = make_client(tracking_uri)
    safe_bom = _redact_nested(bom)
    client.log_dict(run_id, safe_bom, BOM_ARTIFACT_FILE)
    tags = {f"{BOM_TAG_PREFIX}{key}": value for key, value in flatten_dict(safe_bom).items()}
    _log_params_and_tags(client, run_id, {}, to_mlflow_strings(tags, _MAX_TAG_VALUE_CHARS))


def _redact_nested(values: Mapping[str, Any]) -> dict[str, Any]:
    redacted: dict[str, Any] = {}
    for key, value in values.items():
        if is_secret_key(str(key)):
            redacted[str(key)] = _REDACTED
        elif isinstance(value, Mapping):
            redacted[str(key)] = _redact_nested(value)
        else:
            redacted[str(key)] = value
    return redacted


def log_adapter(
    run_id: str,
    adapter_dir: str | os.PathLike[str],
    *,
    artifact_path: str = ADAPTER_ARTIFACT_PATH,
    tracking_uri: str | None = None,
) -> str:
    """Upload a peft ``save_pretrained`` directory as run artifacts; return ``runs:/<id>/<path>``."""
    adapter_path = Path(adapter_dir)
    if not adapter_path.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {adapter_path}")
    if not (adapter_path / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_path} is not a peft adapter directory (no adapter_config.json)")
    make_client(tracking_uri).log_artifacts(run_id, str(adapter_path), artifact_path=artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


def render_loss_curve_png(
    loss_history: list[tuple[int, float]], eval_loss_history: list[tuple[int, float]] | None = None
) -> bytes | None:
    """Training (and eval) loss against the step as PNG bytes; None when there is no data."""
    if not loss_history and not eval_loss_history:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if loss_history:
            steps, losses = zip(*loss_history, strict=True)
            axes.plot(steps, losses, label="train loss", marker="." if len(steps) < 50 else None)
        if eval_loss_history:
            steps, losses = zip(*eval_loss_history, strict=True)
            axes.plot(steps, losses, label="eval loss", marker="o")
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title("LoRA training loss")
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
    finally:
        plt.close(figure)
    return buffer.getvalue()


def log_loss_curve(
    run_id: str,
    loss_history: list[tuple[int, float]],
    *,
    eval_loss_history: list[tuple[int, float]] | None = None,
    artifact_file: str = LOSS_CURVE_ARTIFACT_FILE,
    tracking_uri: str | None = None,
    png: bytes | None = None,
) -> str | None:
    """Log the loss curve PNG (rendered here unless `png` is given) as a run artifact; None when no data."""
    png = png if png is not None else render_loss_curve_png(loss_history, eval_loss_history)
    if png is None:
        return None
    with tempfile.TemporaryDirectory(prefix="llmft-plot-") as tmp:
        png_path = Path(tmp) / Path(artifact_file).name
        png_path.write_bytes(png)
        artifact_dir = str(Path(artifact_file).parent)
        make_client(tracking_uri).log_artifact(
            run_id, str(png_path), artifact_path=None if artifact_dir == "." else artifact_dir
        )
    return artifact_file


def run_metric_history(run_id: str, key: str, *, tracking_uri: str | None = None) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` for one metric of a run, ordered by step."""
    history = make_client(tracking_uri).get_metric_history(run_id, key)
    return sorted((int(m.step), float(m.value)) for m in history)


# --------------------------------------------------------------------------------------------------
# Trainer callback
# --------------------------------------------------------------------------------------------------


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _MlflowTrainingCallbackLogic:
    """The logic of :class:`MlflowTrainingCallback`: a transformers ``TrainerCallback`` logging into
    an existing MLflow run.

    Every numeric entry of each ``on_log`` (loss, learning_rate, grad_norm, tokens_per_second,
    eval_loss...) is logged as a metric at ``state.global_step``. When the trainer logs no
    ``tokens_per_second`` but counts ``num_input_tokens_seen``, the rate is derived between two logs.
    At train end the loss curve is logged as a PNG. Only the main process logs (multi-GPU safe).
    Use ``report_to="none"`` in TrainingArguments so transformers' own MLflow callback (which uses the
    global fluent API) does not log a second time.
    """

    def __init__(
        self,
        run_id: str,
        tracking_uri: str | None = None,
        *,
        plot_artifact_file: str = LOSS_CURVE_ARTIFACT_FILE,
    ) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.plot_artifact_file = plot_artifact_file
        self.loss_history: list[tuple[int, float]] = []
        self.eval_loss_history: list[tuple[int, float]] = []
        self._client: MlflowClient | None = None
        self._last_tokens_seen: tuple[int, float] | None = None  # (tokens, monotonic time)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = make_client(self.tracking_uri)
        return self._client

    def _metrics_from_logs(self, logs: Mapping[str, Any], state: Any) -> dict[str, float]:
        metrics = {
            _sanitize_key(key): float(value) for key, value in logs.items() if _is_finite_number(value)
        }
        tokens_seen = getattr(state, "num_input_tokens_seen", 0) or 0
        now = time.monotonic()
        if "tokens_per_second" not in metrics and tokens_seen > 0 and self._last_tokens_seen is not None:
            previous_tokens, previous_time = self._last_tokens_seen
            elapsed = now - previous_time
            if tokens_seen > previous_tokens and elapsed > 0:
                metrics["tokens_per_second"] = (tokens_seen - previous_tokens) / elapsed
        if tokens_seen > 0:
            self._last_tokens_seen = (int(tokens_seen), now)
        return metrics

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tokens_seen = getattr(state, "num_input_tokens_seen", 0) or 0
        self._last_tokens_seen = (int(tokens_seen), time.monotonic())

    def on_log(
        self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not logs or not getattr(state, "is_world_process_zero", True):
            return
        from mlflow.entities import Metric

        step = int(getattr(state, "global_step", 0))
        metrics = self._metrics_from_logs(logs, state)
        if "loss" in metrics:
            self.loss_history.append((step, metrics["loss"]))
        if "eval_loss" in metrics:
            self.eval_loss_history.append((step, metrics["eval_loss"]))
        if not metrics:
            return
        timestamp_ms = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(key, value, timestamp_ms, step) for key, value in metrics.items()],
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not getattr(state, "is_world_process_zero", True):
            return
        log_loss_curve(
            self.run_id,
            self.loss_history,
            eval_loss_history=self.eval_loss_history,
            artifact_file=self.plot_artifact_file,
            tracking_uri=self.tracking_uri,
        )


@functools.cache
def _callback_class() -> type:
    # transformers (and torch behind it) costs seconds to import; build the subclass on first use so
    # that importing this module from the Dagster code location stays cheap.
    from transformers import TrainerCallback

    return type(
        "MlflowTrainingCallback",
        (_MlflowTrainingCallbackLogic, TrainerCallback),
        {"__module__": __name__, "__doc__": _MlflowTrainingCallbackLogic.__doc__},
    )


if TYPE_CHECKING:
    from transformers import TrainerCallback

    class MlflowTrainingCallback(_MlflowTrainingCallbackLogic, TrainerCallback): ...


def __getattr__(name: str) -> Any:
    if name == "MlflowTrainingCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name)
    except MlflowException as error:
        if error.error_code not in {"RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"}:
            raise


def register_adapter_version(
    tracking_uri: str | None,
    model_name: str,
    run_id: str,
    artifact_path: str = ADAPTER_ARTIFACT_PATH,
    tags: Mapping[str, Any] | None = None,
    *,
    description: str | None = None,
) -> str:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``model_name``; return the version.

    A peft adapter directory is not an MLflow "MLmodel" folder, so ``mlflow.register_model`` (which
    looks for an MLmodel file or a logged model) refuses it; ``create_model_version`` with the run
    source records the same lineage (source run id) without wrapping the adapter in a flavour.
    """
    client = make_client(tracking_uri)
    _ensure_registered_model(client, model_name)
    version = client.create_model_version(
        name=model_name,
        source=f"runs:/{run_id}/{artifact_path}",
        run_id=run_id,
        tags=to_mlflow_strings(tags or {}, _MAX_TAG_VALUE_CHARS),
        description=description,
    )
    return str(version.version)


def set_alias(model_name: str, alias: str, version: str | int, *, tracking_uri: str | None = None) -> None:
    """Point ``alias`` (e.g. ``candidate``, ``champion``) at ``version``; moves it if it pointed elsewhere."""
    make_client(tracking_uri).set_registered_model_alias(model_name, alias, str(version))


def delete_alias(model_name: str, alias: str, *, tracking_uri: str | None = None) -> None:
    make_client(tracking_uri).delete_registered_model_alias(model_name, alias)


def get_version_by_alias(
    model_name: str, alias: str, *, tracking_uri: str | None = None
) -> ModelVersion | None:
    """The version ``alias`` points at, or None when the alias or the registered model does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return make_client(tracking_uri).get_model_version_by_alias(model_name, alias)
    except MlflowException as error:
        # A missing model is RESOURCE_DOES_NOT_EXIST; a missing alias is INVALID_PARAMETER_VALUE "...
        # alias <name> not found". Any other invalid parameter (a malformed name) still raises.
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}:
            return None
        if error.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(error).lower():
            return None
        raise


def set_version_tags(
    model_name: str, version: str | int, tags: Mapping[str, Any], *, tracking_uri: str | None = None
) -> None:
    """Add tags (e.g. the eval headline numbers, the gate decision) to a registered version."""
    client = make_client(tracking_uri)
    for key, value in to_mlflow_strings(tags, _MAX_TAG_VALUE_CHARS).items():
        client.set_model_version_tag(model_name, str(version), key, value)


def download_model_version(
    model_name: str,
    version: str | int,
    dst_dir: str | os.PathLike[str],
    *,
    tracking_uri: str | None = None,
) -> Path:
    """Download a registered adapter version's files into ``dst_dir``; return the adapter folder."""
    client = make_client(tracking_uri)
    model_version = client.get_model_version(model_name, str(version))
    source = model_version.source or ""
    prefix = f"runs:/{model_version.run_id}/"
    if model_version.run_id and source.startswith(prefix):
        artifact_path = source[len(prefix) :]
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        local = client.download_artifacts(model_version.run_id, artifact_path, str(dst_dir))
        return Path(local)
    from mlflow.artifacts import download_artifacts

    return Path(
        download_artifacts(artifact_uri=source, dst_path=str(dst_dir), tracking_uri=client.tracking_uri)
    )
