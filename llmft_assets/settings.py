"""Environment -> typed settings: every `LLMFT_*` variable the project reads, in one object.

`get()` reads the environment when it is called (never at import), so a variable set after start-up (a
test, a sensor tick, a re-launched step) takes effect. A field named `foo` is the variable `LLMFT_<FIELD>`;
adding a variable is one line below plus its line in `.env.example` (a test compares the two). Empty
values count as unset. A bad value raises `SettingsError` naming the variable.

Standard variables of other tools stay theirs: `MLFLOW_TRACKING_URI`, `AWS_*`, `DAGSTER_HOME`, `BENTOML_HOME`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

ENV_PREFIX = "LLMFT_"
ENV_MLFLOW_URI = "MLFLOW_TRACKING_URI"


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


class SettingsError(ValueError):
    """An `LLMFT_*` variable holds a value of the wrong type or out of range."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", alias_generator=env_name, populate_by_name=True)

    # ---- storage and working root
    home: Path | None = Field(None, description="local working root (default ./.llmft)")
    storage: str = Field("", description="artifact storage root: a local path or s3://bucket/prefix")
    s3_attempts: int = Field(8, ge=1, description="attempts per S3 call before giving up")
    # ---- data
    max_reject_rate: float = Field(0.2, ge=0.0, le=1.0, description="validated_reject_rate check limit")
    mask_check_rows: int = Field(64, ge=1, description="rows the tokenized_masks check renders")
    license_policy: str = Field(
        "",
        description='licences a packaged model may carry: "commercial", or "apache-2.0,mit,..." (unset: any)',
    )
    # ---- jobs (read when the code location loads: they are job tags and the executor choice)
    data_max_runtime_s: int = Field(4 * 3600, ge=60, description="dagster/max_runtime of data_job")
    train_max_runtime_s: int = Field(24 * 3600, ge=60, description="dagster/max_runtime of train_job")
    train_executor: Literal["in_process", "k8s"] = Field("in_process", description="train_job's executor")
    shard_executor: Literal["multiprocess", "k8s"] = Field(
        "multiprocess", description="shard_job's executor (k8s: each step of a shard run in its own pod)"
    )
    # ---- evaluation
    eval_backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="where eval_report generates answers (vllm needs vLLM and a GPU)"
    )
    # ---- automation
    retrain_cooldown_hours: float = Field(24.0, ge=0.0, description="spacing of drift retrainings")
    incoming_sensor_interval_s: int = Field(60, ge=5)
    incoming_max_runs: int = Field(2, ge=1, description="data_job runs from incoming drops at once")
    incoming_sharded: bool = Field(
        False,
        description="each incoming drop's files become source_shards partitions, one shard_job run each",
    )
    drift_sensor_interval_s: int = Field(60, ge=5)
    drift_schedule_cron: str = Field("0 6 * * *")
    drift_freshness_hours: float = Field(
        36.0, gt=0.0, description="drift_report older than this fails its freshness check"
    )
    alert_webhook_url: SecretStr | None = Field(None, description="Slack-compatible webhook for drift alerts")
    # ---- training placement on Kubernetes (deploy/README.md)
    gpu_count: int = Field(1, ge=1)
    gpu_node_selector: dict[str, str] | None = Field(None, description="JSON object; default GPU label")
    gpu_tolerations: list[dict[str, Any]] | None = Field(None, description="JSON list; default GPU taint")
    gpu_cpu_request: str = "4"
    gpu_memory_request: str = "32Gi"
    gpu_shm_size: str = "8Gi"
    training_image: str | None = None
    training_service_account: str | None = None
    accelerate_config_dir: str | None = Field(
        None, description="accelerate configs for `strategy` (default: deploy/accelerate of the checkout)"
    )
    # ---- model server (bentos/service.py)
    api_key: SecretStr | None = Field(None, description="the server's API key (required off loopback)")
    api_key_file: str | None = Field(None, description="a file holding the API key")
    model_dir: str | None = Field(None, description="serve this save_pretrained directory")
    bento_model: str = Field("llmft-chat:latest", description="else this BentoML model tag")
    served_model_name: str | None = None
    model_version: str | None = None
    max_prompt_tokens: int = Field(4096, ge=1)
    max_tokens: int = Field(32768, ge=1, description="largest max_tokens a request may ask for")
    # R1-style answers think for thousands of tokens: a request without max_tokens gets what fits in the
    # context, up to this.
    default_max_tokens: int = Field(8192, ge=1, description="max_tokens of a request that sets none")
    max_request_bytes: int = Field(1 << 20, ge=1)
    max_batch_size: int = Field(32, ge=1)
    log_prompts: bool = Field(False, description="put prompt text into server logs")
    request_log_batch_rows: int = Field(256, ge=1)
    request_log_flush_s: float = Field(5.0, gt=0.0)
    torch_threads: int = Field(0, ge=0, description="CPU intra-op threads; 0 = chosen by model size")
    engine: Literal["", "transformers", "vllm"] = Field("", description="force an inference engine")
    request_log_spool: str | None = Field(
        None, description="local folder of the crash-safe request-log segments (default: <home>/serving/...)"
    )
    request_log_fsync_s: float = Field(
        0.1, gt=0.0, description="how often the request-log segment is fsynced"
    )
    max_queued_requests: int = Field(32, ge=0, description="requests waiting for a batch slot; beyond: 503")
    max_queued_tokens: int = Field(262_144, ge=1, description="prompt tokens in flight; beyond: 503")
    rate_limit_rps: float = Field(
        0.0, ge=0.0, description="requests/s per API key (0: no limit); beyond: 429"
    )
    rate_limit_burst: int = Field(20, ge=1, description="token-bucket size per API key")
    header_timeout_s: float = Field(10.0, gt=0.0, description="request headers must arrive within this")
    body_timeout_s: float = Field(30.0, gt=0.0, description="the whole request body must arrive within this")
    reasoning_parser: Literal["think", "none"] = Field(
        "think", description="split <think> into reasoning_content (none: off)"
    )
    registry_model: str | None = Field(
        None, description="serve this MLflow registered model's adapters by alias (llmft-chat@...)"
    )
    registry_poll_s: float = Field(2.0, gt=0.0, description="how often registry aliases are re-read")
    canary_share: float = Field(
        0.0, ge=0.0, le=1.0, description="share of llmft-chat traffic for the candidate (a tag overrides)"
    )
    adapter_cache: str | None = Field(None, description="where registry adapters are downloaded")
    serve_gpus: int = Field(0, ge=0, description="GPUs the model server declares (0: CPU server)")
    serve_gpu_type: str | None = Field(None, description="BentoML gpu_type, e.g. nvidia-h100-80gb")
    serve_arbiter_pid: int | None = Field(
        None, description="internal: set by bentoml serve for its workers, which exit when it dies"
    )
    # ---- benchmarks
    vllm_python: str | None = Field(None, description="a Python with vLLM for benchmarks/gpu_suite.sh")

    @field_validator("gpu_node_selector", "gpu_tolerations", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"not valid JSON: {error}") from None
        return value


def variable_names() -> list[str]:
    """Every `LLMFT_*` variable, in declaration order."""
    return [env_name(name) for name in Settings.model_fields]


def get(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from `environ` (default: the process environment, read now)."""
    env = os.environ if environ is None else environ
    known = set(variable_names())
    values = {key: value for key, value in env.items() if key in known and value.strip() != ""}
    try:
        return Settings.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}={values.get(str(e['loc'][0]), '')!r}: {e['msg']}"
            for e in error.errors()
        )
        raise SettingsError(f"invalid environment: {problems}") from None


def llmft_home() -> Path:
    """The local working root; `./.llmft` of the current directory unless LLMFT_HOME says otherwise."""
    return Path(get().home or Path.cwd() / ".llmft").expanduser().resolve()


def storage_root() -> str:
    """The artifact storage root as a URI-ish string: an absolute local path or `s3://bucket/prefix`."""
    configured = get().storage.strip()
    if not configured:
        return str(llmft_home() / "storage")
    if configured.startswith("s3://"):
        return configured.rstrip("/")
    if configured.startswith("file://"):
        configured = configured[len("file://") :]
    if "://" in configured:
        raise SettingsError(
            f"LLMFT_STORAGE={configured!r}: unsupported scheme; use a local path or s3://bucket/prefix"
        )
    return str(Path(configured).expanduser().resolve())


def cache_dir(*parts: str) -> Path:
    path = llmft_home().joinpath("cache", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
