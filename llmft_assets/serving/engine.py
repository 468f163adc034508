"""Generation engines behind the OpenAI-compatible service.

`TransformersEngine` runs a continuous-batching loop on one background thread: every decode step
advances all running sequences together (one forward pass of shape [batch, 1] over a shared KV
cache); new requests are prefilled and merged into the running batch between steps, and finished
ones leave it at once, so concurrent requests share forward passes instead of queueing behind each
other. Sampling parameters (temperature, top_p, seed, penalties, stop, max_tokens) are per request.

`VLLMEngine` hands the same interface to vLLM's AsyncLLMEngine (paged attention, LoRA adapters)
when a CUDA device and vLLM are present. `create_engine` picks one.

torch / transformers / peft / vllm are imported inside functions: this module is importable (and
its pure helpers testable) without loading them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llmft_assets import settings

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


# Below these the float32 sampler divides by zero or keeps no token (temperature 1e-300 and
# top_p 1e-300 underflow to 0.0): a temperature under the floor means greedy, a top_p is raised to it.
TEMPERATURE_FLOOR = 1e-3
TOP_P_FLOOR = 1e-3
SEED_MODULUS = 1 << 64  # torch generators take a 64-bit seed


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; values the API accepts but the sampler cannot use are clamped here."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be within [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be within (0, 1]")
        if self.temperature < TEMPERATURE_FLOOR:
            object.__setattr__(self, "temperature", 0.0)
        if self.top_p < TOP_P_FLOOR:
            object.__setattr__(self, "top_p", TOP_P_FLOOR)
        if self.seed is not None and not 0 <= self.seed < SEED_MODULUS:
            object.__setattr__(self, "seed", self.seed % SEED_MODULUS)


@dataclass(frozen=True)
class GenerationDelta:
    """New text for one request; `finish_reason` is set ("stop", "length") on the last delta."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class EngineError(RuntimeError):
    """Generation failed inside the engine (reported to the client as a 5xx, without details)."""


class ChatEngine(Protocol):
    tokenizer: Any
    context_length: int
    backend_name: str

    def render_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]: ...

    def stream(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationDelta]: ...

    def is_ready(self) -> bool: ...

    def close(self) -> None: ...


def render_chat_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of the conversation in the model's own chat template, ready for the assistant turn."""
    encoded = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


SMALL_MODEL_PARAMETERS = 50_000_000


def cpu_threads_for(model: Any, requested: int | None = None) -> int:
    """Intra-op threads for CPU inference: `requested`, else 1 for small models, else torch's default.

    A small model's ops are too short to gain from a thread team; on a shared machine every op's
    barrier then waits for a descheduled team thread (measured here: 2-40 ms per decode step
    with 2 threads vs 2 ms with 1 for the tiny model).
    """
    import torch

    if requested:
        return requested
    parameters = sum(p.numel() for p in model.parameters())
    return 1 if parameters < SMALL_MODEL_PARAMETERS else torch.get_num_threads()


def eos_token_ids(tokenizer: Any, generation_config: Any | None) -> set[int]:
    ids: set[int] = set()
    configured = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


# ---------------------------------------------------------------------------------------------
# Stop strings and incremental detokenisation (pure)
# ---------------------------------------------------------------------------------------------


def find_stop(text: str, stops: Sequence[str], search_from: int = 0) -> int:
    """Index of the earliest stop sequence in text[search_from:] (absolute), or -1."""
    best = -1
    for stop in stops:
        index = text.find(stop, search_from)
        if index != -1 and (best == -1 or index < best):
            best = index
    return best


def safe_emit_length(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be sent now: hold back an unfinished UTF-8 character and any
    suffix that could still become a stop sequence."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for prefix_length in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:prefix_length]):
                end = min(end, len(text[:end]) - prefix_length)
                break
    return end


# ---------------------------------------------------------------------------------------------
# Sampling (per-row parameters, vectorised)
# ---------------------------------------------------------------------------------------------


def sample_next_tokens(
    logits: torch.Tensor,
    *,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    generators: Sequence[torch.Generator | None],
    penalties: Sequence[tuple[float, float, Sequence[int]]] | None = None,
) -> list[int]:
    """Pick the next token of every row. Temperature 0 is greedy. `penalties[i]` is
    (presence, frequency, tokens generated so far) as in OpenAI's API.

    transformers' LogitsProcessors take one value for the whole batch; rows here each carry their
    own temperature/top_p/seed, hence this small vectorised version.
    """
    import torch

    logits = logits.float()
    batch, vocab = logits.shape
    if penalties is not None:
        for row, (presence, frequency, generated) in enumerate(penalties):
            if (presence or frequency) and generated:
                counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=vocab)[:vocab]
                counts = counts.to(logits.device, logits.dtype)
                logits[row] -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    chosen = logits.argmax(dim=-1)
    sampled_rows = [row for row in range(batch) if temperatures[row] > 0.0]
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=logits.device)
        temps = torch.tensor(
            [temperatures[r] for r in sampled_rows], device=logits.device, dtype=logits.dtype
        )
        probs = torch.softmax(logits.index_select(0, index) / temps[:, None], dim=-1)
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        top_p = torch.tensor([top_ps[r] for r in sampled_rows], device=logits.device, dtype=logits.dtype)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside_nucleus = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
        sorted_probs = sorted_probs.masked_fill(outside_nucleus, 0.0)
        for position, row in enumerate(sampled_rows):
            pick = torch.multinomial(sorted_probs[position], 1, generator=generators[row])
            chosen[row] = sorted_ids[position, pick[0]]
    return chosen.tolist()


# ---------------------------------------------------------------------------------------------
# Transformers continuous-batching engine
# ---------------------------------------------------------------------------------------------


@dataclass
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[GenerationDelta | BaseException], None]
    wants_stream: bool
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    generator: Any = None
    finish_reason: str | None = None
    adapter: str | None = None  # a LoRA loaded with load_adapter; None: the base model

    @property
    def needs_text_every_step(self) -> bool:
        return self.wants_stream or bool(self.params.stop)


class TransformersEngine:
    """Continuous batching over a transformers causal LM (see module docstring)."""

    backend_name = "transformers"

    def __init__(
        self,
        model_dir: str | Path,
        adapter_dir: str | Path | None = None,
        *,
        max_batch_size: int = 32,
        device: str | None = None,
        max_prefill_tokens: int = 8192,
        torch_threads: int | None = None,
        model: Any = None,
        multi_adapter: bool = False,
    ) -> None:
        """``model``: an already loaded model to run instead of loading ``model_dir``'s (the evaluation
        scores a base model and its unmerged adapters this way); ``model_dir`` still gives the tokenizer."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        # The loop thread decodes with its own instance: a Rust tokenizer shared with the request
        # threads (which encode prompts) can fail with "Already borrowed" under concurrency.
        self._decode_tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        # multi_adapter: the base stays unmerged and LoRA adapters are added with load_adapter();
        # each row of a batch names its own (peft's mixed-batch `adapter_names`).
        self.multi_adapter = multi_adapter
        self._adapters: dict[str, str] = {}  # name -> source directory
        if adapter_dir is not None and not multi_adapter:
            from peft import PeftModel

            # Merged once at load: a LoRA forward costs extra matmuls on every step.
            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        self.model = model.to(self.device).eval()
        self._commands: queue.Queue[tuple[Callable[[], Any], Any]] = queue.Queue()
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads_for(self.model, torch_threads))
        try:
            generation_config = GenerationConfig.from_pretrained(str(model_dir))
        except OSError:
            generation_config = model.generation_config
        self.eos_ids = eos_token_ids(self.tokenizer, generation_config)
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else min(self.eos_ids or {0})
        )
        self._model_config = model.config
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self._waiting: queue.Queue[_Sequence] = queue.Queue()
        self._stop = threading.Event()
        self._default_generator = torch.Generator(device=self.device)
        self._default_generator.seed()
        self._continuous = True  # set False if the cache layout cannot be merged
        self.steps = 0
        self.max_batch_seen = 0
        self._thread = threading.Thread(target=self._loop, name="generation-loop", daemon=True)
        self._thread.start()

    # -- public API --------------------------------------------------------------------------

    def render_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return render_chat_prompt(self.tokenizer, messages)

    def is_ready(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> the directory each came from."""
        return dict(self._adapters)

    def load_adapter(self, name: str, adapter_dir: str | Path, timeout: float = 300.0) -> None:
        """Add a LoRA adapter under `name` (multi_adapter engines); blocks until loaded.

        Runs on the generation thread between two steps, so no forward pass sees a half-loaded
        adapter and running requests go on with theirs. Loading a name twice is a no-op.
        """
        import concurrent.futures

        if not self.multi_adapter:
            raise EngineError("this engine was not created with multi_adapter=True")
        if name in self._adapters:
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def load() -> None:
            from peft import PeftModel

            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(adapter_dir), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name)
            self.model.to(self.device).eval()
            self._adapters[name] = str(adapter_dir)

        self._commands.put((load, done))
        done.result(timeout=timeout)

    def _run_commands(self) -> None:
        while True:
            try:
                command, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command()
            except Exception as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

    def _forward_kwargs(self, sequences: list[_Sequence]) -> dict[str, Any]:
        if not self.multi_adapter or not self._adapters:
            return {}
        return {"adapter_names": [s.adapter or "__base__" for s in sequences]}

    async def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        wants_stream: bool = True,
        adapter: str | None = None,
    ) -> AsyncIterator[GenerationDelta]:
        if not self.is_ready():
            raise EngineError("the generation loop is not running")
        if adapter is not None and adapter not in self._adapters:
            raise EngineError(f"adapter {adapter!r} is not loaded")
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[GenerationDelta | BaseException] = asyncio.Queue()

        def emit(item: GenerationDelta | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, item)
            except RuntimeError:  # the client's event loop is gone
                sequence.cancelled.set()

        sequence = _Sequence(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            emit=emit,
            wants_stream=wants_stream,
            adapter=adapter,
        )
        self._waiting.put(sequence)
        try:
            while True:
                item = await deltas.get()
                if isinstance(item, BaseException):
                    raise EngineError("generation failed") from item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Client disconnected or finished: the loop drops the row at its next step.
            sequence.cancelled.set()

    def generate_text(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, str, int]:
        """Blocking helper (tests, scripts): (text, finish_reason, completion_tokens)."""

        async def collect() -> tuple[str, str, int]:
            parts: list[str] = []
            last: GenerationDelta | None = None
            async for delta in self.stream(prompt_ids, params, "sync", wants_stream=False):
                parts.append(delta.text)
                last = delta
            assert last is not None and last.finish_reason is not None
            return "".join(parts), last.finish_reason, last.completion_tokens

        return asyncio.run(collect())

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        active: list[_Sequence] = []
        cache: Any = None
        mask: torch.Tensor | None = None
        with torch.inference_mode():
            while not self._stop.is_set():
                admitted: list[_Sequence] = []
                try:
                    self._run_commands()
                    active, cache, mask = self._drop_cancelled(active, cache, mask)
                    admitted = self._admit(active)
                    if not active and not admitted:
                        continue
                    if active:
                        active, cache, mask = self._decode_step(active, cache, mask)
                    if admitted:
                        new_rows, new_cache, new_mask = self._prefill(admitted)
                        active, cache, mask = self._merge(active, cache, mask, new_rows, new_cache, new_mask)
                    self.max_batch_seen = max(self.max_batch_seen, len(active))
                except Exception as exc:
                    failed = active + [s for s in admitted if s not in active]
                    # Server log only (tensor shapes, no request text); clients get a generic 500.
                    logger.error(
                        "generation step failed (%s); failing %d requests",
                        type(exc).__name__,
                        len(failed),
                        exc_info=True,
                    )
                    for sequence in failed:
                        sequence.emit(exc)
                    active, cache, mask = [], None, None
            for sequence in active:
                sequence.emit(EngineError("server shutting down"))
            while not self._waiting.empty():
                self._waiting.get_nowait().emit(EngineError("server shutting down"))

    def _admit(self, active: list[_Sequence]) -> list[_Sequence]:
        free = self.max_batch_size - len(active)
        if free <= 0 or (active and not self._continuous):
            return []
        admitted: list[_Sequence] = []
        prefill_tokens = 0
        try:
            # Block briefly only when idle, so a busy loop never waits for arrivals.
            first = self._waiting.get(timeout=0.05) if not active else self._waiting.get_nowait()
        except queue.Empty:
            return []
        pending: _Sequence | None = first
        while pending is not None:
            if not pending.cancelled.is_set():
                admitted.append(pending)
                prefill_tokens += len(pending.prompt_ids)
            if len(admitted) >= free or prefill_tokens >= self.max_prefill_tokens:
                break
            try:
                pending = self._waiting.get_nowait()
            except queue.Empty:
                pending = None
        return admitted

    def _prefill(self, sequences: list[_Sequence]) -> tuple[list[_Sequence], Any, torch.Tensor]:
        import torch
        from transformers import DynamicCache

        sequences = [s for s in sequences if self._row_guard(s, self._seed_generator, s)]
        if not sequences:
            return [], None, None  # type: ignore[return-value]
        longest = max(len(s.prompt_ids) for s in sequences)
        input_ids = torch.full((len(sequences), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            # Left padding: every row's next token lands in the same (last) column.
            input_ids[row, longest - len(sequence.prompt_ids) :] = torch.tensor(sequence.prompt_ids)
            mask[row, longest - len(sequence.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._model_config)
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **self._forward_kwargs(sequences),
        )
        self.steps += 1
        if self._continuous and not _cache_is_mergeable(cache):
            logger.warning("KV cache layout cannot be merged; falling back to static batches")
            self._continuous = False
        return self._after_forward(sequences, output.logits[:, -1, :], cache, mask)

    def _decode_step(
        self, active: list[_Sequence], cache: Any, mask: torch.Tensor
    ) -> tuple[list[_Sequence], Any, torch.Tensor]:
        import torch

        last_tokens = torch.tensor([[s.generated[-1]] for s in active], dtype=torch.long, device=self.device)
        position_ids = mask.sum(dim=-1, keepdim=True)
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=mask.device)], dim=-1)
        output = self.model(
            input_ids=last_tokens,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            **self._forward_kwargs(active),
        )
        self.steps += 1
        return self._after_forward(active, output.logits[:, -1, :], cache, mask)

    def _after_forward(
        self, sequences: list[_Sequence], logits: torch.Tensor, cache: Any, mask: torch.Tensor
    ) -> tuple[list[_Sequence], Any, torch.Tensor]:
        """Sample, emit, and drop finished (or failed) rows from the batch.

        A row whose sampling or detokenisation fails is failed alone; the others go on.
        """
        tokens: list[int | None]
        try:
            tokens = list(self._sample(sequences, logits))
        except Exception:
            # Find the row(s) at fault: sample each row on its own.
            tokens = []
            for row, sequence in enumerate(sequences):
                sampled = self._row_guard(sequence, self._sample, [sequence], logits[row : row + 1])
                tokens.append(sampled[0] if sampled else None)
        keep: list[int] = []
        for row, (sequence, token) in enumerate(zip(sequences, tokens, strict=True)):
            if token is None or not self._row_guard(sequence, self._advance, sequence, token):
                continue
            if sequence.finish_reason is None and not sequence.cancelled.is_set():
                keep.append(row)
        if len(keep) == len(sequences):
            return sequences, cache, mask
        return _select_rows([sequences[i] for i in keep], keep, cache, mask)

    def _sample(self, sequences: list[_Sequence], logits: torch.Tensor) -> list[int]:
        return sample_next_tokens(
            logits,
            temperatures=[s.params.temperature for s in sequences],
            top_ps=[s.params.top_p for s in sequences],
            generators=[s.generator or self._default_generator for s in sequences],
            penalties=[
                (s.params.presence_penalty, s.params.frequency_penalty, s.generated) for s in sequences
            ],
        )

    def _seed_generator(self, sequence: _Sequence) -> bool:
        import torch

        if sequence.params.seed is not None:
            sequence.generator = torch.Generator(device=self.device).manual_seed(sequence.params.seed)
        return True

    def _row_guard(self, sequence: _Sequence, step: Callable[..., Any], *args: Any) -> Any:
        """Run one row's step; on error fail that row only (returns None) and keep the batch going."""
        try:
            return step(*args)
        except Exception as exc:
            logger.error(
                "request %s failed alone in %s (%s)",
                sequence.request_id,
                getattr(step, "__name__", "a step"),
                type(exc).__name__,
                exc_info=True,
            )
            sequence.finish_reason = "error"
            sequence.cancelled.set()
            sequence.emit(exc)
            return None

    def _advance(self, sequence: _Sequence, token: int) -> bool:
        params = sequence.params
        finish: str | None = None
        if token in self.eos_ids:
            finish = "stop"
        else:
            sequence.generated.append(token)
            if (
                len(sequence.generated) >= params.max_tokens
                or len(sequence.prompt_ids) + len(sequence.generated) >= self.context_length
            ):
                finish = "length"
        if finish is None and not sequence.needs_text_every_step:
            return True
        text = self._decode_tokenizer.decode(sequence.generated, skip_special_tokens=True)
        if params.stop:
            # A stop may straddle the already-sent boundary: search from just before it.
            longest_stop = max(len(s) for s in params.stop)
            stop_at = find_stop(text, params.stop, max(0, sequence.emitted_chars - longest_stop + 1))
            if stop_at != -1:
                text, finish = text[:stop_at], "stop"
        if finish is None:
            sendable = safe_emit_length(text, params.stop)
            if sendable <= sequence.emitted_chars:
                return True
            delta = text[sequence.emitted_chars : sendable]
            sequence.emitted_chars = sendable
            sequence.emit(GenerationDelta(delta, None, len(sequence.prompt_ids), len(sequence.generated)))
            return True
        sequence.finish_reason = finish
        delta = text[sequence.emitted_chars :]
        sequence.emitted_chars = len(text)
        sequence.emit(GenerationDelta(delta, finish, len(sequence.prompt_ids), len(sequence.generated)))
        return True

    def _drop_cancelled(
        self, active: list[_Sequence], cache: Any, mask: torch.Tensor | None
    ) -> tuple[list[_Sequence], Any, torch.Tensor | None]:
        keep = [row for row, s in enumerate(active) if not s.cancelled.is_set()]
        if len(keep) == len(active):
            return active, cache, mask
        if not keep:
            return [], None, None
        return _select_rows([active[i] for i in keep], keep, cache, mask)

    def _merge(
        self,
        active: list[_Sequence],
        cache: Any,
        mask: torch.Tensor | None,
        new_rows: list[_Sequence],
        new_cache: Any,
        new_mask: torch.Tensor,
    ) -> tuple[list[_Sequence], Any, torch.Tensor]:
        if not new_rows:
            return active, cache, mask  # type: ignore[return-value]
        if not active or cache is None or mask is None:
            return new_rows, new_cache, new_mask
        return active + new_rows, *_concat_left_padded(cache, mask, new_cache, new_mask)


def _cache_is_mergeable(cache: Any) -> bool:
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _select_rows(
    sequences: list[_Sequence], rows: list[int], cache: Any, mask: torch.Tensor
) -> tuple[list[_Sequence], Any, torch.Tensor]:
    """Keep only `rows` of the batch and trim columns that are padding for every remaining row."""
    import torch

    if not rows:
        return [], None, None  # type: ignore[return-value]
    index = torch.tensor(rows, device=mask.device)
    mask = mask.index_select(0, index)
    first_real_column = int(mask.any(dim=0).nonzero()[0, 0])
    mask = mask[:, first_real_column:]
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, first_real_column:, :]
        layer.values = layer.values.index_select(0, index)[:, :, first_real_column:, :]
    return sequences, cache, mask


def _concat_left_padded(
    cache_a: Any, mask_a: torch.Tensor, cache_b: Any, mask_b: torch.Tensor
) -> tuple[Any, torch.Tensor]:
    """Stack two batches' KV caches into one, left-padding the shorter to the longer's length.

    Padded columns are zero and masked out; RoPE was applied to the cached keys at their own
    positions, and each row's next position comes from its mask, so rows stay exact.
    """
    import torch
    import torch.nn.functional as F

    length = max(mask_a.shape[1], mask_b.shape[1])

    def pad(tensor: torch.Tensor, dim_from_end: int) -> torch.Tensor:
        missing = length - tensor.shape[-dim_from_end]
        if missing == 0:
            return tensor
        spec = [0, 0] * (dim_from_end - 1) + [missing, 0]
        return F.pad(tensor, spec)

    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers, strict=True):
        layer_a.keys = torch.cat([pad(layer_a.keys, 2), pad(layer_b.keys, 2)], dim=0)
        layer_a.values = torch.cat([pad(layer_a.values, 2), pad(layer_b.values, 2)], dim=0)
    mask = torch.cat([pad(mask_a, 1), pad(mask_b, 1)], dim=0)
    return cache_a, mask


# ---------------------------------------------------------------------------------------------
# vLLM engine (CUDA only)
# ---------------------------------------------------------------------------------------------


class VLLMEngine:
    """vLLM's AsyncLLMEngine behind the ChatEngine interface; the adapter is served as a LoRA."""

    backend_name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        adapter_dir: str | Path | None = None,
        *,
        max_batch_size: int = 64,
        gpu_memory_utilization: float = 0.85,
        multi_adapter: bool = False,
        max_loras: int = 4,
        max_lora_rank: int = 64,
    ) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.multi_adapter = multi_adapter
        self._adapters: dict[str, Any] = {}  # name -> LoRARequest
        lora_rank = max_lora_rank if multi_adapter else 16
        if adapter_dir is not None and not multi_adapter:
            adapter_config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
            lora_rank = int(adapter_config.get("r", 16))
        engine_args = AsyncEngineArgs(
            model=str(model_dir),
            tokenizer=str(model_dir),
            enable_lora=adapter_dir is not None or multi_adapter,
            # Several adapters share each batch (vLLM's multi-LoRA); more are swapped in as needed.
            max_loras=max_loras if multi_adapter else 1,
            max_lora_rank=max(8, lora_rank),
            max_num_seqs=max_batch_size,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        self._engine = AsyncLLMEngine.from_engine_args(engine_args)
        self._lora_request = None
        if adapter_dir is not None and not multi_adapter:
            from vllm.lora.request import LoRARequest

            self._lora_request = LoRARequest("llmft-adapter", 1, str(adapter_dir))
        from transformers import AutoConfig

        self.context_length = int(
            getattr(AutoConfig.from_pretrained(str(model_dir)), "max_position_embeddings", 4096)
        )

    def render_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return render_chat_prompt(self.tokenizer, messages)

    def adapters(self) -> dict[str, str]:
        return {name: request.lora_path for name, request in self._adapters.items()}

    def load_adapter(self, name: str, adapter_dir: str | Path, timeout: float = 300.0) -> None:
        """Register a LoRA adapter; vLLM loads it on first use (a LoRARequest per name)."""
        from vllm.lora.request import LoRARequest

        if not self.multi_adapter:
            raise EngineError("this engine was not created with multi_adapter=True")
        if name not in self._adapters:
            self._adapters[name] = LoRARequest(name, len(self._adapters) + 1, str(adapter_dir))

    def close(self) -> None:
        shutdown = getattr(self._engine, "shutdown", None)
        if callable(shutdown):
            shutdown()

    async def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        wants_stream: bool = True,
        adapter: str | None = None,
    ) -> AsyncIterator[GenerationDelta]:
        from vllm import SamplingParams as VLLMSamplingParams

        lora_request = self._lora_request
        if adapter is not None:
            if adapter not in self._adapters:
                raise EngineError(f"adapter {adapter!r} is not loaded")
            lora_request = self._adapters[adapter]
        from vllm.inputs import TokensPrompt

        sampling = VLLMSamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            seed=params.seed,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
        )
        sent = ""
        finished = False
        try:
            async for output in self._engine.generate(
                TokensPrompt(prompt_token_ids=prompt_ids),
                sampling,
                request_id,
                lora_request=lora_request,
            ):
                completion = output.outputs[0]
                finish = completion.finish_reason if output.finished else None
                delta = completion.text[len(sent) :]
                sent = completion.text
                if delta or finish:
                    yield GenerationDelta(delta, finish, len(prompt_ids), len(completion.token_ids))
                if output.finished:
                    finished = True
                    return
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    await self._engine.abort(request_id)


def vllm_available() -> bool:
    if settings.get().engine == "transformers":
        return False
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def create_engine(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    *,
    max_batch_size: int = 32,
    torch_threads: int | None = None,
    multi_adapter: bool = False,
) -> TransformersEngine | VLLMEngine:
    """vLLM on CUDA when installed (LLMFT_ENGINE=transformers forces transformers), else transformers.

    multi_adapter: serve several LoRA adapters over one base (load_adapter / stream(adapter=...)).
    """
    started = time.monotonic()
    engine: TransformersEngine | VLLMEngine
    if vllm_available():
        engine = VLLMEngine(
            model_dir, adapter_dir, max_batch_size=max(max_batch_size, 64), multi_adapter=multi_adapter
        )
    else:
        engine = TransformersEngine(
            model_dir,
            adapter_dir,
            max_batch_size=max_batch_size,
            torch_threads=torch_threads,
            multi_adapter=multi_adapter,
        )
    logger.info("loaded %s engine in %.1fs", engine.backend_name, time.monotonic() - started)
    return engine
