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

import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llmft_assets.serving.admission import AdmissionController, Overloaded, RateLimiter
from llmft_assets.serving.auth import (
    ensure_key_for_bind_host,
    key_name_for,
    load_api_key,
    load_api_keys,
    serve_cli_bind_host,
)
from llmft_assets.serving.config import ServerSettings
from llmft_assets.serving.engine import EngineError, SamplingParams, create_engine, render_chat_prompt
from llmft_assets.serving.openai_schema import (
    SSE_DONE,
    OpenAIError,
    ValidatedChatRequest,
    chat_chunk_body,
    chat_completion_body,
    check_prompt_tokens,
    default_max_tokens,
    error_body,
    internal_error,
    invalid_api_key_error,
    model_not_found_error,
    models_list_body,
    new_completion_id,
    overloaded_error,
    parse_chat_request,
    rate_limited_error,
    request_timeout_error,
    sse_event,
    usage_body,
)
from llmft_assets.serving.packaging import DEFAULT_MODEL_NAME, resolve_model_layout
from llmft_assets.serving.reasoning import ReasoningSplitter, prompt_opens_reasoning, split_reasoning
from llmft_assets.serving.registry import ModelRouter, RegistryWatcher, UnknownModel
from llmft_assets.serving.request_log import RequestLogRecord, SpooledRequestLogWriter
from llmft_assets.serving.resources import service_resources
from llmft_assets.serving.supervision import install_header_timeout, supervise_serve_process

# Under "bentoml." so BentoML's own logging configuration shows these lines.
logger = logging.getLogger("bentoml.llmft.serving")

SETTINGS = ServerSettings.from_env()
DEFAULT_HOST = "127.0.0.1"  # plain `bentoml serve` binds loopback; --host 0.0.0.0 needs an API key
_cli_host = serve_cli_bind_host(sys.argv, os.environ, DEFAULT_HOST)
if _cli_host is not None:
    ensure_key_for_bind_host(_cli_host, load_api_key())
# The CLI goes when `make serve` (its process-group leader) goes; the worker goes when the CLI goes,
# even if that happens while it is still starting (see serving/supervision.py).
supervise_serve_process(is_cli=_cli_host is not None)
# A deadline on request heads (slowloris); takes effect in the worker, whose uvicorn is built after
# this module is imported.
install_header_timeout()
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
    headers = dict(error.headers or {})
    if error.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=headers or None)


class _Ticket:
    """A request's admission slot, released exactly once (however the request ends)."""

    def __init__(self, admission: AdmissionController) -> None:
        self._admission = admission
        self.tokens = 0
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission.release(self.tokens)


@dataclass(frozen=True)
class _Prepared:
    chat: ValidatedChatRequest
    prompt_ids: list[int]
    opens_reasoning: bool


@dataclass(frozen=True)
class _Target:
    """Who answers a request: the model id echoed back, the version logged, the engine adapter."""

    model: str
    version: str
    adapter: str | None


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

        self.api_keys = load_api_keys()
        ensure_key_for_bind_host(_bound_host(), next(iter(self.api_keys.values())) if self.api_keys else None)
        stored = None if SETTINGS.model_dir else self.bento_model
        model_dir, adapter_dir, self.served_model, self.model_version = _resolve_model(stored)
        registry_mode = SETTINGS.registry_model is not None
        self.engine = create_engine(
            model_dir,
            None if registry_mode else adapter_dir,  # registry mode: the base, adapters by alias
            max_batch_size=SETTINGS.max_batch_size,
            torch_threads=SETTINGS.torch_threads,
            multi_adapter=registry_mode,
        )
        self.router: ModelRouter | None = None
        self.watcher: RegistryWatcher | None = None
        if registry_mode:
            self._start_registry()
        self.request_log = SpooledRequestLogWriter(
            open_storage(SETTINGS.storage_root),
            SETTINGS.request_log_spool,
            max_batch_rows=SETTINGS.request_log_batch_rows,
            flush_interval_s=SETTINGS.request_log_flush_s,
            fsync_interval_s=SETTINGS.request_log_fsync_s,
        )
        if self.request_log.recovered_rows:
            logger.info(
                "request log: shipped %d rows left by a previous server", self.request_log.recovered_rows
            )
        self.admission = AdmissionController(
            max_running=SETTINGS.max_batch_size,
            max_waiting=SETTINGS.max_queued_requests,
            max_waiting_tokens=SETTINGS.max_queued_tokens,
        )
        self.rate_limiter = RateLimiter(SETTINGS.rate_limit_rps, SETTINGS.rate_limit_burst)
        # Body parsing, template rendering and tokenization (a 1 MB prompt takes seconds) run on
        # these threads, off the event loop; each has its own tokenizer (a Rust tokenizer shared
        # between threads fails with "Already borrowed"), and two let a small prompt pass a huge one.
        self._tokenizer_dir = str(model_dir)
        self._thread_state = threading.local()
        self._prepare_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prompt-prep")
        self.created = int(time.time())
        logger.info(
            "serving %s (version %s) with %s; request log under %s",
            self.served_model,
            self.model_version,
            self.engine.backend_name,
            SETTINGS.storage_root,
        )

    def _start_registry(self) -> None:
        assert SETTINGS.registry_model is not None
        self.router = ModelRouter(self.served_model)
        self.watcher = RegistryWatcher(
            router=self.router,
            registered_model=SETTINGS.registry_model,
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
            download_root=Path(SETTINGS.adapter_cache),
            load_adapter=self.engine.load_adapter,
            default_canary_share=SETTINGS.canary_share,
            poll_interval_s=SETTINGS.registry_poll_s,
        )
        try:
            logger.info("registry %s aliases: %s", SETTINGS.registry_model, self.watcher.sync())
        except Exception as error:  # served as soon as a later poll succeeds
            logger.error("registry %s not readable yet (%s)", SETTINGS.registry_model, type(error).__name__)
        self.watcher.start()

    async def _target(self, model: str) -> _Target:
        """The adapter version answering `model` now (resolved at admission)."""
        if self.router is None or self.watcher is None:
            return _Target(self.served_model, self.model_version, None)
        try:
            route = self.router.resolve(model)
            if route.version not in self.router.loaded:  # a pinned version seen for the first time
                await asyncio.get_running_loop().run_in_executor(
                    None, self.watcher.ensure_loaded, route.version
                )
        except UnknownModel:
            raise model_not_found_error(model, [entry["id"] for entry in self.router.model_ids()]) from None
        return _Target(model, route.version, route.adapter)

    def __is_ready__(self) -> bool:
        return self.engine.is_ready()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.request_log.close()
        self.engine.close()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    # -- helpers -----------------------------------------------------------------------------

    def _authorize(self, request: Request) -> str:
        """The name of the request's API key (`anonymous` without keys); 401 otherwise."""
        name = key_name_for(request.headers.get("authorization"), self.api_keys)
        if name is None:
            raise invalid_api_key_error()
        return name

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

        async def read() -> None:
            try:
                async for chunk in request.stream():
                    body.extend(chunk)
                    if len(body) > limit:
                        raise OpenAIError(
                            413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large"
                        )
            except ClientDisconnect:
                # Nobody is left to answer; 499 (nginx's "client closed request") for the access log.
                raise OpenAIError(499, "The client closed the connection.", code="client_closed") from None

        try:
            await asyncio.wait_for(read(), timeout=SETTINGS.body_timeout_s)
        except TimeoutError:
            raise request_timeout_error(SETTINGS.body_timeout_s) from None
        return bytes(body)

    def _prepare(self, raw_body: bytes) -> _Prepared:
        """Parse, validate and tokenize (runs on the prep thread)."""
        chat = parse_chat_request(
            raw_body, served_model=None if self.router else self.served_model, limits=SETTINGS.limits
        )
        tokenizer = getattr(self._thread_state, "tokenizer", None)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = self._thread_state.tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_dir)
        prompt_ids = render_chat_prompt(tokenizer, chat.messages)
        opens_reasoning = SETTINGS.reasoning_parser and prompt_opens_reasoning(
            tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False)
        )
        return _Prepared(chat, prompt_ids, opens_reasoning)

    def _log(
        self,
        target: _Target,
        chat: ValidatedChatRequest,
        request_id: str,
        started: float,
        text: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        api_key_name: str,
    ) -> None:
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.request_log.log(
            RequestLogRecord(
                request_id=request_id,
                timestamp=datetime.now(UTC),
                model=target.model,
                model_version=target.version,
                prompt=chat.last_user_message,
                messages_json=json.dumps(chat.messages, ensure_ascii=False),
                response=text,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                latency_ms=latency_ms,
                finish_reason=finish_reason,
                stream=chat.stream,
                api_key_name=api_key_name,
            )
        )
        prompt_tokens_total.labels(model=target.model).inc(prompt_tokens)
        completion_tokens_total.labels(model=target.model).inc(completion_tokens)
        request_latency.labels(model=target.model).observe(latency_ms / 1000.0)
        requests_total.labels(
            model=target.model, outcome=finish_reason, stream=str(chat.stream).lower()
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
        if self.router is None:
            return JSONResponse(models_list_body(self.served_model, created=self.created))
        body = {
            "object": "list",
            "data": [
                {"object": "model", "created": self.created, "owned_by": "llmft", **entry}
                for entry in self.router.model_ids()
            ],
        }
        return JSONResponse(body)

    @openai_api.post("/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        try:
            return await self._chat_completions(request)
        except OpenAIError as error:
            return _error_response(error)
        except Exception as error:
            # Answered here rather than by an exception handler: Starlette re-raises from those,
            # and the server then resets the connection (the client's next request fails too).
            logger.error("unhandled %s while serving a request", type(error).__name__, exc_info=True)
            return _error_response(internal_error())

    async def _chat_completions(self, request: Request) -> Any:
        started = time.perf_counter()
        key_name = self._authorize(request)
        wait_s = self.rate_limiter.check(key_name)
        if wait_s > 0:
            requests_total.labels(model=self.served_model, outcome="rate_limited", stream="unknown").inc()
            raise rate_limited_error(key_name, wait_s)
        try:
            self.admission.reserve()
        except Overloaded as refused:
            requests_total.labels(model=self.served_model, outcome="overloaded", stream="unknown").inc()
            raise overloaded_error(refused.reason, refused.retry_after_s) from None
        ticket = _Ticket(self.admission)
        handed_to_stream = False
        try:
            raw_body = await self._read_body(request)
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self._prepare_pool, self._prepare, raw_body)
            chat, prompt_ids = prepared.chat, prepared.prompt_ids
            target = await self._target(chat.model)
            max_tokens = default_max_tokens(chat, len(prompt_ids), self.engine.context_length)
            check_prompt_tokens(
                len(prompt_ids), max_tokens, limits=SETTINGS.limits, context_length=self.engine.context_length
            )
            try:
                self.admission.add_tokens(len(prompt_ids))
            except Overloaded as refused:
                raise overloaded_error(refused.reason, refused.retry_after_s) from None
            ticket.tokens = len(prompt_ids)
            params = SamplingParams(
                max_tokens=max_tokens,
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
                body = self._stream(target, prepared, params, request_id, created, started, key_name, ticket)
                # Released when the stream ends; the finalizer covers a stream never started.
                weakref.finalize(body, ticket.release)
                handed_to_stream = True
                return StreamingResponse(
                    body,
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            return await self._complete(
                target, request, prepared, params, request_id, created, started, key_name
            )
        finally:
            if not handed_to_stream:
                ticket.release()

    async def _complete(
        self,
        target: _Target,
        request: Request,
        prepared: _Prepared,
        params: SamplingParams,
        request_id: str,
        created: int,
        started: float,
        key_name: str,
    ) -> Response:
        chat, prompt_ids = prepared.chat, prepared.prompt_ids
        parts: list[str] = []
        state = {"finish_reason": "stop", "completion_tokens": 0}

        async def generate() -> None:
            # wants_stream=False: the text arrives in one piece at the end (no time-to-first-token).
            async for delta in self.engine.stream(
                prompt_ids, params, request_id, wants_stream=False, adapter=target.adapter
            ):
                parts.append(delta.text)
                state["completion_tokens"] = delta.completion_tokens
                if delta.finish_reason is not None:
                    state["finish_reason"] = delta.finish_reason

        generation = asyncio.ensure_future(generate())
        disconnect = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({generation, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
        if not generation.done():
            # The client gave up: stop generating for it (the engine drops the row) and say so.
            generation.cancel()
            await asyncio.gather(generation, return_exceptions=True)
            self._log(
                target,
                chat,
                request_id,
                started,
                "".join(parts),
                "cancelled",
                len(prompt_ids),
                int(state["completion_tokens"]),
                key_name,
            )
            return Response(status_code=499)
        if isinstance(generation.exception(), EngineError):
            requests_total.labels(model=target.model, outcome="error", stream="false").inc()
            logger.error("request %s: generation failed", request_id)
            return _error_response(internal_error())
        generation.result()  # re-raise anything else (answered as a 500 by the caller)
        text = "".join(parts)
        finish_reason = str(state["finish_reason"])
        completion_tokens = int(state["completion_tokens"])
        self._log(
            target,
            chat,
            request_id,
            started,
            text,
            finish_reason,
            len(prompt_ids),
            completion_tokens,
            key_name,
        )
        reasoning: str | None = None
        content = text
        if SETTINGS.reasoning_parser:
            reasoning, content = split_reasoning(text, starts_in_reasoning=prepared.opens_reasoning)
        return JSONResponse(
            chat_completion_body(
                completion_id=request_id,
                created=created,
                model=target.model,
                text=content,
                finish_reason=finish_reason,
                prompt_tokens=len(prompt_ids),
                completion_tokens=completion_tokens,
                reasoning_content=reasoning,
            )
        )

    async def _stream(
        self,
        target: _Target,
        prepared: _Prepared,
        params: SamplingParams,
        request_id: str,
        created: int,
        started: float,
        key_name: str,
        ticket: _Ticket,
    ) -> AsyncIterator[bytes]:
        chat, prompt_ids = prepared.chat, prepared.prompt_ids

        def chunk(delta: dict[str, str], finish_reason: str | None) -> bytes:
            return sse_event(
                chat_chunk_body(
                    completion_id=request_id,
                    created=created,
                    model=target.model,
                    delta=delta,
                    finish_reason=finish_reason,
                )
            )

        def text_chunks(reasoning: str, content: str) -> list[bytes]:
            out = []
            if reasoning:
                out.append(chunk({"reasoning_content": reasoning}, None))
            if content:
                out.append(chunk({"content": content}, None))
            return out

        splitter = ReasoningSplitter(starts_in_reasoning=prepared.opens_reasoning)
        parts: list[str] = []
        finish_reason: str | None = None
        completion_tokens = 0
        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            async for delta in self.engine.stream(
                prompt_ids, params, request_id, wants_stream=True, adapter=target.adapter
            ):
                if not parts:
                    time_to_first_token.labels(model=target.model).observe(time.perf_counter() - started)
                parts.append(delta.text)
                completion_tokens = delta.completion_tokens
                if delta.text:
                    if SETTINGS.reasoning_parser:
                        for out in text_chunks(*splitter.feed(delta.text)):
                            yield out
                    else:
                        yield chunk({"content": delta.text}, None)
                if delta.finish_reason is not None:
                    if SETTINGS.reasoning_parser:
                        for out in text_chunks(*splitter.finish()):
                            yield out
                    finish_reason = delta.finish_reason
                    yield chunk({}, finish_reason)
            if chat.include_usage:
                yield sse_event(
                    chat_chunk_body(
                        completion_id=request_id,
                        created=created,
                        model=target.model,
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
            ticket.release()
            # A client that disconnects mid-stream is logged as "cancelled" with what it received.
            self._log(
                target,
                chat,
                request_id,
                started,
                "".join(parts),
                finish_reason or "cancelled",
                len(prompt_ids),
                completion_tokens,
                key_name,
            )


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# Registered after the class so the class-view routes match first; anything else under /v1 gets
# OpenAI's 404 body instead of BentoML's plain-text one.
@openai_api.api_route("/{unknown_path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def unknown_route(request: Request, unknown_path: str) -> JSONResponse:
    return JSONResponse(
        error_body(f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url"),
        status_code=404,
    )
