"""Evidently drift report: drift, no drift, too little data, low-diversity text, sampling."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from llmft_assets.monitoring.drift import DriftResult, build_drift_report, reference_from_conversations

MATH_TOPICS = ["integer", "triangle", "probability", "polynomial", "sequence", "circle", "prime", "matrix"]
MATH_WORDS = ["sum", "of", "the", "digits", "remainder", "divided", "by", "real", "numbers", "positive"]
OTHER_TOPICS = ["recipe", "itinerary", "contract", "symptom", "poem", "invoice", "playlist", "garden"]
OTHER_WORDS = ["please", "write", "friendly", "email", "summer", "family", "deadline", "manager", "coast"]


def synthetic_window(rows: int, *, shifted: bool, seed: int) -> pd.DataFrame:
    """R1-like math prompts with <think> answers; `shifted` means longer off-topic prompts and
    short answers without think blocks or \\boxed{}."""
    rng = np.random.default_rng(seed)
    topics, words = (OTHER_TOPICS, OTHER_WORDS) if shifted else (MATH_TOPICS, MATH_WORDS)
    prompts, responses = [], []
    for _ in range(rows):
        length = int(rng.integers(20, 60) if shifted else rng.integers(5, 20))
        body = " ".join(rng.choice(topics + words, size=length))
        prompts.append(f"Find the {rng.choice(topics)} such that {body} equals {rng.integers(1, 99)}.")
        steps = " ".join(rng.choice(words, size=int(rng.integers(10, 40))))
        if shifted:
            responses.append(f"Sure! {steps.capitalize()}.")
        else:
            responses.append(
                f"<think>\n{steps}\n</think>\n\nThe answer is $\\boxed{{{rng.integers(0, 100)}}}$."
            )
    return pd.DataFrame({"prompt": prompts, "response": responses})


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return synthetic_window(400, shifted=False, seed=1)


@pytest.fixture(scope="module")
def drifted_result(reference: pd.DataFrame) -> DriftResult:
    return build_drift_report(reference, synthetic_window(300, shifted=True, seed=2))


def test_clearly_shifted_window_is_drift(drifted_result: DriftResult) -> None:
    result = drifted_result
    assert result.status == "drift"
    assert result.drift_detected
    assert result.drift_share is not None and result.drift_share >= 0.5
    assert {"prompt", "response", "prompt_words", "response_has_think"} <= set(result.drifted_columns)
    assert result.number_of_columns == 18  # 2 text columns + 16 features
    assert result.columns["prompt"].kind == "text"
    assert result.columns["prompt"].method == "abs_text_content_drift"
    assert result.columns["response_has_think"].kind == "categorical"
    assert result.columns["prompt_words"].kind == "numerical"
    assert (result.reference_rows, result.current_rows) == (400, 300)
    assert "<html" in result.html.lower()
    assert result.json["metrics"] and result.json["tests"]

    summary = result.to_summary()
    round_tripped = json.loads(json.dumps(summary))
    assert round_tripped["status"] == "drift"
    assert round_tripped["columns"]["prompt"]["drifted"] is True
    assert "html" not in round_tripped and "json" not in round_tripped


def test_same_distribution_window_is_ok(reference: pd.DataFrame) -> None:
    current = pa.Table.from_pandas(synthetic_window(300, shifted=False, seed=3))  # pyarrow input too
    result = build_drift_report(reference, current)
    assert result.status == "ok", result.message
    assert result.drift_share is not None and result.drift_share < 0.5
    assert "prompt" not in result.drifted_columns
    assert "response" not in result.drifted_columns


def test_too_little_data_is_not_an_alarm(reference: pd.DataFrame) -> None:
    result = build_drift_report(reference, synthetic_window(20, shifted=True, seed=4), min_rows=50)
    assert result.status == "not_enough_data"
    assert not result.drift_detected
    assert result.drift_share is None and result.drifted_columns == []
    assert "current has 20 rows" in result.message and "50" in result.message
    assert "not enough data" in result.html.lower()
    assert json.loads(json.dumps(result.to_summary()))["status"] == "not_enough_data"

    empty = build_drift_report([], [])
    assert empty.status == "not_enough_data"
    assert (empty.reference_rows, empty.current_rows) == (0, 0)


def test_low_diversity_text_column_is_left_out_not_fatal() -> None:
    # Every prompt is the same stop words: TF-IDF has no vocabulary ("After pruning, no terms
    # remain" / "empty vocabulary") and Evidently's text drift raises ValueError.
    rng = np.random.default_rng(5)
    reference_prompts = ["what is the"] * 120
    current_prompts = ["what is the the"] * 120
    reference_responses = [f"alpha {word} value" for word in rng.choice(MATH_WORDS, size=120)]
    current_responses = [f"alpha {word} value" for word in rng.choice(MATH_WORDS, size=120)]
    result = build_drift_report(
        pd.DataFrame({"prompt": reference_prompts, "response": reference_responses}),
        pd.DataFrame({"prompt": current_prompts, "response": current_responses}),
    )
    assert "prompt" in result.skipped_columns
    assert "low diversity" in result.skipped_columns["prompt"]
    assert "prompt" not in result.columns
    assert "response" in result.columns  # the other text column is still compared
    assert "prompt_words" in result.drifted_columns  # 3 vs 4 words: real drift, still reported
    assert any("'prompt' left out" in note for note in result.notes)


def test_prompt_only_inputs_and_deterministic_text_sample(reference: pd.DataFrame) -> None:
    current = synthetic_window(300, shifted=True, seed=6)
    first = build_drift_report(list(reference["prompt"]), current["prompt"], sample_size=150)
    second = build_drift_report(pa.array(reference["prompt"]), current["prompt"], sample_size=150)

    assert first.number_of_columns == 7  # prompt text + 6 prompt features
    assert all(not column.startswith("response") for column in first.columns)
    assert first.text_sample_rows == {"reference": 150, "current": 150}
    assert any("deterministic sample" in note for note in first.notes)
    assert first.columns["prompt"].score == second.columns["prompt"].score
    assert first.status == "drift"


def test_responses_compared_only_when_both_windows_have_them(reference: pd.DataFrame) -> None:
    current = synthetic_window(200, shifted=False, seed=7)[["prompt"]]
    result = build_drift_report(reference, current)
    assert "response" not in result.columns
    assert any("only one window" in note for note in result.notes)


def test_bad_input_raises_clear_errors(reference: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="no 'prompt' column"):
        build_drift_report(reference, pd.DataFrame({"text": ["a"] * 100}))
    with pytest.raises(TypeError, match=r"current\.prompt"):
        build_drift_report(reference, pd.DataFrame({"prompt": [1] * 100}))
    with pytest.raises(ValueError, match="text_method"):
        build_drift_report(reference, reference, text_method="no_such_method")
    with pytest.raises(ValueError, match="drift_share_threshold"):
        build_drift_report(reference, reference, drift_share_threshold=0)


def test_reference_from_conversations_takes_last_user_and_assistant_turns() -> None:
    message_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    conversations = pa.table(
        {
            "messages": pa.array(
                [
                    [{"role": "user", "content": "only a question"}],
                    [
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": "first"},
                        {"role": "assistant", "content": "one"},
                        {"role": "user", "content": "second"},
                        {"role": "assistant", "content": "<think>x</think> two"},
                    ],
                    [],
                ],
                type=message_type,
            )
        }
    )
    reference_table = reference_from_conversations(conversations.slice(0))
    assert reference_table.column("prompt").to_pylist() == ["only a question", "second", None]
    assert reference_table.column("response").to_pylist() == [None, "<think>x</think> two", None]
    assert reference_from_conversations(conversations.slice(1)).column("prompt").to_pylist() == [
        "second",
        None,
    ]
    with pytest.raises(ValueError, match="messages"):
        reference_from_conversations(pa.table({"text": ["a"]}))
