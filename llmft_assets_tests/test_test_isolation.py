"""Tests leave the user's home alone: the session's stores are temporary, and a session that writes
into the checkout's `.llmft/` fails loudly (shown on a planted write in a child pytest)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmft_assets import settings
from llmft_assets_tests.conftest import CHECKOUT_HOME_NAME, tree_digest

CONFTEST = Path(__file__).with_name("conftest.py")


def test_tree_digest_sees_every_kind_of_change(tmp_path: Path) -> None:
    root = tmp_path / "home"
    assert tree_digest(root) == "absent"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f.bin").write_bytes(b"one")
    first = tree_digest(root)
    assert tree_digest(root) == first
    (root / "a" / "f.bin").write_bytes(b"two")
    changed = tree_digest(root)
    (root / "a" / "empty").mkdir()
    added_dir = tree_digest(root)
    assert len({first, changed, added_dir}) == 3
    (root / "a" / "empty").rmdir()
    assert tree_digest(root) == changed


def test_session_stores_are_outside_the_checkout(pytestconfig: pytest.Config) -> None:
    checkout_home = (pytestconfig.rootpath / CHECKOUT_HOME_NAME).resolve()
    for variable in ("LLMFT_HOME", "DAGSTER_HOME", "BENTOML_HOME"):
        path = Path(os.environ[variable]).resolve()
        assert path.is_dir() and not path.is_relative_to(checkout_home), variable
    assert "MLFLOW_TRACKING_URI" not in os.environ and "LLMFT_STORAGE" not in os.environ
    assert not Path(settings.storage_root()).is_relative_to(checkout_home)
    # A child process (dagster, bentoml, accelerate) inherits them, and BentoML's store follows.
    probe = (
        "import os; from bentoml._internal.configuration.containers import BentoMLContainer as C; "
        "print(C.bentoml_home.get()); print(os.environ['DAGSTER_HOME'])"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    bentoml_home, dagster_home = out.split()
    assert Path(bentoml_home).resolve() == Path(os.environ["BENTOML_HOME"]).resolve()
    assert not Path(dagster_home).resolve().is_relative_to(checkout_home)


def _child_session(tmp_path: Path, test_body: str) -> subprocess.CompletedProcess[str]:
    project = tmp_path / "checkout"
    (project / CHECKOUT_HOME_NAME / "storage").mkdir(parents=True)
    (project / CHECKOUT_HOME_NAME / "storage" / "LATEST.json").write_text('{"version": "demo"}')
    shutil.copy(CONFTEST, project / "conftest.py")
    (project / "test_child.py").write_text(
        f"from pathlib import Path\n\ndef test_it():\n    home = Path(__file__).parent / '.llmft'\n    {test_body}\n"
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(project),
            str(project),
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_a_session_that_writes_into_the_checkout_home_fails_loudly(tmp_path: Path) -> None:
    clean = _child_session(tmp_path / "clean", "assert (home / 'storage' / 'LATEST.json').exists()")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    dirty = _child_session(
        tmp_path / "dirty", "(home / 'storage' / 'LATEST.json').write_text('{\"version\": \"test\"}')"
    )
    assert dirty.returncode == 1, dirty.stdout + dirty.stderr
    assert "1 passed" in dirty.stdout  # the test itself passed: the session check failed it
    assert "The test session changed the checkout's" in dirty.stdout
