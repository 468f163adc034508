"""Scenario: served traffic shifts to a kind of problem the training split barely holds; the drift report
flags it; the retraining dataset over-represents it; the retrained adapter's perplexity on the traffic
slice beats the champion's by a stated margin, measured here; the gate promotes it; the same traffic drifts
less from the retraining split than from the old one.

Sized for 2 CPU cores (the tiny model from random init, short rows, a few dozen optimizer steps each).
The shifted-to kind is the word-problem family (multi-step problems with R1's long, uneven traces): the
tiny model learns its token distribution in a few dozen steps but cannot solve those problems (it learns
only the bundled sample's two-digit additions, in the demo's 300 steps), so verified accuracy cannot
separate champion and candidate here. The gate's answer criteria (paired accuracy, format, finish rate)
are therefore opened; the perplexity criteria decide, measured: the standard test split against the base
model and the champion, and the traffic slice against the champion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmft_assets.data.cleaning import to_conversation
from llmft_assets.data.sample_gen import generate_rows
from llmft_assets.data.schema import CONVERSATION_SCHEMA
from llmft_assets.evaluation.gate import GateThresholds, TrafficSliceScores, decide_gate
from llmft_assets.monitoring.retrain_selection import (
    SelectionSettings,
    first_user_prompts,
    iter_batches,
    mix_with_training,
    problem_keys,
    select_for_traffic,
)
from llmft_assets_tests.test_training_support import tiny_model_dir_fixture  # noqa: F401 - fixture

MAX_SEQ_LEN = 256
TRAIN_STEPS = 40
# The retrained adapter must beat the champion's perplexity on the traffic slice by at least this much.
TRAFFIC_MARGIN = 0.10
# ... and the prompt column's drift score against the new training split must drop by at least this much.
PROMPT_DRIFT_DROP = 0.2
# Opened: the tiny model cannot answer yet; the perplexity criteria are the real ones here.
ANSWER_CRITERIA_OPEN = {
    "alpha": 1.0,
    "min_accuracy_gain": -1.0,
    "min_format_compliance": 0.0,
    "min_finish_rate": 0.0,
}


def conversations(n: int, *, family: str, seed: int, schema: str = "v1") -> list[dict[str, Any]]:
    return [to_conversation(row) for row in generate_rows(n, schema=schema, seed=seed, family=family)]  # type: ignore[arg-type]


def table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CONVERSATION_SCHEMA)


def word_share(rows: pa.Table, word_prompts: set[str]) -> float:
    prompts = first_user_prompts(rows)
    return sum(prompt in word_prompts for prompt in prompts) / len(prompts)


def tokenize(rows: pa.Table, tokenizer: Any, path: Path) -> Path:
    from llmft_assets.data.tokenization import tokenize_to_table

    pq.write_table(tokenize_to_table(rows, tokenizer, max_seq_len=MAX_SEQ_LEN), path)
    return path


def train(model_dir: Path, train_path: Path, out: Path) -> Path:
    from llmft_assets.training.config import TrainingConfig
    from llmft_assets.training.trainer import train_lora

    config = TrainingConfig(
        lora_r=8, lora_alpha=16, max_seq_len=MAX_SEQ_LEN, max_tokens_per_batch=1024, learning_rate=3e-3,
        warmup_ratio=0.0, max_steps=TRAIN_STEPS, save_steps=1000, logging_steps=10, seed=0,
    )  # fmt: skip
    result = train_lora(
        base_model_dir=model_dir,
        train_path=train_path,
        eval_path=None,
        output_dir=out,
        config=config,
        log=lambda _: None,
    )
    return Path(result.adapter_dir)


def perplexity(model_dir: Path, adapter: Path | None, rows_path: Path) -> float:
    from llmft_assets.evaluation.generate import assistant_token_perplexity, attach_adapter, load_base_model

    model = load_base_model(model_dir)
    if adapter is not None:
        model = attach_adapter(model, adapter)
    rows = pq.read_table(rows_path, columns=["id", "input_ids", "labels"]).to_pylist()
    return assistant_token_perplexity(model, rows, batch_size=8)


def scores(ppl: float, rows: int = 60) -> dict[str, Any]:
    """Measured perplexity; the answers as the untrained tiny model gives them: none right."""
    return {
        "perplexity": ppl,
        "accuracy": 0.0,
        "format_compliance": 1.0,
        "finished_rate": 1.0,
        "correct_by_row": {f"r{i}": False for i in range(rows)},
    }


@pytest.mark.slow
def test_traffic_shift_to_a_rare_kind_retrains_for_it_and_the_gate_promotes(
    tiny_model_dir: Path, tmp_path: Path, llmft_home: Path
) -> None:
    from transformers import AutoTokenizer

    from llmft_assets.monitoring.drift import build_drift_report, reference_from_conversations

    arithmetic = conversations(330, family="arithmetic", seed=1)
    word = conversations(16, family="word", seed=1)
    current_train = table(arithmetic[:280] + word[:6])  # 2% word problems: the rare kind
    test_split = table(arithmetic[280:330] + word[6:16])
    pool_word = conversations(120, family="word", seed=5)
    # The pool: additions, word problems, and a test problem under another id (must never be taken).
    leaked = [{**row, "id": f"pool-copy-{i}"} for i, row in enumerate(word[6:11])]
    pool = table(conversations(600, family="arithmetic", seed=5, schema="v0") + pool_word + leaked)
    traffic_rows = generate_rows(120, schema="v0", seed=9, family="word")
    traffic = pa.table(
        {
            "prompt": [row["problem"] for row in traffic_rows],
            "response": [row["solution"] for row in traffic_rows],
        }
    )
    word_prompts = {row["messages"][0]["content"] for row in word + pool_word}

    # 1. The drift report flags the shift.
    drift = build_drift_report(reference_from_conversations(current_train), traffic, min_rows=50)
    assert drift.status == "drift", drift.message
    assert "prompt" in drift.drifted_columns

    # 2. The retraining dataset over-represents what users now ask.
    settings = SelectionSettings(
        target_rows=120, mix_ratio=0.5, traffic_slice_fraction=0.25, min_similarity=0.2
    )
    selection = select_for_traffic(
        traffic["prompt"].to_pylist(),
        iter_batches(pool, 100),
        excluded_keys=problem_keys(iter_batches(test_split, 100)),
        settings=settings,
    )
    mixed = mix_with_training(selection, iter_batches(current_train, 100), settings=settings)
    assert selection.stats.dropped_in_test_split == 5
    before, after = word_share(current_train, word_prompts), word_share(mixed.train, word_prompts)
    assert before < 0.03 and after >= 0.45, (before, after)
    assert word_share(mixed.traffic_slice, word_prompts) == 1.0 and mixed.traffic_slice.num_rows >= 15
    # The same traffic against what the new version trains on: the prompt text drifts much less (Evidently's
    # text-content score: how well a classifier tells the two windows apart; 0.5 is indistinguishable).
    drift_after = build_drift_report(reference_from_conversations(mixed.train), traffic, min_rows=50)
    prompt_before, prompt_after = drift.columns["prompt"].score, drift_after.columns["prompt"].score
    assert prompt_before is not None and prompt_after is not None
    assert prompt_after <= prompt_before - PROMPT_DRIFT_DROP, (prompt_before, prompt_after)

    # 3. Champion (current split) and candidate (retraining split): same base, same steps.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    paths = {
        name: tokenize(rows, tokenizer, tmp_path / f"{name}.parquet")
        for name, rows in {
            "current": current_train, "retraining": mixed.train, "slice": mixed.traffic_slice, "test": test_split,
        }.items()
    }  # fmt: skip
    champion = train(tiny_model_dir, paths["current"], tmp_path / "champion")
    candidate = train(tiny_model_dir, paths["retraining"], tmp_path / "candidate")
    measured = {
        (who, split): perplexity(tiny_model_dir, adapter, paths[split])
        for who, adapter in (("base", None), ("champion", champion), ("candidate", candidate))
        for split in ("slice", "test")
    }
    print(
        {f"{who}/{split}": round(value, 3) for (who, split), value in measured.items()},
        {"prompt_drift": (round(prompt_before, 4), round(prompt_after, 4)), "word_share": (before, after)},
    )
    gain = 1 - measured["candidate", "slice"] / measured["champion", "slice"]
    assert gain >= TRAFFIC_MARGIN, measured

    # 4. The gate: better on the traffic slice, not worse beyond tolerance on the standard split.
    decision = decide_gate(
        scores(measured["candidate", "test"]),
        scores(measured["base", "test"]),
        scores(measured["champion", "test"]),
        thresholds=GateThresholds(**ANSWER_CRITERIA_OPEN, traffic_min_perplexity_gain=TRAFFIC_MARGIN),
        traffic=TrafficSliceScores(
            candidate=scores(measured["candidate", "slice"]),
            reference=scores(measured["champion", "slice"]),
            rows=mixed.traffic_slice.num_rows,
        ),
    )
    assert decision.passed, decision.reasons
    verdicts = {criterion.name: criterion.verdict for criterion in decision.criteria}
    assert (
        verdicts["perplexity"] == verdicts["champion_perplexity"] == verdicts["traffic_perplexity"] == "pass"
    )
    # The champion itself would be refused: it is not better on what users now ask.
    refused = decide_gate(
        scores(measured["champion", "test"]),
        scores(measured["base", "test"]),
        scores(measured["champion", "test"]),
        thresholds=GateThresholds(**ANSWER_CRITERIA_OPEN, traffic_min_perplexity_gain=TRAFFIC_MARGIN),
        traffic=TrafficSliceScores(
            candidate=scores(measured["champion", "slice"]),
            reference=scores(measured["champion", "slice"]),
            rows=mixed.traffic_slice.num_rows,
        ),
    )
    assert refused.failed == ["traffic_perplexity"]
