"""One typed settings object for every LLMFT_* variable: listed in .env.example, read at use time, and
the only place the code reads them from the environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmft_assets import settings
from llmft_assets.monitoring.retrain_policy import retrain_cooldown_s

REPO = Path(__file__).resolve().parent.parent
# Variables of the deployment files themselves (compose / k8s shell), not read by any Python code.
DEPLOY_ONLY = {"LLMFT_BUCKET", "LLMFT_BENTO_IMAGE", "LLMFT_BENTO_CUDA_IMAGE", "LLMFT_GPU_POOL_LIMIT"}
NAME = re.compile(r"\bLLMFT_[A-Z0-9]+(?:_[A-Z0-9]+)*\b(?!_)")
# A direct read: os.environ["X"], os.environ.get("X"), os.getenv("X"), env.get("X"), environ.get("X")...
DIRECT_READ = re.compile(r"""(?:environ|getenv|env)\s*(?:\.get\(|\[|\()\s*["'](LLMFT_[A-Z0-9_]+)""")
CODE_DIRS = ("llmft_assets", "bentos", "benchmarks", "scripts")


def _code_files() -> list[Path]:
    return sorted(path for folder in CODE_DIRS for path in (REPO / folder).rglob("*.py"))


def _doc_files() -> list[Path]:
    return [
        REPO / "README.md",
        REPO / "docs" / "architecture.md",
        REPO / "bentos" / "README.md",
        *_code_files(),
    ]


def test_env_example_lists_exactly_the_settings_variables() -> None:
    listed = re.findall(r"^(LLMFT_[A-Z0-9_]+)=", (REPO / ".env.example").read_text(), flags=re.M)
    assert len(listed) == len(set(listed)), "a variable is listed twice"
    assert set(listed) == set(settings.variable_names())


def test_code_reads_llmft_variables_only_through_settings() -> None:
    direct = {
        f"{path.relative_to(REPO)}: {name}"
        for path in _code_files()
        if path != REPO / "llmft_assets" / "settings.py"
        for name in DIRECT_READ.findall(path.read_text())
    }
    assert direct == set()


def test_every_documented_variable_is_a_setting() -> None:
    known = set(settings.variable_names()) | DEPLOY_ONLY
    unknown = {
        f"{path.relative_to(REPO)}: {name}"
        for path in _doc_files()
        for name in NAME.findall(path.read_text())
        if name not in known
    }
    assert unknown == set()


def test_the_scanners_catch_a_planted_direct_read_and_an_undocumented_name() -> None:
    planted = 'limit = int(os.environ.get("LLMFT_SECRET_KNOB", "3"))\nother = os.getenv("LLMFT_X")'
    assert DIRECT_READ.findall(planted) == ["LLMFT_SECRET_KNOB", "LLMFT_X"]
    assert NAME.findall("set `LLMFT_BASE_MODEL` or LLMFT_GPU_* variables") == ["LLMFT_BASE_MODEL"]


def test_settings_are_read_at_use_time_and_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMFT_RETRAIN_COOLDOWN_HOURS", "2")
    assert retrain_cooldown_s() == 7200
    monkeypatch.setenv("LLMFT_RETRAIN_COOLDOWN_HOURS", "")  # empty = unset = the default
    assert retrain_cooldown_s() == 24 * 3600
    monkeypatch.setenv("LLMFT_RETRAIN_COOLDOWN_HOURS", "-1")
    with pytest.raises(settings.SettingsError, match="LLMFT_RETRAIN_COOLDOWN_HOURS='-1'"):
        retrain_cooldown_s()
    monkeypatch.setenv("LLMFT_RETRAIN_COOLDOWN_HOURS", "soon")
    with pytest.raises(settings.SettingsError, match="LLMFT_RETRAIN_COOLDOWN_HOURS='soon'"):
        settings.get()
    # An explicit mapping (the model server's start-up check) is read the same way.
    values = settings.get({"LLMFT_MAX_TOKENS": "7", "LLMFT_LOG_PROMPTS": "yes", "UNRELATED": "x"})
    assert values.max_tokens == 7 and values.log_prompts is True and values.max_prompt_tokens == 4096


def test_secrets_do_not_show_in_the_settings_repr() -> None:
    values = settings.get({"LLMFT_API_KEY": "sk-very-secret", "LLMFT_ALERT_WEBHOOK_URL": "https://hooks/x"})
    assert "sk-very-secret" not in repr(values) and "hooks" not in repr(values)
    assert values.api_key is not None and values.api_key.get_secret_value() == "sk-very-secret"
