"""Summary statistics of repeated timings (pytest-benchmark / asv style). Pushable: numpy only."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """min / p50 / p90 / p99 / mean / std / cv / count of a list of timings (any unit)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"count": 0.0}
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {
        "count": float(a.size),
        "min": float(a.min()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": mean,
        "std": std,
        "cv": std / mean if mean > 0 else 0.0,
    }
