"""The adapter merged into its base in the base's dtype: files, dtype, and logits equal to base + adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmft_assets.modeling.merge import merge_adapter, saved_dtype

pytestmark = pytest.mark.slow  # builds and loads models (about a minute on 2 cores)


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmft_assets.modeling.tiny_model import build_tiny_model

    # use_cache=False: the build cache lives under LLMFT_HOME, which this module-scoped fixture leaves alone.
    return build_tiny_model(tmp_path_factory.mktemp("merge") / "base", pretrain_steps=0, use_cache=False)


def _base_in(dtype_name: str, tiny_fp32: Path, root: Path) -> Path:
    """The tiny model saved in ``dtype_name`` (as a bf16 / fp16 hub checkpoint would be)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    if dtype_name == "float32":
        return tiny_fp32
    target = root / f"base-{dtype_name}"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_fp32), dtype=getattr(torch, dtype_name))
    model.save_pretrained(str(target))
    for path in tiny_fp32.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy2(path, target / path.name)
    return target


def _adapter_for(base_dir: Path, root: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    # init_lora_weights=False: a non-zero adapter, so the merge visibly changes the weights.
    peft_model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    adapter_dir = root / f"adapter-{base_dir.name}"
    peft_model.save_pretrained(str(adapter_dir))
    return adapter_dir


def _safetensors_dtypes(folder: Path) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            dtypes |= {str(handle.get_tensor(name).dtype) for name in handle.keys()}  # noqa: SIM118
    return dtypes


def _logits(model: Any, input_ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


# Tolerances: fp32 is exact up to summation order; bf16 / fp16 round the merged weights once.
@pytest.mark.parametrize(("dtype_name", "atol"), [("float32", 1e-4), ("bfloat16", 0.05), ("float16", 0.01)])
def test_merged_model_loads_in_the_base_dtype_and_matches_base_plus_adapter(
    dtype_name: str, atol: float, tiny_fp32: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = _base_in(dtype_name, tiny_fp32, tmp_path)
    assert saved_dtype(base_dir) == dtype_name
    adapter_dir = _adapter_for(base_dir, tmp_path)
    out = tmp_path / "merged"
    result = merge_adapter(base_dir, adapter_dir, out, model_card="# card\n")
    assert result.dtype == dtype_name
    assert _safetensors_dtypes(out) == {f"torch.{dtype_name}"}
    assert saved_dtype(out) == dtype_name
    assert (out / "README.md").read_text() == "# card\n"
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (base_dir / "generation_config.json").read_text()
    )
    assert not list(out.glob("adapter_*")) and not list(out.glob("*.bin"))

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert merged.dtype == getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(base_dir)).chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto"), str(adapter_dir)
    )
    base_only = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    expected, got = _logits(reference, input_ids), _logits(merged, input_ids)
    difference = (expected - got).abs().max().item()
    assert difference <= atol, difference
    # The adapter matters: without it the logits are far off, so the comparison above can fail.
    adapter_effect = (expected - _logits(base_only, input_ids)).abs().max().item()
    print(f"{dtype_name}: merged vs base+adapter {difference:.3g}, adapter effect {adapter_effect:.3g}")
    assert adapter_effect > 5 * atol, adapter_effect


def test_large_models_are_sharded(tiny_fp32: Path, tmp_path: Path) -> None:
    adapter_dir = _adapter_for(tiny_fp32, tmp_path)
    result = merge_adapter(tiny_fp32, adapter_dir, tmp_path / "merged", max_shard_size="200KB")
    assert len(result.weight_files) > 1
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.weight_files)


def test_packaging_merge_keeps_the_dtype(tiny_fp32: Path, tmp_path: Path) -> None:
    from llmft_assets.serving.packaging import _merge_adapter_into

    for dtype_name in ("bfloat16", "float16"):
        base_dir = _base_in(dtype_name, tiny_fp32, tmp_path)
        out = tmp_path / f"packaged-{dtype_name}"
        _merge_adapter_into(base_dir, _adapter_for(base_dir, tmp_path), out)
        assert _safetensors_dtypes(out) == {f"torch.{dtype_name}"}
        assert saved_dtype(out) == dtype_name


def test_bad_inputs(tiny_fp32: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json"):
        merge_adapter(tiny_fp32, tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        merge_adapter(tmp_path, tmp_path, tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"dtype": "int8"}))
    with pytest.raises(ValueError, match="unsupported weight dtype 'int8'"):
        saved_dtype(bad)
