"""A tiny Qwen2-architecture chat model built offline, deterministically, for tests and the demo.

It is a faithful miniature of a Qwen2.5-Instruct checkpoint: byte-level BPE with Qwen2's exact
normalizer / pre-tokenizer / decoder, Qwen's special tokens and their roles, the real Qwen2.5 ChatML
template, a ``Qwen2Config`` and a ``save_pretrained`` directory that ``AutoTokenizer`` and
``AutoModelForCausalLM`` load like the real thing. Optionally it is briefly pretrained on plain text (no
chat markup) so that it knows the vocabulary but not the chat/answer format, which LoRA then teaches.

Heavy libraries (torch, transformers, tokenizers) are imported inside the functions that use them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

# Qwen2.5-Instruct's chat template, verbatim (ChatML; default system prompt; tool calling).
QWEN25_CHAT_TEMPLATE: str = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
QWEN_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2's pre-tokenization regex (transformers' Qwen2Tokenizer re-applies it on load, so train with it).
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Same order as Qwen's vocabulary: the special tokens come right after the BPE tokens.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

DEFAULT_VOCAB_SIZE = 2048
# Measured: copying digits from the context (what column addition needs) appears between 600 and 900 steps
# of worksheet text; 1,500 steps of the mix below leave a margin.
DEFAULT_PRETRAIN_STEPS = 1500
TOKENIZER_TEXTS_SEED = 7  # differs from the bundled sample's seeds: the sample is "unseen" data
PRETRAIN_TEXTS_SEED = 11
_PRETRAIN_ROWS = 150
_PRETRAIN_FACT_SHEETS = 40
_PRETRAIN_WORKSHEETS = 1500
_WORKSHEET_PROBLEMS = 6
# Lines of varying length between a question and its working. Measured with the demo's training (300 LoRA
# steps, 64 held-out test rows): with no gap the base learned to copy the addends from a fixed distance, which
# chat markup then shifts, and the adapter answered 9% right; with these gaps, 100%.
_WORKSHEET_GAPS = (
    "",
    "Solution:\n",
    "Let me work it out.\n",
    "Answer below.\n",
    "(show your working)\n",
    "Worked answer, column by column, as usual:\n",
    "Here is the working, one line at a time, and a check at the end:\n",
)
_PRETRAIN_BLOCK = 128
_PRETRAIN_BATCH = 8
# Bump when the build changes what it makes (the shipped default build is only used under the same recipe).
_CODE_VERSION = "tiny-model-4"
# The default build (DEFAULT_PRETRAIN_STEPS, seed 0, default shape) ships with the package, as a real base
# model comes from the hub: it takes minutes of CPU to make. scripts/build_tiny_model.py remakes it.
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "sample_data" / "tiny_model"
BUILD_INFO_FILE = "tiny_model_build.json"


def default_tokenizer_texts() -> list[str]:
    """Text the default tokenizer is trained on: sample-generator rows of both families (fixed seed), both schemas."""
    from llmft_assets.data.sample_gen import generate_rows

    texts: list[str] = []
    for family, count in (("word", 600), ("arithmetic", 300)):
        for schema in ("v0", "v1"):
            for row in generate_rows(count, schema=schema, seed=TOKENIZER_TEXTS_SEED, family=family):
                texts.append(row["problem"] if schema == "v0" else row["messages"][0]["content"])
                texts.append(row["reannotated_assistant_content"])
                texts.append(row["solution"] if schema == "v0" else row["messages"][1]["content"])
    return texts


def addition_fact_sheets(count: int, seed: int) -> list[str]:
    """``count`` shuffled tables of one-digit addition facts (``7 + 8 = 15``, and with a carry,
    ``4 + 3 + 1 = 8``): what a base model knows before fine-tuning."""
    import random

    facts = [f"{a} + {b} = {a + b}" for a in range(10) for b in range(10)]
    facts += [f"{a} + {b} + 1 = {a + b + 1}" for a in range(10) for b in range(10)]
    rng = random.Random(seed)
    sheets = []
    for _ in range(count):
        rng.shuffle(facts)
        sheets.append("Addition facts:\n" + "\n".join(facts))
    return sheets


def addition_worksheets(count: int, seed: int) -> list[str]:
    """``count`` plain-text worksheets of two-digit additions, each asked as the sample asks and worked
    column by column (the skill), on addend pairs the bundled sample never uses, so its test rows stay
    unseen. No chat markup, no ``<think>``, no boxed answer and no end token: answering a chat request in
    R1's format, and stopping, are left to the adapter."""
    import random

    from llmft_assets.data.sample_gen import ARITHMETIC_ADDENDS, sample_arithmetic_pairs, worked_addition

    low, high = ARITHMETIC_ADDENDS
    held_out = sample_arithmetic_pairs()
    pairs = [
        (a, b)
        for a in range(low, high + 1)
        for b in range(low, high + 1)
        if (min(a, b), max(a, b)) not in held_out
    ]
    rng = random.Random(f"worksheets:{seed}")
    sheets = []
    for _ in range(count):
        blocks = [
            worked_addition(*rng.choice(pairs), rng, gap=rng.choice(_WORKSHEET_GAPS))
            for _ in range(_WORKSHEET_PROBLEMS)
        ]
        sheets.append("Column addition practice:\n\n" + "\n\n".join(blocks))
    return sheets


def default_pretrain_texts(n_rows: int = _PRETRAIN_ROWS) -> list[str]:
    """Plain text, no chat markup, from a seed the bundled sample does not use: word-problem prose (problem,
    reasoning, answer) for the vocabulary, addition-fact tables, and column-addition worksheets (most of the
    tokens: they teach the model to copy digits from its context, which the arithmetic needs)."""
    from llmft_assets.data.sample_gen import generate_rows, plain_texts

    texts = plain_texts(generate_rows(n_rows, schema="v0", seed=PRETRAIN_TEXTS_SEED))
    texts += addition_fact_sheets(_PRETRAIN_FACT_SHEETS, PRETRAIN_TEXTS_SEED)
    return texts + addition_worksheets(_PRETRAIN_WORKSHEETS, PRETRAIN_TEXTS_SEED)


def train_qwen2_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE trained with exactly Qwen2's pipeline; special tokens appended after the BPE vocab."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols plus special tokens, got {vocab_size}")
    tokenizer = Tokenizer(
        BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    return tokenizer


def qwen2_tokenizer_from_bpe(bpe: Tokenizer) -> PreTrainedTokenizerBase:
    """Wrap a trained BPE as transformers' ``Qwen2Tokenizer`` with Qwen2.5-Instruct's settings."""
    from transformers import Qwen2Tokenizer

    state = json.loads(bpe.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges = [
        tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)
        for merge in state["model"]["merges"]
    ]
    for token in SPECIAL_TOKENS:
        vocab[token] = bpe.token_to_id(token)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=32768,
        errors="replace",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    return tokenizer


def build_tiny_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerBase:
    """A ``Qwen2Tokenizer`` (fast) trained on ``texts``: pad ``<|endoftext|>``, eos ``<|im_end|>``, ChatML."""
    return qwen2_tokenizer_from_bpe(train_qwen2_bpe(texts, vocab_size))


def tiny_model_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 8192,
) -> Any:
    from transformers import Qwen2Config

    # Like Qwen, the embedding matrix is padded past the tokenizer's length (to a multiple of 64).
    vocab_size = -(-len(tokenizer) // 64) * 64
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=True,
        use_sliding_window=False,
        initializer_range=0.02,
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        dtype="float32",
    )


def _hash_texts(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def _code_fingerprint() -> str:
    """Changes whenever this builder or the generator it trains on changes, so stale caches are skipped."""
    from llmft_assets.data import sample_gen

    digest = hashlib.sha256(_CODE_VERSION.encode())
    for path in (Path(__file__), Path(sample_gen.__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def tiny_model_recipe_key(texts: Sequence[str], *, pretrain_steps: int, seed: int, **config: int) -> str:
    """What a build is made from (tokenizer texts, pretraining texts, steps, seed, shape, builder version),
    without library versions: the shipped default build is used when this matches its own."""
    payload = {
        "texts": _hash_texts(texts),
        "pretrain_texts": _hash_texts(default_pretrain_texts()) if pretrain_steps else None,
        "pretrain_steps": pretrain_steps,
        "seed": seed,
        "config": dict(sorted(config.items())),
        "builder": _CODE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def shipped_model_matches(recipe_key: str) -> bool:
    info_file = SHIPPED_MODEL_DIR / BUILD_INFO_FILE
    if not info_file.is_file() or not (SHIPPED_MODEL_DIR / "model.safetensors").is_file():
        return False
    return json.loads(info_file.read_text()).get("recipe_key") == recipe_key


def tiny_model_cache_key(texts: Sequence[str], *, pretrain_steps: int, seed: int, **config: int) -> str:
    import tokenizers
    import torch
    import transformers

    payload = {
        "texts": _hash_texts(texts),
        "pretrain_steps": pretrain_steps,
        "seed": seed,
        "config": dict(sorted(config.items())),
        "code": _code_fingerprint(),
        "versions": [torch.__version__, transformers.__version__, tokenizers.__version__],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _pretrain(
    model: Any, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], steps: int, seed: int
) -> list[float]:
    """Causal-LM pretraining on plain text packed into fixed blocks; returns the loss per step."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    separator = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(separator)
    n_blocks = len(stream) // _PRETRAIN_BLOCK
    if n_blocks < _PRETRAIN_BATCH:
        raise ValueError(f"pretraining text too short: {len(stream)} tokens for blocks of {_PRETRAIN_BLOCK}")
    blocks = torch.tensor(stream[: n_blocks * _PRETRAIN_BLOCK], dtype=torch.long).view(
        n_blocks, _PRETRAIN_BLOCK
    )
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=max(1, steps // 20), num_training_steps=steps
    )
    model.train()
    losses: list[float] = []
    order = torch.randperm(n_blocks, generator=generator)
    cursor = 0
    # One thread: the same bytes whatever the machine's core count (reduction order), and no spinning
    # threads when the CPU is shared; the model is small enough that this costs little.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            if cursor + _PRETRAIN_BATCH > n_blocks:
                order, cursor = torch.randperm(n_blocks, generator=generator), 0
            batch = blocks[order[cursor : cursor + _PRETRAIN_BATCH]]
            cursor += _PRETRAIN_BATCH
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return losses


def _write_tiny_model(
    out_dir: Path, texts: Sequence[str], *, pretrain_steps: int, seed: int, vocab_size: int, **config: int
) -> None:
    recipe_key = tiny_model_recipe_key(
        texts, pretrain_steps=pretrain_steps, seed=seed, vocab_size=vocab_size, **config
    )
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer(texts, vocab_size=vocab_size)
    model_config = tiny_model_config(tokenizer, **config)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(model_config)
    losses: list[float] = []
    if pretrain_steps > 0:
        losses = _pretrain(model, tokenizer, default_pretrain_texts(), pretrain_steps, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        # Qwen2.5-Instruct stops on either; greedy by default so evals and demos are reproducible.
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)],
        do_sample=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    build_info = {
        "builder": "llmft_assets.modeling.tiny_model",
        "builder_version": _CODE_VERSION,
        "recipe_key": recipe_key,
        "seed": seed,
        "pretrain_steps": pretrain_steps,
        "pretrain_loss_first": losses[0] if losses else None,
        "pretrain_loss_last": losses[-1] if losses else None,
        "pretrain_loss_curve": {
            step: round(loss, 4) for step, loss in enumerate(losses, 1) if step % 25 == 0
        },
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(build_info, indent=2, sort_keys=True) + "\n")


def build_tiny_model(
    out_dir: Path,
    texts: Iterable[str] | None = None,
    *,
    pretrain_steps: int = DEFAULT_PRETRAIN_STEPS,
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    use_cache: bool = True,
) -> Path:
    """Write a tiny Qwen2 chat model as a ``save_pretrained`` directory at ``out_dir`` and return it.

    The tokenizer is trained on ``texts`` (default: :func:`default_tokenizer_texts`); the model is
    pretrained for ``pretrain_steps`` on plain text (:func:`default_pretrain_texts`). Same inputs give
    byte-identical files. The default build ships with the package (used when the recipe matches); other
    builds are cached under ``$LLMFT_HOME/cache/tiny_model/<key>`` (key: config, texts, steps, seed, code).
    """
    if pretrain_steps < 0:
        raise ValueError(f"pretrain_steps must be >= 0, got {pretrain_steps}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    text_list = list(texts) if texts is not None else default_tokenizer_texts()
    if not any(text.strip() for text in text_list):
        raise ValueError("build_tiny_model needs non-empty texts to train the tokenizer")
    config = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
    }
    out_dir = Path(out_dir)
    if not use_cache:
        _write_tiny_model(
            out_dir, text_list, pretrain_steps=pretrain_steps, seed=seed, vocab_size=vocab_size, **config
        )
        return out_dir

    recipe = tiny_model_recipe_key(
        text_list, pretrain_steps=pretrain_steps, seed=seed, vocab_size=vocab_size, **config
    )
    if shipped_model_matches(recipe):
        shutil.copytree(SHIPPED_MODEL_DIR, out_dir, dirs_exist_ok=True)
        return out_dir
    key = tiny_model_cache_key(
        text_list, pretrain_steps=pretrain_steps, seed=seed, vocab_size=vocab_size, **config
    )
    from llmft_assets.settings import llmft_home

    cache_dir = llmft_home() / "cache" / "tiny_model" / key
    if not (cache_dir / "model.safetensors").is_file():
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir.parent))
        try:
            _write_tiny_model(
                staging, text_list, pretrain_steps=pretrain_steps, seed=seed, vocab_size=vocab_size, **config
            )
            try:
                staging.rename(cache_dir)  # atomic: readers see a complete build or none
            except OSError:
                if not (cache_dir / "model.safetensors").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(cache_dir, out_dir, dirs_exist_ok=True)
    return out_dir
