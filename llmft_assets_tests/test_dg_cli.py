"""The `dg` CLI (pinned with the Dagster family) sees the project: `dg check defs` loads the one code location
and `dg list defs` lists its assets, as a person would run them from the repository root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llmft_assets_tests.test_defs_layout import ASSET_KEYS

REPO_ROOT = Path(__file__).resolve().parents[1]


def _dg(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir(exist_ok=True)
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "NO_COLOR": "1"}
    return subprocess.run(
        [str(Path(sys.executable).parent / "dg"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        env=env,
    )


def test_dg_check_defs(tmp_path: Path) -> None:
    completed = _dg("check", "defs", tmp_path=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "All definitions loaded successfully" in completed.stdout + completed.stderr


def test_dg_list_defs_names_every_asset(tmp_path: Path) -> None:
    completed = _dg("list", "defs", "--json", tmp_path=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    listed = json.loads(completed.stdout)
    keys = {asset["asset_key"] for asset in listed["assets"]}
    assert keys >= ASSET_KEYS, sorted(ASSET_KEYS - keys)
