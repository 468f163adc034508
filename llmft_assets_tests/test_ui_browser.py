"""The Dagster UI in a real headless browser, as a person uses it.

`dagster dev` runs on loopback with its own DAGSTER_HOME and LLMFT_HOME; Playwright drives Debian's
Chromium (Playwright's own browser download needs the internet; `scripts/ensure_chromium.sh`, run by
`make test`, installs the system one). The test opens the data group's asset graph, opens `raw_dataset`
(never materialized on a fresh instance), presses "Materialize", waits for the run to succeed and checks
that the materialization's metadata renders in the page with exactly the values the instance recorded.
The server's process group is stopped at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmft_assets_tests.servers import LOOPBACK, free_port, start_process

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ASSETS = ["raw_dataset", "cleaned_dataset", "validated_dataset", "tokenized_dataset", "dataset_splits"]
RUN_TIMEOUT_S = 300.0

LATEST_MATERIALIZATION = """
query Latest($path: [String!]!) { assetOrError(assetKey: {path: $path}) { __typename
  ... on Asset { assetMaterializations(limit: 1) { runId metadataEntries { label __typename
    ... on IntMetadataEntry { intValue } ... on TextMetadataEntry { text } } } } } }
"""
RUN_STATUS = """
query Run($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { status } } }
"""


def chromium_executable() -> str | None:
    for candidate in (os.environ.get("LLMFT_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")


def graphql(url: str, query: str, **variables: Any) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = json.loads(response.read())
    assert not payload.get("errors"), payload["errors"]
    return payload["data"]


@pytest.fixture
def dagster_ui(tmp_path: Path) -> Iterator[str]:
    llmft_home, dagster_home = tmp_path / "llmft_home", tmp_path / "dagster_home"
    llmft_home.mkdir()
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"LLMFT_STORAGE", "MLFLOW_TRACKING_URI", "LLMFT_ALERT_WEBHOOK_URL", "AWS_ENDPOINT_URL"}
    }
    env.update({"LLMFT_HOME": str(llmft_home), "DAGSTER_HOME": str(dagster_home), "PYTHONUNBUFFERED": "1"})
    port = free_port()
    dagster = str(Path(sys.executable).parent / "dagster")
    server = start_process(
        [dagster, "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-h", LOOPBACK, "-p", str(port)],
        f"http://{LOOPBACK}:{port}/server_info",
        timeout=240,
        env=env,
        cwd=REPO_ROOT,
        log_path=tmp_path / "dagster-dev.log",
    )
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.stop(grace_seconds=20)


def _dismiss_welcome_dialog(page: Any) -> None:
    """A fresh instance greets the first visitor with 'Join the Dagster community'; a person presses Skip."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.click(timeout=8_000)
    except Exception:  # no dialog this time: nothing to dismiss
        return


def _latest_materialization(base_url: str, asset: str) -> dict[str, Any] | None:
    data = graphql(f"{base_url}/graphql", LATEST_MATERIALIZATION, path=[asset])["assetOrError"]
    materializations = data.get("assetMaterializations") or []
    return materializations[0] if materializations else None


def test_materialize_from_the_ui_and_read_its_metadata(dagster_ui: str, tmp_path: Path) -> None:
    executable = chromium_executable()
    if executable is None:
        pytest.skip(
            "no Chromium found (scripts/ensure_chromium.sh installs Debian's; LLMFT_CHROMIUM names one)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            # The asset graph of the data group: every data asset is a node.
            page.goto(f"{dagster_ui}/locations/llmft/asset-groups/data", wait_until="networkidle")
            _dismiss_welcome_dialog(page)
            for asset in DATA_ASSETS:
                page.get_by_text(asset, exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "asset-graph.png"))

            # raw_dataset has never run on this instance; a person presses Materialize.
            page.goto(f"{dagster_ui}/assets/raw_dataset", wait_until="networkidle")
            _dismiss_welcome_dialog(page)
            page.get_by_text("Never materialized").first.wait_for(timeout=30_000)
            assert _latest_materialization(dagster_ui, "raw_dataset") is None
            page.locator("button", has_text="Materialize").first.click()

            deadline = time.monotonic() + RUN_TIMEOUT_S
            materialization = None
            while materialization is None and time.monotonic() < deadline:
                time.sleep(3)
                materialization = _latest_materialization(dagster_ui, "raw_dataset")
            assert materialization is not None, "no materialization of raw_dataset after pressing Materialize"
            run = graphql(f"{dagster_ui}/graphql", RUN_STATUS, runId=materialization["runId"])["runOrError"]
            while run.get("status") in {"QUEUED", "STARTING", "STARTED"} and time.monotonic() < deadline:
                time.sleep(2)
                run = graphql(f"{dagster_ui}/graphql", RUN_STATUS, runId=materialization["runId"])[
                    "runOrError"
                ]
            assert run == {"__typename": "Run", "status": "SUCCESS"}

            recorded = {entry["label"]: entry for entry in materialization["metadataEntries"]}
            rows_in, rows_out = recorded["rows_in"]["intValue"], recorded["rows_out"]["intValue"]
            assert rows_in > 0 and rows_out > 0

            # The page shows the new materialization's metadata table with the recorded values.
            page.reload(wait_until="networkidle")
            rows_out_row = page.locator("tr", has_text="rows_out").first
            rows_out_row.wait_for(timeout=60_000)
            assert str(rows_out) in rows_out_row.inner_text()
            assert str(rows_in) in page.locator("tr", has_text="rows_in").first.inner_text()
            assert "sample" in page.locator("tr", has_text="source").first.inner_text()
            # Markdown metadata is rendered, not shown as source: bold numbers, no '**' left.
            balance = page.locator("tr", has_text="counts_balance").first.inner_text()
            assert f"{rows_in} in = {rows_out} out" in " ".join(balance.split())
            assert "**" not in balance
            assert page.get_by_text("Never materialized").count() == 0
            page.screenshot(path=str(tmp_path / "raw_dataset.png"), full_page=True)
        finally:
            browser.close()
