"""Small statistics helpers: seeded percentile bootstrap intervals, the Wilson interval of a proportion.

>>> lo, hi = bootstrap_mean_ci([0, 1, 1, 1], n_boot=200, seed=0)
>>> 0.0 <= lo <= 0.75 <= hi <= 1.0
True
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
                      ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [a, 100 - a])
    return float(lo), float(hi)


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (95 % by default); ``(nan, nan)`` for ``n == 0``."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)
