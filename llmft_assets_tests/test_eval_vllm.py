"""Eval generation on vLLM: backend selection, LoRA request / engine / sampling building, and the hook in
`evaluate`, all without vLLM. The engine stand-in below generates with the transformers model and the peft
adapter each LoRARequest names, so a run through the vLLM path must give exactly the metrics of the
transformers path (same prompts, same cut at the end token, same decoding)."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from llmft_assets.evaluation import vllm_generate
from llmft_assets.evaluation.report import ADAPTER, BASE, CHAMPION, evaluate
from llmft_assets.evaluation.vllm_generate import (
    ENV_EVAL_BACKEND,
    engine_kwargs,
    generations_from_token_ids,
    lora_specs,
    max_lora_rank,
    sampling_kwargs,
    select_generation_backend,
)
from llmft_assets_tests.test_eval_generate_report import (  # noqa: F401 - fixtures
    MAX_NEW_TOKENS,
    adapters,
    test_rows,
    tiny_model_dir,
)


@pytest.mark.parametrize(
    ("requested", "installed", "cuda", "expected"),
    [
        ("auto", True, True, "vllm"),
        ("auto", True, False, "transformers"),
        ("auto", False, True, "transformers"),
        ("transformers", True, True, "transformers"),
        ("vllm", True, True, "vllm"),
    ],
)
def test_backend_selection(requested: str, installed: bool, cuda: bool, expected: str) -> None:
    assert select_generation_backend(requested, vllm_installed=installed, cuda_available=cuda) == expected


def test_backend_selection_errors_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="'vllm' cannot run here: vllm is not installed, no CUDA device"):
        select_generation_backend("vllm", vllm_installed=False, cuda_available=False)
    with pytest.raises(ValueError, match="'vllm' cannot run here: no CUDA device"):
        select_generation_backend("vllm", vllm_installed=True, cuda_available=False)
    with pytest.raises(ValueError, match="not one of"):
        select_generation_backend("tgi", vllm_installed=True, cuda_available=True)
    monkeypatch.setenv(ENV_EVAL_BACKEND, "transformers")
    assert select_generation_backend(None, vllm_installed=True, cuda_available=True) == "transformers"
    monkeypatch.setenv(ENV_EVAL_BACKEND, "auto")
    assert select_generation_backend(None, vllm_installed=True, cuda_available=True) == "vllm"


def _adapter(folder: Path, rank: int, **extra: Any) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA", **extra}))
    return folder


def test_lora_requests_engine_and_sampling(tmp_path: Path) -> None:
    specs = lora_specs({"adapter": _adapter(tmp_path / "a", 16), "champion": _adapter(tmp_path / "c", 4)})
    assert [(s.name, s.int_id, s.rank) for s in specs] == [("adapter", 1, 16), ("champion", 2, 4)]
    assert specs[0].path == str(tmp_path / "a")
    assert max_lora_rank(specs) == 16
    assert max_lora_rank(lora_specs({"x": _adapter(tmp_path / "x", 24)})) == 32
    with pytest.raises(ValueError, match="exceeds vLLM's largest"):
        max_lora_rank(lora_specs({"y": _adapter(tmp_path / "y", 1024)}))
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json"):
        lora_specs({"missing": tmp_path / "nowhere"})
    dora = _adapter(tmp_path / "d", 8, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        lora_specs({"dora": dora})
    assert not vllm_generate.vllm_can_serve({"dora": dora}) and vllm_generate.vllm_can_serve(
        {"a": tmp_path / "a"}
    )

    kwargs = engine_kwargs(tmp_path / "model", specs, seed=3, max_model_len=700)
    assert kwargs["enable_lora"] is True and kwargs["max_loras"] == 2 and kwargs["max_lora_rank"] == 16
    assert kwargs["model"] == kwargs["tokenizer"] == str(tmp_path / "model")
    assert kwargs["max_model_len"] == 700 and kwargs["seed"] == 3
    assert "enable_lora" not in engine_kwargs(tmp_path / "model", [], seed=0, max_model_len=10)
    params = sampling_kwargs(max_new_tokens=64, stop_ids=[7, 9], seed=1)
    assert params["temperature"] == 0.0 and params["max_tokens"] == 64 and params["stop_token_ids"] == [7, 9]
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling_kwargs(max_new_tokens=0, stop_ids=[1], seed=0)


def test_generations_are_cut_at_the_first_end_token() -> None:
    class Tokenizer:
        def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
            return " ".join(map(str, ids))

    stop = [99]
    [finished, cut_off] = generations_from_token_ids(Tokenizer(), [[5, 6, 99, 0], [5, 6, 7]], stop)
    assert (finished.text, finished.num_tokens, finished.finished) == ("5 6", 2, True)
    assert (cut_off.text, cut_off.num_tokens, cut_off.finished) == ("5 6 7", 3, False)


def _fake_vllm(calls: list[dict[str, Any]]) -> dict[str, types.ModuleType]:
    """vllm's offline API (LLM, SamplingParams, LoRARequest) over transformers + peft, greedy."""

    class SamplingParams:
        def __init__(self, **kwargs: Any) -> None:
            self.__dict__.update(kwargs)

    class LoRARequest:
        def __init__(self, lora_name: str, lora_int_id: int, lora_path: str) -> None:
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    class LLM:
        def __init__(self, **kwargs: Any) -> None:
            from transformers import AutoModelForCausalLM

            calls.append({"engine": kwargs})
            self.model_dir = kwargs["model"]
            self.base = AutoModelForCausalLM.from_pretrained(self.model_dir).eval()

        def generate(
            self, requests: list[dict], params: Any, lora_request: Any = None, use_tqdm: bool = True
        ):
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            calls.append({"lora": lora_request, "params": params.__dict__, "prompts": requests})
            model = self.base
            if lora_request is not None:
                model = PeftModel.from_pretrained(
                    AutoModelForCausalLM.from_pretrained(self.model_dir), lora_request.lora_path
                ).eval()
            results = []
            with torch.inference_mode():
                for request in requests:
                    ids = torch.tensor([request["prompt_token_ids"]])
                    output = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=params.max_tokens,
                        do_sample=False,
                        eos_token_id=params.stop_token_ids,
                        pad_token_id=params.stop_token_ids[0],
                        temperature=None,
                        top_p=None,
                        top_k=None,
                    )
                    tokens = output[0, ids.shape[1] :].tolist()  # vLLM keeps the stop token too
                    results.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tokens)]))
            return results

    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    return {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}


@pytest.mark.slow
def test_evaluate_on_the_vllm_path_gives_the_same_metrics(
    tiny_model_dir: Path,  # noqa: F811 - fixture
    adapters: dict[str, Path],  # noqa: F811 - fixture
    test_rows: list[dict[str, Any]],  # noqa: F811 - fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    common = {
        "max_new_tokens": MAX_NEW_TOKENS,
        "batch_size": 4,
        "seed": 0,
        "champion_adapter_dir": adapters["identity"],
    }
    reference = evaluate(
        tiny_model_dir, adapters["random"], test_rows, generation_backend="transformers", **common
    )
    assert reference.settings["generation_backend"] == "transformers"

    calls: list[dict[str, Any]] = []
    for name, module in _fake_vllm(calls).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(vllm_generate, "_cuda_available", lambda: True)
    assert select_generation_backend("auto") == "vllm"
    report = evaluate(tiny_model_dir, adapters["random"], test_rows, generation_backend="auto", **common)

    assert report.settings["generation_backend"] == "vllm"
    assert report.models == reference.models  # every metric, for base, adapter and champion
    assert [s.outputs for s in report.samples] == [s.outputs for s in reference.samples]
    # one engine, three passes: the base model, then one LoRARequest per adapter
    engine = calls[0]["engine"]
    assert engine["enable_lora"] is True and engine["max_loras"] == 2
    passes = [
        (call["lora"].lora_name, call["lora"].lora_int_id) if call["lora"] else None for call in calls[1:]
    ]
    assert passes == [None, (ADAPTER, 1), (CHAMPION, 2)]
    assert calls[1]["params"]["temperature"] == 0.0 and calls[1]["params"]["max_tokens"] == MAX_NEW_TOKENS
    assert len(calls[1]["prompts"]) == len(test_rows) and BASE in report.models
