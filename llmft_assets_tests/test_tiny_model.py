"""The tiny offline Qwen2 chat model: tokenizer fidelity, ChatML template, determinism, cache, base-model loading."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmft_assets.data.sample_gen import generate_rows, plain_texts
from llmft_assets.modeling import tiny_model
from llmft_assets.modeling.base_model import TINY_MODEL_ID, materialize_base_model
from llmft_assets.modeling.tiny_model import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    QWEN25_CHAT_TEMPLATE,
    build_tiny_model,
    build_tiny_tokenizer,
    train_qwen2_bpe,
)

_PRETRAIN_STEPS = 12
_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_VARIED_TEXTS = [
    "Okay, so I need 12345 apples + 678 = 13023.",
    "<think>\nLet me check: 7 \u00d7 8 = 56.\n</think>\n\nThe answer is \\(\\boxed{56}\\).",
    "Unicode: café, naïve, Straße, 日本語のテキスト, emoji 🙂, math ∑ ≤ ∞, Ελληνικά.",
    "Decomposed e\u0301 and composed \u00e9 are the same after NFC.",
    "   leading spaces, tabs\tand\r\nwindows newlines\n\n\nand trailing   ",
    "Don't won't they'll I'M WE'RE it's",
    f"{IM_START}user\nspecial tokens inline{IM_END}\n{ENDOFTEXT}",
    "$\\frac{3}{4}$ of 120 is $90$; \\sqrt{2} ≈ 1.414",
]


def _small_texts() -> list[str]:
    return plain_texts(generate_rows(150, schema="v0", seed=123)) + _VARIED_TEXTS


@pytest.fixture(scope="module")
def llmft_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("llmft_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMFT_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def tiny_dir(llmft_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", pretrain_steps=_PRETRAIN_STEPS)


def test_reloaded_tokenizer_is_qwen2_with_identical_ids(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    texts = _small_texts()
    trained = train_qwen2_bpe(texts, vocab_size=1024)
    tokenizer = build_tiny_tokenizer(texts, vocab_size=1024)
    tokenizer.save_pretrained(tmp_path)
    # AutoTokenizer needs config.json's model_type to pick Qwen2Tokenizer's own pipeline, as on the hub.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "Qwen2Tokenizer"
    assert reloaded.is_fast
    for text in [*_VARIED_TEXTS, *texts[:20]]:
        expected = trained.encode(text).ids
        assert tokenizer(text)["input_ids"] == expected
        assert reloaded(text)["input_ids"] == expected
        assert reloaded.decode(expected) == unicodedata.normalize("NFC", text)


def test_special_tokens_follow_qwen() -> None:
    tokenizer = build_tiny_tokenizer(_small_texts(), vocab_size=1024)
    assert tokenizer.pad_token == ENDOFTEXT
    assert tokenizer.eos_token == IM_END
    assert tokenizer.bos_token is None
    ids = [tokenizer.convert_tokens_to_ids(token) for token in (ENDOFTEXT, IM_START, IM_END)]
    # Like Qwen: the special tokens sit right after the BPE vocabulary, in this order.
    assert ids == [len(tokenizer) - 3, len(tokenizer) - 2, len(tokenizer) - 1]
    assert tokenizer(f"a{IM_END}b")["input_ids"][1] == ids[2]
    assert "<think>" not in tokenizer.get_vocab()  # plain text in Qwen2.5, as it is here


def test_chat_template_renders_qwen25_chatml(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert tokenizer.chat_template == QWEN25_CHAT_TEMPLATE
    conversation = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n\n\\boxed{5}"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "\\boxed{8}"},
    ]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered == (
        f"<|im_start|>system\n{_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2 + 3 = 5\n</think>\n\n\\boxed{5}<|im_end|>\n"
        "<|im_start|>user\nAnd 4 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n\\boxed{8}<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *conversation[:1]]
    prompt = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert (
        prompt
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    encoded = tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True, return_dict=True)
    suffix = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"][-len(suffix) :] == suffix


def test_model_directory_loads_and_generates(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        path.name for path in tiny_dir.iterdir()
    }
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size >= len(tokenizer)
    generation = GenerationConfig.from_pretrained(tiny_dir)
    assert generation.eos_token_id == [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.pad_token_id]

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "A box holds 4 apples. How many apples are there in 3 such boxes?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert new_tokens.shape[0] == 8
    assert isinstance(tokenizer.decode(new_tokens), str)


def test_pretraining_lowers_the_loss(tiny_dir: Path) -> None:
    info = json.loads((tiny_dir / "tiny_model_build.json").read_text())
    assert info["pretrain_steps"] == _PRETRAIN_STEPS
    assert info["pretrain_loss_last"] < info["pretrain_loss_first"] - 0.5


def test_builds_are_byte_identical_and_seeded(tmp_path: Path) -> None:
    texts = _small_texts()
    first = build_tiny_model(tmp_path / "a", texts, pretrain_steps=2, use_cache=False, vocab_size=768)
    second = build_tiny_model(tmp_path / "b", texts, pretrain_steps=2, use_cache=False, vocab_size=768)
    other_seed = build_tiny_model(
        tmp_path / "c", texts, pretrain_steps=0, seed=1, use_cache=False, vocab_size=768
    )
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other_seed / "model.safetensors").read_bytes()


def test_cache_is_reused(llmft_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = _small_texts()
    first = build_tiny_model(tmp_path / "first", texts, pretrain_steps=0, vocab_size=640)
    cached = list((llmft_home / "cache" / "tiny_model").iterdir())
    assert any((path / "model.safetensors").is_file() for path in cached)

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache miss: the tiny model was rebuilt")

    monkeypatch.setattr(tiny_model, "_write_tiny_model", no_rebuild)
    again = build_tiny_model(tmp_path / "again", texts, pretrain_steps=0, vocab_size=640)
    assert (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    with pytest.raises(AssertionError, match="cache miss"):  # another seed is another key
        build_tiny_model(tmp_path / "other", texts, pretrain_steps=0, seed=5, vocab_size=640)


def test_invalid_build_arguments() -> None:
    with pytest.raises(ValueError, match="pretrain_steps"):
        build_tiny_model(Path("unused"), ["x"], pretrain_steps=-1)
    with pytest.raises(ValueError, match="non-empty texts"):
        build_tiny_model(Path("unused"), ["", "  "], pretrain_steps=0)


def test_materialize_tiny_and_local_path(tiny_dir: Path, llmft_home: Path, tmp_path: Path) -> None:
    info = materialize_base_model("tiny", tmp_path / "tiny", pretrain_steps=_PRETRAIN_STEPS)
    assert json.loads(json.dumps(info)) == info
    assert info["model_id"] == TINY_MODEL_ID
    assert info["revision"].startswith("sha256:")
    assert info["eos_token"] == IM_END
    assert info["num_parameters"] > 100_000
    assert (tmp_path / "tiny" / "model.safetensors").read_bytes() == (
        tiny_dir / "model.safetensors"
    ).read_bytes()

    local = materialize_base_model(str(tiny_dir), tmp_path / "copy")
    assert local["model_id"] == str(tiny_dir.resolve())
    for key in ("num_parameters", "chat_template_sha256", "vocab_size", "tokenizer_size", "eos_token"):
        assert local[key] == info[key], key
    assert len(local["tokenizer_sha256"]) == 64


def test_materialize_rejects_unknown_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no/such/dir"):
        materialize_base_model("./no/such/dir", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"without config\.json"):
        materialize_base_model(str(tmp_path / "empty"), tmp_path / "out")
    with pytest.raises(ValueError, match="only applies"):
        materialize_base_model("Qwen/Qwen2.5-7B-Instruct", tmp_path / "out", pretrain_steps=3)


def test_hub_spec_offline_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode makes the hub path fail at once instead of retrying an unreachable host.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"Qwen/Qwen2\.5-7B-Instruct.*hub"):
        materialize_base_model("Qwen/Qwen2.5-7B-Instruct", tmp_path / "out", revision="main")


def test_addition_fact_sheets_are_correct_complete_and_seeded() -> None:
    import re

    from llmft_assets.modeling.tiny_model import addition_fact_sheets

    sheets = addition_fact_sheets(3, seed=4)
    assert sheets == addition_fact_sheets(3, seed=4) and sheets != addition_fact_sheets(3, seed=5)
    for sheet in sheets:
        title, *lines = sheet.splitlines()
        assert title == "Addition facts:" and len(set(lines)) == len(lines) == 200
        for line in lines:
            match = re.fullmatch(r"(\d) \+ (\d)( \+ 1)? = (\d+)", line)
            assert match, line
            a, b, carry, total = match.groups()
            assert int(a) + int(b) + (1 if carry else 0) == int(total)
    assert sheets[0] != sheets[1]  # shuffled anew for every sheet


def test_addition_worksheets_are_correct_seeded_and_never_hold_a_sample_problem() -> None:
    import re

    from llmft_assets.data.sample_gen import sample_arithmetic_pairs
    from llmft_assets.modeling.tiny_model import addition_worksheets

    sheets = addition_worksheets(40, seed=3)
    assert sheets == addition_worksheets(40, seed=3) and sheets != addition_worksheets(40, seed=4)
    held_out = sample_arithmetic_pairs()
    assert len(held_out) == 2400  # every problem of both bundled files
    seen = set()
    for sheet in sheets:
        title, *blocks = sheet.split("\n\n")
        assert title == "Column addition practice:" and len(blocks) == 6
        for block in blocks:
            question, *middle, total = block.splitlines()
            a, b = (int(n) for n in re.findall(r"\d+", question))
            working = [line for line in middle if line.startswith(("Ones:", "Tens:"))]
            assert (
                working[0].startswith(f"Ones: {a % 10} + {b % 10} = ") and total == f"So {a} + {b} = {a + b}."
            )
            assert any(f"{a}" in line and f"{b}" in line for line in middle)  # the opener restates them
            assert "\\boxed" not in block and "<think>" not in block
            seen.add((min(a, b), max(a, b)))
    assert seen and not seen & held_out  # the sample's test rows stay unseen by the base model


def _default_recipe(**override: int) -> str:
    from llmft_assets.modeling.tiny_model import (
        DEFAULT_PRETRAIN_STEPS,
        DEFAULT_VOCAB_SIZE,
        default_tokenizer_texts,
        tiny_model_recipe_key,
    )

    settings = {
        "pretrain_steps": DEFAULT_PRETRAIN_STEPS,
        "seed": 0,
        "vocab_size": DEFAULT_VOCAB_SIZE,
        "hidden_size": 128,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 384,
        **override,
    }
    return tiny_model_recipe_key(default_tokenizer_texts(), **settings)


def test_the_shipped_default_build_matches_the_current_recipe() -> None:
    """Fails when the builder's recipe changes without `python scripts/build_tiny_model.py`."""
    from llmft_assets.modeling.tiny_model import shipped_model_matches

    assert shipped_model_matches(_default_recipe())
    assert not shipped_model_matches(_default_recipe(pretrain_steps=_PRETRAIN_STEPS))
    assert not shipped_model_matches(_default_recipe(seed=1))


def test_the_default_build_is_the_shipped_one_and_others_are_built(llmft_home: Path, tmp_path: Path) -> None:
    from llmft_assets.modeling.tiny_model import SHIPPED_MODEL_DIR

    default = build_tiny_model(tmp_path / "default")
    shipped = (SHIPPED_MODEL_DIR / "model.safetensors").read_bytes()
    assert (default / "model.safetensors").read_bytes() == shipped
    other = build_tiny_model(tmp_path / "other", pretrain_steps=2)
    assert (other / "model.safetensors").read_bytes() != shipped
    assert json.loads((other / "tiny_model_build.json").read_text())["pretrain_steps"] == 2


def test_the_shipped_base_model_adds_two_digit_numbers_it_never_saw_in_plain_text() -> None:
    """The skill the demo's adapter builds on: column addition on the bundled sample's own (unseen) problems,
    asked in the worksheets' plain-text form. The chat form, the R1 answer format and stopping are the
    adapter's job."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmft_assets.data.sample_gen import sample_arithmetic_pairs
    from llmft_assets.modeling.tiny_model import _WORKSHEET_GAPS, SHIPPED_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_MODEL_DIR))
    model = AutoModelForCausalLM.from_pretrained(str(SHIPPED_MODEL_DIR)).eval()
    pairs = sorted(sample_arithmetic_pairs())[::120]  # 20 problems spread over the sample
    right = 0
    for index, (a, b) in enumerate(pairs):
        gap = _WORKSHEET_GAPS[index % len(_WORKSHEET_GAPS)]  # every gap the worksheets use, in turn
        prompt = f"Column addition practice:\n\nWhat is {a} + {b}?\n{gap}"
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        right += f"So {a} + {b} = {a + b}." in tokenizer.decode(out[0, ids.shape[1] :])
    # Measured on the shipped build: 19/20 (the same shape untrained: 0/20).
    assert right / len(pairs) >= 0.6, f"{right}/{len(pairs)} right"
