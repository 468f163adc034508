"""The continuous-batching transformers engine on the tiny offline Qwen2 model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmft_assets.serving.engine import SamplingParams, TransformersEngine, sample_next_tokens


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmft_assets.modeling.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", pretrain_steps=0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    engine = TransformersEngine(tiny_model_dir, max_batch_size=8, device="cpu")
    yield engine
    engine.close()


def prompts(engine: TransformersEngine, count: int) -> list[list[int]]:
    # Different lengths on purpose: rows are left-padded and merged at different cache lengths.
    return [
        engine.render_prompt(
            [{"role": "user", "content": f"Question {i}: what is {i} + {i * 7}?" + " please" * i}]
        )
        for i in range(count)
    ]


def reference_greedy(engine: TransformersEngine, prompt_ids: list[int], max_new_tokens: int) -> str:
    import torch

    output = engine.model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return engine.tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=True)


async def run_staggered(
    engine: TransformersEngine, all_prompts: list[list[int]], params: SamplingParams
) -> list[str]:
    async def one(index: int, prompt_ids: list[int]) -> str:
        await asyncio.sleep(0.003 * index)  # arrive while others are mid-generation
        parts = [d.text async for d in engine.stream(prompt_ids, params, f"r{index}")]
        return "".join(parts)

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(all_prompts)))


def test_continuous_batching_matches_sequential_generate(engine: TransformersEngine) -> None:
    all_prompts = prompts(engine, 12)  # more than max_batch_size: some wait for a free slot
    batched = asyncio.run(run_staggered(engine, all_prompts, SamplingParams(max_tokens=12, temperature=0.0)))
    assert engine.max_batch_seen > 1, "requests were not batched"
    for prompt_ids, text in zip(all_prompts, batched, strict=True):
        assert text == reference_greedy(engine, prompt_ids, 12)


def test_max_tokens_and_stop_sequences(engine: TransformersEngine) -> None:
    prompt_ids = prompts(engine, 1)[0]
    text, finish, completion_tokens = engine.generate_text(
        prompt_ids, SamplingParams(max_tokens=10, temperature=0.0)
    )
    assert finish in ("length", "stop") and completion_tokens <= 10
    if finish == "length":
        assert completion_tokens == 10
    stop = text.strip()[:2] or text[:1]
    assert stop
    stopped, stop_finish, _ = engine.generate_text(
        prompt_ids, SamplingParams(max_tokens=10, temperature=0.0, stop=(stop,))
    )
    assert stop_finish == "stop"
    assert stopped == text[: text.find(stop)]


def test_seeded_sampling_is_reproducible_and_streams_concatenate(engine: TransformersEngine) -> None:
    prompt_ids = prompts(engine, 2)[1]
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    first = engine.generate_text(prompt_ids, params)
    second = engine.generate_text(prompt_ids, params)
    assert first == second

    async def streamed() -> tuple[str, int]:
        deltas = [d async for d in engine.stream(prompt_ids, params, "s")]
        assert all(d.finish_reason is None for d in deltas[:-1]) and deltas[-1].finish_reason is not None
        return "".join(d.text for d in deltas), len(deltas)

    text, chunk_count = asyncio.run(streamed())
    assert text == first[0] and chunk_count >= 1


def test_a_cancelled_request_leaves_the_others_intact(engine: TransformersEngine) -> None:
    all_prompts = prompts(engine, 3)
    params = SamplingParams(max_tokens=10, temperature=0.0)

    async def scenario() -> list[str]:
        async def abandon() -> None:
            async for _ in engine.stream(
                all_prompts[0], SamplingParams(max_tokens=200, temperature=0.0), "gone"
            ):
                break  # client disconnects after the first delta

        async def full(index: int) -> str:
            return "".join([d.text async for d in engine.stream(all_prompts[index], params, f"k{index}")])

        results = await asyncio.gather(abandon(), full(1), full(2))
        return list(results[1:])

    outputs = asyncio.run(scenario())
    assert outputs == [reference_greedy(engine, all_prompts[i], 10) for i in (1, 2)]


def test_a_failing_forward_fails_its_requests_and_the_loop_recovers(engine: TransformersEngine) -> None:
    from llmft_assets.serving.engine import EngineError

    prompt_ids = prompts(engine, 1)[0]
    params = SamplingParams(max_tokens=3, temperature=0.0)
    real_model = engine.model

    def broken_model(**_: object) -> None:
        raise RuntimeError("simulated device failure")

    engine.model = broken_model
    try:
        with pytest.raises(EngineError):
            engine.generate_text(prompt_ids, params)
    finally:
        engine.model = real_model
    assert engine.is_ready()
    assert engine.generate_text(prompt_ids, params)[0] == reference_greedy(engine, prompt_ids, 3)


def test_sampler_rules() -> None:
    import torch

    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.9]])
    greedy = sample_next_tokens(logits, temperatures=[0.0, 0.0], top_ps=[1.0, 1.0], generators=[None, None])
    assert greedy == [1, 0]
    # top_p that keeps only the most likely token is greedy whatever the seed.
    generator = torch.Generator().manual_seed(0)
    tokens = sample_next_tokens(
        logits, temperatures=[1.0, 1.0], top_ps=[0.01, 0.01], generators=[generator, generator]
    )
    assert tokens == [1, 0]
    # A frequency penalty pushes an already generated token down.
    penalised = sample_next_tokens(
        logits.clone(),
        temperatures=[0.0, 0.0],
        top_ps=[1.0, 1.0],
        generators=[None, None],
        penalties=[(0.0, 2.0, [1, 1, 1]), (0.0, 0.0, [])],
    )
    assert penalised == [2, 0]


def test_invalid_sampling_params_are_rejected() -> None:
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=5, top_p=0.0)


def test_sampler_inputs_are_clamped() -> None:
    params = SamplingParams(max_tokens=4, temperature=1e-300, top_p=1e-300, seed=2**64)
    assert (params.temperature, params.top_p, params.seed) == (0.0, 1e-3, 0)
    assert SamplingParams(max_tokens=4, seed=-1).seed == 2**64 - 1
    assert SamplingParams(max_tokens=4, temperature=0.7, top_p=0.9, seed=5) == SamplingParams(
        max_tokens=4, temperature=0.7, top_p=0.9, seed=5
    )


def test_extreme_sampler_values_next_to_others_all_succeed(engine: TransformersEngine) -> None:
    all_prompts = prompts(engine, 8)
    params = [
        SamplingParams(max_tokens=6, temperature=1e-300),
        SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-300, seed=2**64),
        SamplingParams(max_tokens=6, temperature=2.0, seed=-(2**70)),
    ] + [SamplingParams(max_tokens=6, temperature=0.0)] * 5

    async def run() -> list[str]:
        async def one(i: int) -> str:
            return "".join([d.text async for d in engine.stream(all_prompts[i], params[i], f"x{i}")])

        return await asyncio.gather(*(one(i) for i in range(8)))

    texts = asyncio.run(run())
    for i in range(3, 8):
        assert texts[i] == reference_greedy(engine, all_prompts[i], 6)
    assert texts[0] == reference_greedy(engine, all_prompts[0], 6)  # temperature 1e-300 is greedy


def test_a_failing_row_fails_alone(engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmft_assets.serving.engine import EngineError

    all_prompts = prompts(engine, 6)
    original = engine._advance

    def advance(sequence, token):  # a planted per-row defect: detokenising request "bad" raises
        if sequence.request_id == "bad":
            raise RuntimeError("planted")
        return original(sequence, token)

    monkeypatch.setattr(engine, "_advance", advance)
    params = SamplingParams(max_tokens=5, temperature=0.0)

    async def one(i: int) -> str:
        request_id = "bad" if i == 2 else f"ok{i}"
        try:
            return "".join([d.text async for d in engine.stream(all_prompts[i], params, request_id)])
        except EngineError:
            return "<failed>"

    async def run() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(6)))

    texts = asyncio.run(run())
    assert texts[2] == "<failed>"
    for i in (0, 1, 3, 4, 5):
        assert texts[i] == reference_greedy(engine, all_prompts[i], 5)
    assert engine.is_ready()


def make_random_adapter(model_dir: Path, target: Path, seed: int) -> Path:
    """A LoRA adapter with non-zero weights (peft's default init would leave the model unchanged)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(model_dir)),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    model.save_pretrained(str(target))
    return target


def test_several_adapters_share_one_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = {
        name: make_random_adapter(tiny_model_dir, tmp_path / name, seed)
        for name, seed in (("v1", 1), ("v2", 2))
    }
    engine = TransformersEngine(tiny_model_dir, max_batch_size=8, device="cpu", multi_adapter=True)
    try:
        for name, path in adapters.items():
            engine.load_adapter(name, path)
        assert set(engine.adapters()) == {"v1", "v2"}
        all_prompts = prompts(engine, 6)
        choice = ["v1", "v2", None, "v2", "v1", None]
        params = SamplingParams(max_tokens=6, temperature=0.0)

        async def run() -> list[str]:
            async def one(i: int) -> str:
                await asyncio.sleep(0.003 * i)
                stream = engine.stream(all_prompts[i], params, f"m{i}", adapter=choice[i])
                return "".join([d.text async for d in stream])

            return await asyncio.gather(*(one(i) for i in range(6)))

        texts = asyncio.run(run())
        assert engine.max_batch_seen > 1
    finally:
        engine.close()
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapters["v1"]), adapter_name="v1"
    )
    reference.load_adapter(str(adapters["v2"]), adapter_name="v2")
    reference.eval()

    def expected(prompt_ids: list[int], name: str | None) -> str:
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            if name is None:
                with reference.disable_adapter():
                    out = reference.generate(
                        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
                    )
            else:
                reference.set_adapter(name)
                out = reference.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
                )
        return engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    for i, name in enumerate(choice):
        assert texts[i] == expected(all_prompts[i], name), (i, name)
    # The adapters really change the answer (else routing would be untested).
    assert len({expected(all_prompts[0], name) for name in ("v1", "v2", None)}) == 3
