"""Remake the shipped default tiny base model: llmft_assets/sample_data/tiny_model/.

The default build (DEFAULT_PRETRAIN_STEPS of pretraining on plain text, seed 0, the default shape) takes
minutes of CPU, so it ships with the package like a downloaded hub checkpoint; `build_tiny_model` uses it
whenever the recipe (texts, steps, seed, shape, builder version) matches, and builds anything else. Run this
after changing the recipe: the test suite fails while the shipped build no longer matches it.

Deterministic (one thread, fixed seeds): the same machine and library versions give the same bytes.
Usage: python scripts/build_tiny_model.py [--out llmft_assets/sample_data/tiny_model]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from llmft_assets.modeling.tiny_model import BUILD_INFO_FILE, SHIPPED_MODEL_DIR, build_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL_DIR)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        built = build_tiny_model(Path(scratch) / "model", use_cache=False)
        shutil.rmtree(args.out, ignore_errors=True)
        shutil.copytree(built, args.out)
    info = json.loads((args.out / BUILD_INFO_FILE).read_text())
    print(
        json.dumps(
            {
                "out": str(args.out),
                "seconds": round(time.monotonic() - started, 1),
                "recipe_key": info["recipe_key"],
                "pretrain_loss_first": info["pretrain_loss_first"],
                "pretrain_loss_last": info["pretrain_loss_last"],
            }
        )
    )


if __name__ == "__main__":
    main()
