"""Every run config in configs/ validates against the Definitions for the selection its own command names,
the way `dagster asset materialize -c` resolves it (no model is downloaded)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import dagster as dg
import pytest

from llmft_assets.definitions import defs

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))
README = Path(__file__).resolve().parents[1] / "README.md"
DATA_CHAIN = ["raw_dataset", "cleaned_dataset", "validated_dataset", "tokenized_dataset", "dataset_splits"]
FINETUNE = "group:data,group:model,group:training,group:evaluation"


def _command(path: Path) -> list[str]:
    """The `dagster asset materialize` command written in the file's header comment."""
    match = re.search(r"^#\s+(dagster asset materialize .*)$", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} names no `dagster asset materialize` command"
    return shlex.split(match.group(1))


def _validate(select: str, config_paths: list[str]) -> dict:
    """What the CLI does before launching: the implicit asset job for the selection, then the run config."""
    from dagster._cli.workspace.cli_target import get_run_config_from_cli_opts

    run_config = get_run_config_from_cli_opts(tuple(config_paths), None)
    repository = defs.get_repository_def()
    keys = dg.AssetSelection.from_coercible(select.split(",")).resolve(repository.asset_graph)
    job = repository.get_implicit_job_def_for_assets(keys)
    assert job is not None
    # The commands name no --partition: a partitioned asset in the selection would fail the run.
    partitioned = sorted(k.to_user_string() for k in keys if repository.asset_graph.get(k).is_partitioned)
    if partitioned:
        raise ValueError(f"the selection {select!r} holds partitioned assets {partitioned}: name a partition")
    # Dagster ignores config for an op it does not run (a misspelt asset name too): refuse it here.
    selected = {key.to_user_string() for key in keys}
    unknown = sorted(set(run_config.get("ops", {})) - selected)
    if unknown:
        raise ValueError(f"config for assets outside the selection {select!r}: {unknown}")
    return dg.validate_run_config(job.get_subset(asset_selection=keys), run_config)


def test_there_are_configs_for_cpu_one_gpu_and_many_gpus() -> None:
    assert [path.name for path in CONFIG_FILES] == [
        "qwen2.5-0.5b-lora-cpu.yaml",
        "qwen2.5-72b-qlora-8gpu.yaml",
        "qwen2.5-7b-qlora-1gpu.yaml",
    ]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.name)
def test_config_validates_for_its_command(path: Path) -> None:
    from llmft_assets.defs.training.assets import LoraAdapterConfig

    command = _command(path)
    assert command[:6] == ["dagster", "asset", "materialize", "-m", "llmft_assets.definitions", "--select"]
    select = command[6]
    config_path = command[command.index("-c") + 1]
    assert config_path == f"configs/{path.name}"
    validated = _validate(select, [str(CONFIG_DIR.parent / config_path)])
    ops = validated["ops"]
    assert {"raw_dataset", "base_model", "lora_adapter", "eval_report"} <= set(ops)
    # The fine-tune path: the unpartitioned data chain, the base model, the adapter and its evaluation.
    repository = defs.get_repository_def()
    keys = dg.AssetSelection.from_coercible(select.split(",")).resolve(repository.asset_graph)
    assert sorted(k.to_user_string() for k in keys) == sorted(
        [*DATA_CHAIN, "base_model", "lora_adapter", "eval_report"]
    )
    assert ops["base_model"]["config"]["model"].startswith("Qwen/Qwen2.5-")
    # The training hyper-parameters also pass the training config's own rules (ranges, QLoRA precision).
    LoraAdapterConfig(**ops["lora_adapter"]["config"]).to_domain(asset="lora_adapter")
    assert path.name in README.read_text(), f"README does not point to {path.name}"


def test_a_selection_with_partitioned_assets_is_refused() -> None:
    # "*eval_report" reaches the daily drift report and the shard partitions through lineage edges.
    with pytest.raises(
        ValueError, match=r"holds partitioned assets \['drift_report', 'shard_cleaned_dataset'"
    ):
        _validate("*eval_report", [str(CONFIG_DIR / "qwen2.5-7b-qlora-1gpu.yaml")])


def test_a_wrong_field_or_value_is_refused(tmp_path: Path) -> None:
    source = (CONFIG_DIR / "qwen2.5-7b-qlora-1gpu.yaml").read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(source.replace("lora_r: 16", "lora_rank: 16"))
    with pytest.raises(dg.DagsterInvalidConfigError, match="lora_rank"):
        _validate(FINETUNE, [str(typo)])
    wrong_type = tmp_path / "wrong_type.yaml"
    wrong_type.write_text(source.replace("qlora: true", "qlora: maybe"))
    with pytest.raises(dg.DagsterInvalidConfigError, match="qlora"):
        _validate(FINETUNE, [str(wrong_type)])
    # A misspelt asset name, or config for assets the command does not select, is refused by our guard.
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text(source.replace("  lora_adapter:", "  lora_adaptor:"))
    with pytest.raises(ValueError, match=r"outside the selection '.*': \['lora_adaptor'\]"):
        _validate(FINETUNE, [str(misspelt)])
    with pytest.raises(ValueError, match="outside the selection 'raw_dataset'"):
        _validate("raw_dataset", [str(CONFIG_DIR / "qwen2.5-7b-qlora-1gpu.yaml")])


def test_every_ops_example_in_the_readme_validates(tmp_path: Path) -> None:
    import yaml

    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL)
    examples = [block for block in blocks if "ops" in (yaml.safe_load(block) or {})]
    assert len(examples) >= 3
    for index, block in enumerate(examples):
        path = tmp_path / f"readme_{index}.yaml"
        path.write_text(block)
        _validate(f"{FINETUNE},group:retraining,merged_model", [str(path)])
