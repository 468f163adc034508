"""Typed, validated LoRA/QLoRA training configuration. Pure: no Dagster, no torch at import time.

Two layers of validation, both raising `ValueError` subclasses that name the offending field:
- structural checks run when the model is built (pydantic `ValidationError` is a `ValueError`);
- environment checks (`check_runtime`) run on the machine that trains, because whether bf16 or
  bitsandbytes are usable depends on that machine, not on the one that wrote the config.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Precision = Literal["fp32", "bf16", "fp16", "auto"]
ResolvedPrecision = Literal["fp32", "bf16", "fp16"]

_SCHEDULERS = {
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
}
ALL_LINEAR = "all-linear"
_ATTN_IMPLEMENTATIONS = {"sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"}
# Optimizers offered (transformers' names). The bitsandbytes ones keep 8-bit / paged state on the GPU.
_TORCH_OPTIMIZERS = {"adamw_torch", "adamw_torch_fused", "adafactor", "sgd"}
_CUDA_OPTIMIZERS = {"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"}
_OPTIMIZERS = _TORCH_OPTIMIZERS | _CUDA_OPTIMIZERS
_FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
Strategy = Literal["ddp", "fsdp"]


class TrainingConfig(BaseModel):
    """Hyper-parameters of one LoRA/QLoRA fine-tuning run.

    The one home of every training field and default: `lora_adapter`'s Dagster config is derived from
    this class (llmft_assets/defs/config_models.py), so a field added here is a run-config field there.
    Field types stay within what Dagster config can express (no unions other than `X | None`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # LoRA
    lora_r: int = Field(16, gt=0, description="LoRA rank")
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: [ALL_LINEAR], description='["all-linear"] or module names'
    )
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA): magnitude + direction")
    use_rslora: bool = Field(
        False, description="rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r"
    )
    # QLoRA: 4-bit NF4 base weights with double quantization
    qlora: bool = False
    bnb_4bit_compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # optimisation
    optim: str = Field("adamw_torch", description="optimizer; paged_adamw_8bit (CUDA) saves memory in QLoRA")
    learning_rate: float = Field(5e-4, gt=0.0, lt=1.0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    num_train_epochs: float = Field(2.0, ge=0.0)
    max_steps: int = Field(-1, ge=-1, description="> 0 overrides num_train_epochs")
    per_device_train_batch_size: int = Field(8, gt=0)
    per_device_eval_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    # data
    max_seq_len: int | None = Field(
        None,
        gt=1,
        description="tokenized_dataset's max_seq_len owns it: unset = the tokenized data's; a set value must "
        "equal it",
    )
    packing: bool = Field(True, description="padding-free batches (DataCollatorWithFlattening)")
    max_tokens_per_batch: int | None = Field(
        None,
        gt=0,
        description="token budget per micro-batch (default: see token_budget); "
        "a row longer than the budget gets a micro-batch of its own",
    )
    shuffle_window_batches: int = Field(
        16, gt=0, description="length-sorting window, in batches: larger = less padding, less randomness"
    )
    # runtime
    gradient_checkpointing: bool = False
    seed: int = Field(42, ge=0)
    precision: Precision = "auto"
    attn_implementation: str = "sdpa"
    use_liger_kernel: bool = Field(
        False,
        description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy); CUDA",
    )
    torch_compile: bool = Field(False, description="torch.compile the model")
    torch_compile_backend: Literal["inductor", "aot_eager", "cudagraphs"] = Field(
        "inductor", description="inductor (generated kernels) or aot_eager (graph capture only, no codegen)"
    )
    strategy: Strategy = Field(
        "ddp", description="multi-process strategy: ddp (replicas) or fsdp (sharded base weights)"
    )
    save_steps: int = Field(50, gt=0)
    save_total_limit: int = Field(2, gt=0, description="local Trainer checkpoints kept on disk")
    logging_steps: int = Field(5, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="evaluate every N steps; None: only at the end")
    dataloader_num_workers: int = Field(0, ge=0)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # "all-linear" as JSON files used to say

    @field_validator("target_modules")
    @classmethod
    def _check_target_modules(cls, value: list[str]) -> list[str]:
        if not value or any(not name.strip() for name in value):
            raise ValueError("target_modules must be a non-empty list of non-empty module names")
        return value

    @field_validator("lr_scheduler_type")
    @classmethod
    def _check_scheduler(cls, value: str) -> str:
        if value not in _SCHEDULERS:
            raise ValueError(f"lr_scheduler_type {value!r} is not one of {sorted(_SCHEDULERS)}")
        return value

    @field_validator("attn_implementation")
    @classmethod
    def _check_attn(cls, value: str) -> str:
        if value not in _ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation {value!r} is not one of {sorted(_ATTN_IMPLEMENTATIONS)}")
        return value

    @field_validator("optim")
    @classmethod
    def _check_optim(cls, value: str) -> str:
        if value not in _OPTIMIZERS:
            raise ValueError(f"optim {value!r} is not one of {sorted(_OPTIMIZERS)}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> TrainingConfig:
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("num_train_epochs / max_steps: set num_train_epochs > 0 or max_steps > 0")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 16:
            raise ValueError(f"max_tokens_per_batch ({self.max_tokens_per_batch}) must be >= 16 tokens")
        if self.qlora and self.precision == "fp16":
            # fp16 compute with NF4 weights overflows easily; bf16 or fp32 are the supported choices
            raise ValueError("precision: QLoRA supports 'bf16', 'fp32' or 'auto', not 'fp16'")
        if self.qlora and self.strategy == "fsdp":
            # 4-bit weights are not sharded by FSDP here; QLoRA fits one GPU per replica, so it runs DDP
            raise ValueError("strategy: QLoRA trains with 'ddp', not 'fsdp'")
        return self

    # ---- derived values -------------------------------------------------------------------------

    @property
    def token_budget(self) -> int:
        """Tokens per micro-batch for padding-free batches (or padded token slots without packing).

        Packed default: max_seq_len. With sdpa/eager the flattened row pays attention over its whole
        length (block-diagonal mask, T^2 work), so a packed row much longer than one sequence wastes
        compute; flash_attention_2 (varlen) has no such cost and can take a larger budget.
        """
        if self.max_tokens_per_batch is not None:
            return self.max_tokens_per_batch
        if self.max_seq_len is None:
            raise ValueError("max_seq_len: unresolved; take it from the tokenized data (with_max_seq_len)")
        if self.packing:
            return self.max_seq_len
        return self.per_device_train_batch_size * self.max_seq_len

    @property
    def peft_target_modules(self) -> str | list[str]:
        """What peft expects: the string "all-linear", or module names."""
        return ALL_LINEAR if self.target_modules == [ALL_LINEAR] else list(self.target_modules)

    def with_max_seq_len(
        self, tokenized_max_seq_len: int, *, source: str = "tokenized_dataset"
    ) -> TrainingConfig:
        """This config with the tokenized data's max_seq_len; a different explicit value is an error, since
        rows were truncated when they were tokenized and training cannot make them longer (or silently
        cut them shorter)."""
        if self.max_seq_len is not None and self.max_seq_len != tokenized_max_seq_len:
            raise ValueError(
                f"max_seq_len: the training config asks for {self.max_seq_len} but {source} was built with "
                f"max_seq_len {tokenized_max_seq_len}; set it on tokenized_dataset (where rows are truncated) "
                "and leave it unset for training"
            )
        return self.model_copy(update={"max_seq_len": tokenized_max_seq_len})

    def resolve_precision(self, device_type: str) -> ResolvedPrecision:
        """The precision actually used on `device_type` ("cpu" or "cuda"); "auto" picks bf16 where supported."""
        if self.precision != "auto":
            return self.precision
        if device_type == "cuda" and _cuda_bf16_supported():
            return "bf16"
        return "fp32"

    def check_runtime(self, device_type: str) -> None:
        """Environment checks on the training machine; raises ValueError naming the field."""
        precision = self.resolve_precision(device_type)
        if precision == "bf16":
            supported = _cuda_bf16_supported() if device_type == "cuda" else _cpu_bf16_supported()
            if not supported:
                raise ValueError(f"precision: bf16 is not supported on this {device_type} device")
        if precision == "fp16" and device_type != "cuda":
            raise ValueError("precision: fp16 mixed precision needs a CUDA device; use 'fp32' or 'auto'")
        if self.qlora and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("qlora: bitsandbytes is not installed (pip install 'llmft[qlora]')")
        if self.attn_implementation.startswith("flash_attention") and device_type != "cuda":
            raise ValueError(f"attn_implementation: {self.attn_implementation} needs a CUDA device")
        kernel_package = _FLASH_PACKAGES.get(self.attn_implementation)
        if kernel_package is not None and importlib.util.find_spec(kernel_package) is None:
            raise ValueError(
                f"attn_implementation: {self.attn_implementation} needs {kernel_package} installed"
            )
        if self.use_liger_kernel:
            if device_type != "cuda":
                raise ValueError("use_liger_kernel: Liger's Triton kernels need a CUDA device")
            if importlib.util.find_spec("liger_kernel") is None:
                raise ValueError("use_liger_kernel: liger-kernel is not installed (pip install liger-kernel)")
        if self.optim in _CUDA_OPTIMIZERS:
            if device_type != "cuda":
                raise ValueError(f"optim: {self.optim} (bitsandbytes) needs a CUDA device; use 'adamw_torch'")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ValueError(f"optim: {self.optim} needs bitsandbytes installed")

    # ---- I/O ------------------------------------------------------------------------------------

    @classmethod
    def from_json_file(cls, path: Path) -> TrainingConfig:
        try:
            data: Any = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"training config {path} is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise ValueError(f"training config {path} must be a JSON object")
        return cls.model_validate(data)

    def to_json_file(self, path: Path) -> Path:
        Path(path).write_text(self.model_dump_json(indent=2))
        return Path(path)


def _cuda_bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _cpu_bf16_supported() -> bool:
    import torch

    # AVX512-BF16 or AMX make bf16 matmuls native; elsewhere torch emulates them very slowly.
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
