"""LoRA / QLoRA fine-tuning glue over transformers' Trainer and peft. Pure: no Dagster import.

`train_lora` loads the base model (4-bit NF4 for QLoRA), wraps it with a peft LoRA adapter, trains on
a tokenized split with padding-free token-budget batches (or pad-to-longest), publishes every Trainer
checkpoint to a `CheckpointStore`, resumes from the newest one, and saves the adapter with
`save_pretrained` (plus a tokenizer copy). The loss covers assistant tokens only: the labels carry
-100 everywhere else. The same function runs under `accelerate launch` (DDP); rank 0 writes the adapter.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmft_assets.training.checkpoints import (
    CheckpointStore,
    LocalCheckpointStore,
    checkpoint_step,
    finished_checkpoint,
    make_checkpoint_callback,
)
from llmft_assets.training.config import TrainingConfig
from llmft_assets.training.data import (
    PackedCollator,
    PaddedCollator,
    TokenBudgetBatchSampler,
    TokenizedSplit,
    as_torch_dataset,
)

ADAPTER_DIRNAME = "adapter"
TRAINER_DIRNAME = "trainer"
RESULT_FILENAME = "train_result.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class TrainResult:
    """Outcome of one `train_lora` call (JSON-able through `to_dict`)."""

    global_step: int
    train_loss: float
    eval_loss: float | None
    loss_history: list[tuple[int, float]]
    tokens_per_second: float
    train_runtime_s: float
    num_trainable_params: int
    num_total_params: int
    resumed_from_step: int | None
    adapter_dir: str
    world_size: int = 1
    num_train_tokens: int = 0
    precision: str = "fp32"
    device: str = "cpu"
    data_stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loss_history"] = [[int(step), float(loss)] for step, loss in self.loss_history]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        values = dict(data)
        values["loss_history"] = [(int(step), float(loss)) for step, loss in values.get("loss_history", [])]
        return cls(**values)


def _has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).exists() for name in _TOKENIZER_FILES)


def _device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_lora_model(
    base_model_dir: Path, config: TrainingConfig, device_type: str, local_rank: int = 0
) -> Any:
    """Base model (NF4 4-bit for QLoRA) with a fresh peft LoRA adapter; KV cache off for packing."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    precision = config.resolve_precision(device_type)
    # on CUDA the frozen base lives in the compute dtype; on CPU autocast handles bf16, weights stay fp32
    load_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device_type != "cuda":
        load_dtype = torch.float32
    kwargs: dict[str, Any] = {"dtype": load_dtype, "attn_implementation": config.attn_implementation}
    if config.qlora:
        compute = config.bnb_4bit_compute_dtype if config.bnb_4bit_compute_dtype != "auto" else precision
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(
                compute, torch.float32
            ),
        )
        kwargs["device_map"] = {"": local_rank} if device_type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), **kwargs)
    # padding-free batches are exact only without a KV cache (see data.py)
    model.config.use_cache = False
    if config.qlora:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.peft_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
    )
    return get_peft_model(model, lora)


def fsdp_full_state_dict(model: Any, *, offload_to_cpu: bool) -> dict[str, Any]:
    """The whole state dict of an FSDP (v1) model, gathered on rank 0 (a collective: every rank calls it).

    `offload_to_cpu` moves each gathered tensor to host memory (needed on GPUs); with CPU shards torch
    2.13 crashes on it (SIGSEGV), and they live in host memory anyway.
    """
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=offload_to_cpu, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        return model.state_dict()


_FSDP_WRAPPED = "_fsdp_wrapped_module."


def save_fsdp_adapter(peft_model: Any, full_state_dict: dict[str, Any], adapter_dir: Path) -> None:
    """Write the adapter of an FSDP-wrapped peft model from its gathered (clean-keyed) state dict.

    FSDP wraps the decoder layers in place, so the peft model's module names carry `_fsdp_wrapped_module.`
    while the gathered keys do not, and peft 0.21's key selection (by module name) then keeps nothing.
    The keys are matched to the wrapped names for peft's own selection, then cleaned again.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    wrapped_names = {
        name.replace(_FSDP_WRAPPED, ""): name
        for name, _ in [*peft_model.named_parameters(), *peft_model.named_buffers()]
    }
    renamed = {wrapped_names.get(key, key): value for key, value in full_state_dict.items()}
    adapter_name = getattr(peft_model, "active_adapter", "default")
    selected = get_peft_model_state_dict(peft_model, state_dict=renamed, adapter_name=adapter_name)
    tensors = {key.replace(_FSDP_WRAPPED, ""): value.contiguous() for key, value in selected.items()}
    if not tensors:
        raise ValueError("FSDP adapter save: the gathered state dict holds no adapter weights")
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_model.peft_config[adapter_name].save_pretrained(str(adapter_dir))


def save_adapter(trainer: Any, adapter_dir: Path, *, is_main: bool, device_type: str) -> None:
    """Write the adapter (`save_pretrained`) from rank 0, whatever wraps the model.

    Under FSDP every rank holds a shard of each parameter, and rank 0 saving its own view would write
    fragments: the full state dict is gathered first and the adapter's keys are kept from it. Under DDP
    or in one process the state is whole on every rank and the model saves itself.
    """
    accelerator = trainer.accelerator
    unwrapped = accelerator.unwrap_model(trainer.model)
    if accelerator.distributed_type == "FSDP":
        wrapped = getattr(trainer, "model_wrapped", None) or trainer.model  # the root FSDP module
        if accelerator.is_fsdp2:
            state_dict = accelerator.get_state_dict(wrapped)
        else:
            state_dict = fsdp_full_state_dict(wrapped, offload_to_cpu=device_type == "cuda")
        if is_main:
            save_fsdp_adapter(unwrapped, state_dict, adapter_dir)
        return
    if is_main:
        unwrapped.save_pretrained(str(adapter_dir))


def _make_trainer_class() -> type:
    from torch.utils.data import DataLoader
    from transformers import Trainer

    class LoraTrainer(Trainer):
        """Trainer with token-budget batches and a per-step record of the rows it trained on."""

        def __init__(self, *args: Any, token_budget: int, cost: str, window_batches: int, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.token_budget = token_budget
            self.batch_cost = cost
            self.window_batches = window_batches
            self.token_sampler: TokenBudgetBatchSampler | None = None
            self.step_rows: list[int] = []

        def get_train_dataloader(self) -> DataLoader:
            if self.train_dataset is None:
                raise ValueError("LoraTrainer: training requires a train_dataset")
            self.token_sampler = TokenBudgetBatchSampler(
                self.train_dataset.lengths,
                max_tokens=self.token_budget,
                seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                window_batches=self.window_batches,
                cost=self.batch_cost,  # type: ignore[arg-type]
            )
            loader = DataLoader(
                self.train_dataset,
                batch_sampler=self.token_sampler,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
            )
            # under DDP accelerate shards the batches round-robin over the ranks
            return self.accelerator.prepare(loader)

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            row_index = inputs.pop("row_index", None)
            if row_index is not None and model.training:
                self.step_rows.extend(int(index) for index in row_index.tolist())
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    return LoraTrainer


def _make_progress_callback(
    log: Callable[[str], None],
    trainer_ref: dict[str, Any],
    sample_trace_path: Path | None,
    row_ids: list[str],
) -> Any:
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Logs loss / lr / grad_norm / real tokens per second; keeps the sampler's epoch in step."""

        def __init__(self) -> None:
            self.started_at = 0.0
            self.start_tokens = 0
            self.last_time = 0.0
            self.last_tokens = 0
            self.finished_at = 0.0
            self.end_tokens = 0
            self.trace_handle: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started_at = self.last_time = time.perf_counter()
            self.start_tokens = self.last_tokens = int(state.num_input_tokens_seen)
            if sample_trace_path is not None:
                path = Path(sample_trace_path)
                if args.world_size > 1:
                    path = path.with_name(f"{path.stem}.rank{args.process_index}{path.suffix}")
                path.parent.mkdir(parents=True, exist_ok=True)
                self.trace_handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed on train end

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # fallback for wrapped samplers the Trainer cannot reach: epoch index from the restored state
            sampler = trainer_ref["trainer"].token_sampler
            if sampler is not None and state.epoch is not None:
                sampler.set_epoch(math.floor(state.epoch + 1e-6))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            trainer = trainer_ref["trainer"]
            if self.trace_handle is not None:
                record = {"step": state.global_step, "rank": args.process_index}
                record["ids"] = [row_ids[index] for index in trainer.step_rows]
                self.trace_handle.write(json.dumps(record) + "\n")
                self.trace_handle.flush()
            trainer.step_rows = []

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            now = time.perf_counter()
            tokens = int(state.num_input_tokens_seen)
            rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
            self.last_time, self.last_tokens = now, tokens
            grad_norm = logs.get("grad_norm")
            log(
                f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                f"lr {logs.get('learning_rate', 0.0):.3e} "
                f"grad_norm {grad_norm if grad_norm is None else f'{grad_norm:.3f}'} "
                f"tokens/s {rate:.0f}"
            )

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.finished_at = time.perf_counter()
            self.end_tokens = int(state.num_input_tokens_seen)
            if self.trace_handle is not None:
                self.trace_handle.close()
                self.trace_handle = None

    return ProgressCallback()


def _longest_row(path: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return int(pc.max(pq.read_table(path, columns=["num_tokens"]).column("num_tokens")).as_py() or 0)


def train_lora(
    *,
    base_model_dir: Path,
    train_path: Path,
    eval_path: Path | None,
    output_dir: Path,
    config: TrainingConfig,
    callbacks: Sequence[Any] = (),
    checkpoints: CheckpointStore | None = None,
    log: Callable[[str], None] = print,
    sample_trace_path: Path | None = None,
) -> TrainResult:
    """Fine-tune a LoRA (or QLoRA) adapter on a tokenized split; resume from `checkpoints` if it has one.

    `checkpoints=None` keeps them in `output_dir/checkpoints` (so re-running the same call resumes).
    `callbacks` are extra `TrainerCallback`s (e.g. MLflow tracking). `sample_trace_path` (optional)
    appends one JSON line per optimizer step with the ids of the rows it trained on.
    """
    from transformers import AutoTokenizer, TrainingArguments, set_seed

    base_model_dir, output_dir = Path(base_model_dir), Path(output_dir)
    if not (base_model_dir / "config.json").is_file():
        raise FileNotFoundError(f"base model directory has no config.json: {base_model_dir}")
    device_type = _device_type()
    config.check_runtime(device_type)
    precision = config.resolve_precision(device_type)
    output_dir.mkdir(parents=True, exist_ok=True)
    store: CheckpointStore = checkpoints or LocalCheckpointStore(output_dir / "checkpoints")

    if config.max_seq_len is None:
        # Called without the tokenized manifest (CLI, tests): the data is already truncated, its
        # longest row is the limit it was built with (or shorter).
        config = config.with_max_seq_len(max(2, _longest_row(Path(train_path))), source=str(train_path))
    train_split = TokenizedSplit(Path(train_path), config.max_seq_len)
    if len(train_split) == 0:
        raise ValueError(f"train split {train_path} has no usable rows: {train_split.stats.to_dict()}")
    eval_split = TokenizedSplit(Path(eval_path), config.max_seq_len) if eval_path is not None else None
    if eval_split is not None and len(eval_split) == 0:
        log(f"eval split {eval_path} has no usable rows; skipping evaluation")
        eval_split = None
    data_stats = {"train": train_split.stats.to_dict()}
    if eval_split is not None:
        data_stats["eval"] = eval_split.stats.to_dict()

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir)) if _has_tokenizer(base_model_dir) else None
    if config.packing:
        collator: PackedCollator | PaddedCollator = PackedCollator()
    else:
        from transformers import AutoConfig

        pad_token_id = AutoConfig.from_pretrained(str(base_model_dir)).pad_token_id
        collator = PaddedCollator(tokenizer, pad_token_id=pad_token_id)

    args = TrainingArguments(
        output_dir=str(output_dir / TRAINER_DIRNAME),
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        optim=config.optim,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if (config.eval_steps and eval_split is not None) else "no",
        eval_steps=config.eval_steps,
        prediction_loss_only=True,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,  # keep row_index; the collators only emit model inputs besides it
        include_num_input_tokens_seen="all" if config.packing else "non_padding",
        dataloader_num_workers=config.dataloader_num_workers,
        ddp_find_unused_parameters=False,
        use_cache=False,
        use_liger_kernel=config.use_liger_kernel,
        torch_compile=config.torch_compile,
        torch_compile_backend=config.torch_compile_backend if config.torch_compile else None,
        # makes accelerate pick DDP over gloo when several CPU processes are launched (torchrun)
        use_cpu=device_type == "cpu",
        dataloader_pin_memory=device_type == "cuda",
    )
    set_seed(config.seed)  # LoRA weights are initialised from the global RNG
    model = load_lora_model(base_model_dir, config, device_type, local_rank=max(args.local_rank, 0))
    num_trainable, num_total = model.get_nb_trainable_parameters()

    trainer_ref: dict[str, Any] = {}
    progress = _make_progress_callback(log, trainer_ref, sample_trace_path, train_split.ids)
    trainer_class = _make_trainer_class()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=as_torch_dataset(train_split),
        eval_dataset=as_torch_dataset(eval_split) if eval_split is not None else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[progress, make_checkpoint_callback(store, log), *callbacks],
        token_budget=config.token_budget,
        cost="sum" if config.packing else "padded",
        window_batches=config.shuffle_window_batches,
    )
    trainer_ref["trainer"] = trainer
    is_main = trainer.is_world_process_zero()

    # One process per host fetches the newest checkpoint (from storage) first; the others then find it in
    # the local cache, so ranks never download into the same folder at once.
    with args.main_process_first(local=True, desc="fetch the latest checkpoint"):
        resume_dir = store.latest()
    if resume_dir is not None and finished_checkpoint(resume_dir, config.max_steps):
        # Resuming the last step of a finished run would train zero steps and pass the old weights off
        # as a new result; the caller reuses finished results, so this one starts over (same seed).
        log(
            f"{resume_dir.name} ends a finished run: not resuming into a zero-step run, training from the start"
        )
        resume_dir = None
    resumed_from_step = checkpoint_step(resume_dir) if resume_dir is not None else None
    if is_main:
        log(
            f"training: {len(train_split)} rows, {train_split.stats.tokens} tokens, device {device_type}, "
            f"precision {precision}, world size {args.world_size}, packing {config.packing}, "
            f"qlora {config.qlora}, trainable params {num_trainable:,} / {num_total:,}"
            + (f", resuming from step {resumed_from_step} ({resume_dir})" if resume_dir else "")
        )
    output = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir is not None else None)

    eval_loss: float | None = None
    if eval_split is not None:
        eval_loss = float(trainer.evaluate()["eval_loss"])
        if is_main:
            log(f"eval loss {eval_loss:.4f}")

    adapter_dir = output_dir / ADAPTER_DIRNAME
    save_adapter(trainer, adapter_dir, is_main=is_main, device_type=device_type)
    if is_main and tokenizer is not None:
        tokenizer.save_pretrained(str(adapter_dir))
    trainer.accelerator.wait_for_everyone()

    runtime = max(progress.finished_at - progress.started_at, 1e-9)
    session_tokens = progress.end_tokens - progress.start_tokens
    history = [
        (int(entry["step"]), float(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry
    ]
    result = TrainResult(
        global_step=int(output.global_step),
        train_loss=float(output.training_loss),
        eval_loss=eval_loss,
        loss_history=history,
        tokens_per_second=session_tokens / runtime,
        train_runtime_s=float(output.metrics.get("train_runtime", runtime)),
        num_trainable_params=int(num_trainable),
        num_total_params=int(num_total),
        resumed_from_step=resumed_from_step,
        adapter_dir=str(adapter_dir),
        world_size=int(args.world_size),
        num_train_tokens=int(progress.end_tokens),
        precision=precision,
        device=device_type,
        data_stats=data_stats,
    )
    if is_main:
        (output_dir / RESULT_FILENAME).write_text(json.dumps(result.to_dict(), indent=2))
        log(
            f"trained {result.global_step} steps, loss {result.train_loss:.4f}, "
            f"{result.tokens_per_second:.0f} tokens/s; adapter at {adapter_dir}"
        )
    return result
