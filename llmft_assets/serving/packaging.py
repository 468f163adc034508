"""Package a served model for BentoML: the model store entry and the bento built from bentos/.

Layout of a model in the BentoML store (described by `llmft_model.json` at its root):
- merged:        the adapter merged into the base, one `save_pretrained` directory at the root;
- base+adapter:  `base/` (save_pretrained) and `adapter/` (peft save_pretrained), for vLLM's LoRA
                 serving or to keep the base shared.
The service reads the layout with `resolve_model_layout`. bentoml/torch/peft are imported inside
the functions (Dagster imports this module).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAYOUT_FILE = "llmft_model.json"
DEFAULT_MODEL_NAME = "llmft-chat"
BILL_OF_MATERIALS_FILE = "bill_of_materials.json"
MODEL_CARD_FILE = "README.md"
# BentoML labels are strings; long ones (a whole bill of materials) stay readable up to this size.
MAX_LABEL_CHARS = 4096


@dataclass(frozen=True)
class ModelLayout:
    model_dir: Path
    adapter_dir: Path | None
    layout: str


def resolve_model_layout(root: str | Path) -> ModelLayout:
    """Where the base weights and the optional adapter of a packaged (or plain) model directory are."""
    root = Path(root)
    layout_file = root / LAYOUT_FILE
    if not layout_file.is_file():
        if not (root / "config.json").is_file():
            raise FileNotFoundError(
                f"{root} is neither a packaged llmft model nor a save_pretrained directory"
            )
        return ModelLayout(model_dir=root, adapter_dir=None, layout="plain")
    info = json.loads(layout_file.read_text(encoding="utf-8"))
    layout = info.get("layout")
    if layout == "merged":
        return ModelLayout(model_dir=root, adapter_dir=None, layout=layout)
    if layout == "base+adapter":
        return ModelLayout(model_dir=root / "base", adapter_dir=root / "adapter", layout=layout)
    raise ValueError(f"{layout_file}: unknown layout {layout!r}")


def labels_to_strings(labels: Mapping[str, Any]) -> dict[str, str]:
    """BentoML accepts only string labels: dicts/lists become compact JSON, None becomes ''."""
    converted: dict[str, str] = {}
    for key, value in labels.items():
        if value is None:
            text = ""
        elif isinstance(value, str):
            text = value
        elif isinstance(value, bool | int | float):
            text = json.dumps(value)
        else:
            text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
        if len(text) > MAX_LABEL_CHARS:
            raise ValueError(f"label {key!r} is {len(text)} characters; keep labels under {MAX_LABEL_CHARS}")
        converted[str(key)] = text
    return converted


def _copy_pretrained_dir(source: Path, target: Path) -> None:
    # Only weights/config/tokenizer files: no optimizer state, and never pickles (*.bin/*.pt/*.pkl).
    allowed_suffixes = {".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken"}
    target.mkdir(parents=True, exist_ok=True)
    copied = 0
    for path in source.iterdir():
        if path.is_file() and path.suffix in allowed_suffixes:
            shutil.copy2(path, target / path.name)
            copied += 1
    if copied == 0:
        raise FileNotFoundError(f"{source} holds no safetensors/json files to package")


def _merge_adapter_into(model_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    from llmft_assets.modeling.merge import merge_adapter

    # The same merge as the merged_model export: the base's dtype (bf16 stays bf16), safetensors only.
    merge_adapter(model_dir, adapter_dir, out_dir)


def save_model_to_bentoml(
    model_dir: str | Path,
    adapter_dir: str | Path | None,
    *,
    name: str = DEFAULT_MODEL_NAME,
    labels: Mapping[str, Any],
    merge: bool = True,
    metadata: Mapping[str, Any] | None = None,
    model_card: str | None = None,
) -> str:
    """Put the model into the BentoML model store and return its tag ("name:version").

    `labels` should carry model_version (the adapter artifact version or MLflow version, used as
    the request log's model_version), mlflow_run_id, storage_uri, license and bill_of_materials;
    non-string values are stored as JSON strings. With an adapter, `merge=True` stores the merged
    model; `merge=False` stores base/ + adapter/ (vLLM serves the adapter as a LoRA). `model_card`
    (Markdown) becomes the model's README.md.
    """
    import bentoml

    model_dir = Path(model_dir)
    adapter_path = Path(adapter_dir) if adapter_dir is not None else None
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a save_pretrained model directory (no config.json)")
    if adapter_path is not None and not (adapter_path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_path} is not a peft adapter directory (no adapter_config.json)")
    string_labels = labels_to_strings(labels)
    layout = "merged" if adapter_path is None or merge else "base+adapter"
    model_metadata: dict[str, Any] = {"layout": layout, **(metadata or {})}

    with bentoml.models.create(name, labels=string_labels, metadata=model_metadata) as bento_model:
        target = Path(bento_model.path)
        if adapter_path is None:
            _copy_pretrained_dir(model_dir, target)
        elif merge:
            _merge_adapter_into(model_dir, adapter_path, target)
        else:
            _copy_pretrained_dir(model_dir, target / "base")
            _copy_pretrained_dir(adapter_path, target / "adapter")
        bill = labels.get("bill_of_materials")
        if bill is None and adapter_path is not None and (adapter_path / BILL_OF_MATERIALS_FILE).is_file():
            shutil.copy2(adapter_path / BILL_OF_MATERIALS_FILE, target / BILL_OF_MATERIALS_FILE)
        elif bill is not None:
            bill_obj = json.loads(bill) if isinstance(bill, str) else bill
            (target / BILL_OF_MATERIALS_FILE).write_text(
                json.dumps(bill_obj, indent=2, sort_keys=True, default=str)
            )
        if model_card is not None:
            (target / MODEL_CARD_FILE).write_text(model_card, encoding="utf-8")
        (target / LAYOUT_FILE).write_text(
            json.dumps({"layout": layout, "labels": string_labels}, indent=2, sort_keys=True)
        )
        tag = str(bento_model.tag)
    return tag


def _ensure_uv_on_path() -> None:
    """bentoml build pip-installs uv when it is not on PATH, which fails offline: use the venv's."""
    import sys

    venv_bin = str(Path(sys.executable).parent)
    if shutil.which("uv") is None and (Path(venv_bin) / "uv").exists():
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")


def build_bento(
    bentos_dir: str | Path,
    *,
    model_tag: str,
    build_ctx: str | Path | None = None,
    labels: Mapping[str, Any] | None = None,
    version: str | None = None,
    model_card: str | None = None,
) -> str:
    """Build the bento described by `<bentos_dir>/bentofile.yaml` around `model_tag`; return its tag.

    The build context defaults to the repository root (the parent of bentos/) so that the service
    and the llmft_assets.serving package it imports are both packed. The model tag travels as the
    bento argument `model_tag`, so the built bento serves exactly that model. `model_card` (Markdown)
    replaces the bento's README.md (BentoML writes the bentofile's one-line description there).
    """
    import bentoml

    bentos_dir = Path(bentos_dir).resolve()
    bentofile = bentos_dir / "bentofile.yaml"
    if not bentofile.is_file():
        raise FileNotFoundError(f"{bentofile} does not exist")
    context = Path(build_ctx).resolve() if build_ctx is not None else bentos_dir.parent
    stored = bentoml.models.get(model_tag)  # fails early with a clear error if the tag is unknown
    bento_labels = labels_to_strings({**stored.info.labels, **(labels or {}), "model_tag": str(stored.tag)})
    _ensure_uv_on_path()
    bento = bentoml.bentos.build_bentofile(
        str(bentofile),
        build_ctx=str(context),
        labels=bento_labels,
        version=version,
        args={"model_tag": str(stored.tag)},
    )
    if model_card is not None:
        (Path(bento.path) / MODEL_CARD_FILE).write_text(model_card, encoding="utf-8")
    return str(bento.tag)
