"""Greedy generation and assistant-token perplexity for the eval (transformers + peft).

Prompts are rendered with the model's own chat template (``add_generation_prompt=True``) and decoded
greedily until the end-of-turn token (``<|im_end|>`` for ChatML) or the generation budget.
`generate_continuous` (what the eval uses) runs every row through the serving engine's continuous
batching: a row that finishes leaves the batch at once and the next row takes its place, so short
answers never wait for the longest one. `generate_with_model` is the static alternative (left-padded
batches that run until their longest row ends), kept as the baseline of benchmarks/eval_generation.py.
torch, transformers and peft are imported inside the functions: Dagster imports this module on every step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmft_assets.data.schema import IGNORE_INDEX
from llmft_assets.evaluation.metrics import Generation

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Message = Mapping[str, str]

# The eval's generation budget (one home: the eval_report config and `evaluate` default to it). R1-style
# answers carry a reasoning trace of hundreds to thousands of tokens before the boxed answer; a smaller
# budget cuts them off and scores a model that would have finished as unfinished and wrong.
DEFAULT_MAX_NEW_TOKENS = 4096


def prompt_messages(conversation: Sequence[Message]) -> list[dict[str, str]]:
    """The conversation up to the model's turn: a trailing assistant turn (the reference) is dropped."""
    messages = [
        {"role": str(message["role"]), "content": str(message["content"])} for message in conversation
    ]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user turn (after dropping a trailing assistant answer)")
    return messages


def end_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> list[int]:
    """Token ids that end a turn: the tokenizer's eos (``<|im_end|>``) plus the generation config's eos ids."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        configured = [configured]
    for token_id in configured or []:
        if int(token_id) not in ids:
            ids.append(int(token_id))
    if not ids:
        raise ValueError("the tokenizer has no eos token and the model's generation config names none")
    return ids


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_dir}: the tokenizer has no chat_template; generation needs one")
    if tokenizer.pad_token_id is None:
        # Padding tokens are masked out, so any id works; eos is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_dir: Path) -> PreTrainedModel:
    """The base causal LM in eval mode, on GPU when one is available (bf16 there, fp32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    if torch.cuda.is_available():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, device_map="cuda")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model


def attach_adapter(model: PreTrainedModel, adapter_dir: Path, adapter_name: str = "default") -> Any:
    """Wrap ``model`` with the peft adapter at ``adapter_dir`` (or add it to an existing PeftModel)."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a peft adapter directory (no adapter_config.json)")
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
        model.set_adapter(adapter_name)
        return model
    peft_model = PeftModel.from_pretrained(
        model, str(adapter_dir), adapter_name=adapter_name, is_trainable=False
    )
    peft_model.eval()
    return peft_model


@contextmanager
def _padding_side(tokenizer: PreTrainedTokenizerBase, side: str) -> Iterator[None]:
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def generate_with_model(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> list[Generation]:
    """Greedy answers for ``conversations`` (in order), with token counts and whether each finished."""
    import torch
    from transformers import set_seed

    if max_new_tokens <= 0 or batch_size <= 0:
        raise ValueError(
            f"max_new_tokens and batch_size must be positive, got {max_new_tokens}, {batch_size}"
        )
    if not conversations:
        return []
    set_seed(seed)  # greedy decoding is deterministic; this pins anything a model might sample
    prompts = [
        tokenizer.apply_chat_template(
            prompt_messages(conversation), tokenize=False, add_generation_prompt=True
        )
        for conversation in conversations
    ]
    stop_ids = end_token_ids(tokenizer, model)
    # Batching prompts of similar length wastes less compute on padding; results go back in input order.
    prompt_lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda index: prompt_lengths[index])
    results: list[Generation | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    with _padding_side(tokenizer, "left"), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch_indices = order[start : start + batch_size]
            encoded = tokenizer(
                [prompts[index] for index in batch_indices],
                add_special_tokens=False,
                padding=True,
                return_tensors="pt",
            ).to(device)
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                # Silence the generation config's sampling knobs (temperature, top_p) under greedy.
                temperature=None,
                top_p=None,
                top_k=None,
            )
            continuations = output[:, encoded["input_ids"].shape[1] :].tolist()
            for index, token_ids in zip(batch_indices, continuations, strict=True):
                results[index] = _to_generation(tokenizer, token_ids, stop_ids)
    return [generation for generation in results if generation is not None]


def generate_continuous(
    model: Any,
    model_dir: Path,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int | Sequence[int],
    batch_size: int,
    seed: int,
) -> list[Generation]:
    """Greedy answers for ``conversations`` (in order) through continuous batching.

    Uses the serving engine (`llmft_assets.serving.engine.TransformersEngine`) on ``model`` as loaded
    (a base model or a PeftModel with its adapter unmerged), up to ``batch_size`` rows decoded together.
    Measured on the tiny model on CPU (32 rows of uneven length, one run, load average ~10): the engine 24.6 s,
    transformers' built-in continuous batching (``init_continuous_batching``, paged cache) 156.7 s, static
    left-padded ``generate`` 47.4 s; so the engine it is. ``max_new_tokens`` is one budget for every row
    or one per row. Greedy results equal one-at-a-time ``generate`` (tested).
    """
    import asyncio

    import torch
    from transformers import set_seed

    from llmft_assets.serving.engine import SamplingParams, TransformersEngine

    budgets = (
        [int(max_new_tokens)] * len(conversations)
        if isinstance(max_new_tokens, int)
        else [int(budget) for budget in max_new_tokens]
    )
    if len(budgets) != len(conversations):
        raise ValueError(f"{len(budgets)} budgets for {len(conversations)} conversations")
    if batch_size <= 0 or any(budget <= 0 for budget in budgets):
        raise ValueError(
            f"max_new_tokens and batch_size must be positive, got {budgets[:3]}..., {batch_size}"
        )
    if not conversations:
        return []
    set_seed(seed)  # greedy decoding is deterministic; this pins anything a model might sample
    threads = torch.get_num_threads()  # the engine picks its own count for CPU inference; put it back after
    engine = TransformersEngine(model_dir, model=model, max_batch_size=batch_size)
    try:
        prompts = [engine.render_prompt(prompt_messages(conversation)) for conversation in conversations]

        async def answer(index: int) -> Generation:
            parts: list[str] = []
            finish_reason, completion_tokens = None, 0
            params = SamplingParams(max_tokens=budgets[index], temperature=0.0)
            async for delta in engine.stream(prompts[index], params, f"eval-{index}", wants_stream=False):
                parts.append(delta.text)
                finish_reason, completion_tokens = delta.finish_reason, delta.completion_tokens
            return Generation(
                text="".join(parts), num_tokens=completion_tokens, finished=finish_reason == "stop"
            )

        async def answer_all() -> list[Generation]:
            return list(await asyncio.gather(*(answer(index) for index in range(len(prompts)))))

        return asyncio.run(answer_all())
    finally:
        engine.close()
        torch.set_num_threads(threads)


def _to_generation(
    tokenizer: PreTrainedTokenizerBase, token_ids: list[int], stop_ids: list[int]
) -> Generation:
    """Cut the continuation at its first end token (later positions are padding)."""
    end = next((position for position, token in enumerate(token_ids) if token in stop_ids), None)
    answer_ids = token_ids if end is None else token_ids[:end]
    text = tokenizer.decode(answer_ids, skip_special_tokens=True)
    return Generation(text=text, num_tokens=len(answer_ids), finished=end is not None)


def generate_answers(
    model_dir: Path,
    adapter_dir: Path | None,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> list[str]:
    """Greedy answers of the base model (``adapter_dir=None``) or base + LoRA adapter, one per conversation.

    A conversation ending with an assistant turn is answered from the turns before it.
    """
    load_tokenizer(Path(model_dir))  # fails early and clearly when the tokenizer has no chat template
    model = load_base_model(Path(model_dir))
    if adapter_dir is not None:
        model = attach_adapter(model, Path(adapter_dir))
    generations = generate_continuous(
        model, Path(model_dir), conversations, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed
    )
    return [generation.text for generation in generations]


def assistant_token_perplexity(
    model: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 4,
    pad_token_id: int = 0,
) -> float:
    """``exp`` of the mean negative log-likelihood over the assistant tokens (``labels != -100``).

    Rows are tokenized-schema rows (``input_ids``, ``labels`` aligned with the inputs, as the
    model's own loss expects). Tokens are pooled over all rows, so long answers weigh more than short
    ones, like the training loss. Raises ValueError when no row has an assistant token.
    """
    import torch

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            for row in batch:
                if len(row["input_ids"]) != len(row["labels"]):
                    raise ValueError(f"row {row.get('id')!r}: input_ids and labels differ in length")
            width = max(len(row["input_ids"]) for row in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for position, row in enumerate(batch):
                length = len(row["input_ids"])
                input_ids[position, :length] = torch.as_tensor(list(row["input_ids"]), dtype=torch.long)
                labels[position, :length] = torch.as_tensor(list(row["labels"]), dtype=torch.long)
                attention_mask[position, :length] = 1
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
            ).logits
            # Token t is predicted from the positions before it: shift logits left, labels right.
            shifted_logits = logits[:, :-1, :].float()
            shifted_labels = labels[:, 1:].to(device)
            total_nll += float(
                torch.nn.functional.cross_entropy(
                    shifted_logits.reshape(-1, shifted_logits.size(-1)),
                    shifted_labels.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            total_tokens += int((shifted_labels != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise ValueError("no assistant tokens (labels != -100) to compute perplexity on")
    return math.exp(total_nll / total_tokens)
