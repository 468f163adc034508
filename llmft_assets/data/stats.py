"""Summary statistics of token lengths for asset metadata (plain JSON-able dicts)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np


def token_length_histogram(lengths: Sequence[int], bins: int | Sequence[int] = 20) -> dict[str, Any]:
    """Histogram and percentiles of sequence lengths.

    ``bins`` is a bin count (equal-width bins over [min, max]) or explicit increasing edges.
    Returns ``{"count", "min", "max", "mean", "p50", "p90", "p99", "edges", "counts"}``; with no
    lengths the statistics are None and the histogram empty.
    """
    if isinstance(bins, bool) or (isinstance(bins, int) and bins <= 0):
        raise ValueError(f"bins must be a positive integer or a list of edges, got {bins!r}")
    if not isinstance(bins, int):
        edges_in = [float(edge) for edge in bins]
        if len(edges_in) < 2 or any(b <= a for a, b in itertools.pairwise(edges_in)):
            raise ValueError(f"bin edges must be at least two strictly increasing numbers, got {bins!r}")
    values = np.asarray(lengths, dtype=np.int64)
    if values.size == 0:
        return {
            "count": 0, "min": None, "max": None, "mean": None,
            "p50": None, "p90": None, "p99": None, "edges": [], "counts": [],
        }  # fmt: skip
    if (values < 0).any():
        raise ValueError("token lengths must be >= 0")
    counts, edges = np.histogram(values, bins=bins if isinstance(bins, int) else edges_in)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "count": int(values.size),
        "min": int(values.min()),
        "max": int(values.max()),
        "mean": round(float(values.mean()), 2),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "edges": [round(float(edge), 2) for edge in edges],
        "counts": [int(count) for count in counts],
    }
