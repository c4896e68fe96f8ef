"""Shared timing helpers: interleaved repeats, min and median, ratios in the same process."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Time every function ``repeats`` times, interleaving them so machine noise hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: {"min_s": min(v), "median_s": statistics.median(v), "runs": len(v)} for k, v in times.items()}


def ratios(res: dict[str, dict[str, float]], baseline: str) -> dict[str, dict[str, float]]:
    b = res[baseline]
    return {k: {"ratio_min": v["min_s"] / b["min_s"], "ratio_median": v["median_s"] / b["median_s"], **v}
            for k, v in res.items()}
