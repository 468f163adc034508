"""The `accelerate launch` command line of a multi-process training run. Pure: no Dagster, no torch.

`strategy` picks the accelerate config (`deploy/accelerate/ddp.yaml` or `fsdp.yaml`, or the folder
LLMFT_ACCELERATE_CONFIG_DIR names, as in the CUDA training image); the command line then overrides what
depends on this run: process count, mixed precision (from the training config), the rendezvous address.
Both configs start the ranks through torchrun, so on a machine without CUDA the same command runs the
ranks over gloo (accelerate 1.15's `--cpu --num_processes N` would silently start ONE process).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ENV_ACCELERATE_CONFIG_DIR = "LLMFT_ACCELERATE_CONFIG_DIR"
_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
TRAINING_MODULE = "llmft_assets.training.cli"


def accelerate_config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """LLMFT_ACCELERATE_CONFIG_DIR, else `deploy/accelerate` of the checkout this package runs from."""
    from llmft_assets import settings

    configured = (settings.get(environ).accelerate_config_dir or "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path(__file__).resolve().parents[2] / "deploy" / "accelerate"


def accelerate_config_file(strategy: str, config_dir: Path | None = None) -> Path:
    """The accelerate config of `strategy` ("ddp" or "fsdp"); FileNotFoundError names the path."""
    path = (config_dir or accelerate_config_dir()) / f"{strategy}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"accelerate config for strategy {strategy!r} not found at {path} (set {ENV_ACCELERATE_CONFIG_DIR})"
        )
    return path


def accelerate_launch_command(
    *,
    strategy: str,
    num_processes: int,
    precision: str,
    cli_args: Sequence[str],
    config_dir: Path | None = None,
    main_process_port: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """`python -m accelerate.commands.launch --config_file <strategy>.yaml ... -m llmft_assets.training.cli ARGS`."""
    if num_processes < 2:
        raise ValueError(f"num_processes: a launched run needs >= 2 processes, got {num_processes}")
    if precision not in _MIXED_PRECISION:
        raise ValueError(f"precision: expected one of {sorted(_MIXED_PRECISION)}, got {precision!r}")
    command = [
        python, "-m", "accelerate.commands.launch",
        "--config_file", str(accelerate_config_file(strategy, config_dir)),
        "--num_processes", str(num_processes),
        "--num_machines", "1",
        "--mixed_precision", _MIXED_PRECISION[precision],
        "--dynamo_backend", "no",  # torch.compile is the training config's `torch_compile`
    ]  # fmt: skip
    if main_process_port is not None:
        command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(main_process_port)]
    return [*command, "-m", TRAINING_MODULE, *cli_args]
