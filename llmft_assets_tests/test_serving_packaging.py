"""Packaging for model_bento: the BentoML model store entry (merged or base+adapter) and the bento."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmft_assets.serving.packaging import labels_to_strings, resolve_model_layout

REPO_ROOT = Path(__file__).resolve().parents[1]

LABELS = {
    "model_version": "7",
    "mlflow_run_id": "0123abcd",
    "storage_uri": "s3://bucket/llmft/assets/lora_adapter/v7",
    "license": "CC-BY-NC-SA-4.0",
    "bill_of_materials": {"base_model": "tiny-qwen2", "dataset_version": "d1", "seed": 0},
}

# Runs in a child process: BENTOML_HOME is read when bentoml is first imported, and the test
# session must not touch the user's store.
PACKAGING_SCRIPT = r"""
import json, sys
import bentoml
from llmft_assets.serving.packaging import build_bento, save_model_to_bentoml

model_dir, adapter_dir, build = sys.argv[1], sys.argv[2], sys.argv[3] == "build"
labels = json.loads(sys.argv[4])
merged = save_model_to_bentoml(model_dir, adapter_dir, name="llmft-chat", labels=labels, merge=True)
split = save_model_to_bentoml(model_dir, adapter_dir, name="llmft-chat-split", labels=labels, merge=False)
result = {"merged": merged, "split": split}
for key, tag in (("merged", merged), ("split", split)):
    stored = bentoml.models.get(tag)
    result[key + "_path"] = stored.path
    result[key + "_labels"] = dict(stored.info.labels)
if build:
    bento_tag = build_bento("bentos", model_tag=merged)
    bento = bentoml.get(bento_tag)
    result["bento"] = bento_tag
    result["bento_models"] = [str(m.tag) for m in bento.info.all_models]
    result["bento_args"] = dict(bento.info.args)
    result["bento_labels"] = dict(bento.info.labels)
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmft_assets.modeling.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("packaging")
    model_dir = build_tiny_model(root / "base", pretrain_steps=0)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    # init_lora_weights=False: a non-zero adapter, so merging visibly changes the weights.
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter_dir = root / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    (adapter_dir / "bill_of_materials.json").write_text(json.dumps(LABELS["bill_of_materials"]))
    return model_dir, adapter_dir


def run_packaging(tmp_path: Path, model_dir: Path, adapter_dir: Path, *, build: bool) -> dict:
    env = dict(os.environ)
    env["BENTOML_HOME"] = str(tmp_path / "bentoml")
    env["BENTOML_DO_NOT_TRACK"] = "True"
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            PACKAGING_SCRIPT,
            str(model_dir),
            str(adapter_dir),
            "build" if build else "no",
            json.dumps(LABELS),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def logits_of(model_dir: Path, adapter_dir: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.inference_mode():
        return model.eval()(torch.tensor([[5, 17, 42, 99, 7]])).logits


def check_store_entries(result: dict, model_dir: Path, adapter_dir: Path) -> None:
    import torch

    assert result["merged"].startswith("llmft-chat:")
    for key in ("merged_labels", "split_labels"):
        labels = result[key]
        assert labels["model_version"] == "7" and labels["license"] == "CC-BY-NC-SA-4.0"
        assert json.loads(labels["bill_of_materials"]) == LABELS["bill_of_materials"]

    merged_layout = resolve_model_layout(result["merged_path"])
    assert merged_layout.layout == "merged" and merged_layout.adapter_dir is None
    assert (
        json.loads((Path(result["merged_path"]) / "bill_of_materials.json").read_text())
        == LABELS["bill_of_materials"]
    )
    expected = logits_of(model_dir, adapter_dir)
    assert not torch.allclose(expected, logits_of(model_dir), atol=1e-4), "adapter should change the model"
    assert torch.allclose(logits_of(merged_layout.model_dir), expected, atol=1e-4)

    split_layout = resolve_model_layout(result["split_path"])
    assert split_layout.layout == "base+adapter" and split_layout.adapter_dir is not None
    assert torch.allclose(logits_of(split_layout.model_dir, split_layout.adapter_dir), expected, atol=1e-5)
    # Only safetensors/json went in: nothing that unpickles.
    assert not list(Path(result["split_path"]).rglob("*.bin"))


@pytest.fixture(scope="module")
def packaged(
    tmp_path_factory: pytest.TempPathFactory, model_and_adapter: tuple[Path, Path]
) -> tuple[Path, dict]:
    # One child process saves both layouts and builds the bento: bentoml's import is the slow part.
    home = tmp_path_factory.mktemp("bento-home")
    model_dir, adapter_dir = model_and_adapter
    return home, run_packaging(home, model_dir, adapter_dir, build=True)


@pytest.mark.slow
def test_save_model_merged_and_split(
    packaged: tuple[Path, dict], model_and_adapter: tuple[Path, Path]
) -> None:
    model_dir, adapter_dir = model_and_adapter
    check_store_entries(packaged[1], model_dir, adapter_dir)


@pytest.mark.slow
def test_build_bento_pins_the_model(packaged: tuple[Path, dict]) -> None:
    tmp_path, result = packaged
    assert result["bento"].startswith("llmft-chat:")
    assert result["bento_models"] == [result["merged"]]
    assert result["bento_args"] == {"model_tag": result["merged"]}
    assert result["bento_labels"]["model_version"] == "7" and result["bento_labels"]["project"] == "llmft"
    bento_dir = tmp_path / "bentoml" / "bentos" / "llmft-chat" / result["bento"].split(":")[1]
    assert (bento_dir / "src" / "bentos" / "service.py").is_file()
    assert (bento_dir / "src" / "llmft_assets" / "serving" / "engine.py").is_file()


def test_labels_to_strings_and_layout_errors(tmp_path: Path) -> None:
    assert labels_to_strings({"a": 1, "b": None, "c": {"x": [1]}, "d": "s", "e": True}) == {
        "a": "1",
        "b": "",
        "c": '{"x":[1]}',
        "d": "s",
        "e": "true",
    }
    with pytest.raises(ValueError, match="characters"):
        labels_to_strings({"huge": "x" * 5000})
    with pytest.raises(FileNotFoundError):
        resolve_model_layout(tmp_path)
    (tmp_path / "llmft_model.json").write_text('{"layout": "mystery"}')
    with pytest.raises(ValueError, match="unknown layout"):
        resolve_model_layout(tmp_path)


@pytest.mark.slow
def test_built_bento_serves_its_model(packaged: tuple[Path, dict], tmp_path: Path) -> None:
    """`bentoml serve <bento>` (what `make serve` runs on the champion) answers with the packed model."""
    import openai

    from llmft_assets.serving.request_log import read_request_logs
    from llmft_assets.storage import open_storage
    from llmft_assets_tests.servers import LOOPBACK, free_port, start_bentoml_serve

    home, result = packaged
    port = free_port()
    env = dict(os.environ)
    env.pop("LLMFT_MODEL_DIR", None)
    env.update(
        {
            "BENTOML_HOME": str(home / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "True",
            "LLMFT_STORAGE": str(tmp_path / "storage"),
            "LLMFT_API_KEY": "bento-key",
            "LLMFT_REQUEST_LOG_FLUSH_S": "0.3",
        }
    )
    server = start_bentoml_serve(
        port,
        env=env,
        cwd=tmp_path,
        log_path=tmp_path / "server.log",
        target=result["bento"],
        timeout=180,
    )
    try:
        api = openai.OpenAI(base_url=f"http://{LOOPBACK}:{port}/v1", api_key="bento-key", max_retries=0)
        assert [m.id for m in api.models.list().data] == ["llmft-chat"]
        answer = api.chat.completions.create(
            model="llmft-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        )
        assert answer.usage.completion_tokens > 0
    finally:
        server.stop()  # SIGTERM: the shutdown flush writes the request log
    logged = read_request_logs(open_storage(str(tmp_path / "storage"))).to_pylist()
    assert [(r["request_id"], r["model_version"]) for r in logged] == [(answer.id, "7")]
