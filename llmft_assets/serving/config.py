"""Model-server settings from the environment (one place, typed, validated at start-up)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llmft_assets import settings
from llmft_assets.serving.openai_schema import ServingLimits
from llmft_assets.settings import llmft_home
from llmft_assets.settings import storage_root as default_storage_root

DEFAULT_BENTO_MODEL = settings.Settings.model_fields["bento_model"].default


@dataclass(frozen=True)
class ServerSettings:
    model_dir: str | None  # LLMFT_MODEL_DIR: a local save_pretrained (or packaged) directory
    bento_model: str  # LLMFT_BENTO_MODEL: BentoML model tag used when no directory is given
    storage_root: str  # LLMFT_STORAGE: request logs go to <root>/request_logs/
    served_model_name: str | None  # LLMFT_SERVED_MODEL_NAME: the `model` clients send
    model_version: str | None  # LLMFT_MODEL_VERSION: overrides the version read from labels
    limits: ServingLimits
    max_batch_size: int
    log_prompts: bool  # LLMFT_LOG_PROMPTS=1 puts prompt text into server logs (off by default)
    request_log_batch_rows: int
    request_log_flush_s: float
    torch_threads: int | None  # LLMFT_TORCH_THREADS: CPU intra-op threads (default: 1 for small models)
    request_log_spool: str  # LLMFT_REQUEST_LOG_SPOOL: local folder of the crash-safe log segments
    request_log_fsync_s: float  # LLMFT_REQUEST_LOG_FSYNC_S: how often the segment is fsynced
    max_queued_requests: int  # LLMFT_MAX_QUEUED_REQUESTS: waiting for a batch slot, beyond: 503
    max_queued_tokens: int  # LLMFT_MAX_QUEUED_TOKENS: prompt tokens in flight, beyond: 503
    rate_limit_rps: float  # LLMFT_RATE_LIMIT_RPS: requests/s per API key (0: no limit), beyond: 429
    rate_limit_burst: int  # LLMFT_RATE_LIMIT_BURST: bucket size per key
    body_timeout_s: float  # LLMFT_BODY_TIMEOUT_S: the whole request body must arrive within this
    reasoning_parser: bool  # LLMFT_REASONING_PARSER=none turns the <think> split off
    registry_model: str | None  # LLMFT_REGISTRY_MODEL: serve this MLflow registered model's adapters by alias
    registry_poll_s: float  # LLMFT_REGISTRY_POLL_S: how often aliases are re-read
    canary_share: float  # LLMFT_CANARY_SHARE: default share of llmft-chat for the candidate (tag overrides)
    adapter_cache: str  # LLMFT_ADAPTER_CACHE: where registry adapters are downloaded

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerSettings:
        env = settings.get(environ)  # types, ranges and defaults of every LLMFT_* variable live there
        limits = ServingLimits(
            max_prompt_tokens=env.max_prompt_tokens,
            max_completion_tokens=env.max_tokens,
            max_request_bytes=env.max_request_bytes,
            default_completion_tokens=env.default_max_tokens,
        )
        return cls(
            model_dir=env.model_dir,
            bento_model=env.bento_model,
            storage_root=env.storage or default_storage_root(),
            served_model_name=env.served_model_name,
            model_version=env.model_version,
            limits=limits,
            max_batch_size=env.max_batch_size,
            log_prompts=env.log_prompts,
            request_log_batch_rows=env.request_log_batch_rows,
            request_log_flush_s=env.request_log_flush_s,
            torch_threads=env.torch_threads or None,
            request_log_spool=env.request_log_spool or str(llmft_home() / "serving" / "request_log_spool"),
            request_log_fsync_s=env.request_log_fsync_s,
            max_queued_requests=env.max_queued_requests,
            max_queued_tokens=env.max_queued_tokens,
            rate_limit_rps=env.rate_limit_rps,
            rate_limit_burst=env.rate_limit_burst,
            body_timeout_s=env.body_timeout_s,
            reasoning_parser=env.reasoning_parser != "none",
            registry_model=env.registry_model,
            registry_poll_s=env.registry_poll_s,
            canary_share=env.canary_share,
            adapter_cache=env.adapter_cache or str(llmft_home() / "serving" / "adapters"),
        )
