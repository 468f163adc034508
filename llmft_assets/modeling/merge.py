"""Merge a LoRA adapter into its base model, in the base's own dtype, as a standalone `save_pretrained` folder.

The folder is what other tools load: ``AutoModelForCausalLM.from_pretrained``, vLLM, llama.cpp's
``convert_hf_to_gguf.py``. It holds safetensors shards (with an index past ``max_shard_size``), the
config, the generation config, the tokenizer with its chat template, and a model card (``README.md``,
made by `llmft_assets.evaluation.model_card`).
A bf16 / fp16 base stays bf16 / fp16: merging never widens the weights to fp32 (a 7B model would double
in size). torch / transformers / peft are imported inside the functions (Dagster imports this module).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODEL_CARD_FILE = "README.md"
GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class MergeResult:
    """What was written: the dtype the weights are in, the weight files and the parameter count."""

    dtype: str
    weight_files: list[str]
    num_parameters: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def saved_dtype(model_dir: str | Path) -> str:
    """The dtype a `save_pretrained` folder's config names (``dtype``, or ``torch_dtype`` before
    transformers 5); ``float32`` when it names none, as transformers assumes."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    name = str(name).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(
            f"{model_dir}: unsupported weight dtype {name!r}; expected one of {', '.join(_DTYPES)}"
        )
    return name


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    model_card: str | None = None,
) -> MergeResult:
    """Merge ``adapter_dir`` (peft) into ``base_dir`` and save the result to ``out_dir``.

    ``dtype`` defaults to the base's saved dtype. The tokenizer (and its chat template) comes from the
    adapter folder when training saved one there, else from the base; the base's generation config is
    kept. ``model_card`` (markdown) is written as README.md.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir} is not a save_pretrained model directory (no config.json)")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a peft adapter directory (no adapter_config.json)")
    dtype_name = dtype or saved_dtype(base_dir)
    if dtype_name not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype_name!r}")
    torch_dtype = getattr(torch, dtype_name)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch_dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    wrong = sorted({str(p.dtype) for p in merged.parameters() if p.dtype != torch_dtype})
    if wrong:
        raise RuntimeError(f"merged weights came out as {wrong}, not {dtype_name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(out_dir))
    if (base_dir / GENERATION_CONFIG_FILE).is_file():
        # The base's own stop tokens and sampling defaults, byte for byte.
        shutil.copy2(base_dir / GENERATION_CONFIG_FILE, out_dir / GENERATION_CONFIG_FILE)
    if model_card is not None:
        (out_dir / MODEL_CARD_FILE).write_text(model_card, encoding="utf-8")
    return MergeResult(
        dtype=dtype_name,
        weight_files=sorted(path.name for path in out_dir.glob("*.safetensors")),
        num_parameters=sum(parameter.numel() for parameter in merged.parameters()),
    )
