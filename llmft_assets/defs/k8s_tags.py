"""Kubernetes placement for the training job: the ``dagster-k8s/config`` tag dagster-k8s reads.

Two places read the same tag shape (dagster issue 22865):

* ``gpu_run_tags()`` goes on the *job* (``define_asset_job(..., tags=gpu_run_tags())``). The
  ``K8sRunLauncher`` applies it to the run pod, which is where training runs when the job uses the
  in-process or multiprocess executor.
* ``gpu_op_tags()`` goes on the *asset* (``@asset(op_tags=gpu_op_tags())``). The ``k8s_job_executor``
  applies it to that asset's step pod; it never reads job tags for step pods, so with that executor
  the job itself should stay on a CPU run pod.

Values are JSON strings, which both run tags and op tags accept. Defaults come from environment
variables (`llmft_assets.settings`, where their defaults live) read when the code location loads, so
the Helm values decide where training lands:

=============================  ==========================================================  ===================
variable                       meaning                                                     default
=============================  ==========================================================  ===================
LLMFT_GPU_COUNT                GPUs per training pod (``nvidia.com/gpu`` limit)            ``1``
LLMFT_GPU_NODE_SELECTOR        JSON object, the pod's nodeSelector                          GPU feature label
LLMFT_GPU_TOLERATIONS          JSON list of tolerations                                    ``nvidia.com/gpu``
LLMFT_GPU_CPU_REQUEST          CPU request of the training container                       ``4``
LLMFT_GPU_MEMORY_REQUEST       memory request (and limit) of the training container        ``32Gi``
LLMFT_GPU_SHM_SIZE             size of the in-memory /dev/shm (NCCL, dataloader workers)   ``8Gi``
LLMFT_TRAINING_IMAGE           CUDA image for the training pod; unset: code location image  unset
LLMFT_TRAINING_SERVICE_ACCOUNT service account of the training pod (its own IAM role)      unset
=============================  ==========================================================  ===================

No Dagster import: this is plain data, unit-tested against dagster-k8s's own pod construction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from llmft_assets import settings

K8S_CONFIG_TAG = "dagster-k8s/config"  # dagster_k8s.job.USER_DEFINED_K8S_CONFIG_KEY
GPU_RESOURCE_NAME = "nvidia.com/gpu"
GPU_POOL = "gpu"  # the Dagster pool that limits how many trainings hold GPUs at once

# NVIDIA GPU feature discovery (GPU operator / device plugin) labels every GPU node with this.
DEFAULT_GPU_NODE_SELECTOR: dict[str, str] = {"nvidia.com/gpu.present": "true"}
# Managed GPU node pools (EKS, GKE, AKS) taint GPU nodes so that only pods asking for GPUs land there.
DEFAULT_GPU_TOLERATIONS: list[dict[str, str]] = [
    {"key": GPU_RESOURCE_NAME, "operator": "Exists", "effect": "NoSchedule"}
]

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds", "toleration_seconds"}
_SHM_VOLUME = "dshm"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def _quantity(name: str, value: str) -> str:
    text = str(value).strip()
    if not _QUANTITY.match(text):
        raise ValueError(f"{name} is not a Kubernetes quantity (e.g. '4', '500m', '32Gi'): {value!r}")
    return text


def _validated_node_selector(node_selector: Mapping[str, Any]) -> dict[str, str]:
    if not all(isinstance(key, str) and isinstance(value, str) for key, value in node_selector.items()):
        raise ValueError(f"node selector must map label names to string values, got {node_selector!r}")
    return dict(node_selector)


def _validated_tolerations(tolerations: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    checked: list[dict[str, Any]] = []
    for toleration in tolerations:
        if not isinstance(toleration, Mapping):
            raise ValueError(f"each toleration must be an object, got {toleration!r}")
        unknown = set(toleration) - _TOLERATION_KEYS
        if unknown:
            raise ValueError(f"unknown toleration fields {sorted(unknown)} in {dict(toleration)!r}")
        if toleration.get("operator", "Equal") not in {"Equal", "Exists"}:
            raise ValueError(f"toleration operator must be Equal or Exists: {dict(toleration)!r}")
        checked.append(dict(toleration))
    return checked


def gpu_k8s_config(
    *,
    gpus: int | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] | None = None,
    cpu_request: str | None = None,
    memory_request: str | None = None,
    shm_size: str | None = None,
    image: str | None = None,
    service_account: str | None = None,
) -> dict[str, Any]:
    """The user-defined k8s config (``container_config`` / ``pod_spec_config``) of a GPU training pod.

    Arguments left as ``None`` take their value from the environment (see the module docstring).
    Memory request and limit are equal so that the kubelet never evicts a training pod for
    overcommitted memory; CPU has no limit so that tokenization and data loading can burst.
    """
    env = settings.get()  # LLMFT_GPU_*, LLMFT_TRAINING_*: the defaults of every argument left as None
    if gpus is None:
        gpus = env.gpu_count
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")

    if node_selector is None:
        node_selector = (
            env.gpu_node_selector if env.gpu_node_selector is not None else DEFAULT_GPU_NODE_SELECTOR
        )
    if tolerations is None:
        tolerations = env.gpu_tolerations if env.gpu_tolerations is not None else DEFAULT_GPU_TOLERATIONS
    cpu = _quantity("cpu_request", cpu_request or env.gpu_cpu_request)
    memory = _quantity("memory_request", memory_request or env.gpu_memory_request)
    shm = _quantity("shm_size", shm_size or env.gpu_shm_size)
    image = image or env.training_image or None
    service_account = service_account or env.training_service_account or None
    if service_account is not None and not _DNS_LABEL.match(service_account):
        raise ValueError(f"service account must be a Kubernetes name, got {service_account!r}")

    gpu_count = str(gpus)
    container_config: dict[str, Any] = {
        "resources": {
            # Extended resources must be in limits; a request, if given, must equal the limit.
            "requests": {"cpu": cpu, "memory": memory, GPU_RESOURCE_NAME: gpu_count},
            "limits": {"memory": memory, GPU_RESOURCE_NAME: gpu_count},
        },
        # The default 64 MiB /dev/shm breaks NCCL and multi-worker data loading.
        "volume_mounts": [{"name": _SHM_VOLUME, "mount_path": "/dev/shm"}],
    }
    if image:
        container_config["image"] = image
    pod_spec_config: dict[str, Any] = {
        "node_selector": _validated_node_selector(node_selector),
        "tolerations": _validated_tolerations(tolerations),
        "volumes": [{"name": _SHM_VOLUME, "empty_dir": {"medium": "Memory", "size_limit": shm}}],
    }
    if service_account:
        pod_spec_config["service_account_name"] = service_account
    return {"container_config": container_config, "pod_spec_config": pod_spec_config}


def gpu_run_tags(**placement: Any) -> dict[str, str]:
    """Job tags that put a run's pod (K8sRunLauncher) on a GPU node; arguments as `gpu_k8s_config`."""
    return {K8S_CONFIG_TAG: json.dumps(gpu_k8s_config(**placement), sort_keys=True)}


def gpu_op_tags(**placement: Any) -> dict[str, str]:
    """Asset ``op_tags`` that put that asset's step pod (k8s_job_executor) on a GPU node.

    Same tag as ``gpu_run_tags``; the executor reads it from the step, not from the job (dagster
    issue 22865), so it must sit on the asset.
    """
    return gpu_run_tags(**placement)
