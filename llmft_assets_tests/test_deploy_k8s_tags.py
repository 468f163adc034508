"""The GPU tags of train_job, fed through dagster-k8s's own run launcher and step handler.

No cluster: the Kubernetes batch API is a mock that records the Job body dagster-k8s would create,
and the assertions read the pod spec of that body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import kubernetes
import pytest
from dagster import AssetSelection, Definitions, JobDefinition, asset, define_asset_job
from dagster._config import process_config, resolve_to_config_type
from dagster._core.definitions.reconstruct import reconstructable
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
from dagster._core.execution.context_creation_job import create_context_free_log_manager
from dagster._core.executor.init import InitExecutorContext
from dagster._core.executor.step_delegating.step_handler.base import StepHandlerContext
from dagster._core.instance import DagsterInstance
from dagster._core.launcher import LaunchRunContext
from dagster._core.test_utils import create_run_for_test, instance_for_test
from dagster._grpc.types import ExecuteStepArgs
from dagster_k8s import K8sRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.executor import _K8S_EXECUTOR_CONFIG_SCHEMA, K8sStepHandler, k8s_job_executor
from dagster_k8s.job import USER_DEFINED_K8S_CONFIG_KEY, get_user_defined_k8s_config

from llmft_assets.defs.k8s_tags import (
    DEFAULT_GPU_NODE_SELECTOR,
    DEFAULT_GPU_TOLERATIONS,
    GPU_RESOURCE_NAME,
    K8S_CONFIG_TAG,
    gpu_k8s_config,
    gpu_op_tags,
    gpu_run_tags,
)

GPU_POOL_SELECTOR = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb", "pool": "train"}
GPU_POOL_TOLERATIONS = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"},
]
TRAINING_IMAGE = "registry.example.com/llmft-train-cuda:1.0.0"

MINIMAL_KUBECONFIG = """
apiVersion: v1
kind: Config
current-context: fake-context
contexts:
  - context:
      cluster: fake-cluster
    name: fake-context
clusters:
  - cluster: {}
    name: fake-cluster
"""


# The shapes the lead's definitions use: the job (run pod, K8sRunLauncher) carries gpu_run_tags;
# with k8s_job_executor the training asset carries gpu_op_tags instead.
@asset(
    op_tags=gpu_op_tags(gpus=2, node_selector=GPU_POOL_SELECTOR, tolerations=GPU_POOL_TOLERATIONS),
)
def gpu_training_step() -> int:
    return 1


training_defs = Definitions(
    assets=[gpu_training_step],
    jobs=[
        define_asset_job(
            "train_job_run_pod",
            selection=AssetSelection.assets(gpu_training_step),
            tags=gpu_run_tags(
                gpus=4,
                node_selector=GPU_POOL_SELECTOR,
                tolerations=GPU_POOL_TOLERATIONS,
                image=TRAINING_IMAGE,
                service_account="llmft-train",
            ),
        ),
        define_asset_job(
            "train_job_step_pods",
            selection=AssetSelection.assets(gpu_training_step),
            executor_def=k8s_job_executor,
        ),
    ],
)


def train_job_run_pod() -> JobDefinition:
    return training_defs.resolve_job_def("train_job_run_pod")


def train_job_step_pods() -> JobDefinition:
    return training_defs.resolve_job_def("train_job_step_pods")


@pytest.fixture
def kubeconfig_file(tmp_path: Path) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(MINIMAL_KUBECONFIG)
    return str(path)


def _launcher_config(kubeconfig_file: str) -> dict[str, Any]:
    return {
        "service_account_name": "llmft-dagster",
        "instance_config_map": "dagster-instance",
        "postgres_password_secret": "dagster-postgresql-secret",
        "dagster_home": "/opt/dagster/dagster_home",
        "job_image": "registry.example.com/llmft-code:1.0.0",
        "load_incluster_config": False,
        "kubeconfig_file": kubeconfig_file,
    }


@pytest.fixture
def k8s_instance(kubeconfig_file: str) -> Iterator[DagsterInstance]:
    launcher = {
        "module": "dagster_k8s",
        "class": "K8sRunLauncher",
        "config": _launcher_config(kubeconfig_file),
    }
    with instance_for_test(overrides={"run_launcher": launcher}) as instance:
        yield instance


def _pod_spec_from_created_job(batch_api: mock.MagicMock) -> kubernetes.client.V1PodSpec:
    calls = [call for call in batch_api.method_calls if call[0] == "create_namespaced_job"]
    assert len(calls) == 1, batch_api.method_calls
    job = calls[0].kwargs["body"]
    assert isinstance(job, kubernetes.client.V1Job)
    return job.spec.template.spec


def _assert_gpu_placement(
    pod_spec: kubernetes.client.V1PodSpec,
    *,
    gpus: int,
    node_selector: dict[str, str],
    tolerations: list[dict[str, Any]],
) -> None:
    container = pod_spec.containers[0]
    assert container.resources.limits[GPU_RESOURCE_NAME] == str(gpus)
    assert container.resources.requests[GPU_RESOURCE_NAME] == str(gpus)
    assert container.resources.limits["memory"] == container.resources.requests["memory"]
    assert pod_spec.node_selector == node_selector
    placed = [
        {"key": t.key, "operator": t.operator, "value": t.value, "effect": t.effect}
        for t in pod_spec.tolerations
    ]
    expected = [{"value": None, **t} for t in tolerations]
    assert placed == expected
    shm_volumes = [v for v in pod_spec.volumes if v.empty_dir is not None]
    assert [v.empty_dir.medium for v in shm_volumes] == ["Memory"]
    assert any(m.mount_path == "/dev/shm" for m in container.volume_mounts)


def test_run_pod_of_train_job_gets_gpu_node_selector_and_tolerations(
    k8s_instance: DagsterInstance, kubeconfig_file: str
) -> None:
    job_def = train_job_run_pod()
    assert K8S_CONFIG_TAG == USER_DEFINED_K8S_CONFIG_KEY
    batch_api = mock.MagicMock()  # no cluster: record the Job instead of creating it
    launcher = K8sRunLauncher(**_launcher_config(kubeconfig_file), k8s_client_batch_api=batch_api)
    launcher.register_instance(k8s_instance)

    run = create_run_for_test(
        k8s_instance,
        job_name=job_def.name,
        tags=job_def.tags,
        job_code_origin=reconstructable(train_job_run_pod).get_python_origin(),
    )
    launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))

    pod_spec = _pod_spec_from_created_job(batch_api)
    _assert_gpu_placement(pod_spec, gpus=4, node_selector=GPU_POOL_SELECTOR, tolerations=GPU_POOL_TOLERATIONS)
    assert pod_spec.containers[0].image == TRAINING_IMAGE
    assert pod_spec.service_account_name == "llmft-train"
    # The launcher's own wiring survives the merge: instance secret and DAGSTER_HOME.
    env_names = {env.name for env in pod_spec.containers[0].env}
    assert {"DAGSTER_HOME", "DAGSTER_PG_PASSWORD"} <= env_names


def _k8s_executor(instance: DagsterInstance, job: Any) -> Any:
    processed = process_config(resolve_to_config_type(_K8S_EXECUTOR_CONFIG_SCHEMA), {})
    assert processed.success, processed.errors
    return k8s_job_executor.executor_creation_fn(  # type: ignore[misc]
        InitExecutorContext(
            job=job, executor_def=k8s_job_executor, executor_config=processed.value, instance=instance
        )
    )


def test_step_pod_of_training_asset_gets_gpu_from_op_tags(
    k8s_instance: DagsterInstance, kubeconfig_file: str
) -> None:
    recon_job = reconstructable(train_job_step_pods)
    run = create_run_for_test(
        k8s_instance,
        job_name="train_job_step_pods",
        job_code_origin=recon_job.get_python_origin(),
    )
    execution_plan = create_execution_plan(recon_job)
    [step_key] = [step.key for step in execution_plan.steps]
    plan_context = PlanOrchestrationContext(
        plan_data=PlanData(
            job=recon_job, dagster_run=run, instance=k8s_instance, execution_plan=execution_plan
        ),
        log_manager=create_context_free_log_manager(k8s_instance, run),
        executor=_k8s_executor(k8s_instance, recon_job),
        output_capture=None,
    )
    step_context = StepHandlerContext(
        instance=k8s_instance,
        plan_context=plan_context,
        steps=execution_plan.steps,
        execute_step_args=ExecuteStepArgs(recon_job.get_python_origin(), run.run_id, [step_key]),
        dagster_run=run,
    )
    batch_api = mock.MagicMock()
    handler = K8sStepHandler(
        image="registry.example.com/llmft-code:1.0.0",
        container_context=K8sContainerContext(namespace="llmft"),
        load_incluster_config=False,
        kubeconfig_file=kubeconfig_file,
        k8s_client_batch_api=batch_api,
    )
    list(handler.launch_step(step_context))

    pod_spec = _pod_spec_from_created_job(batch_api)
    _assert_gpu_placement(pod_spec, gpus=2, node_selector=GPU_POOL_SELECTOR, tolerations=GPU_POOL_TOLERATIONS)


def test_defaults_come_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFT_GPU_COUNT", "8")
    monkeypatch.setenv(
        "LLMFT_GPU_NODE_SELECTOR", json.dumps({"node.kubernetes.io/instance-type": "p5.48xlarge"})
    )
    monkeypatch.setenv("LLMFT_GPU_TOLERATIONS", json.dumps([{"key": "gpu", "operator": "Exists"}]))
    monkeypatch.setenv("LLMFT_GPU_MEMORY_REQUEST", "900Gi")
    monkeypatch.setenv("LLMFT_TRAINING_IMAGE", TRAINING_IMAGE)

    user_config = get_user_defined_k8s_config(gpu_run_tags())

    resources = user_config.container_config["resources"]
    assert resources["limits"] == {"memory": "900Gi", GPU_RESOURCE_NAME: "8"}
    assert user_config.container_config["image"] == TRAINING_IMAGE
    assert user_config.pod_spec_config["node_selector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert user_config.pod_spec_config["tolerations"] == [{"key": "gpu", "operator": "Exists"}]


def test_builtin_defaults_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "LLMFT_GPU_COUNT",
        "LLMFT_GPU_NODE_SELECTOR",
        "LLMFT_GPU_TOLERATIONS",
        "LLMFT_TRAINING_IMAGE",
        "LLMFT_TRAINING_SERVICE_ACCOUNT",
    ):
        monkeypatch.delenv(name, raising=False)
    config = gpu_k8s_config()
    assert config["container_config"]["resources"]["limits"][GPU_RESOURCE_NAME] == "1"
    assert "image" not in config["container_config"]
    assert "service_account_name" not in config["pod_spec_config"]
    assert config["pod_spec_config"]["node_selector"] == DEFAULT_GPU_NODE_SELECTOR
    assert config["pod_spec_config"]["tolerations"] == DEFAULT_GPU_TOLERATIONS
    # op tags and run tags are one shape: dagster-k8s parses both the same way.
    assert gpu_op_tags() == gpu_run_tags()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LLMFT_GPU_COUNT": "two"}, "LLMFT_GPU_COUNT='two': Input should be a valid integer"),
        ({"LLMFT_GPU_COUNT": "0"}, "LLMFT_GPU_COUNT='0': Input should be greater than or equal to 1"),
        ({"LLMFT_GPU_NODE_SELECTOR": "{not json"}, "LLMFT_GPU_NODE_SELECTOR=.*not valid JSON"),
        ({"LLMFT_GPU_NODE_SELECTOR": '["a"]'}, "LLMFT_GPU_NODE_SELECTOR=.*valid dictionary"),
        ({"LLMFT_GPU_TOLERATIONS": '[{"key": "x", "operater": "Exists"}]'}, "unknown toleration fields"),
        ({"LLMFT_GPU_MEMORY_REQUEST": "lots"}, "not a Kubernetes quantity"),
        ({"LLMFT_TRAINING_SERVICE_ACCOUNT": "Train Job"}, "must be a Kubernetes name"),
    ],
)
def test_bad_settings_fail_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        gpu_run_tags()


def test_the_projects_train_job_lands_on_a_gpu_node(
    k8s_instance: DagsterInstance, kubeconfig_file: str
) -> None:
    """The real train_job (llmft_assets.defs.training.jobs) through the K8sRunLauncher, with its tags as defined."""
    from llmft_assets.defs.training import jobs

    tags = dict(jobs.train_job.tags or {})
    if K8S_CONFIG_TAG not in tags:
        pytest.skip("train_job runs its training step on k8s_job_executor (LLMFT_TRAIN_EXECUTOR=k8s)")
    batch_api = mock.MagicMock()
    launcher = K8sRunLauncher(**_launcher_config(kubeconfig_file), k8s_client_batch_api=batch_api)
    launcher.register_instance(k8s_instance)
    run = create_run_for_test(
        k8s_instance,
        job_name="train_job",
        tags={key: str(value) for key, value in tags.items()},
        job_code_origin=reconstructable(train_job_run_pod).get_python_origin(),
    )
    launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))

    pod_spec = _pod_spec_from_created_job(batch_api)
    expected = json.loads(tags[K8S_CONFIG_TAG])
    _assert_gpu_placement(
        pod_spec,
        gpus=int(expected["container_config"]["resources"]["limits"][GPU_RESOURCE_NAME]),
        node_selector=expected["pod_spec_config"]["node_selector"],
        tolerations=expected["pod_spec_config"]["tolerations"],
    )
