"""Model-server settings from the environment (one place, typed, validated at start-up)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from llmft_assets.serving.openai_schema import ServingLimits
from llmft_assets.settings import llmft_home
from llmft_assets.settings import storage_root as default_storage_root

DEFAULT_BENTO_MODEL = "llmft-chat:latest"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, allow_zero: bool = False) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def _share(env: Mapping[str, str], name: str) -> float:
    value = _float(env, name, 0.0, allow_zero=True)
    if value > 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {value}")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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
        env = os.environ if environ is None else environ
        limits = ServingLimits(
            max_prompt_tokens=_int(env, "LLMFT_MAX_PROMPT_TOKENS", 4096),
            # R1-style answers think for thousands of tokens before answering: a request without
            # max_tokens gets what fits in the context, up to LLMFT_DEFAULT_MAX_TOKENS.
            max_completion_tokens=_int(env, "LLMFT_MAX_TOKENS", 32768),
            max_request_bytes=_int(env, "LLMFT_MAX_REQUEST_BYTES", 1 << 20),
            default_completion_tokens=_int(env, "LLMFT_DEFAULT_MAX_TOKENS", 8192),
        )
        return cls(
            model_dir=env.get("LLMFT_MODEL_DIR") or None,
            bento_model=env.get("LLMFT_BENTO_MODEL") or DEFAULT_BENTO_MODEL,
            storage_root=env.get("LLMFT_STORAGE") or default_storage_root(),
            served_model_name=env.get("LLMFT_SERVED_MODEL_NAME") or None,
            model_version=env.get("LLMFT_MODEL_VERSION") or None,
            limits=limits,
            max_batch_size=_int(env, "LLMFT_MAX_BATCH_SIZE", 32),
            log_prompts=_bool(env, "LLMFT_LOG_PROMPTS"),
            request_log_batch_rows=_int(env, "LLMFT_REQUEST_LOG_BATCH_ROWS", 256),
            request_log_flush_s=_float(env, "LLMFT_REQUEST_LOG_FLUSH_S", 5.0),
            torch_threads=_int(env, "LLMFT_TORCH_THREADS", 0, minimum=0) or None,
            request_log_spool=env.get("LLMFT_REQUEST_LOG_SPOOL")
            or str(llmft_home() / "serving" / "request_log_spool"),
            request_log_fsync_s=_float(env, "LLMFT_REQUEST_LOG_FSYNC_S", 0.1),
            max_queued_requests=_int(env, "LLMFT_MAX_QUEUED_REQUESTS", 32, minimum=0),
            max_queued_tokens=_int(env, "LLMFT_MAX_QUEUED_TOKENS", 262_144),
            rate_limit_rps=_float(env, "LLMFT_RATE_LIMIT_RPS", 0.0, allow_zero=True),
            rate_limit_burst=_int(env, "LLMFT_RATE_LIMIT_BURST", 20),
            body_timeout_s=_float(env, "LLMFT_BODY_TIMEOUT_S", 30.0),
            reasoning_parser=env.get("LLMFT_REASONING_PARSER", "think").strip().lower() != "none",
            registry_model=env.get("LLMFT_REGISTRY_MODEL") or None,
            registry_poll_s=_float(env, "LLMFT_REGISTRY_POLL_S", 2.0),
            canary_share=_share(env, "LLMFT_CANARY_SHARE"),
            adapter_cache=env.get("LLMFT_ADAPTER_CACHE") or str(llmft_home() / "serving" / "adapters"),
        )
