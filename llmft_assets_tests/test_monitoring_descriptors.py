"""Text features for drift monitoring, checked on hand-made examples."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from llmft_assets.monitoring.descriptors import (
    categorical_feature_columns,
    compute_text_features,
    numerical_feature_columns,
)


def test_generic_features_on_hand_made_prompts() -> None:
    prompts = [
        "Hello there. How are you?",
        "Solve x+1=2",
        "3.14 is pi.",
        "",
        None,
    ]
    features = compute_text_features(prompts, None)

    assert list(features["prompt_chars"]) == [25, 11, 11, 0, 0]
    assert list(features["prompt_words"]) == [5, 2, 3, 0, 0]
    # "3.14" is no sentence break; a text without a final terminator still has a sentence.
    assert list(features["prompt_sentences"]) == [2, 1, 1, 0, 0]
    # "Solve x+1=2": 6 letters of 11 characters, 2 digits.
    assert features["prompt_non_letter_share"][1] == pytest.approx(5 / 11)
    assert features["prompt_digit_share"][1] == pytest.approx(2 / 11)
    assert features["prompt_digit_share"][3] == 0.0  # empty text: 0, not NaN
    assert not any(column.startswith("response_") for column in features.columns)


def test_script_guess() -> None:
    prompts = [
        "Find the integer x.",
        "Привет, как дела?",
        "你好，世界。今天天气很好",  # noqa: RUF001
        "مرحبا بالعالم",
        "Ελληνικά γράμματα",
        "hello Привет мир друг",  # 5 Latin vs 12 Cyrillic letters: Cyrillic holds >= 60%
        "abc где",  # 3 vs 3: no script dominates
        "12345 + 678",
        "",
    ]
    features = compute_text_features(prompts)
    assert list(features["prompt_script"]) == [
        "latin",
        "cyrillic",
        "cjk",
        "arabic",
        "other",
        "cyrillic",
        "mixed",
        "none",
        "none",
    ]
    # Full-width CJK terminators end a sentence without a following space.
    assert features["prompt_sentences"][2] == 2


def test_response_features_think_boxed_refusal() -> None:
    prompts = ["q1", "q2", "q3", "q4", "q5", "q6"]
    responses = [
        "<think>ok so</think> The answer is $\\boxed{3}$.",
        "I'm sorry, but I can't help with that.",
        "As an AI language model, I do not have opinions.",
        "<think>unclosed мир",  # an unclosed block runs to the end; counted in characters
        "I cannot simplify further, so the result is 7.",  # ordinary reasoning, not a refusal
        None,
    ]
    features = compute_text_features(prompts, responses)

    assert list(features["response_has_think"]) == [True, False, False, True, False, False]
    assert list(features["response_think_chars"]) == [5, 0, 0, 12, 0, 0]
    assert list(features["response_has_boxed"]) == [True, False, False, False, False, False]
    assert list(features["response_is_refusal"]) == [False, True, True, False, False, False]
    assert features["response_chars"][5] == 0
    assert set(categorical_feature_columns(features)) == {
        "prompt_script",
        "response_script",
        "response_has_think",
        "response_has_boxed",
        "response_is_refusal",
    }
    assert "response_think_chars" in numerical_feature_columns(features)


def test_accepts_pyarrow_and_pandas_columns_and_many_rows() -> None:
    texts = ["<think>a b</think> \\boxed{1}", "x y z"] * 20_000  # spans several feature slices
    features = compute_text_features(pa.chunked_array([pa.array(texts[:100]), pa.array(texts[100:])]), texts)
    assert len(features) == 40_000
    assert features["prompt_words"].sum() == 20_000 * 3 + 20_000 * 3
    assert features["response_think_chars"].sum() == 20_000 * 3
    assert np.issubdtype(features["response_chars"].dtype, np.integer)


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(TypeError, match="prompts"):
        compute_text_features(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="string column"):
        compute_text_features(pa.array([1, 2]))
    with pytest.raises(TypeError, match="single str"):
        compute_text_features("not a list")
    with pytest.raises(ValueError, match="differ in length"):
        compute_text_features(["a", "b"], ["only one"])
