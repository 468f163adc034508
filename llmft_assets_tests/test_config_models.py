"""One home per parameter: the Dagster config classes are derived from the domain models field for field,
`max_seq_len` belongs to tokenized_dataset, and every README YAML example validates and takes effect."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from pydantic import Field

from llmft_assets.data.raw_sources import DataSourceError, _local_files
from llmft_assets.data.splits import SplitSettings
from llmft_assets.data.validation import ValidationLimits
from llmft_assets.definitions import defs
from llmft_assets.defs.config_models import dagster_config, domain_fields
from llmft_assets.defs.data.assets import (
    BaseModelConfig,
    RawDatasetConfig,
    SplitConfig,
    TokenizeConfig,
    ValidationConfig,
)
from llmft_assets.defs.monitoring.retraining import RetrainingDatasetConfig
from llmft_assets.defs.training.assets import LoraAdapterConfig
from llmft_assets.training.config import TrainingConfig

REPO = Path(__file__).resolve().parent.parent
DERIVED = [
    (LoraAdapterConfig, TrainingConfig, {"num_processes", "training_data"}),
    (ValidationConfig, ValidationLimits, set()),
    (SplitConfig, SplitSettings, set()),
]
OP_CONFIGS = {
    "raw_dataset": RawDatasetConfig,
    "base_model": BaseModelConfig,
    "tokenized_dataset": TokenizeConfig,
    "validated_dataset": ValidationConfig,
    "dataset_splits": SplitConfig,
    "lora_adapter": LoraAdapterConfig,
    "retraining_dataset": RetrainingDatasetConfig,
}


@pytest.mark.parametrize(("config_class", "domain", "dagster_only"), DERIVED)
def test_dagster_config_matches_the_domain_model_field_for_field(
    config_class: Any, domain: type, dagster_only: set[str]
) -> None:
    fields = domain_fields(domain)
    assert set(config_class.model_fields) == set(fields) | dagster_only
    defaults = config_class()
    for name, (_annotation, default, description) in fields.items():
        assert getattr(defaults, name) == default, name
        assert config_class.model_fields[name].description == description, name
    # The defaults of a run started from Dagster are the defaults of one started any other way.
    assert defaults.to_domain(asset="x") == domain()


def test_a_field_added_to_the_domain_model_flows_into_the_dagster_config() -> None:
    class Extended(TrainingConfig):
        use_dora: bool = Field(False, description="DoRA")
        strategy: str = "ddp"

    derived = dagster_config(Extended, "ExtendedConfig", extra_fields={"num_processes": (int, Field(1))})
    assert {"use_dora", "strategy", "num_processes"} <= set(derived.model_fields)
    assert derived(use_dora=True).to_domain(asset="lora_adapter").use_dora is True

    # A union Dagster cannot express is refused when the class is built, not at run time.
    @dataclasses.dataclass
    class Bad:
        x: int | str = 1

    with pytest.raises(TypeError, match=r"Bad\.x"):
        dagster_config(Bad, "BadConfig")


def test_domain_errors_are_a_clear_dagster_failure() -> None:
    with pytest.raises(dg.Failure, match="lora_adapter config is invalid: lora_r"):
        LoraAdapterConfig(lora_r=0).to_domain(asset="lora_adapter")
    with pytest.raises(dg.Failure, match=r"validated_dataset config is invalid: .*max_chars"):
        ValidationConfig(min_chars=10, max_chars=5).to_domain(asset="validated_dataset")
    with pytest.raises(dg.Failure, match=r"dataset_splits config is invalid: .*validation_fraction"):
        SplitConfig(validation_fraction=0.6, test_fraction=0.5).to_domain(asset="dataset_splits")


def test_max_seq_len_comes_from_the_tokenized_data_and_a_conflict_is_refused() -> None:
    assert TrainingConfig().max_seq_len is None
    assert TrainingConfig().with_max_seq_len(4096).max_seq_len == 4096
    assert TrainingConfig().with_max_seq_len(4096).token_budget == 4096
    assert TrainingConfig(max_seq_len=512).with_max_seq_len(512).max_seq_len == 512
    with pytest.raises(
        ValueError, match="asks for 4096 but tokenized_dataset was built with max_seq_len 1024"
    ):
        TrainingConfig(max_seq_len=4096).with_max_seq_len(1024)
    with pytest.raises(ValueError, match="max_seq_len: unresolved"):
        _ = TrainingConfig().token_budget


def _readme_yaml_blocks() -> list[dict[str, Any]]:
    text = (REPO / "README.md").read_text()
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]


def test_readme_has_yaml_examples() -> None:
    blocks = _readme_yaml_blocks()
    assert len(blocks) >= 2 and all("ops" in block for block in blocks)


@pytest.mark.parametrize("index", range(len(_readme_yaml_blocks())))
def test_readme_yaml_example_validates_and_takes_effect(index: int) -> None:
    run_config = _readme_yaml_blocks()[index]
    job = defs.resolve_implicit_global_asset_job_def()
    validated = dg.validate_run_config(job, run_config)
    ops = run_config["ops"]
    for op, body in ops.items():
        config = OP_CONFIGS[op](**validated["ops"][op]["config"])
        for key, value in body["config"].items():
            assert getattr(config, key) == value, f"{op}.{key} did not reach the step's config"
    # What each value does downstream:
    tokenized_len = TokenizeConfig(
        **validated["ops"].get("tokenized_dataset", {}).get("config", {})
    ).max_seq_len
    training = LoraAdapterConfig(**validated["ops"].get("lora_adapter", {}).get("config", {}))
    resolved = training.to_domain(asset="lora_adapter").with_max_seq_len(tokenized_len)
    assert resolved.max_seq_len == tokenized_len  # training runs at the tokenized length
    if "tokenized_dataset" in ops:
        assert resolved.max_seq_len == ops["tokenized_dataset"]["config"]["max_seq_len"]
    lora_keys = set(ops.get("lora_adapter", {}).get("config", {}))
    for key in lora_keys & set(TrainingConfig.model_fields):  # training_data, num_processes: the asset's own
        assert getattr(resolved, key) == ops["lora_adapter"]["config"][key]
    assert lora_keys - set(TrainingConfig.model_fields) <= {"training_data", "num_processes"}
    if "raw_dataset" in ops:
        source = ops["raw_dataset"]["config"]["source"]
        if source.startswith("s3://"):
            pass  # read from the bucket (llmft_assets_tests/test_data_raw_sources.py, on moto)
        elif Path(source).suffix in {".jsonl", ".json", ".parquet"}:
            # A local file (the README's column-mapping example names the user's own file): read from
            # disk, never looked up on the hub.
            with pytest.raises(DataSourceError, match="no such file"):
                _local_files(source, ops["raw_dataset"]["config"].get("config"))
        else:
            assert _local_files(source, ops["raw_dataset"]["config"].get("config")) is None  # from the hub
