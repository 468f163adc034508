"""Eval generation on vLLM: one offline `LLM` for the base model, each adapter a `LoRARequest`, greedy.

Chosen by `select_generation_backend` ("auto": vLLM when it is installed and a CUDA device is present,
else the transformers path of `generate.py`). The metrics are the same either way: the prompts are the same
chat-template token ids, each continuation is cut at the first end token and decoded with the same
tokenizer (`generations_from_token_ids`), and perplexity stays on the transformers model.
vllm and torch are imported inside functions; the request building is testable without them.
"""

from __future__ import annotations

import gc
import importlib.util
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmft_assets.evaluation.metrics import Generation

ENV_EVAL_BACKEND = "LLMFT_EVAL_BACKEND"  # auto (default) | vllm | transformers (llmft_assets.settings)
BACKENDS = ("auto", "vllm", "transformers")
# vLLM accepts these LoRA ranks for `max_lora_rank`
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def select_generation_backend(
    requested: str | None = None,
    *,
    vllm_installed: bool | None = None,
    cuda_available: bool | None = None,
) -> str:
    """ "vllm" or "transformers" for `requested` (else LLMFT_EVAL_BACKEND, else "auto").

    "auto" takes vLLM only when it is installed and CUDA is present; asking for "vllm" where either is
    missing is a ValueError that says which.
    """
    from llmft_assets import settings

    choice = (requested or settings.get().eval_backend).strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"generation backend {choice!r} is not one of {list(BACKENDS)} ({ENV_EVAL_BACKEND})")
    if choice == "transformers":
        return "transformers"
    installed = importlib.util.find_spec("vllm") is not None if vllm_installed is None else vllm_installed
    cuda = _cuda_available() if cuda_available is None else cuda_available
    if choice == "vllm" and not (installed and cuda):
        missing = [
            name for name, ok in (("vllm is not installed", installed), ("no CUDA device", cuda)) if not ok
        ]
        raise ValueError(f"generation backend 'vllm' cannot run here: {', '.join(missing)}")
    return "vllm" if installed and cuda else "transformers"


def vllm_can_serve(adapters: Mapping[str, Path]) -> bool:
    """False when an adapter is DoRA, which vLLM does not load (the transformers path does)."""
    for folder in adapters.values():
        config_file = Path(folder) / "adapter_config.json"
        if config_file.is_file() and json.loads(config_file.read_text()).get("use_dora"):
            return False
    return True


@dataclass(frozen=True)
class LoraSpec:
    """What a `vllm.lora.request.LoRARequest` is built from: name, a unique id >= 1, path, rank."""

    name: str
    int_id: int
    path: str
    rank: int


def lora_specs(adapters: Mapping[str, Path]) -> list[LoraSpec]:
    """One spec per adapter, ids 1..n in the given order; FileNotFoundError for a folder without a config."""
    specs = []
    for index, (name, folder) in enumerate(adapters.items(), start=1):
        config_file = Path(folder) / "adapter_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder}: not a peft adapter directory (no adapter_config.json)")
        config = json.loads(config_file.read_text())
        if config.get("use_dora"):
            raise ValueError(f"adapter {name!r}: vLLM serves no DoRA adapters; use the transformers backend")
        specs.append(LoraSpec(name=name, int_id=index, path=str(folder), rank=int(config.get("r", 8))))
    return specs


def max_lora_rank(specs: Sequence[LoraSpec]) -> int:
    """The smallest rank vLLM accepts that holds every adapter; ValueError above vLLM's largest."""
    needed = max((spec.rank for spec in specs), default=1)
    for rank in _VLLM_LORA_RANKS:
        if rank >= needed:
            return rank
    raise ValueError(f"LoRA rank {needed} exceeds vLLM's largest max_lora_rank {_VLLM_LORA_RANKS[-1]}")


def engine_kwargs(
    model_dir: Path,
    specs: Sequence[LoraSpec],
    *,
    seed: int,
    max_model_len: int,
    gpu_memory_utilization: float = 0.6,
) -> dict[str, Any]:
    """Arguments of `vllm.LLM`: LoRA enabled for every adapter at once; memory left for the perplexity model."""
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "dtype": "bfloat16",
        "seed": seed,
        "max_model_len": max_model_len,
        "gpu_memory_utilization": gpu_memory_utilization,
    }
    if specs:
        kwargs.update(enable_lora=True, max_loras=len(specs), max_lora_rank=max_lora_rank(specs))
    return kwargs


def sampling_kwargs(*, max_new_tokens: int, stop_ids: Sequence[int], seed: int) -> dict[str, Any]:
    """Greedy decoding to the end token, like the transformers path."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    return {
        "temperature": 0.0,
        "max_tokens": max_new_tokens,
        "stop_token_ids": list(stop_ids),
        "seed": seed,
        "skip_special_tokens": True,
    }


def prompt_token_ids(tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, str]]]) -> list[list[int]]:
    """The chat-template prompt of each conversation as token ids (the transformers path's prompt)."""
    from llmft_assets.evaluation.generate import prompt_messages

    texts = [
        tokenizer.apply_chat_template(
            prompt_messages(conversation), tokenize=False, add_generation_prompt=True
        )
        for conversation in conversations
    ]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def generations_from_token_ids(
    tokenizer: Any, continuations: Sequence[Sequence[int]], stop_ids: Sequence[int]
) -> list[Generation]:
    """Cut each continuation at its first end token and decode it, as `generate._to_generation` does."""
    results = []
    for token_ids in continuations:
        ids = list(token_ids)
        end = next((position for position, token in enumerate(ids) if token in stop_ids), None)
        answer = ids if end is None else ids[:end]
        results.append(
            Generation(
                text=tokenizer.decode(answer, skip_special_tokens=True),
                num_tokens=len(answer),
                finished=end is not None,
            )
        )
    return results


def generate_all_with_vllm(
    model_dir: Path,
    adapters: Mapping[str, Path],
    conversations: Sequence[Sequence[Mapping[str, str]]],
    *,
    base_name: str,
    tokenizer: Any,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    seed: int,
) -> dict[str, list[Generation]]:
    """Greedy answers of the base model and of every adapter (a LoRARequest each), from one vLLM engine.

    The engine is released before returning, so the perplexity pass can load the transformers model.
    """
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    specs = lora_specs(adapters)
    prompts = prompt_token_ids(tokenizer, conversations)
    max_model_len = max((len(ids) for ids in prompts), default=1) + max_new_tokens
    llm = LLM(**engine_kwargs(Path(model_dir), specs, seed=seed, max_model_len=max_model_len))
    params = SamplingParams(**sampling_kwargs(max_new_tokens=max_new_tokens, stop_ids=stop_ids, seed=seed))
    requests = [{"prompt_token_ids": ids} for ids in prompts]
    outputs: dict[str, list[Generation]] = {}
    try:
        runs: list[tuple[str, Any]] = [(base_name, None)]
        runs += [(spec.name, LoRARequest(spec.name, spec.int_id, spec.path)) for spec in specs]
        for name, lora_request in runs:
            results = llm.generate(requests, params, lora_request=lora_request, use_tqdm=False)
            continuations = [list(result.outputs[0].token_ids) for result in results]
            outputs[name] = generations_from_token_ids(tokenizer, continuations, stop_ids)
    finally:
        del llm
        gc.collect()
        if _cuda_available():
            import torch

            torch.cuda.empty_cache()
    return outputs
