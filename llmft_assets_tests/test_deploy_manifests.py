"""deploy/ parses and means what it says, checked without Kubernetes, Docker, Helm or Terraform.

* every Kubernetes manifest deserializes into the kubernetes client's API models, and serializes
  back to exactly the same document (a misspelled or misplaced field is dropped by the model and
  fails the comparison);
* the Helm values use the keys the official Dagster chart reads, and the run launcher's defaults and
  the GPU overlay go through dagster-k8s's own job construction;
* Terraform parses (python-hcl2) and has versioning, encryption, lifecycle and scoped IAM;
* the compose stack is wired together and takes every secret from the environment.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import kubernetes
import pytest
import yaml
from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

from llmft_assets.defs.k8s_tags import GPU_RESOURCE_NAME, gpu_run_tags

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S_DIR = DEPLOY / "k8s"
HELM_DIR = DEPLOY / "helm"
TERRAFORM_DIR = DEPLOY / "terraform"
COMPOSE_DIR = DEPLOY / "compose"

# ------------------------------------------------------------------------------------------- helpers


class _RecordedResponse:
    """What ApiClient.deserialize reads: a response whose .data is the JSON body."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.data = json.dumps(document)


def _model_name(document: dict[str, Any]) -> str:
    version = document["apiVersion"].split("/")[-1]
    return f"{version[0].upper()}{version[1:]}{document['kind']}"


def _to_model(document: dict[str, Any]) -> Any:
    api = kubernetes.client.ApiClient()
    model_name = _model_name(document)
    assert hasattr(kubernetes.client, model_name), f"no kubernetes model {model_name}"
    return api.deserialize(_RecordedResponse(document), model_name)


def _round_trip(document: dict[str, Any]) -> dict[str, Any]:
    return kubernetes.client.ApiClient().sanitize_for_serialization(_to_model(document))


def _manifest_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield f"{path.name}:{document['kind']}/{document['metadata']['name']}", document


MANIFESTS = dict(_manifest_documents())


def _load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _secret_keys() -> dict[str, set[str]]:
    return {
        document["metadata"]["name"]: set(document.get("stringData", {}))
        for document in yaml.safe_load_all((K8S_DIR / "secrets.template.yaml").read_text())
    }


# --------------------------------------------------------------------------------------- manifests


def test_manifest_set_is_complete() -> None:
    kinds = {(name.split(":")[0], doc["kind"]) for name, doc in MANIFESTS.items()}
    for expected in [
        ("bento.yaml", "Deployment"),
        ("bento.yaml", "Service"),
        ("bento.yaml", "HorizontalPodAutoscaler"),
        ("bento-gpu.yaml", "Deployment"),
        ("bento-gpu.yaml", "HorizontalPodAutoscaler"),
        ("mlflow.yaml", "Deployment"),
        ("mlflow.yaml", "Service"),
        ("secrets.template.yaml", "Secret"),
        ("dagster-gpu-pool-job.yaml", "Job"),
    ]:
        assert expected in kinds, expected


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_deserializes_into_kubernetes_models_without_loss(name: str) -> None:
    document = MANIFESTS[name]
    assert _round_trip(document) == document


def test_kustomization_lists_existing_manifests() -> None:
    kustomization = _load_yaml(K8S_DIR / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S_DIR / resource).is_file(), resource
    # Secrets are created by the operator from a secret store, never applied from the repo.
    assert "secrets.template.yaml" not in kustomization["resources"]


def test_secret_templates_hold_no_values() -> None:
    secrets = [doc for doc in MANIFESTS.values() if doc["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        assert "data" not in secret
        assert all(value == "" for value in secret["stringData"].values()), secret["metadata"]["name"]


def test_workloads_read_only_declared_secrets_and_service_accounts() -> None:
    secret_keys = _secret_keys()
    service_accounts = {
        doc["metadata"]["name"] for doc in MANIFESTS.values() if doc["kind"] == "ServiceAccount"
    } | {"llmft-dagster"}  # created by the Dagster chart (serviceAccount.name)
    for name, document in MANIFESTS.items():
        if document["kind"] not in {"Deployment", "Job"}:
            continue
        pod = _to_model(document).spec.template.spec
        assert pod.service_account_name in service_accounts, name
        for container in [*pod.containers, *(pod.init_containers or [])]:
            for source in container.env_from or []:
                assert source.secret_ref.name in secret_keys, (name, source.secret_ref.name)
            for env in container.env or []:
                if env.value_from and env.value_from.secret_key_ref:
                    ref = env.value_from.secret_key_ref
                    assert ref.key in secret_keys[ref.name], (name, ref.name, ref.key)
                # Nothing that looks like a credential is written inline.
                assert not re.search(r"(PASSWORD|SECRET|API_KEY|TOKEN)", env.name) or env.value is None, name


def test_bento_deployment_service_and_hpa_fit_together() -> None:
    for file_name in ("bento.yaml", "bento-gpu.yaml"):
        docs = {
            doc["kind"]: _to_model(doc) for key, doc in MANIFESTS.items() if key.startswith(f"{file_name}:")
        }
        deployment, service, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
        pod_labels = deployment.spec.template.metadata.labels
        assert deployment.spec.selector.match_labels.items() <= pod_labels.items()
        assert service.spec.selector.items() <= pod_labels.items()
        container = deployment.spec.template.spec.containers[0]
        port_names = {port.name for port in container.ports}
        assert {port.target_port for port in service.spec.ports} <= port_names
        assert hpa.spec.scale_target_ref.kind == "Deployment"
        assert hpa.spec.scale_target_ref.name == deployment.metadata.name
        assert 1 <= hpa.spec.min_replicas < hpa.spec.max_replicas
        assert container.readiness_probe.http_get.path == "/readyz"
        assert container.liveness_probe.http_get.path == "/livez"
        assert container.resources.requests["memory"] == container.resources.limits["memory"]

    gpu_pod = _to_model(MANIFESTS["bento-gpu.yaml:Deployment/llmft-bento"]).spec.template.spec
    assert gpu_pod.containers[0].resources.limits[GPU_RESOURCE_NAME] == "1"
    assert gpu_pod.node_selector
    assert any(t.key == GPU_RESOURCE_NAME for t in gpu_pod.tolerations)
    cpu_pod = _to_model(MANIFESTS["bento.yaml:Deployment/llmft-bento"]).spec.template.spec
    assert GPU_RESOURCE_NAME not in (cpu_pod.containers[0].resources.limits or {})


def test_mlflow_server_uses_postgres_secret_and_s3_artifacts() -> None:
    deployment = _to_model(MANIFESTS["mlflow.yaml:Deployment/mlflow"])
    container = deployment.spec.template.spec.containers[0]
    env = {item.name: item.value for item in container.env}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert [source.secret_ref.name for source in container.env_from] == ["llmft-mlflow"]
    assert "MLFLOW_BACKEND_STORE_URI" in _secret_keys()["llmft-mlflow"]
    assert "--serve-artifacts" in container.args
    [migrate] = deployment.spec.template.spec.init_containers
    assert "mlflow db upgrade" in " ".join(migrate.command)


# ---------------------------------------------------------------------------------------- helm


HELM_VALUES = _load_yaml(HELM_DIR / "values.yaml")
HELM_GPU_VALUES = _load_yaml(HELM_DIR / "values-gpu.yaml")

# Keys of the chart's K8sRunLauncherConfig schema (helm/dagster/schema/.../run_launcher.py).
K8S_RUN_LAUNCHER_REQUIRED = {
    "imagePullPolicy",
    "loadInclusterConfig",
    "envConfigMaps",
    "envSecrets",
    "envVars",
    "volumeMounts",
    "volumes",
}
K8S_RUN_LAUNCHER_OPTIONAL = {
    "image",
    "jobNamespace",
    "kubeconfigFile",
    "labels",
    "failPodOnRunFailure",
    "resources",
    "schedulerName",
    "securityContext",
    "runK8sConfig",
}
RUN_K8S_CONFIG_KEYS = {
    "containerConfig",
    "podSpecConfig",
    "podTemplateSpecMetadata",
    "jobSpecConfig",
    "jobMetadata",
}


def test_helm_values_configure_the_official_chart() -> None:
    values = HELM_VALUES
    user_deployments = values["dagster-user-deployments"]
    assert user_deployments["enabled"] is True
    [deployment] = user_deployments["deployments"]
    assert deployment["codeServerArgs"] == ["-m", "llmft_assets.definitions"]
    assert isinstance(deployment["port"], int)
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    assert {"repository", "tag", "pullPolicy"} <= deployment["image"].keys()

    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert launcher.keys() >= K8S_RUN_LAUNCHER_REQUIRED
    assert launcher.keys() <= K8S_RUN_LAUNCHER_REQUIRED | K8S_RUN_LAUNCHER_OPTIONAL
    assert launcher["runK8sConfig"].keys() <= RUN_K8S_CONFIG_KEYS

    postgres = values["postgresql"]
    assert postgres["enabled"] is False and postgres["postgresqlHost"]
    assert postgres["postgresqlScheme"] == "postgresql+psycopg2"
    assert postgres["postgresqlPassword"] == ""
    assert values["generatePostgresqlPasswordSecret"] is False
    assert "postgresql-password" in _secret_keys()[values["global"]["postgresqlSecretName"]]

    log_manager = values["computeLogManager"]
    assert log_manager["type"] == "S3ComputeLogManager"
    assert log_manager["config"]["s3ComputeLogManager"]["bucket"]

    daemon = values["dagsterDaemon"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert daemon["runMonitoring"]["enabled"] is True
    assert daemon["runMonitoring"]["startTimeoutSeconds"] > 0
    assert daemon["runRetries"]["enabled"] is True and daemon["runRetries"]["maxRetries"] >= 1

    concurrency = values["concurrency"]
    assert concurrency["enabled"] is True
    assert concurrency["pools"].keys() <= {"defaultLimit", "granularity", "opGranularityRunBuffer"}
    assert concurrency["pools"]["granularity"] in {"run", "op"}
    # The chart refuses maxConcurrentRuns in both places.
    queued = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert not ("maxConcurrentRuns" in queued and "maxConcurrentRuns" in concurrency.get("runs", {}))


def test_helm_values_reference_declared_secrets() -> None:
    secret_names = set(_secret_keys())
    references = [
        *HELM_VALUES["dagsterWebserver"]["envSecrets"],
        *HELM_VALUES["dagsterDaemon"]["envSecrets"],
        *HELM_VALUES["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"],
        *HELM_VALUES["dagster-user-deployments"]["deployments"][0]["envSecrets"],
    ]
    assert references
    assert {reference["name"] for reference in references} <= secret_names


def test_run_launcher_defaults_build_a_valid_run_job() -> None:
    run_k8s_config = HELM_VALUES["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    # The chart hands runK8sConfig to K8sRunLauncher(run_k8s_config=...) with snake_case top-level keys.
    user_config = UserDefinedDagsterK8sConfig.from_dict(
        {re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower(): value for key, value in run_k8s_config.items()}
    )
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(
            job_image="registry.example.com/llmft-code:1", dagster_home="/opt/dagster/dagster_home"
        ),
        args=["dagster", "api", "execute_run"],
        job_name="dagster-run-test",
        user_defined_k8s_config=user_config,
    )
    assert job.spec.backoff_limit == 0
    resources = job.spec.template.spec.containers[0].resources
    assert resources.requests["cpu"] == "1"
    assert resources.limits["memory"] == "8Gi"


def test_gpu_overlay_env_drives_the_training_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    [base] = HELM_VALUES["dagster-user-deployments"]["deployments"]
    [gpu] = HELM_GPU_VALUES["dagster-user-deployments"]["deployments"]
    # Helm replaces lists: the overlay must repeat the base deployment, env included.
    assert {k: v for k, v in gpu.items() if k != "env"} == {k: v for k, v in base.items() if k != "env"}
    base_env = {item["name"]: item["value"] for item in base["env"]}
    gpu_env = {item["name"]: item["value"] for item in gpu["env"]}
    assert base_env.items() <= gpu_env.items()
    for item in gpu["env"]:
        kubernetes.client.ApiClient().deserialize(_RecordedResponse(item), "V1EnvVar")

    for name, value in gpu_env.items():
        monkeypatch.setenv(name, value)
    config = json.loads(gpu_run_tags()["dagster-k8s/config"])
    limits = config["container_config"]["resources"]["limits"]
    assert limits[GPU_RESOURCE_NAME] == gpu_env["LLMFT_GPU_COUNT"]
    assert config["container_config"]["image"] == gpu_env["LLMFT_TRAINING_IMAGE"]
    assert config["pod_spec_config"]["node_selector"] == json.loads(gpu_env["LLMFT_GPU_NODE_SELECTOR"])
    assert config["pod_spec_config"]["service_account_name"] == "llmft-train"
    # The training service account exists as a manifest.
    assert "serviceaccounts.yaml:ServiceAccount/llmft-train" in MANIFESTS


def test_dagster_yaml_matches_the_helm_instance_settings() -> None:
    instance = _load_yaml(DEPLOY / "dagster.yaml")
    daemon = HELM_VALUES["dagsterDaemon"]
    assert instance["run_monitoring"]["enabled"] is daemon["runMonitoring"]["enabled"] is True
    assert instance["run_retries"]["enabled"] is daemon["runRetries"]["enabled"] is True
    assert instance["compute_logs"]["class"] == HELM_VALUES["computeLogManager"]["type"]
    assert (
        instance["storage"]["postgres"]["postgres_db"]["scheme"]
        == HELM_VALUES["postgresql"]["postgresqlScheme"]
    )
    assert (
        instance["concurrency"]["pools"]["granularity"] == HELM_VALUES["concurrency"]["pools"]["granularity"]
    )
    # Every connection setting is an env reference, never a literal.
    for field, value in instance["storage"]["postgres"]["postgres_db"].items():
        if field != "scheme":
            assert set(value) == {"env"}, field


# ----------------------------------------------------------------------------------- terraform


def _unquote(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if isinstance(value, list):
        return [_unquote(item) for item in value]
    if isinstance(value, dict):
        return {_unquote(key): _unquote(item) for key, item in value.items() if key != "__is_block__"}
    return value


def _terraform_blocks(kind: str) -> dict[tuple[str, str], dict[str, Any]]:
    blocks: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(TERRAFORM_DIR.glob("*.tf")):
        with path.open() as handle:
            parsed = _unquote(hcl2.load(handle))
        for entry in parsed.get(kind, []):
            for type_name, by_name in entry.items():
                for name, body in by_name.items():
                    blocks[(type_name, name)] = body
    return blocks


TF_RESOURCES = _terraform_blocks("resource")
TF_DATA = _terraform_blocks("data")


def test_terraform_parses_and_declares_bucket_and_roles() -> None:
    assert ("aws_s3_bucket", "artifacts") in TF_RESOURCES
    assert ("aws_iam_role", "workload") in TF_RESOURCES
    with (TERRAFORM_DIR / "variables.tf").open() as handle:
        variables = {
            name: body for entry in _unquote(hcl2.load(handle))["variable"] for name, body in entry.items()
        }
    # Names that differ per installation have no default: terraform asks instead of guessing.
    for required in ("bucket_name", "eks_oidc_provider_arn", "eks_oidc_provider_url"):
        assert "default" not in variables[required], required
    # Every variable the configuration uses is declared.
    used = set()
    for path in TERRAFORM_DIR.glob("*.tf"):
        used |= set(re.findall(r"var\.([a-z_]+)", path.read_text()))
    assert used <= variables.keys(), used - variables.keys()


def test_bucket_is_versioned_encrypted_private_and_has_lifecycle() -> None:
    versioning = TF_RESOURCES[("aws_s3_bucket_versioning", "artifacts")]
    assert versioning["versioning_configuration"][0]["status"] == "Enabled"

    encryption = TF_RESOURCES[("aws_s3_bucket_server_side_encryption_configuration", "artifacts")]
    default = encryption["rule"][0]["apply_server_side_encryption_by_default"][0]
    assert default["sse_algorithm"] == "aws:kms"
    assert TF_RESOURCES[("aws_kms_key", "artifacts")]["enable_key_rotation"] is True

    public = TF_RESOURCES[("aws_s3_bucket_public_access_block", "artifacts")]
    assert all(
        public[flag] is True
        for flag in (
            "block_public_acls",
            "block_public_policy",
            "ignore_public_acls",
            "restrict_public_buckets",
        )
    )

    rules = TF_RESOURCES[("aws_s3_bucket_lifecycle_configuration", "artifacts")]["rule"]
    assert all(rule["status"] == "Enabled" for rule in rules)
    old_versions = [
        rule for rule in rules if "noncurrent_version_expiration" in rule and rule["filter"] == [{}]
    ]
    assert old_versions, "no bucket-wide rule expiring old artifact versions"
    assert any("abort_incomplete_multipart_upload" in rule for rule in rules)

    [bucket_policy] = TF_DATA[("aws_iam_policy_document", "bucket")]["statement"]
    assert bucket_policy["effect"] == "Deny"
    assert bucket_policy["condition"][0]["variable"] == "aws:SecureTransport"


ROLE_POLICIES = ("code_location", "training", "model_server", "mlflow")


@pytest.mark.parametrize("policy_name", ROLE_POLICIES)
def test_role_policies_are_scoped_to_the_bucket(policy_name: str) -> None:
    statements = TF_DATA[("aws_iam_policy_document", policy_name)]["statement"]
    assert statements
    for statement in statements:
        assert statement["effect"] == "Allow"
        actions = statement["actions"]
        assert "*" not in actions and "s3:*" not in actions, statement["sid"]
        assert all(action.startswith("s3:") and "*" not in action for action in actions), statement["sid"]
        assert statement["resources"], statement["sid"]
        for resource in statement["resources"]:
            assert resource != "*", statement["sid"]
            assert re.match(r"^\$\{local\.(bucket_arn|root_arn|logs_arn)\}", resource), resource
        if "s3:ListBucket" in actions:
            # Listing is limited to the workload's prefixes.
            [condition] = statement["condition"]
            assert condition["variable"] == "s3:prefix"
            assert all(prefix != "*" for prefix in condition["values"])
    kms = TF_DATA[("aws_iam_policy_document", "kms_use")]["statement"][0]
    assert kms["resources"] == ["${aws_kms_key.artifacts.arn}"]


def _writable_resources(policy_name: str) -> set[str]:
    statements = TF_DATA[("aws_iam_policy_document", policy_name)]["statement"]
    return {
        resource
        for statement in statements
        if {"s3:PutObject", "s3:DeleteObject"} & set(statement["actions"])
        for resource in statement["resources"]
    }


def test_each_role_writes_only_its_own_prefixes() -> None:
    assert _writable_resources("model_server") == {"${local.root_arn}/request_logs/*"}
    assert _writable_resources("training") == {
        "${local.root_arn}/assets/lora_adapter/*",
        "${local.root_arn}/checkpoints/*",
        "${local.logs_arn}/*",
    }
    assert _writable_resources("mlflow") == {"${local.root_arn}/mlflow/*"}
    # Published artifacts are immutable: only the trainer's checkpoints and MLflow may delete.
    for policy_name in ("code_location", "model_server"):
        statements = TF_DATA[("aws_iam_policy_document", policy_name)]["statement"]
        assert all("s3:DeleteObject" not in statement["actions"] for statement in statements)


def test_roles_trust_one_service_account_each() -> None:
    [statement] = TF_DATA[("aws_iam_policy_document", "assume")]["statement"]
    assert statement["actions"] == ["sts:AssumeRoleWithWebIdentity"]
    subjects = [c for c in statement["condition"] if c["variable"].endswith(":sub")]
    assert subjects[0]["test"] == "StringEquals"
    assert subjects[0]["values"] == ["system:serviceaccount:${var.namespace}:${each.value.service_account}"]


# -------------------------------------------------------------------------------------- compose


COMPOSE = _load_yaml(COMPOSE_DIR / "docker-compose.yml")


def test_compose_stack_has_every_service_wired() -> None:
    services = COMPOSE["services"]
    assert set(services) >= {
        "postgres",
        "minio",
        "minio-init",
        "mlflow",
        "dagster-code",
        "dagster-webserver",
        "dagster-daemon",
        "bento",
    }
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
        build = service.get("build")
        if build:
            assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), (name, source)
    workspace = _load_yaml(COMPOSE_DIR / "workspace.yaml")
    server = workspace["load_from"][0]["grpc_server"]
    assert server["host"] == "dagster-code"
    assert f"{server['port']}" in services["dagster-code"]["command"]


def test_compose_takes_every_secret_from_the_environment() -> None:
    secret_name = re.compile(r"(PASSWORD|SECRET|API_KEY|ROOT_USER)")
    checked = 0
    for service in COMPOSE["services"].values():
        for name, value in (service.get("environment") or {}).items():
            if secret_name.search(name):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), (name, value)
                checked += 1
    assert checked >= 6
    example = (COMPOSE_DIR / ".env.example").read_text()
    for line in example.splitlines():
        if secret_name.search(line.split("=")[0]):
            assert line.endswith("="), line


# ------------------------------------------------------------------------------------- dockerfiles


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.train-cuda", "Dockerfile.mlflow"])
def test_images_install_from_constraints_and_run_as_non_root(dockerfile: str) -> None:
    text = (DEPLOY / "docker" / dockerfile).read_text()
    assert "constraints" in text and re.search(r"pip install [^\n]*-c ", text)
    user_lines = [line for line in text.splitlines() if line.startswith("USER ")]
    assert user_lines and user_lines[-1] != "USER root"
    assert not re.search(r"^(ENV|ARG)\s+[^\n]*(PASSWORD|SECRET|ACCESS_KEY|API_KEY)", text, re.MULTILINE)
    assert (DEPLOY / "docker" / f"{dockerfile}.dockerignore").is_file()


# ------------------------------------------------------------------------------------- accelerate


@pytest.mark.parametrize(("config_name", "distributed_type"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_accelerate_configs_load(config_name: str, distributed_type: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    # from_yaml_file rejects unknown keys, so a misspelled option fails here.
    config = ClusterConfig.from_yaml_file(str(DEPLOY / "accelerate" / f"{config_name}.yaml"))
    assert config.distributed_type.value == distributed_type
    assert config.num_machines == 1 and config.use_cpu is False
    if config_name == "fsdp":
        # LoRA mixes frozen and trainable parameters inside one wrapped module.
        assert config.fsdp_config["fsdp_use_orig_params"] is True
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"
