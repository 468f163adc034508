"""TrainingConfig: nonsense is rejected with an error that names the field; derived values."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from llmft_assets.training import config as config_module
from llmft_assets.training.config import TrainingConfig


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"lora_r": 0}, "lora_r"),
        ({"lora_r": -4}, "lora_r"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"precision": "int3"}, "precision"),
        ({"lr_scheduler_type": "zigzag"}, "lr_scheduler_type"),
        ({"attn_implementation": "magic"}, "attn_implementation"),
        ({"target_modules": []}, "target_modules"),
        ({"num_train_epochs": 0, "max_steps": -1}, "num_train_epochs"),
        ({"max_tokens_per_batch": 8}, "max_tokens_per_batch"),
        ({"qlora": True, "precision": "fp16"}, "precision"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_nonsense_is_a_value_error_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TrainingConfig(**overrides)


def test_defaults_and_derived_values() -> None:
    config = TrainingConfig(per_device_train_batch_size=4, max_seq_len=512)
    assert config.target_modules == ["all-linear"] and config.peft_target_modules == "all-linear"
    assert config.attn_implementation == "sdpa"
    assert config.token_budget == 512  # packed: one max-length sequence per micro-batch
    assert (
        TrainingConfig(per_device_train_batch_size=4, max_seq_len=512, packing=False).token_budget == 4 * 512
    )
    assert TrainingConfig(max_tokens_per_batch=4096, max_seq_len=1024).token_budget == 4096
    # auto precision: fp32 on CPU
    assert config.resolve_precision("cpu") == "fp32"
    assert TrainingConfig(precision="bf16").resolve_precision("cpu") == "bf16"


def test_check_runtime_rejects_qlora_without_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "bitsandbytes" else real_find_spec(name, *args),
    )
    with pytest.raises(ValueError, match="qlora"):
        TrainingConfig(qlora=True).check_runtime("cpu")
    TrainingConfig(qlora=False).check_runtime("cpu")


def test_check_runtime_rejects_bf16_on_cpu_without_support(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "_cpu_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="precision"):
        TrainingConfig(precision="bf16").check_runtime("cpu")
    monkeypatch.setattr(config_module, "_cpu_bf16_supported", lambda: True)
    TrainingConfig(precision="bf16").check_runtime("cpu")


def test_check_runtime_rejects_fp16_and_flash_attention_on_cpu() -> None:
    with pytest.raises(ValueError, match="precision"):
        TrainingConfig(precision="fp16").check_runtime("cpu")
    with pytest.raises(ValueError, match="attn_implementation"):
        TrainingConfig(attn_implementation="flash_attention_2").check_runtime("cpu")


def test_json_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    config = TrainingConfig(lora_r=8, max_steps=3, target_modules=["q_proj", "v_proj"])
    path = config.to_json_file(tmp_path / "config.json")
    assert TrainingConfig.from_json_file(path) == config

    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainingConfig.from_json_file(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        TrainingConfig.from_json_file(tmp_path / "list.json")
    (tmp_path / "bad_r.json").write_text(json.dumps({"lora_r": 0}))
    with pytest.raises(ValueError, match="lora_r"):
        TrainingConfig.from_json_file(tmp_path / "bad_r.json")
