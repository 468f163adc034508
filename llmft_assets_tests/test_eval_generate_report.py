"""Generation, perplexity and the full eval on the tiny offline Qwen2 model with real peft adapters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from llmft_assets.evaluation import generate
from llmft_assets.evaluation.report import ADAPTER, BASE, CHAMPION, EvalReport, evaluate

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmft_assets.modeling.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", pretrain_steps=0)


def _save_adapter(model_dir: Path, out_dir: Path, *, random_b: bool) -> Path:
    """A real peft LoRA adapter; with ``random_b=False`` B is zero, so it leaves the model unchanged."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=not random_b,
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "random": _save_adapter(tiny_model_dir, root / "random", random_b=True),
        "identity": _save_adapter(tiny_model_dir, root / "identity", random_b=False),
    }


@pytest.fixture(scope="module")
def test_rows(tiny_model_dir: Path) -> list[dict[str, Any]]:
    """Tokenized-schema rows made by the data pipeline's own functions from the bundled generator."""
    from transformers import AutoTokenizer

    from llmft_assets.data.answers import extract_boxed_answer
    from llmft_assets.data.sample_gen import generate_rows
    from llmft_assets.data.tokenization import tokenize_batch

    conversations = []
    for row in generate_rows(4, schema="v1", seed=5):
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        conversations.append(
            {
                "id": row["id"],
                "messages": messages,
                "reference_answer": extract_boxed_answer(messages[-1]["content"]),
            }
        )
    # Prompts of different lengths, so that batches really are left-padded.
    conversations[1]["messages"][0]["content"] += " Please answer carefully and show every step of the work."
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return tokenize_batch(conversations, tokenizer, max_seq_len=384)


@pytest.fixture(scope="module")
def base_model_and_tokenizer(tiny_model_dir: Path) -> tuple[Any, Any]:
    return generate.load_base_model(tiny_model_dir), generate.load_tokenizer(tiny_model_dir)


def test_perplexity_matches_the_models_own_loss(
    base_model_and_tokenizer: tuple[Any, Any], test_rows: list[dict[str, Any]]
) -> None:
    import torch

    model, tokenizer = base_model_and_tokenizer
    row = test_rows[0]
    with torch.inference_mode():
        loss = model(
            input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]), use_cache=False
        ).loss
    single = generate.assistant_token_perplexity(model, [row], pad_token_id=tokenizer.pad_token_id)
    assert single == pytest.approx(math.exp(float(loss)), rel=1e-4)

    # Pooled over rows: padding in a batch must not change the result.
    one_by_one = generate.assistant_token_perplexity(
        model, test_rows, batch_size=1, pad_token_id=tokenizer.pad_token_id
    )
    batched = generate.assistant_token_perplexity(
        model, test_rows, batch_size=3, pad_token_id=tokenizer.pad_token_id
    )
    assert batched == pytest.approx(one_by_one, rel=1e-4)
    # An untrained model is about uniform over its vocabulary.
    assert 0.2 * model.config.vocab_size < batched < 5 * model.config.vocab_size

    with pytest.raises(ValueError, match="no assistant tokens"):
        generate.assistant_token_perplexity(model, [{**row, "labels": [-100] * len(row["labels"])}])


def test_batched_left_padded_greedy_equals_one_at_a_time(
    base_model_and_tokenizer: tuple[Any, Any], test_rows: list[dict[str, Any]]
) -> None:
    model, tokenizer = base_model_and_tokenizer
    padding_side_before = tokenizer.padding_side
    conversations = [row["messages"] for row in test_rows]
    batched = generate.generate_with_model(
        model, tokenizer, conversations, max_new_tokens=MAX_NEW_TOKENS, batch_size=4, seed=0
    )
    single = generate.generate_with_model(
        model, tokenizer, conversations, max_new_tokens=MAX_NEW_TOKENS, batch_size=1, seed=0
    )
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.num_tokens for g in batched] == [g.num_tokens for g in single]
    assert all(0 < g.num_tokens <= MAX_NEW_TOKENS for g in batched)
    assert tokenizer.padding_side == padding_side_before  # left padding is scoped to generation


@pytest.mark.parametrize("with_adapter", [False, True])
def test_continuous_batching_equals_one_at_a_time_greedy(
    tiny_model_dir: Path,
    adapters: dict[str, Path],
    test_rows: list[dict[str, Any]],
    with_adapter: bool,
) -> None:
    """The eval's continuous batching gives exactly the tokens of plain one-row `generate`, also when rows
    join and leave the batch at different steps (uneven budgets, fewer slots than rows) and with an
    unmerged LoRA adapter."""
    model = generate.load_base_model(tiny_model_dir)
    if with_adapter:
        model = generate.attach_adapter(model, adapters["random"])
    tokenizer = generate.load_tokenizer(tiny_model_dir)
    conversations = [row["messages"] for row in test_rows]
    budgets = [3, MAX_NEW_TOKENS, 7, MAX_NEW_TOKENS - 2]
    ours = generate.generate_continuous(
        model, tiny_model_dir, conversations, max_new_tokens=budgets, batch_size=2, seed=0
    )
    reference = [
        generate.generate_with_model(
            model, tokenizer, [conversation], max_new_tokens=budget, batch_size=1, seed=0
        )[0]
        for conversation, budget in zip(conversations, budgets, strict=True)
    ]
    assert ours == reference
    assert [generation.num_tokens for generation in ours] == budgets  # the untrained model never stops
    with pytest.raises(ValueError, match="budgets for"):
        generate.generate_continuous(
            model, tiny_model_dir, conversations, max_new_tokens=[4], batch_size=2, seed=0
        )


def test_generation_is_cut_at_the_end_token(base_model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tokenizer = base_model_and_tokenizer
    stop_ids = generate.end_token_ids(tokenizer, model)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_ids[0] == im_end
    text_ids = tokenizer("The answer is 7", add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    finished = generate._to_generation(tokenizer, [*text_ids, im_end, pad, pad], stop_ids)
    assert finished.text == "The answer is 7" and finished.finished and finished.num_tokens == len(text_ids)
    running = generate._to_generation(tokenizer, text_ids, stop_ids)
    assert not running.finished and running.num_tokens == len(text_ids)


def test_prompt_messages_drop_the_reference_answer() -> None:
    conversation = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    assert generate.prompt_messages(conversation) == conversation[:2]
    assert generate.prompt_messages(conversation[:2]) == conversation[:2]
    with pytest.raises(ValueError, match="end with a user turn"):
        generate.prompt_messages([{"role": "assistant", "content": "a"}])


def test_evaluate_scores_base_adapter_and_champion_on_the_same_rows(
    tiny_model_dir: Path, adapters: dict[str, Path], test_rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    bad_row = {"id": "broken", "messages": [], "input_ids": [], "labels": []}
    report = evaluate(
        tiny_model_dir,
        adapters["random"],
        [*test_rows, bad_row],
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=4,
        seed=0,
        num_samples=2,
        # The identity adapter (B = 0) as champion: it must score exactly like the base model, which
        # proves the adapters are switched, not stacked or left on.
        champion_adapter_dir=adapters["identity"],
        adapter_name="llmft-adapter v2",
        champion_name="llmft-adapter v1",
    )
    assert report.num_rows == len(test_rows)
    assert report.skipped == [{"id": "broken", "reason": "messages missing or empty"}]
    assert set(report.models) == {BASE, ADAPTER, CHAMPION}
    base, adapter, champion = report.models[BASE], report.models[ADAPTER], report.models[CHAMPION]
    assert champion.perplexity == pytest.approx(base.perplexity, rel=1e-5)
    assert adapter.perplexity is not None and abs(adapter.perplexity - base.perplexity) > 1e-3
    for scores in (base, adapter, champion):
        assert scores.num_checkable == len(test_rows)  # every generated row has a boxed reference
        assert scores.accuracy is not None and 0.0 <= scores.accuracy <= 1.0
        assert scores.format_compliance is not None and 0.0 <= scores.format_compliance <= 1.0
        assert scores.mean_response_tokens is not None and 0 < scores.mean_response_tokens <= MAX_NEW_TOKENS
    assert [s.outputs[CHAMPION] for s in report.samples] == [s.outputs[BASE] for s in report.samples]
    assert len(report.samples) == 2
    assert report.samples[0].reference_answer == test_rows[0]["reference_answer"]

    # Every row's verdicts are kept (the gate's paired test); the identity champion matches the base.
    assert [row.id for row in report.rows] == [row["id"] for row in test_rows]
    assert all(row.correct[CHAMPION] == row.correct[BASE] for row in report.rows)
    assert all(row.finished[CHAMPION] == row.finished[BASE] for row in report.rows)
    assert sum(row.correct[ADAPTER] is True for row in report.rows) == adapter.num_correct
    assert sum(row.finished[BASE] for row in report.rows) / len(report.rows) == base.finished_rate
    assert report.settings["answer_check"] == "math-verify"

    headline = report.headline()
    assert headline["perplexity_delta"] == pytest.approx(adapter.perplexity - base.perplexity)
    assert headline["champion_accuracy"] == champion.accuracy
    from llmft_assets.evaluation.gate import decide_gate_for_report

    decision = decide_gate_for_report(report)
    # An untrained tiny model answers nothing right and never stops within 12 tokens: refused.
    assert not decision.passed
    assert {"accuracy_gain", "accuracy_significance", "finish_rate"} <= set(decision.failed)
    report.gate = decision.as_dict()
    json_path, html_path = report.write(tmp_path / "report")
    assert EvalReport.from_json(json_path.read_text()) == report
    assert "llmft-adapter v2" in html_path.read_text()

    # The standalone entry point gives the same adapter answers as the report.
    answers = generate.generate_answers(
        tiny_model_dir,
        adapters["random"],
        [row["messages"] for row in test_rows[:2]],
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=2,
        seed=0,
    )
    assert answers == [sample.outputs[ADAPTER] for sample in report.samples]


def test_evaluate_with_no_usable_rows_raises(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="no evaluable test rows"):
        evaluate(tiny_model_dir, adapters["random"], [{"id": "x", "messages": None}], max_new_tokens=4)
