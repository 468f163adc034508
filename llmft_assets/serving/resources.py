"""The model server's resource declaration for `@bentoml.service(resources=...)`.

Read from the environment when the service module is imported, which happens both when a bento is built
(the declaration is stored in the bento) and when it is served: the CUDA bento sets LLMFT_SERVE_GPUS in its
image (bentos/bentofile-gpu.yaml) and is built with the same value, the CPU bento declares no GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ENV_SERVE_GPUS = "LLMFT_SERVE_GPUS"  # GPUs per server replica (0: CPU server, the default)
ENV_SERVE_GPU_TYPE = "LLMFT_SERVE_GPU_TYPE"  # optional BentoML gpu_type, e.g. nvidia-h100-80gb


def service_resources(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`{"gpu": n[, "gpu_type": t]}` for a GPU server, `{}` for a CPU one; ValueError names the variable."""
    from llmft_assets import settings

    values = settings.get(environ)  # types and ranges live there; a bad value names the variable
    gpus = values.serve_gpus
    if gpus == 0:
        return {}
    resources: dict[str, Any] = {"gpu": gpus}
    gpu_type = (values.serve_gpu_type or "").strip()
    if gpu_type:
        resources["gpu_type"] = gpu_type
    return resources
