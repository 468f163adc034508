"""`merged_model` through Dagster: refuses without a champion or on other base weights, else publishes the
merged folder that AutoModelForCausalLM loads with logits equal to base + adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from llmft_assets.definitions import build_resources
from llmft_assets.defs.data.assets import base_model
from llmft_assets.defs.mlflow_resource import MlflowResource
from llmft_assets.defs.serving.export import merged_model
from llmft_assets.storage import open_storage
from llmft_assets.storage.publish import fetch_artifact, latest_version, publish_directory

pytestmark = pytest.mark.slow

EVAL = {"accuracy": 0.625, "format_compliance": 0.5, "finished_rate": 0.875, "perplexity": 3.25}
GATE = {
    "passed": True,
    "champion": None,
    "reasons": ["promoted"],
    "criteria": [
        {"name": "accuracy_vs_base", "value": 0.25, "threshold": 0.05, "comparator": "<=", "verdict": "pass"}
    ],
}


def _materialize(selection: Any, run_config: dict | None = None) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [base_model, merged_model],
        selection=selection,
        resources=build_resources(),
        run_config=run_config or {},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def _failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    return result.get_step_failure_events()[0].event_specific_data.error.message


def _publish_adapter(storage_root: Path, base_dir: Path, weights_sha: dict, work: Path) -> str:
    """A non-zero LoRA adapter for the stored base, published as a lora_adapter artifact; returns its version."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base_dir)),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    folder = work / f"adapter-{len(list(work.iterdir()))}"
    model.save_pretrained(str(folder / "adapter"))
    bom = {
        "base_model": {"model_id": "llmft/tiny-qwen2", "revision": "r1", "weights_sha256": weights_sha},
        "dataset": {"version": "d1", "license": "cc-by-nc-sa-4.0", "license_source": "per-source table"},
        "method": "lora",
        "seed": 1,
    }
    (folder / "adapter" / "bill_of_materials.json").write_text(json.dumps(bom))
    return publish_directory(open_storage(str(storage_root)), "assets/lora_adapter", folder).version


def _publish_eval_report(storage_root: Path, adapter_version: str, work: Path) -> None:
    folder = work / f"eval-{adapter_version}"
    folder.mkdir()
    base_metrics = {"accuracy": 0.375, "format_compliance": 0.25, "finished_rate": 0.5, "perplexity": 4.5}
    report = {"models": {"base": base_metrics, "adapter": EVAL}, "gate": GATE}
    (folder / "eval_report.json").write_text(json.dumps(report))
    publish_directory(
        open_storage(str(storage_root)),
        "assets/eval_report",
        folder,
        metadata={"adapter_version": adapter_version},
    )


def _make_champion(adapter_version: str) -> str:
    from llmft_assets.training import tracking

    mlflow = MlflowResource()
    run_id = mlflow.start_training_run("export-test", {"seed": 1})
    tracking.finish_run(run_id, "FINISHED", tracking_uri=mlflow.resolved_tracking_uri())
    version = mlflow.register_adapter_version(
        run_id, tags={"llmft.adapter_version": adapter_version, "llmft.eval": json.dumps(EVAL)}
    )
    mlflow.set_alias("champion", version)
    return str(version)


def test_merged_model_asset(llmft_home: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built = _materialize([base_model], {"ops": {"base_model": {"config": {"pretrain_steps": 0}}}})
    assert built.success
    storage_root = llmft_home / "storage"
    backend = open_storage(str(storage_root))
    base_artifact, base_dir = fetch_artifact(backend, "assets/base_model", llmft_home / "cache")
    weights_sha = base_artifact.metadata["model_info"]["weights_sha256"]
    work = tmp_path / "work"
    work.mkdir()

    # No champion yet: nothing to export.
    assert "no champion yet" in _failure(_materialize([merged_model]))

    # A champion trained on other base weights is refused, naming it.
    stale = _publish_adapter(storage_root, base_dir, {"model.safetensors": "0" * 64}, work)
    _make_champion(stale)
    assert f"champion {stale} was trained on other base weights" in _failure(_materialize([merged_model]))

    adapter_version = _publish_adapter(storage_root, base_dir, weights_sha, work)
    _publish_eval_report(storage_root, adapter_version, work)
    _publish_eval_report(storage_root, stale, work)  # another adapter's report: not the one on the card
    registered = _make_champion(adapter_version)
    # A commercial deployment may not take a model trained on non-commercial data.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMFT_LICENSE_POLICY", "commercial")
        refused = _failure(_materialize([merged_model]))
    assert (
        "licence policy: the dataset licence cc-by-nc-sa-4.0 (from per-source table) does not allow"
        in refused
    )
    result = _materialize([merged_model])
    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = {
        k: getattr(v, "value", v) for k, v in event.event_specific_data.materialization.metadata.items()
    }
    assert metadata["adapter_version"] == adapter_version
    assert metadata["mlflow_model_version"] == registered
    assert metadata["dtype"] == "float32"
    version = latest_version(backend, "assets/merged_model")
    assert metadata["version"] == version
    out = storage_root / "assets" / "merged_model" / version
    names = {path.name for path in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
    } <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    card = (out / "README.md").read_text()
    assert card.startswith('---\nlicense: "cc-by-nc-sa-4.0"\nbase_model: "llmft/tiny-qwen2"\n')
    assert "library_name: transformers" in card
    assert "- licence: cc-by-nc-sa-4.0 (from per-source table)" in card
    assert f"(MLflow llmft-adapter v{registered})" in card
    assert "| Verified accuracy (math-verify) | 37.5% | 62.5% |" in card  # base -> adapter, this report
    assert "Decision: **promoted**" in card and "| accuracy_vs_base | 0.25 | <= 0.05 | pass |" in card
    # No path of the build machine inside the exported files.
    for path in out.iterdir():
        if (
            path.suffix in {".json", ".md", ".jinja", ".txt"} and path.name != "_MANIFEST.json"
        ):  # storage's own
            assert str(tmp_path) not in path.read_text(), path.name

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 6 * 7?"}], tokenize=False, add_generation_prompt=True
    )
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    adapter_dir = storage_root / "assets" / "lora_adapter" / adapter_version / "adapter"
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(str(out))(input_ids=input_ids).logits
        reference = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir)
        )
        expected = reference(input_ids=input_ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(str(base_dir))(input_ids=input_ids).logits
    assert torch.allclose(merged_logits, expected, atol=1e-4)
    assert (expected - base_logits).abs().max().item() > 0.1  # the adapter changes the model
