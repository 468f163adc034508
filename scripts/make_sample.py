"""Write the bundled R1-Distill-SFT-shaped sample: llmft_assets/sample_data/r1_distill_sft_{v0,v1}.parquet.

The rows are the generator's easy arithmetic family (two-digit additions with a short `<think>` trace),
which the tiny model learns in the demo's few minutes of training.

Deterministic (fixed seeds, fixed writer settings): running it again gives the same bytes.
Usage: python scripts/make_sample.py [--rows 1200] [--out llmft_assets/sample_data]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from llmft_assets.data.sample_gen import (
    SAMPLE_DATA_DIR,
    SAMPLE_FAMILY,
    SAMPLE_ROWS,
    SAMPLE_SEED_V0,
    SAMPLE_SEED_V1,
    generate_rows,
    write_parquet,
)


def make_sample(out_dir: Path, rows: int = SAMPLE_ROWS) -> dict[str, dict[str, object]]:
    """Write both sample files into ``out_dir``; return their row counts, sizes and sha256."""
    written: dict[str, dict[str, object]] = {}
    for schema, seed in (("v0", SAMPLE_SEED_V0), ("v1", SAMPLE_SEED_V1)):
        path = write_parquet(
            generate_rows(rows, schema=schema, seed=seed, family=SAMPLE_FAMILY),
            out_dir / f"r1_distill_sft_{schema}.parquet",
            schema,
        )
        written[path.name] = {
            "rows": rows,
            "seed": seed,
            "family": SAMPLE_FAMILY,
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=SAMPLE_ROWS)
    parser.add_argument("--out", type=Path, default=SAMPLE_DATA_DIR)
    args = parser.parse_args()
    print(json.dumps(make_sample(args.out, args.rows), indent=2))


if __name__ == "__main__":
    main()
