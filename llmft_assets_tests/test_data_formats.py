"""Source formats: detection per row, OpenAI / ShareGPT / Alpaca / prompt-response, column mapping,
format-aware validation, multi-turn masks, and mixed-format files and folders from raw to splits."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml

from llmft_assets.data.cleaning import clean_rows
from llmft_assets.data.formats import (
    FORMAT_NAMES,
    RowRejected,
    apply_column_mapping,
    check_column_mapping,
    format_counts,
)
from llmft_assets.data.raw_sources import iter_raw_batches
from llmft_assets.data.schema import IGNORE_INDEX, StageCounts
from llmft_assets.data.tokenization import assistant_end_marker, tokenize_batch, verify_masks
from llmft_assets.data.validation import validate_rows

README = Path(__file__).resolve().parent.parent / "README.md"


def clean(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], StageCounts]:
    counts = StageCounts(stage="cleaned")
    cleaned, quarantine = clean_rows(rows, seen_hashes=set(), counts=counts, prefer_reannotated=True)
    counts.check_balanced()
    return cleaned, quarantine, counts


def validate(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return validate_rows(rows, seen_ids=set(), counts=StageCounts(stage="validated"))


def turns(conversation: dict[str, Any]) -> list[tuple[str, str]]:
    return [(message["role"], message["content"]) for message in conversation["messages"]]


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def readme_block(title: str, language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", readme_section(title), re.DOTALL)
    assert match, f"no {language} block in README section {title!r}"
    return match.group(1)


# ----------------------------------------------------------------------------------------- README


def test_readme_example_lines_each_clean_validate_and_name_their_format() -> None:
    rows = [json.loads(line) for line in readme_block("Bring your data", "jsonl").splitlines() if line]
    cleaned, quarantine, counts = clean(rows)
    assert quarantine == []
    assert [row["source_format"] for row in cleaned] == [
        "r1_v0", "r1_v1", "openai", "sharegpt", "sharegpt", "alpaca", "prompt_response",
    ]  # fmt: skip
    assert set(FORMAT_NAMES) == {row["source_format"] for row in cleaned}
    valid, rejected = validate(cleaned)
    assert rejected == [] and len(valid) == len(rows)
    assert format_counts(counts) == {
        "alpaca": 1, "openai": 1, "prompt_response": 1, "r1_v0": 1, "r1_v1": 1, "sharegpt": 2,
    }  # fmt: skip
    openai = cleaned[2]
    assert [role for role, _ in turns(openai)] == ["system", "user", "assistant", "user", "assistant"]
    assert cleaned[5]["messages"][0]["content"] == "Translate to German.\n\nGood morning"


def test_readme_columns_example_maps_a_custom_layout(tmp_path: Path) -> None:
    from llmft_assets.defs.data.assets import RawDatasetConfig

    config = yaml.safe_load(readme_block("Bring your data", "yaml"))["ops"]["raw_dataset"]["config"]
    source = tmp_path / "qa.jsonl"
    source.write_text(
        json.dumps({"question": "What is the boiling point of water?", "answer": "100 °C at sea level."})
        + "\n"
        + json.dumps({"question": "No answer column here"})
        + "\n"
    )
    config["source"] = str(source)
    parsed = RawDatasetConfig(**config)
    batches = list(iter_raw_batches(parsed.source, config=parsed.config, columns=parsed.columns))
    rows = [row for batch in batches for row in batch.rows]
    quarantine = [row for batch in batches for row in batch.quarantine]
    assert [row["reason"] for row in quarantine] == [
        "missing_column: answer (mapped to response by the columns config)"
    ]
    (conversation,), _, _ = clean(rows)
    assert conversation["source_format"] == "prompt_response"
    assert turns(conversation) == [
        ("user", "What is the boiling point of water?"),
        ("assistant", "100 °C at sea level."),
    ]


# ---------------------------------------------------------------------------------------- formats


def test_openai_rows_without_id_get_a_stable_content_id_and_developer_is_system() -> None:
    row = {
        "messages": [
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "2+2"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "4"},
        ]
    }
    (first,), _, _ = clean([dict(row)])
    (again,), _, _ = clean([dict(row)])
    assert first["id"] == again["id"] and re.fullmatch(r"sha256-[0-9a-f]{20}", first["id"])
    assert first["id"] == "sha256-" + first["content_hash"][:20]
    assert turns(first) == [("system", "Answer briefly."), ("user", "2+2?"), ("assistant", "4")]
    assert first["source_dataset"] == "unknown" and first["schema_version"] == "openai"
    (with_id,), _, _ = clean([{**row, "id": 7}])
    assert with_id["id"] == "7"


def test_sharegpt_variants() -> None:
    original = {
        "id": "s1",
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Goodbye"},
        ],
        "system": "Be polite.",
    }
    variant = {"conversations": [{"from": "USER", "value": "Q"}, {"from": "assistant", "value": "A"}]}
    role_content = {
        "conversations": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    }
    (first, second, third), quarantine, _ = clean([original, variant, role_content])
    assert quarantine == []
    assert turns(first) == [
        ("system", "Be polite."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Goodbye"),
    ]  # fmt: skip
    assert turns(second) == [("user", "Q"), ("assistant", "A")]
    assert turns(third) == [("user", "Q2"), ("assistant", "A2")]
    assert {row["source_format"] for row in (first, second, third)} == {"sharegpt"}


def test_alpaca_with_and_without_input_and_with_history() -> None:
    rows = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "And now?", "output": "bye", "history": [["Say hi.", "hi"]], "system": "Short."},
    ]
    (with_input, without_input, with_history), quarantine, _ = clean(rows)
    assert quarantine == []
    assert turns(with_input) == [("user", "Add.\n\n2 and 3"), ("assistant", "5")]
    assert turns(without_input) == [("user", "Say hi."), ("assistant", "hi")]
    assert turns(with_history) == [
        ("system", "Short."), ("user", "Say hi."), ("assistant", "hi"), ("user", "And now?"), ("assistant", "bye"),
    ]  # fmt: skip


def test_prompt_response_strings_and_trl_conversational() -> None:
    rows = [
        {"prompt": "P", "response": "R \\boxed{3}"},
        {
            "prompt": [{"role": "user", "content": "Q"}],
            "completion": [{"role": "assistant", "content": "A"}],
        },
    ]
    (plain, conversational), quarantine, _ = clean(rows)
    assert quarantine == []
    assert turns(plain) == [("user", "P"), ("assistant", "R \\boxed{3}")]
    assert plain["reference_answer"] == "3"
    assert turns(conversational) == [("user", "Q"), ("assistant", "A")]


def test_r1_v1_is_told_apart_from_openai_messages() -> None:
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A \\boxed{1}"}]
    r1, _, _ = clean([{"id": "a", "messages": messages, "reannotated_assistant_content": "x"}])
    openai, _, _ = clean([{"id": "b", "messages": [*messages[:1], {"role": "assistant", "content": "B"}]}])
    assert r1[0]["source_format"] == "r1_v1" and r1[0]["schema_version"] == "v1"
    assert openai[0]["source_format"] == "openai"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (
            {"id": "x", "text": "hello"},
            "unknown_schema: no known format matches; tried r1_v0 (problem (+ reannotated_assistant_content)); "
            "r1_v1 (messages + reannotated_assistant_content, or reannotated_messages); openai (messages); "
            "sharegpt (conversations); alpaca (instruction + output); "
            "prompt_response (prompt + response or completion); got columns ['id', 'text']",
        ),
        (
            {"messages": [{"role": "tool", "content": "{}"}]},
            "unknown_role: messages[0].role is 'tool', expected one of system, user, assistant, developer",
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": []}]},
            "wrong_type: messages[0].content is null, expected string",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "wrong_type: messages[0].content[0] is not a text part ({type: text, text: string})",
        ),
        (
            {"conversations": [{"from": "bot", "value": "x"}]},
            "unknown_role: conversations[0].from is 'bot', expected one of system, user, assistant, human, gpt",
        ),
        ({"instruction": "I", "output": None}, "missing_value: output is null"),
        (
            {"instruction": "I", "output": "O", "history": [["only one"]]},
            "wrong_type: history[0] is not a [prompt, response] pair of strings",
        ),
        ({"prompt": 3, "response": "R"}, "wrong_type: prompt is int, expected string"),
        ({"messages": [{"role": "user", "content": "q"}], "id": ""}, "empty_id: id is an empty string"),
    ],
)
def test_rows_in_no_format_are_quarantined_with_the_exact_reason(row: dict[str, Any], reason: str) -> None:
    cleaned, (quarantined,), counts = clean([row, {"prompt": "fine", "response": "ok"}])
    assert [c["source_format"] for c in cleaned] == ["prompt_response"]
    assert quarantined["reason"] == reason
    assert quarantined["stage"] == "cleaned"
    assert format_counts(counts) == {"prompt_response": 1}


def test_column_mapping_checks_and_renames() -> None:
    check_column_mapping({"prompt": "q", "response": "a"})
    with pytest.raises(ValueError, match="unknown target"):
        check_column_mapping({"question": "q"})
    with pytest.raises(ValueError, match="mapped to two targets"):
        check_column_mapping({"prompt": "q", "response": "q"})
    with pytest.raises(ValueError, match="non-empty column name"):
        check_column_mapping({"prompt": ""})
    assert apply_column_mapping({"q": "Q", "a": "A", "prompt": "old"}, {"prompt": "q", "response": "a"}) == {
        "prompt": "Q",
        "response": "A",
    }
    with pytest.raises(RowRejected, match="missing_column: a"):
        apply_column_mapping({"q": "Q"}, {"prompt": "q", "response": "a"})
    with pytest.raises(ValueError, match="unknown target"):
        list(iter_raw_batches("sample", columns={"nope": "x"}))


# ---------------------------------------------------------------------------- format-aware rules


def test_think_rule_applies_to_every_r1_turn_but_only_to_chat_turns_opening_with_think() -> None:
    prose = "DeepSeek-R1 closes its reasoning with </think> before the answer."
    chat = {
        "messages": [
            {"role": "user", "content": "How does R1 format answers?"},
            {"role": "assistant", "content": prose},
        ]
    }
    (openai_row,), _, _ = clean([chat])
    (r1_row,), _, _ = clean([{**chat, "id": "r1", "reannotated_assistant_content": prose}])
    assert validate([openai_row]) == ([openai_row], [])
    _, (rejected,) = validate([r1_row])
    assert rejected["reason"].startswith("unbalanced_think: turn 1")
    trace = {
        "messages": [
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "<think> never closed"},
        ]
    }
    (reasoning_chat,), _, _ = clean([trace])
    _, (rejected_chat,) = validate([reasoning_chat])
    assert rejected_chat["reason"].startswith("unbalanced_think: turn 1")


def test_missing_answer_rule_does_not_reject_chat_whose_final_turn_has_no_box() -> None:
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "\\boxed{4}"},
        {"role": "user", "content": "Thanks, explain briefly."},
        {"role": "assistant", "content": "Two and two make four."},
    ]
    (chat,), _, _ = clean([{"messages": messages}])
    (r1,), _, _ = clean([{"id": "r1", "messages": messages, "reannotated_assistant_content": "x"}])
    assert chat["reference_answer"] is None and r1["reference_answer"] == "4"
    assert validate([chat])[0] == [chat]
    _, (rejected,) = validate([r1])
    assert rejected["reason"].startswith("missing_answer:")


# ------------------------------------------------------------------------------ multi-turn masks


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from llmft_assets.modeling.tiny_model import build_tiny_tokenizer

    texts = ["What is 2 + 2? The answer is 4. Bonjour hello goodbye user assistant system"] * 20
    return build_tiny_tokenizer(texts, vocab_size=600)


MULTI_TURN_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "And of Spain?"},
            {"role": "assistant", "content": "Madrid."},
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello there"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "See you"},
        ]
    },
    {"instruction": "And now?", "output": "bye", "history": [["Say hi.", "hi"], ["Again.", "hi again"]]},
]


def _labelled_texts(row: dict[str, Any], tokenizer: Any) -> list[str]:
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def test_multi_turn_masks_cover_every_assistant_turn_of_every_format(tokenizer: Any) -> None:
    cleaned, _, _ = clean(MULTI_TURN_ROWS)
    valid, rejected = validate(cleaned)
    assert rejected == [] and [row["source_format"] for row in valid] == ["openai", "sharegpt", "alpaca"]
    tokenized = tokenize_batch(valid, tokenizer, max_seq_len=4096)
    marker = assistant_end_marker(tokenizer)
    expected = [
        ["Paris.", "Rome.", "Madrid."],
        ["Hello there", "See you"],
        ["hi", "hi again", "bye"],
    ]
    for row, answers in zip(tokenized, expected, strict=True):
        assert _labelled_texts(row, tokenizer) == [answer + marker for answer in answers]
    assert verify_masks(tokenized, tokenizer) == []
    # A mask that forgets an earlier assistant turn (last-turn-only training) is caught.
    broken = dict(tokenized[0])
    labels = list(broken["labels"])
    first_labelled = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    while labels[first_labelled] != IGNORE_INDEX:
        labels[first_labelled] = IGNORE_INDEX
        first_labelled += 1
    broken["labels"] = labels
    broken["num_assistant_tokens"] = len(labels) - labels.count(IGNORE_INDEX)
    (problem,) = verify_masks([broken], tokenizer)
    assert "do not match the assistant turns" in problem


# ------------------------------------------------------------------ mixed files and folders, e2e


def _write_jsonl(path: Path, rows: list[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@pytest.mark.slow
def test_mixed_format_folder_goes_from_raw_to_splits(llmft_home: Path, tmp_path: Path) -> None:
    from llmft_assets.definitions import DATA_ASSETS, build_resources
    from llmft_assets.defs.data.checks import DATA_CHECKS
    from llmft_assets.storage import open_storage
    from llmft_assets.storage.publish import latest_version

    folder = tmp_path / "drop"
    openai = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} + {i}?"},
                      {"role": "assistant", "content": f"{2 * i}."}, {"role": "user", "content": "Double it?"},
                      {"role": "assistant", "content": f"{4 * i}."}]}
        for i in range(12)
    ]  # fmt: skip
    sharegpt = [
        {"conversations": [{"from": "human", "value": f"Say the number {i} in words please."},
                           {"from": "gpt", "value": f"The number is {i}."}]}
        for i in range(10)
    ]  # fmt: skip
    alpaca = [
        {"instruction": "Repeat the input.", "input": f"token {i}", "output": f"token {i}"} for i in range(8)
    ]
    # The README's example lines (one per format, R1 included) as one more file of the folder.
    (folder / "readme").mkdir(parents=True)
    (folder / "readme" / "examples.jsonl").write_text(readme_block("Bring your data", "jsonl"))
    _write_jsonl(folder / "chat.jsonl", openai)
    _write_jsonl(folder / "nested" / "share.jsonl", sharegpt)
    # One file mixing formats, an exact duplicate and a row in no format.
    _write_jsonl(
        folder / "mixed.jsonl",
        [*alpaca, {"prompt": "Say yes, please.", "completion": "Yes."}, alpaca[0], {"text": "?"}],
    )
    run_config = {
        "ops": {
            "raw_dataset": {"config": {"source": str(folder), "config": None}},
            "base_model": {"config": {"pretrain_steps": 0}},
            "tokenized_dataset": {"config": {"max_seq_len": 512, "workers": 1}},
        }
    }
    result = dg.materialize(
        [*DATA_ASSETS, *DATA_CHECKS],
        resources=build_resources(),
        run_config=run_config,
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    assert all(evaluation.passed for evaluation in result.get_asset_check_evaluations())
    metadata = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        metadata[materialization.asset_key.to_user_string()] = {
            key: getattr(value, "value", value) for key, value in materialization.metadata.items()
        }
    assert metadata["raw_dataset"]["rows_out"] == 12 + 10 + 8 + 3 + 7
    cleaned = metadata["cleaned_dataset"]
    assert cleaned["rows_per_format"] == {
        "alpaca": 9, "openai": 13, "prompt_response": 2, "r1_v0": 1, "r1_v1": 1, "sharegpt": 12,
    }  # fmt: skip
    assert (cleaned["duplicates_dropped"], cleaned["quarantined"]) == (1, 1)
    assert metadata["validated_dataset"]["rows_per_format"] == cleaned["rows_per_format"]
    splits = metadata["dataset_splits"]
    assert splits["train_rows"] + splits["validation_rows"] + splits["test_rows"] == 38
    root = llmft_home / "storage"
    backend = open_storage(str(root))

    def table(asset: str, name: str) -> Any:
        return pq.read_table(root / "assets" / asset / latest_version(backend, f"assets/{asset}") / name)

    (reason,) = table("cleaned_dataset", "quarantine.parquet").column("reason").to_pylist()
    assert reason.startswith("unknown_schema: no known format matches; tried r1_v0") and "['text']" in reason
    train = table("dataset_splits", "train.parquet").to_pylist()
    tokenized = {row["id"]: row for row in table("tokenized_dataset", "data.parquet").to_pylist()}
    assert len(tokenized) == 38
    openai_row = next(row for row in tokenized.values() if row["source_format"] == "openai")
    assistant_turns = sum(message["role"] == "assistant" for message in openai_row["messages"])
    labels = openai_row["labels"]
    runs = sum(
        1
        for i, label in enumerate(labels)
        if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)
    )
    assert assistant_turns == runs == 2
    assert {row["source_format"] for row in train} <= set(FORMAT_NAMES)


def test_columns_config_maps_a_custom_file_through_the_assets(llmft_home: Path, tmp_path: Path) -> None:
    from llmft_assets.definitions import DATA_ASSETS, build_resources

    source = tmp_path / "custom.jsonl"
    _write_jsonl(
        source,
        [
            {"uid": "q1", "question": "Name the largest planet.", "answer": "Jupiter."},
            {"uid": "q2", "question": "Name the smallest planet."},  # no answer column
        ],
    )
    columns = {"id": "uid", "prompt": "question", "response": "answer"}
    result = dg.materialize(
        DATA_ASSETS[:2],
        resources=build_resources(),
        run_config={
            "ops": {"raw_dataset": {"config": {"source": str(source), "config": None, "columns": columns}}}
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    metadata = {
        event.event_specific_data.materialization.asset_key.to_user_string(): {
            key: getattr(value, "value", value)
            for key, value in event.event_specific_data.materialization.metadata.items()
        }
        for event in result.get_asset_materialization_events()
    }
    assert (metadata["raw_dataset"]["rows_out"], metadata["raw_dataset"]["quarantined"]) == (1, 1)
    assert metadata["raw_dataset"]["quarantine_reasons"] == {"missing_column": 1}
    assert metadata["cleaned_dataset"]["rows_per_format"] == {"prompt_response": 1}
    from llmft_assets.storage import open_storage
    from llmft_assets.storage.publish import latest_version

    root = llmft_home / "storage"
    version = latest_version(open_storage(str(root)), "assets/cleaned_dataset")
    (row,) = pq.read_table(root / "assets" / "cleaned_dataset" / version / "data.parquet").to_pylist()
    assert row["id"] == "q1" and row["source_format"] == "prompt_response"
    assert turns(row) == [("user", "Name the largest planet."), ("assistant", "Jupiter.")]
