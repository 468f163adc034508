"""Materialize the base model as a local ``save_pretrained`` directory and describe it for the BOM.

``"tiny"`` builds the offline stand-in (:mod:`llmft_assets.modeling.tiny_model`); anything else goes
through the real ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` path (a hub id such as
``Qwen/Qwen2.5-7B-Instruct`` or a local directory). Heavy imports stay inside the functions.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

TINY_SPEC = "tiny"
TINY_MODEL_ID = "llmft/tiny-qwen2-chat"
# "org/name" or "name", as the hub spells repository ids.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_model_dir(model_dir: Path, *, model_id: str, revision: str | None) -> dict[str, Any]:
    """JSON-able facts about a saved model directory: what the adapter's bill of materials records."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    chat_template = tokenizer.chat_template
    if not isinstance(chat_template, str) or not chat_template:
        raise ValueError(f"base model {model_id!r} has no chat_template; a chat model is required")
    tokenizer_json = model_dir / "tokenizer.json"
    weights = sorted(model_dir.glob("*.safetensors"))
    num_parameters = 0
    if weights:
        from safetensors import safe_open

        for path in weights:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    shape = handle.get_slice(name).get_shape()
                    count = 1
                    for dim in shape:
                        count *= dim
                    num_parameters += count
    return {
        "model_id": model_id,
        "revision": revision,
        "path": str(model_dir),
        "model_type": config.model_type,
        "num_parameters": num_parameters,
        "chat_template_sha256": _sha256_bytes(chat_template.encode("utf-8")),
        "tokenizer_sha256": _sha256_file(tokenizer_json) if tokenizer_json.is_file() else None,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "vocab_size": int(config.vocab_size),
        "tokenizer_size": len(tokenizer),
        "weights_sha256": {path.name: _sha256_file(path) for path in weights},
    }


def _load_and_save(spec: str, out_dir: Path, revision: str | None) -> str | None:
    """The real loading path; returns the resolved commit where the hub reports one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(spec, revision=revision, dtype="auto")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors: never pickle a model
    tokenizer.save_pretrained(out_dir)
    return getattr(model.config, "_commit_hash", None) or revision


def materialize_base_model(
    spec: str,
    out_dir: Path,
    *,
    revision: str | None = None,
    pretrain_steps: int | None = None,
) -> dict[str, Any]:
    """Write the base model named by ``spec`` to ``out_dir`` and return its JSON-able description.

    ``spec`` is ``"tiny"``, an existing local model directory, or a hub id. Raises ``ValueError`` naming
    the spec when it is none of those or cannot be loaded (e.g. the hub is unreachable offline).
    """
    out_dir = Path(out_dir)
    spec = spec.strip()
    if spec == TINY_SPEC:
        from llmft_assets.modeling.tiny_model import DEFAULT_PRETRAIN_STEPS, build_tiny_model

        steps = DEFAULT_PRETRAIN_STEPS if pretrain_steps is None else pretrain_steps
        build_tiny_model(out_dir, pretrain_steps=steps)
        weights_sha = _sha256_file(out_dir / "model.safetensors")
        # The tiny model has no hub commit; its weights hash pins exactly which bytes were used.
        return describe_model_dir(out_dir, model_id=TINY_MODEL_ID, revision=f"sha256:{weights_sha[:16]}")
    if pretrain_steps is not None:
        raise ValueError(f"pretrain_steps only applies to the 'tiny' base model, not {spec!r}")

    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(f"base model {spec!r} is a directory without config.json, not a saved model")
        try:
            _load_and_save(str(local), out_dir, None)
        except (OSError, ValueError) as error:
            raise ValueError(f"base model {spec!r}: cannot load the local directory: {error}") from error
        return describe_model_dir(out_dir, model_id=str(local.resolve()), revision=revision)

    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or local.exists()
    if not spec or looks_like_path or not _HUB_ID.match(spec):
        raise ValueError(
            f"base model {spec!r} is neither 'tiny', an existing local model directory, nor a hub id"
        )
    try:
        resolved = _load_and_save(spec, out_dir, revision)
    except OSError as error:
        raise ValueError(
            f"base model {spec!r} could not be loaded from the Hugging Face hub (unreachable offline, "
            f"unknown id or revision, or gated): {error}"
        ) from error
    return describe_model_dir(out_dir, model_id=spec, revision=resolved)
