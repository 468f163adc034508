"""Command-line entry point for LoRA/QLoRA training, single process or under `accelerate launch`.

    python -m llmft_assets.training.cli --base-model DIR --train PATH [--eval PATH] --output DIR \
        --config JSON_FILE [--checkpoint-dir DIR] [--sample-trace PATH]
    accelerate launch --config_file deploy/accelerate/{ddp,fsdp}.yaml --num_processes N \
        -m llmft_assets.training.cli ...      (see training/launch.py; on CPU the ranks use gloo)

Rank 0 writes the adapter to `OUTPUT/adapter` and the result to `OUTPUT/train_result.json`; every
rank logs with a `[rank r/w]` prefix. Exit status 2 means bad input (config, paths, data).

Launched by Dagster through Pipes (the `lora_adapter` asset with `num_processes` > 1), rank 0 also reports
its log lines as Dagster log events and every logged training loss as a structured message
(`{"step": ..., "loss": ...}`); the other ranks print to the step's captured output only.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmft-train", description="Fine-tune a LoRA/QLoRA adapter.")
    parser.add_argument("--base-model", required=True, type=Path, help="save_pretrained base model dir")
    parser.add_argument("--train", required=True, type=Path, help="tokenized train split (Parquet)")
    parser.add_argument("--eval", type=Path, default=None, help="tokenized eval split (Parquet)")
    parser.add_argument("--output", required=True, type=Path, help="output dir (adapter, result, trainer)")
    parser.add_argument("--config", required=True, type=Path, help="TrainingConfig as a JSON file")
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="checkpoint store root (default OUTPUT/checkpoints)"
    )
    parser.add_argument(
        "--checkpoint-storage",
        default=None,
        help="publish checkpoints into this storage root (a path or s3://bucket/prefix; rank 0 publishes, "
        "resume fetches from it); needs --checkpoint-prefix",
    )
    parser.add_argument("--checkpoint-prefix", default=None, help="key prefix of this run's checkpoints")
    parser.add_argument("--cache-dir", type=Path, default=None, help="local cache for fetched checkpoints")
    parser.add_argument(
        "--sample-trace", type=Path, default=None, help="append the row ids of every step to this JSONL file"
    )
    parser.add_argument(
        "--mlflow-run-id",
        default=None,
        help="log per-step metrics into this open MLflow run (MLFLOW_TRACKING_URI or the embedded store)",
    )
    return parser.parse_args(argv)


def _checkpoint_store(args: argparse.Namespace) -> object | None:
    from llmft_assets.training.checkpoints import LocalCheckpointStore

    if args.checkpoint_storage:
        if not args.checkpoint_prefix:
            raise ValueError("--checkpoint-storage needs --checkpoint-prefix")
        from llmft_assets.storage import open_storage
        from llmft_assets.training.storage_checkpoints import StorageCheckpointStore

        cache = args.cache_dir or args.output / "checkpoint-cache"
        return StorageCheckpointStore(open_storage(args.checkpoint_storage), args.checkpoint_prefix, cache)
    return LocalCheckpointStore(args.checkpoint_dir) if args.checkpoint_dir is not None else None


def _open_pipes(rank: int, stack: ExitStack) -> Any:
    """The Dagster Pipes connection of rank 0 when Dagster launched this run through Pipes; else None
    (one writer per session: the other ranks never open it)."""
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    if rank != 0 or DAGSTER_PIPES_CONTEXT_ENV_VAR not in os.environ:
        return None
    return stack.enter_context(open_dagster_pipes())


def _pipes_loss_callback(pipes: Any) -> Any:
    """A transformers callback reporting each logged training loss over Pipes."""
    from transformers import TrainerCallback

    class PipesLossCallback(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any
        ) -> None:
            if logs and "loss" in logs:
                pipes.report_custom_message({"step": int(state.global_step), "loss": float(logs["loss"])})

    return PipesLossCallback()


def main(argv: Sequence[str] | None = None) -> int:
    with ExitStack() as stack:
        return _main(argv, stack)


def _main(argv: Sequence[str] | None, stack: ExitStack) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {rank}/{world_size}]"
    pipes = _open_pipes(rank, stack)

    def log(message: str) -> None:
        print(f"{prefix} {message}", flush=True)
        if pipes is not None:
            pipes.log.info(f"{prefix} {message}")

    from llmft_assets.training.config import TrainingConfig
    from llmft_assets.training.trainer import train_lora

    try:
        config = TrainingConfig.from_json_file(args.config)
        store = _checkpoint_store(args)
        callbacks = []
        if args.mlflow_run_id:
            from llmft_assets.training.tracking import MlflowTrainingCallback

            # The callback logs from the main process only, so every rank can carry it.
            callbacks.append(MlflowTrainingCallback(args.mlflow_run_id))
        if pipes is not None:
            callbacks.append(_pipes_loss_callback(pipes))
        result = train_lora(
            base_model_dir=args.base_model,
            train_path=args.train,
            eval_path=args.eval,
            output_dir=args.output,
            config=config,
            checkpoints=store,
            callbacks=callbacks,
            log=log,
            sample_trace_path=args.sample_trace,
        )
    except (ValueError, FileNotFoundError) as error:
        log(f"error: {error}")
        return EXIT_BAD_INPUT
    log(
        f"done: world size {result.world_size}, {result.global_step} steps, "
        f"train loss {result.train_loss:.4f}, resumed from step {result.resumed_from_step}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
