"""Tokenization: assistant-only labels by prompt-prefix masking, multi-turn, truncation, verification."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from llmft_assets.data.cleaning import clean_rows
from llmft_assets.data.sample_gen import generate_rows
from llmft_assets.data.schema import IGNORE_INDEX, TOKENIZED_SCHEMA, StageCounts
from llmft_assets.data.tokenization import (
    ChatTemplateError,
    assistant_end_marker,
    tokenize_batch,
    verify_masks,
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from llmft_assets.modeling.tiny_model import build_tiny_tokenizer

    rows = generate_rows(150, schema="v0", seed=21)
    texts = [row["problem"] + "\n" + row["reannotated_assistant_content"] for row in rows]
    return build_tiny_tokenizer(texts, vocab_size=800)


def conversation(turns: list[tuple[str, str]], row_id: str = "c") -> dict[str, Any]:
    return {
        "id": row_id,
        "messages": [{"role": role, "content": content} for role, content in turns],
        "source": "test",
        "source_dataset": "test",
        "schema_version": "v1",
        "source_format": "r1_v1",
        "reference_answer": None,
        "content_hash": row_id,
        "origin": f"test#{row_id}",
    }


MULTI_TURN = conversation(
    [
        ("system", "You add numbers."),
        ("user", "What is 2 + 2?"),
        ("assistant", "<think>\n2 + 2 = 4\n</think>\n\nThe answer is \\boxed{4}."),
        ("user", "And 10 + 5?"),
        ("assistant", "<think>10 + 5 = 15</think> So \\boxed{15}."),
        ("user", "Thanks, café ☕!"),
        ("assistant", "You're welcome — 🙂"),
    ],
    row_id="multi",
)
SINGLE_TURN = conversation(
    [("user", "What is 3 * 3?"), ("assistant", "<think>3 * 3 = 9</think> \\boxed{9}")], "single"
)


def labelled_text(row: dict[str, Any], tokenizer: Any) -> list[str]:
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in row["labels"]:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def test_end_marker_comes_from_the_template(tokenizer: Any) -> None:
    assert assistant_end_marker(tokenizer) == "<|im_end|>"


def test_multi_turn_labels_cover_exactly_the_assistant_turns(tokenizer: Any) -> None:
    (row,) = tokenize_batch([MULTI_TURN], tokenizer, max_seq_len=4096)
    assistants = [m["content"] for m in MULTI_TURN["messages"] if m["role"] == "assistant"]
    assert labelled_text(row, tokenizer) == [content + "<|im_end|>" for content in assistants]
    # The prompt parts (system, user turns and each "<|im_start|>assistant\n" header) are masked.
    decoded_all = tokenizer.decode(row["input_ids"], skip_special_tokens=False)
    assert decoded_all.startswith("<|im_start|>system\nYou add numbers.<|im_end|>")
    assert decoded_all.endswith("You're welcome — 🙂<|im_end|>")
    assert row["num_tokens"] == len(row["input_ids"]) == len(row["labels"])
    assert row["num_assistant_tokens"] == sum(label != IGNORE_INDEX for label in row["labels"])
    assert row["truncated"] is False
    assert verify_masks([row], tokenizer) == []


def test_batched_ids_equal_the_per_row_template_tokenization(tokenizer: Any) -> None:
    rows = [SINGLE_TURN, MULTI_TURN]
    tokenized = tokenize_batch(rows, tokenizer, max_seq_len=4096)
    for source, row in zip(rows, tokenized, strict=True):
        messages = source["messages"]
        reference = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
        # Ours stops after the final <|im_end|>; the template adds one newline token after it.
        assert reference[: len(row["input_ids"])] == row["input_ids"]
        assert tokenizer.decode(reference[len(row["input_ids"]) :]) == "\n"
        # Independent check of the first assistant turn: its prompt, tokenized alone, is masked.
        first_assistant = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(
            messages[:first_assistant], tokenize=True, add_generation_prompt=True
        )["input_ids"]
        assert row["input_ids"][: len(prompt)] == prompt
        assert set(row["labels"][: len(prompt)]) == {IGNORE_INDEX}
        assert row["labels"][len(prompt)] == row["input_ids"][len(prompt)]


def test_default_system_prompt_is_masked(tokenizer: Any) -> None:
    (row,) = tokenize_batch([SINGLE_TURN], tokenizer, max_seq_len=4096)
    text = tokenizer.decode(row["input_ids"], skip_special_tokens=False)
    assert "You are Qwen" in text  # the Qwen2.5 template inserts a default system turn
    assert labelled_text(row, tokenizer) == ["<think>3 * 3 = 9</think> \\boxed{9}<|im_end|>"]


def test_truncation_is_flagged_counted_and_still_verifies(tokenizer: Any) -> None:
    (full,) = tokenize_batch([MULTI_TURN], tokenizer, max_seq_len=4096)
    counts = StageCounts(stage="tokenized")
    rows = tokenize_batch(
        [MULTI_TURN, SINGLE_TURN], tokenizer, max_seq_len=full["num_tokens"] - 5, counts=counts
    )
    assert rows[0]["truncated"] is True and rows[0]["num_tokens"] == full["num_tokens"] - 5
    assert rows[0]["input_ids"] == full["input_ids"][: full["num_tokens"] - 5]
    assert rows[1]["truncated"] is False
    assert counts.extra["truncated"] == 1 and counts.rows_in == counts.rows_out == 2
    assert verify_masks(rows, tokenizer) == []
    # Cut inside the prompt: nothing left to learn, counted.
    (tiny,) = tokenize_batch([SINGLE_TURN], tokenizer, max_seq_len=3, counts=counts)
    assert tiny["num_assistant_tokens"] == 0 and counts.extra["no_assistant_tokens"] == 1


def test_verify_masks_finds_corrupted_labels(tokenizer: Any) -> None:
    (row,) = tokenize_batch([MULTI_TURN], tokenizer, max_seq_len=4096)
    shifted = dict(row, labels=[IGNORE_INDEX, *row["labels"][:-1]])
    assert any(
        "differ from input_ids" in p or "do not match" in p for p in verify_masks([shifted], tokenizer)
    )
    first_prompt_token = (
        row["labels"].index(next(label for label in row["labels"] if label != IGNORE_INDEX)) - 1
    )
    leaked = list(row["labels"])
    leaked[first_prompt_token] = row["input_ids"][first_prompt_token]  # label one prompt token
    problems = verify_masks([dict(row, labels=leaked)], tokenizer)
    assert any("do not match the assistant turns" in p for p in problems)
    missing_end = dict(
        row, input_ids=row["input_ids"][:-1], labels=row["labels"][:-1], num_tokens=row["num_tokens"] - 1,
        num_assistant_tokens=row["num_assistant_tokens"] - 1,
    )  # fmt: skip
    assert any("does not end with" in p for p in verify_masks([missing_end], tokenizer))
    wrong_count = dict(row, num_assistant_tokens=1)
    assert any("num_assistant_tokens" in p for p in verify_masks([wrong_count], tokenizer))


def test_pipeline_rows_tokenize_into_the_table_schema(tokenizer: Any) -> None:
    counts = StageCounts(stage="cleaned")
    cleaned, _ = clean_rows(
        generate_rows(40, schema="v0", seed=2) + generate_rows(40, schema="v1", seed=2),
        seen_hashes=set(),
        counts=counts,
    )
    tokenized = tokenize_batch(cleaned, tokenizer, max_seq_len=2048)
    table = pa.Table.from_pylist(tokenized, schema=TOKENIZED_SCHEMA)
    assert table.num_rows == len(cleaned)
    assert verify_masks(tokenized, tokenizer) == []
    assert all(row["num_assistant_tokens"] > 0 for row in tokenized)


def test_template_that_rewrites_earlier_turns_is_rejected(tokenizer: Any) -> None:
    # Like Qwen3's template: earlier assistant turns lose their reasoning, so prefixes do not line up.
    original = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
        "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    try:
        with pytest.raises(ChatTemplateError, match="not a prefix"):
            tokenize_batch([MULTI_TURN], tokenizer, max_seq_len=4096)
    finally:
        tokenizer.chat_template = original


def test_bad_arguments(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_batch([SINGLE_TURN], tokenizer, max_seq_len=0)
    assert tokenize_batch([], tokenizer, max_seq_len=16) == []
    with pytest.raises(ValueError, match="messages must be a non-empty list"):
        tokenize_batch([dict(SINGLE_TURN, messages=[])], tokenizer, max_seq_len=64)


def test_trailing_user_turn_is_kept_and_masked(tokenizer: Any) -> None:
    row = conversation([("user", "Q1?"), ("assistant", "A1 \\boxed{1}"), ("user", "Q2?")], "open-ended")
    (tokenized,) = tokenize_batch([row], tokenizer, max_seq_len=4096)
    text = tokenizer.decode(tokenized["input_ids"], skip_special_tokens=False)
    assert text.rstrip().endswith("Q2?<|im_end|>")
    assert labelled_text(tokenized, tokenizer) == ["A1 \\boxed{1}<|im_end|>"]


def test_leftover_truncation_on_the_backend_does_not_change_results(tokenizer: Any) -> None:
    (expected,) = tokenize_batch([MULTI_TURN], tokenizer, max_seq_len=4096)
    tokenizer.backend_tokenizer.enable_truncation(max_length=8)
    try:
        (row,) = tokenize_batch([MULTI_TURN], tokenizer, max_seq_len=4096)
    finally:
        tokenizer.backend_tokenizer.no_truncation()
    assert row["input_ids"] == expected["input_ids"] and row["labels"] == expected["labels"]


def test_chunked_encoding_gives_the_same_rows(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmft_assets.data.tokenization as tokenization

    rows = [MULTI_TURN, SINGLE_TURN, dict(SINGLE_TURN, id="s2"), MULTI_TURN, SINGLE_TURN]
    whole = tokenize_batch(rows, tokenizer, max_seq_len=4096)
    monkeypatch.setattr(tokenization, "ENCODE_CHUNK_ROWS", 2)
    assert tokenize_batch(rows, tokenizer, max_seq_len=4096) == whole


# Multi-byte characters right at the span edges, split by the tiny vocabulary into byte tokens.
UNICODE_EDGES = conversation(
    [
        ("system", "Réponds 简体 ✓"),
        ("user", "🙂 là?"),
        ("assistant", "é début — 中文 fin 🙂"),
        ("user", "ñ"),
        ("assistant", "🙂"),
    ],
    row_id="unicode",
)


def _offset_labels(
    monkeypatch: pytest.MonkeyPatch, rows: list[dict[str, Any]], tokenizer: Any, **kw: Any
) -> Any:
    import llmft_assets.data.tokenization as tokenization

    with monkeypatch.context() as patch:
        patch.setattr(
            tokenization, "_encode_chunk", lambda tok, texts: (tokenization._encode(tok, texts), False)
        )
        return tokenize_batch(rows, tokenizer, **kw)


def test_byte_length_spans_equal_the_offset_spans(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmft_assets.data.tokenization import _encode_chunk, assistant_char_spans, byte_spans

    rows = [MULTI_TURN, UNICODE_EDGES, SINGLE_TURN]
    texts, _ = assistant_char_spans(rows, tokenizer, "<|im_end|>")
    assert byte_spans(tokenizer) is not None
    assert _encode_chunk(tokenizer, texts)[1] is True  # the offset-free encode is the one taken
    for max_seq_len in (4096, 37, 5):
        by_bytes = tokenize_batch(rows, tokenizer, max_seq_len=max_seq_len)
        assert by_bytes == _offset_labels(monkeypatch, rows, tokenizer, max_seq_len=max_seq_len)
        assert verify_masks(by_bytes, tokenizer) == []
    (row,) = tokenize_batch([UNICODE_EDGES], tokenizer, max_seq_len=4096)
    assert labelled_text(row, tokenizer) == ["é début — 中文 fin 🙂<|im_end|>", "🙂<|im_end|>"]


def test_text_outside_the_normal_form_is_encoded_with_offsets(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmft_assets.data.tokenization import _encode_chunk, assistant_char_spans

    decomposed = conversation([("user", "cafe\u0301?"), ("assistant", "e\u0301 \\boxed{1}")], "nfd")
    texts, _ = assistant_char_spans([decomposed], tokenizer, "<|im_end|>")
    assert _encode_chunk(tokenizer, texts)[1] is False  # the NFC normalizer would change this text
    rows = [decomposed, SINGLE_TURN]
    assert tokenize_batch(rows, tokenizer, max_seq_len=4096) == _offset_labels(
        monkeypatch, rows, tokenizer, max_seq_len=4096
    )


def test_byte_token_spans_match_char_to_token_or_give_up(tokenizer: Any) -> None:
    import numpy as np

    from llmft_assets.data.tokenization import _byte_token_spans, byte_spans

    spans = byte_spans(tokenizer)
    assert spans is not None
    text = "<|im_start|>user\nñ🙂<|im_end|>"
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids = np.array(encoding.ids, dtype=np.int32)
    char_spans = [(17, 29), (18, 19), (0, 12)]  # ñ..<|im_end|>, 🙂, <|im_start|>
    expected = [(encoding.char_to_token(start), encoding.char_to_token(end - 1)) for start, end in char_spans]
    assert _byte_token_spans(text, ids, char_spans, spans.token_bytes) == expected
    # 🙂 is four byte tokens here: both ends of its span are the first of them, as char_to_token says.
    assert (
        len({encoding.token_to_chars(i) for i in range(len(ids))} & {(18, 19)}) == 1
        and expected[1][0] == expected[1][1]
    )
    # Bytes that do not add up to the text's (another text, a normalizer at work): no answer, offsets decide.
    assert _byte_token_spans(text + "x", ids, char_spans, spans.token_bytes) is None


def test_byte_spans_only_for_byte_level_tokenizers(tokenizer: Any) -> None:
    import copy

    from tokenizers import AddedToken, normalizers, pre_tokenizers

    from llmft_assets.data.tokenization import byte_spans

    spans = byte_spans(tokenizer)
    assert spans is not None and spans.normal_form == "NFC"
    backend = tokenizer.backend_tokenizer
    assert spans.token_bytes[backend.token_to_id("<|im_end|>")] == len("<|im_end|>")
    assert spans.token_bytes[backend.token_to_id("Ċ")] == 1  # "\\n", in the byte alphabet
    longest = max(backend.get_vocab(with_added_tokens=False), key=len)
    assert spans.token_bytes[backend.token_to_id(longest)] == len(
        tokenizer.convert_tokens_to_string([longest]).encode()
    )

    lowercased = copy.deepcopy(tokenizer)
    lowercased.backend_tokenizer.normalizer = normalizers.Lowercase()
    prefixed = copy.deepcopy(tokenizer)
    prefixed.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    stripping = copy.deepcopy(tokenizer)
    stripping.backend_tokenizer.add_special_tokens([AddedToken("<tool>", lstrip=True)])
    plain = copy.deepcopy(tokenizer)
    plain.backend_tokenizer.normalizer = None
    assert [byte_spans(t) is None for t in (lowercased, prefixed, stripping)] == [True, True, True]
    plain_spans = byte_spans(plain)
    assert plain_spans is not None and plain_spans.normal_form is None


def test_token_tables_stream_one_pipeline_over_the_batches(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llmft_assets.data.tokenization as tokenization
    from llmft_assets.data.schema import CONVERSATION_SCHEMA
    from llmft_assets.data.tokenization import iter_token_tables, tokenize_to_table

    monkeypatch.setattr(tokenization, "ENCODE_CHUNK_ROWS", 2)
    arrow = pa.Table.from_pylist([UNICODE_EDGES, SINGLE_TURN], schema=CONVERSATION_SCHEMA)
    batches: list[Any] = [
        [MULTI_TURN, SINGLE_TURN, UNICODE_EDGES],
        [],
        [SINGLE_TURN],
        arrow,
        arrow.to_batches()[0],
    ]
    pulled: list[int] = []

    def source() -> Any:
        for index, batch in enumerate(batches):
            pulled.append(index)
            yield batch

    streamed = []
    for table, counts in iter_token_tables(source(), tokenizer, max_seq_len=64):
        if not streamed:
            # The first batch comes out only once the next non-empty one is read and encoding.
            assert pulled == [0, 1, 2]
        streamed.append((table, counts))
    assert len(streamed) == len(batches)
    for batch, (table, counts) in zip(batches, streamed, strict=True):
        alone = StageCounts(stage="tokenized")
        assert table.equals(tokenize_to_table(batch, tokenizer, max_seq_len=64, counts=alone))
        assert counts == alone
    assert streamed[1][0].num_rows == 0 and streamed[1][1].rows_in == 0
