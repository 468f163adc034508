"""llmft's model server: an OpenAI-compatible chat API as a BentoML service.

    bentoml serve bentos.service:LLMChatService --port 3000        # from the repository root

Endpoints: POST /v1/chat/completions (plain and SSE streaming), GET /v1/models (both need
`Authorization: Bearer $LLMFT_API_KEY` when a key is set), and BentoML's own /livez, /readyz
(true once the model is loaded and the generation loop runs) and /metrics (Prometheus).

The model comes from LLMFT_MODEL_DIR (a local directory) or the BentoML model LLMFT_BENTO_MODEL
(default llmft-chat:latest, the latest model that passed the eval gate; a built bento pins its own
tag through the `model_tag` bento argument). Every answered request is appended to the request
log under LLMFT_STORAGE (see llmft_assets/serving/request_log.py) for the drift report.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmft_assets.serving.auth import (
    bearer_token_matches,
    ensure_key_for_bind_host,
    load_api_key,
    serve_cli_bind_host,
)
from llmft_assets.serving.config import ServerSettings
from llmft_assets.serving.engine import EngineError, SamplingParams, create_engine
from llmft_assets.serving.openai_schema import (
    SSE_DONE,
    OpenAIError,
    ValidatedChatRequest,
    chat_chunk_body,
    chat_completion_body,
    check_prompt_tokens,
    error_body,
    internal_error,
    invalid_api_key_error,
    models_list_body,
    new_completion_id,
    parse_chat_request,
    sse_event,
    usage_body,
)
from llmft_assets.serving.packaging import DEFAULT_MODEL_NAME, resolve_model_layout
from llmft_assets.serving.request_log import RequestLogRecord, RequestLogWriter
from llmft_assets.serving.resources import service_resources

# Under "bentoml." so BentoML's own logging configuration shows these lines.
logger = logging.getLogger("bentoml.llmft.serving")

SETTINGS = ServerSettings.from_env()
DEFAULT_HOST = "127.0.0.1"  # plain `bentoml serve` binds loopback; --host 0.0.0.0 needs an API key
_cli_host = serve_cli_bind_host(sys.argv, os.environ, DEFAULT_HOST)
if _cli_host is not None:
    ensure_key_for_bind_host(_cli_host, load_api_key())
BENTO_ARGS = bentoml.use_arguments()
MODEL_TAG: str = getattr(BENTO_ARGS, "model_tag", None) or SETTINGS.bento_model

prompt_tokens_total = bentoml.metrics.Counter(
    name="llmft_prompt_tokens_total", documentation="Prompt tokens of answered requests", labelnames=["model"]
)
completion_tokens_total = bentoml.metrics.Counter(
    name="llmft_completion_tokens_total",
    documentation="Generated tokens of answered requests",
    labelnames=["model"],
)
requests_total = bentoml.metrics.Counter(
    name="llmft_chat_requests_total",
    documentation="Chat completion requests by outcome",
    labelnames=["model", "outcome", "stream"],
)
time_to_first_token = bentoml.metrics.Histogram(
    name="llmft_time_to_first_token_seconds",
    documentation="Seconds from request to first generated text",
    labelnames=["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
request_latency = bentoml.metrics.Histogram(
    name="llmft_request_latency_seconds",
    documentation="Seconds from request to last generated token",
    labelnames=["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)

openai_api = FastAPI(title="llmft OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)


def _error_response(error: OpenAIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else None
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=headers)


@openai_api.exception_handler(OpenAIError)
async def _openai_error_handler(_: Request, error: OpenAIError) -> JSONResponse:
    return _error_response(error)


@openai_api.exception_handler(StarletteHTTPException)
async def _http_error_handler(request: Request, error: StarletteHTTPException) -> JSONResponse:
    message = (
        f"Unknown request URL: {request.method} {request.url.path}."
        if error.status_code in (404, 405)
        else str(error.detail)
    )
    return JSONResponse(
        error_body(message, code="unknown_url" if error.status_code == 404 else None),
        status_code=error.status_code,
    )


@openai_api.exception_handler(Exception)
async def _unexpected_error_handler(_: Request, error: Exception) -> JSONResponse:
    # Logged with its type only: the message may quote the request.
    logger.error("unhandled %s while serving a request", type(error).__name__)
    return _error_response(internal_error())


def _bound_host() -> str:
    """The address this worker really listens on (BentoML passes the socket as --fd N)."""
    argv = sys.argv
    if "--fd" in argv:
        try:
            fd = int(argv[argv.index("--fd") + 1])
            with socket.fromfd(
                fd, socket.AF_INET, socket.SOCK_STREAM
            ) as sock:  # a dup; closing it is harmless
                return str(sock.getsockname()[0])
        except (ValueError, IndexError, OSError):
            pass
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.http.host.get())


def _resolve_model(stored: Any | None) -> tuple[Path, Path | None, str, str]:
    """(model_dir, adapter_dir, served model name, model version) from the settings."""
    if SETTINGS.model_dir:
        root = Path(SETTINGS.model_dir).expanduser()
        layout = resolve_model_layout(root)
        labels: dict[str, str] = {}
        layout_file = root / "llmft_model.json"
        if layout_file.is_file():
            labels = json.loads(layout_file.read_text(encoding="utf-8")).get("labels", {})
        name = SETTINGS.served_model_name or labels.get("model_name") or DEFAULT_MODEL_NAME
        version = SETTINGS.model_version or labels.get("model_version") or f"local:{root.resolve().name}"
        return layout.model_dir, layout.adapter_dir, name, version
    if stored is None:
        stored = bentoml.models.get(MODEL_TAG)
    layout = resolve_model_layout(stored.path)
    labels = dict(stored.info.labels)
    name = SETTINGS.served_model_name or labels.get("model_name") or stored.tag.name
    version = (
        SETTINGS.model_version
        or labels.get("model_version")
        or labels.get("mlflow_version")
        or str(stored.tag)
    )
    return layout.model_dir, layout.adapter_dir, name, version


@bentoml.service(
    name="llmft-chat",
    # One worker: the batching loop needs every concurrent request in the same process.
    workers=1,
    # {"gpu": n} in the CUDA bento (LLMFT_SERVE_GPUS, see bentos/bentofile-gpu.yaml); none on CPU.
    resources=service_resources(),
    traffic={"timeout": 600},
    http={"host": DEFAULT_HOST, "port": 3000},
)
@bentoml.asgi_app(openai_api, path="/v1")
class LLMChatService:
    if SETTINGS.model_dir is None:
        # Declared so that `bentoml build` packs this model into the bento and serving resolves it
        # from the bento (or the local store). Absent when serving a directory (LLMFT_MODEL_DIR).
        bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        from llmft_assets.storage import open_storage

        self.api_key = load_api_key()
        ensure_key_for_bind_host(_bound_host(), self.api_key)
        stored = None if SETTINGS.model_dir else self.bento_model
        model_dir, adapter_dir, self.served_model, self.model_version = _resolve_model(stored)
        self.engine = create_engine(
            model_dir,
            adapter_dir,
            max_batch_size=SETTINGS.max_batch_size,
            torch_threads=SETTINGS.torch_threads,
        )
        self.request_log = RequestLogWriter(
            open_storage(SETTINGS.storage_root),
            max_batch_rows=SETTINGS.request_log_batch_rows,
            flush_interval_s=SETTINGS.request_log_flush_s,
        )
        self.created = int(time.time())
        logger.info(
            "serving %s (version %s) with %s; request log under %s",
            self.served_model,
            self.model_version,
            self.engine.backend_name,
            SETTINGS.storage_root,
        )

    def __is_ready__(self) -> bool:
        return self.engine.is_ready()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.request_log.close()
        self.engine.close()

    # -- helpers -----------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not bearer_token_matches(request.headers.get("authorization"), self.api_key):
            raise invalid_api_key_error()

    async def _read_body(self, request: Request) -> bytes:
        limit = SETTINGS.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise OpenAIError(
                413,
                f"Request body is {declared} bytes; the limit is {limit} bytes.",
                code="request_too_large",
            )
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise OpenAIError(
                    413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large"
                )
        return bytes(body)

    def _log(
        self,
        chat: ValidatedChatRequest,
        request_id: str,
        started: float,
        text: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.request_log.log(
            RequestLogRecord(
                request_id=request_id,
                timestamp=datetime.now(UTC),
                model=self.served_model,
                model_version=self.model_version,
                prompt=chat.last_user_message,
                messages_json=json.dumps(chat.messages, ensure_ascii=False),
                response=text,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                latency_ms=latency_ms,
                finish_reason=finish_reason,
                stream=chat.stream,
            )
        )
        prompt_tokens_total.labels(model=self.served_model).inc(prompt_tokens)
        completion_tokens_total.labels(model=self.served_model).inc(completion_tokens)
        request_latency.labels(model=self.served_model).observe(latency_ms / 1000.0)
        requests_total.labels(
            model=self.served_model, outcome=finish_reason, stream=str(chat.stream).lower()
        ).inc()
        if SETTINGS.log_prompts:
            logger.info("request %s prompt=%r response=%r", request_id, chat.last_user_message, text)
        logger.info(
            "request %s done: %d prompt + %d completion tokens, %.0f ms, finish=%s",
            request_id,
            prompt_tokens,
            completion_tokens,
            latency_ms,
            finish_reason,
        )

    # -- endpoints ---------------------------------------------------------------------------

    @openai_api.get("/models")
    async def list_models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(models_list_body(self.served_model, created=self.created))

    @openai_api.post("/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        started = time.perf_counter()
        self._authorize(request)
        chat = parse_chat_request(
            await self._read_body(request), served_model=self.served_model, limits=SETTINGS.limits
        )
        prompt_ids = self.engine.render_prompt(chat.messages)
        check_prompt_tokens(
            len(prompt_ids),
            chat.max_tokens,
            limits=SETTINGS.limits,
            context_length=self.engine.context_length,
        )
        params = SamplingParams(
            max_tokens=chat.max_tokens,
            temperature=chat.temperature,
            top_p=chat.top_p,
            stop=chat.stop,
            seed=chat.seed,
            presence_penalty=chat.presence_penalty,
            frequency_penalty=chat.frequency_penalty,
        )
        request_id = new_completion_id()
        created = int(time.time())
        if chat.stream:
            return StreamingResponse(
                self._stream(chat, prompt_ids, params, request_id, created, started),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        parts: list[str] = []
        finish_reason, completion_tokens = "stop", 0
        try:
            # wants_stream=False: the text arrives in one piece at the end (no time-to-first-token).
            async for delta in self.engine.stream(prompt_ids, params, request_id, wants_stream=False):
                parts.append(delta.text)
                completion_tokens = delta.completion_tokens
                if delta.finish_reason is not None:
                    finish_reason = delta.finish_reason
        except EngineError:
            requests_total.labels(model=self.served_model, outcome="error", stream="false").inc()
            logger.error("request %s: generation failed", request_id)
            return _error_response(internal_error())
        text = "".join(parts)
        self._log(chat, request_id, started, text, finish_reason, len(prompt_ids), completion_tokens)
        return JSONResponse(
            chat_completion_body(
                completion_id=request_id,
                created=created,
                model=self.served_model,
                text=text,
                finish_reason=finish_reason,
                prompt_tokens=len(prompt_ids),
                completion_tokens=completion_tokens,
            )
        )

    async def _stream(
        self,
        chat: ValidatedChatRequest,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        created: int,
        started: float,
    ) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, str], finish_reason: str | None) -> bytes:
            return sse_event(
                chat_chunk_body(
                    completion_id=request_id,
                    created=created,
                    model=self.served_model,
                    delta=delta,
                    finish_reason=finish_reason,
                )
            )

        parts: list[str] = []
        finish_reason: str | None = None
        completion_tokens = 0
        yield chunk({"role": "assistant", "content": ""}, None)
        try:
            async for delta in self.engine.stream(prompt_ids, params, request_id, wants_stream=True):
                if not parts:
                    time_to_first_token.labels(model=self.served_model).observe(time.perf_counter() - started)
                parts.append(delta.text)
                completion_tokens = delta.completion_tokens
                if delta.text:
                    yield chunk({"content": delta.text}, None)
                if delta.finish_reason is not None:
                    finish_reason = delta.finish_reason
                    yield chunk({}, finish_reason)
            if chat.include_usage:
                yield sse_event(
                    chat_chunk_body(
                        completion_id=request_id,
                        created=created,
                        model=self.served_model,
                        delta={},
                        finish_reason=None,
                        usage=usage_body(len(prompt_ids), completion_tokens),
                        include_choice=False,
                    )
                )
            yield SSE_DONE
        except EngineError:
            logger.error("request %s: generation failed mid-stream", request_id)
            finish_reason = "error"
            yield sse_event(internal_error().to_body())
        finally:
            # A client that disconnects mid-stream is logged as "cancelled" with what it received.
            self._log(
                chat,
                request_id,
                started,
                "".join(parts),
                finish_reason or "cancelled",
                len(prompt_ids),
                completion_tokens,
            )


# Registered after the class so the class-view routes match first; anything else under /v1 gets
# OpenAI's 404 body instead of BentoML's plain-text one.
@openai_api.api_route("/{unknown_path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def unknown_route(request: Request, unknown_path: str) -> JSONResponse:
    return JSONResponse(
        error_body(f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url"),
        status_code=404,
    )
