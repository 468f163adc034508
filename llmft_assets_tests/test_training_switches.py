"""The fast-training switches of TrainingConfig: validated, passed through to peft / transformers, recorded in
the bill of materials and the Dagster config, trained for two steps on CPU where CPU can run them, and a clear
error where they need CUDA (flash attention, Liger, bitsandbytes optimizers, fp16; bf16 where unsupported).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmft_assets.training import config as config_module
from llmft_assets.training.bom import bill_of_materials
from llmft_assets.training.config import TrainingConfig
from llmft_assets.training.trainer import TrainResult, train_lora
from llmft_assets_tests.test_training_support import tiny_model_dir_fixture, tiny_splits_fixture  # noqa: F401

# no dropout: runs that differ only in a numerically exact switch must give the same losses
TWO_STEPS = {
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "max_seq_len": 256,
    "max_tokens_per_batch": 384,
    "logging_steps": 1,
    "learning_rate": 5e-3,
    "warmup_ratio": 0.0,
    "max_steps": 2,
    "save_steps": 100,
}
SWITCHES = {
    "use_dora": True,
    "use_rslora": True,
    "optim": "adamw_torch_fused",
    "attn_implementation": "eager",
    "use_liger_kernel": False,
    "torch_compile": False,
    "gradient_checkpointing": True,
    "precision": "bf16",
    "strategy": "fsdp",
}


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"optim": "adamw_magic"}, "optim"),
        ({"strategy": "zero3"}, "strategy"),
        ({"qlora": True, "strategy": "fsdp"}, "strategy"),
        ({"use_dora": "often"}, "use_dora"),
        ({"torch_compile": "maybe"}, "torch_compile"),
    ],
)
def test_bad_switches_are_value_errors_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TrainingConfig(**overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attn_implementation": "flash_attention_2"}, "attn_implementation: flash_attention_2 needs a CUDA"),
        ({"use_liger_kernel": True}, "use_liger_kernel: Liger's Triton kernels need a CUDA device"),
        ({"optim": "paged_adamw_8bit"}, r"optim: paged_adamw_8bit \(bitsandbytes\) needs a CUDA device"),
        ({"optim": "adamw_bnb_8bit"}, r"optim: adamw_bnb_8bit \(bitsandbytes\) needs a CUDA device"),
        ({"precision": "fp16"}, "precision: fp16 mixed precision needs a CUDA device"),
    ],
)
def test_cuda_only_switches_fail_clearly_on_cpu(overrides: dict, message: str) -> None:
    config = TrainingConfig(**overrides)
    with pytest.raises(ValueError, match=message):
        config.check_runtime("cpu")


def test_cuda_switches_check_their_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    missing = {"flash_attn", "liger_kernel", "bitsandbytes"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find_spec(name, *a)
    )
    monkeypatch.setattr(config_module, "_cuda_bf16_supported", lambda: True)
    for overrides, message in [
        ({"attn_implementation": "flash_attention_2"}, "needs flash_attn installed"),
        ({"use_liger_kernel": True}, "liger-kernel is not installed"),
        ({"optim": "paged_adamw_8bit"}, "needs bitsandbytes installed"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainingConfig(**overrides).check_runtime("cuda")
    # with the packages present, CUDA passes the same configs
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(config_module.importlib.util, "find_spec", lambda name, *a: object())
    TrainingConfig(
        attn_implementation="flash_attention_2", use_liger_kernel=True, optim="paged_adamw_8bit"
    ).check_runtime("cuda")


def test_bf16_where_unsupported_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "_cpu_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="precision: bf16 is not supported on this cpu device"):
        TrainingConfig(precision="bf16").check_runtime("cpu")
    monkeypatch.setattr(config_module, "_cpu_bf16_supported", lambda: True)
    TrainingConfig(precision="bf16").check_runtime("cpu")


def test_switches_are_recorded_in_the_bill_of_materials() -> None:
    config = TrainingConfig(**SWITCHES)
    bom = bill_of_materials(
        base_model_info={"model_id": "tiny"}, dataset_version="v1", dataset=None, config=config, seed=1
    )
    recorded = bom["training_config"]
    assert {key: recorded[key] for key in SWITCHES} == SWITCHES
    json.dumps(bom)  # JSON-able as written into the adapter folder and MLflow


def test_dagster_config_passes_every_switch_through() -> None:
    import dagster as dg

    from llmft_assets.defs.training.assets import LoraAdapterConfig

    training = LoraAdapterConfig(**SWITCHES).to_domain(asset="lora_adapter")
    assert {key: getattr(training, key) for key in SWITCHES} == SWITCHES
    # the MLflow params of the run are this dump (see lora_adapter)
    assert {key: training.model_dump()[key] for key in SWITCHES} == SWITCHES
    with pytest.raises(dg.Failure, match="optim"):
        LoraAdapterConfig(optim="adamw_magic").to_domain(asset="lora_adapter")


# ---------------------------------------------------------------------------------------- two-step CPU runs


def _train(model_dir: Path, splits: dict[str, Path], out: Path, **overrides: object) -> TrainResult:
    return train_lora(
        base_model_dir=model_dir,
        train_path=splits["train"],
        eval_path=None,
        output_dir=out,
        config=TrainingConfig(**{**TWO_STEPS, **overrides}),
        log=lambda _: None,
    )


@pytest.fixture(scope="module", name="baseline")
def baseline_fixture(
    tiny_model_dir: Path, tiny_splits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> TrainResult:
    return _train(tiny_model_dir, tiny_splits, tmp_path_factory.mktemp("baseline"))


def _losses(result: TrainResult) -> list[float]:
    return [loss for _, loss in result.loss_history]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {"attn_implementation": "eager"},
        {"gradient_checkpointing": True},
        {"optim": "adamw_torch_fused"},
    ],
    ids=["eager", "gradient_checkpointing", "adamw_torch_fused"],
)
def test_exact_switches_train_to_the_same_losses(
    overrides: dict, baseline: TrainResult, tiny_model_dir: Path, tiny_splits: dict[str, Path], tmp_path: Path
) -> None:
    result = _train(tiny_model_dir, tiny_splits, tmp_path, **overrides)
    assert result.global_step == 2
    assert _losses(result) == pytest.approx(_losses(baseline), rel=1e-4)


@pytest.mark.slow
def test_torch_compile_trains_to_the_same_losses(
    baseline: TrainResult, tiny_model_dir: Path, tiny_splits: dict[str, Path], tmp_path: Path
) -> None:
    # aot_eager: dynamo's graph capture and AOT autograd through LoRA and packed batches, without inductor's
    # C++ code generation (inductor passed this test once here but took 567 s on two loaded cores)
    result = _train(
        tiny_model_dir, tiny_splits, tmp_path, torch_compile=True, torch_compile_backend="aot_eager"
    )
    assert result.global_step == 2
    # the compiled graph may reorder float ops: equal up to rounding
    assert _losses(result) == pytest.approx(_losses(baseline), rel=1e-3)


@pytest.mark.slow
def test_dora_and_rslora_change_the_adapter(
    baseline: TrainResult, tiny_model_dir: Path, tiny_splits: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftConfig
    from safetensors.torch import load_file

    dora = _train(tiny_model_dir, tiny_splits, tmp_path / "dora", use_dora=True)
    rslora = _train(tiny_model_dir, tiny_splits, tmp_path / "rslora", use_rslora=True)
    dora_tensors = load_file(str(Path(dora.adapter_dir) / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in name for name in dora_tensors)
    assert not any(
        "lora_magnitude_vector" in name
        for name in load_file(str(Path(baseline.adapter_dir) / "adapter_model.safetensors"))
    )
    assert PeftConfig.from_pretrained(dora.adapter_dir).use_dora is True
    assert PeftConfig.from_pretrained(rslora.adapter_dir).use_rslora is True
    # both start from the base model's output (B = 0), then update differently from plain LoRA
    for result in (dora, rslora):
        assert _losses(result)[0] == pytest.approx(_losses(baseline)[0], rel=1e-5)
        assert _losses(result)[1] != pytest.approx(_losses(baseline)[1], rel=1e-6)


@pytest.mark.slow
def test_bf16_mixed_precision_on_cpu(
    baseline: TrainResult, tiny_model_dir: Path, tiny_splits: dict[str, Path], tmp_path: Path
) -> None:
    if not config_module._cpu_bf16_supported():
        with pytest.raises(ValueError, match="bf16 is not supported"):
            _train(tiny_model_dir, tiny_splits, tmp_path, precision="bf16")
        return
    result = _train(tiny_model_dir, tiny_splits, tmp_path, precision="bf16")
    assert result.precision == "bf16" and result.global_step == 2
    # bf16 autocast keeps 8 mantissa bits: close to fp32, not equal
    assert _losses(result)[0] == pytest.approx(_losses(baseline)[0], rel=2e-2)
    assert _losses(result)[0] != _losses(baseline)[0]
