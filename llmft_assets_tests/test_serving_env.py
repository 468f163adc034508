"""The model server's own environment: pinned requirement sets that resolve, a bento without Dagster, and a
CUDA bento / GPU manifest that agree with each other.

The resolution tests ask the package registry this machine's pip uses (its `pip config`: index, extra
indexes, find-links) for metadata only (`uv pip compile --no-build`): no CUDA wheel is downloaded.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from llmft_assets.serving.resources import ENV_SERVE_GPUS, service_resources

REPO = Path(__file__).resolve().parents[1]
BENTOS = REPO / "bentos"
GPU_LOCK = BENTOS / "requirements-gpu.txt"
GPU_INPUT = BENTOS / "requirements-gpu.in"
CPU_SET = BENTOS / "requirements-cpu.txt"
GPU_MANIFEST = REPO / "deploy" / "k8s" / "bento-gpu.yaml"
GPU_RESOURCE = "nvidia.com/gpu"
# the oldest NVIDIA driver branch that runs each CUDA major's user-space libraries
MIN_DRIVER_FOR_CUDA = {12: 525, 13: 580}
# the GPU set runs in the bento's nvidia/cuda ubuntu24.04 image (glibc 2.39)
GPU_PLATFORM = "x86_64-manylinux_2_39"
CPU_PLATFORM = "x86_64-manylinux_2_28"
PYPI = "https://pypi.org/simple"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)\s*(?:==\s*(\S+))?", line)
        assert match, f"{path.name}: unexpected requirement line {line!r}"
        name = re.sub(r"\[.*\]", "", match.group(1)).lower().replace("_", "-")
        pins[name] = match.group(2) or ""
    return pins


def _pip_registry() -> list[str]:
    """uv arguments naming the registries this machine's pip uses (index, extra indexes, find-links)."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    ).stdout
    settings: dict[str, list[str]] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        for item in shlex.split(value.strip().strip("'\"")):
            if item not in settings.setdefault(option, []):
                settings[option].append(item)
    index = (settings.get("index-url") or [PYPI])[0]
    args = ["--index-url", index]
    for url in settings.get("extra-index-url", []):
        if not url.startswith("file://") or Path(url[len("file://") :]).is_dir():
            args += ["--extra-index-url", url]
    for location in settings.get("find-links", []):
        if "://" in location or Path(location).is_dir():
            args += ["--find-links", location]
    return args


def _require_registry(args: list[str], project: str) -> None:
    index = args[args.index("--index-url") + 1]
    if index.startswith("file://"):
        return
    try:
        urllib.request.urlopen(f"{index.rstrip('/')}/{project}/", timeout=20).close()
    except OSError as error:
        pytest.skip(f"package registry {index} cannot be reached from here ({error}); resolution not checked")


def _compile(requirements: Path, platform: str, tmp_path: Path) -> dict[str, str]:
    registry = _pip_registry()
    _require_registry(registry, "vllm")
    uv = Path(sys.executable).with_name("uv")
    out = tmp_path / f"{requirements.stem}.lock"
    command = [
        str(uv if uv.exists() else "uv"), "pip", "compile", str(requirements), "-o", str(out),
        "--python-platform", platform, "--python-version", "3.11",
        # pip's semantics: every index is searched and the best version wins (uv's default stops at the
        # first index that has the project)
        "--index-strategy", "unsafe-best-match",
        "--no-build",  # wheels only: metadata comes from the registry, nothing is built or downloaded
        "--no-header", "--no-annotate", "--no-config", *registry,
    ]  # fmt: skip
    env = {**os.environ, "UV_CACHE_DIR": str(tmp_path / "uv-cache")}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return _pins(out)


@pytest.mark.slow
def test_gpu_serving_lock_resolves_against_the_registry(tmp_path: Path) -> None:
    locked = _pins(GPU_LOCK)
    resolved = _compile(GPU_LOCK, GPU_PLATFORM, tmp_path)
    # a closed, consistent set: resolving the lock changes no pin and adds nothing
    assert resolved == locked


@pytest.mark.slow
def test_cpu_serving_set_resolves_against_the_registry(tmp_path: Path) -> None:
    wanted = _pins(CPU_SET)
    resolved = _compile(CPU_SET, CPU_PLATFORM, tmp_path)
    for name, version in wanted.items():
        # a local build tag (2.13.0+cpu from a find-links folder) satisfies ==2.13.0
        assert resolved[name].split("+")[0] == version, name
    assert not any(name.startswith("dagster") for name in resolved)


def test_gpu_lock_pins_its_inputs_and_no_training_stack() -> None:
    locked = _pins(GPU_LOCK)
    assert all(version for version in locked.values()), "every package of the lock is pinned"
    for name, version in _pins(GPU_INPUT).items():
        assert name in locked, name
        if version:
            assert locked[name] == version, name
    # vLLM's own torch / transformers, not the training venv's
    assert locked["vllm"] == "0.33.0"
    assert locked["torch"].startswith("2.14.")
    assert not any(name.startswith("dagster") for name in locked)
    assert not any(name.startswith("dagster") for name in _pins(CPU_SET))


def _cuda_major_of_lock() -> int:
    return int(_pins(GPU_LOCK)["nvidia-cuda-runtime"].split(".")[0])


def test_cuda_bento_and_gpu_manifest_agree() -> None:
    from bentoml._internal.bento.build_config import BentoBuildConfig

    bentofile = yaml.safe_load((BENTOS / "bentofile-gpu.yaml").read_text())
    with open(BENTOS / "bentofile-gpu.yaml") as stream:
        config = BentoBuildConfig.from_yaml(stream)  # validates the CUDA version against BentoML's list
    assert config.docker.cuda_version == bentofile["docker"]["cuda_version"] == "12.8.1"
    assert bentofile["python"]["requirements_txt"] == "./bentos/requirements-gpu.txt"
    envs = {item["name"]: item["value"] for item in bentofile["envs"]}
    assert service_resources(envs) == {"gpu": 1}

    deployment = next(
        doc for doc in yaml.safe_load_all(GPU_MANIFEST.read_text()) if doc and doc["kind"] == "Deployment"
    )
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"][GPU_RESOURCE] == envs[ENV_SERVE_GPUS]
    assert "cuda" in container["image"]
    # the lock's CUDA libraries need a driver that supports them: the pod must land on such a node
    [term] = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    [driver] = [e for e in term["matchExpressions"] if e["key"] == "nvidia.com/cuda.driver-version.major"]
    assert driver["operator"] == "Gt"
    assert int(driver["values"][0]) + 1 == MIN_DRIVER_FOR_CUDA[_cuda_major_of_lock()]

    cpu_bentofile = yaml.safe_load((BENTOS / "bentofile.yaml").read_text())
    assert cpu_bentofile["python"]["requirements_txt"] == "./bentos/requirements-cpu.txt"
    assert "cuda_version" not in cpu_bentofile.get("docker", {})
    assert service_resources({}) == {}


def _local_imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return {name for name in modules if name.split(".")[0] in {"llmft_assets", "bentos", "dagster"}}


def _module_file(module: str) -> Path:
    base = REPO / Path(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


@pytest.mark.parametrize("bentofile", ["bentofile.yaml", "bentofile-gpu.yaml"])
def test_bento_includes_every_module_the_service_imports(bentofile: str) -> None:
    """Follows every import (also those inside functions) from bentos/service.py through llmft_assets."""
    include = yaml.safe_load((BENTOS / bentofile).read_text())["include"]
    seen: set[Path] = set()
    pending = [BENTOS / "service.py"]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _local_imports(path):
            assert not module.startswith("dagster"), f"{path.relative_to(REPO)} imports {module}"
            parts = module.split(".")
            for depth in range(1, len(parts) + 1):  # a package's __init__ runs too
                candidate = _module_file(".".join(parts[:depth]))
                if candidate.is_file():
                    pending.append(candidate)
    files = sorted(str(path.relative_to(REPO)) for path in seen)
    assert "llmft_assets/serving/engine.py" in files and "llmft_assets/settings.py" in files
    missing = [name for name in files if not any(fnmatch.fnmatch(name, pattern) for pattern in include)]
    assert not missing, f"{bentofile} does not pack {missing}"


_NO_DAGSTER_IMPORT = r"""
import importlib.abc, json, sys

class NoDagster(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0].startswith("dagster"):
            raise ImportError(f"the model server must not import {name}")
        return None

sys.meta_path.insert(0, NoDagster())
import bentos.service as service
print(json.dumps(service.LLMChatService.config.get("resources") or {}))
"""


@pytest.mark.parametrize(("gpus", "expected"), [("1", {"gpu": 1}), ("0", {})])
def test_service_imports_without_dagster_and_declares_its_gpus(
    gpus: str, expected: dict, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        ENV_SERVE_GPUS: gpus,
        "LLMFT_MODEL_DIR": str(tmp_path),  # no model is loaded at import
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "LLMFT_HOME": str(tmp_path / "home"),
    }
    completed = subprocess.run(
        [sys.executable, "-c", _NO_DAGSTER_IMPORT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    import json

    assert json.loads(completed.stdout.strip().splitlines()[-1]) == expected


def test_service_resources_validation() -> None:
    assert service_resources({ENV_SERVE_GPUS: "2", "LLMFT_SERVE_GPU_TYPE": "nvidia-h100-80gb"}) == {
        "gpu": 2,
        "gpu_type": "nvidia-h100-80gb",
    }
    assert service_resources({ENV_SERVE_GPUS: " "}) == {}
    with pytest.raises(ValueError, match="LLMFT_SERVE_GPUS='one'"):
        service_resources({ENV_SERVE_GPUS: "one"})
    with pytest.raises(ValueError, match="LLMFT_SERVE_GPUS='-1'"):
        service_resources({ENV_SERVE_GPUS: "-1"})
