"""The model server's resource declaration for `@bentoml.service(resources=...)`.

Read from the environment when the service module is imported, which happens both when a bento is built
(the declaration is stored in the bento) and when it is served: the CUDA bento sets LLMFT_SERVE_GPUS in its
image (bentos/bentofile-gpu.yaml) and is built with the same value, the CPU bento declares no GPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

ENV_SERVE_GPUS = "LLMFT_SERVE_GPUS"  # GPUs per server replica (0: CPU server, the default)
ENV_SERVE_GPU_TYPE = "LLMFT_SERVE_GPU_TYPE"  # optional BentoML gpu_type, e.g. nvidia-h100-80gb


def service_resources(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`{"gpu": n[, "gpu_type": t]}` for a GPU server, `{}` for a CPU one; ValueError names the variable."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_SERVE_GPUS, "").strip() or "0"
    try:
        gpus = int(raw)
    except ValueError as error:
        raise ValueError(f"{ENV_SERVE_GPUS} must be a whole number of GPUs, got {raw!r}") from error
    if gpus < 0:
        raise ValueError(f"{ENV_SERVE_GPUS} must be >= 0, got {gpus}")
    if gpus == 0:
        return {}
    resources: dict[str, Any] = {"gpu": gpus}
    gpu_type = env.get(ENV_SERVE_GPU_TYPE, "").strip()
    if gpu_type:
        resources["gpu_type"] = gpu_type
    return resources
