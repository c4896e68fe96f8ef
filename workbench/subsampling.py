"""Subsampling (m-out-of-n without replacement) confidence intervals, for statistics the bootstrap gets wrong.

Why not the bootstrap: the activation-overlap statistic (MSO of energy-η bases, ``probes/overlap.py``) is a
function of the SET of prompts, not an average over them. Resampling prompts WITH replacement repeats rows;
repeated rows carry double or triple weight in the energy spectrum and there are only about 63 % distinct
ones, which shifts the energy bases (other k, noisier directions). The bootstrap distribution of the MSO then
sits below the full-sample value, and the percentile interval can exclude the estimate it belongs to (SmolLM2:
H1~H2 slice mean 0.741, percentile interval [0.522, 0.635]). Subsampling draws every subset WITHOUT
replacement: each is a genuine sample of ``m`` distinct prompts of the same population, and it is valid under
weak conditions (the statistic has a limiting distribution at some rate; no smoothness needed).

The interval (Politis & Romano 1994, "Large sample confidence regions based on subsamples under minimal
assumptions", Ann. Statist. 22:2031-2050; Politis, Romano & Wolf 1999, "Subsampling", Springer), with the
finite-population factor of the jackknife histogram (Wu 1990, "On the asymptotic properties of the jackknife
histogram", Ann. Statist. 18:1438-1452; Shao & Wu 1989, the delete-d jackknife):

* draw ``B`` subsets of ``m = floor(n / 2)`` prompts without replacement (:func:`subsample_size`), compute the
  statistic ``T*_b`` on each;
* ``c = sqrt(m / (n - m))`` (:func:`subsample_scale`): ``c * (T*_b - T_n)`` estimates the law of
  ``T_n - theta``;
* with ``q_lo, q_hi`` the ``alpha / 2`` and ``1 - alpha / 2`` quantiles of the ``T*_b``::

      CI = [T_n - c (q_hi - T_n),  T_n - c (q_lo - T_n)]

  (:func:`subsample_ci`; the reflected, "basic" form: deviations of the subsample values around the
  full-sample estimate, rescaled and subtracted).

On the factor: Politis and Romano's ``tau_m / tau_n = sqrt(m / n)`` assumes ``m / n -> 0``. At a fixed fraction
the subsets overlap the full sample and vary less around it than a fresh sample would: for a mean,
``Var(mean_m - mean_n) = sigma^2 (1/m - 1/n)`` exactly (without replacement), so ``sqrt(m / (n - m))`` is the
factor that gives ``sigma^2 / n``; it tends to ``sqrt(m / n)`` as ``m / n -> 0`` and equals 1 at ``m = n / 2``
(half-sampling). With several sets (each subsampled on its own, ``m_s = floor(n_s / 2)``) the factor is
``sqrt(mean_s m_s / (n_s - m_s))``, exactly 1 when every set has an even size.

A statistic biased at small samples (the MSO falls as fewer prompts estimate each basis) is biased more in the
subsets; the reflected interval moves AWAY from that bias, towards the truth (for a bias ~ a / n, half-samples
with ``c = 1`` remove it to first order: the interval's centre is ``2 T_n - mean(T*)``, the half-sample
jackknife correction), where the percentile bootstrap interval moves further into it. ``tests/test_overlap.py``
checks the coverage on planted data with a known overlap against the old with-replacement percentile interval.

>>> import numpy as np
>>> subsample_size(30), subsample_scale([30, 30]), round(subsample_scale([31]), 4)
(15, 1.0, 0.9682)
>>> subsample_ci(np.array([0.4, 0.5, 0.6]), 0.5, 1.0, alpha=0.0)
[0.4, 0.6]
>>> subsample_ci(np.array([0.3, 0.4]), 0.5, 1.0, alpha=0.0)   # subsets lower than the estimate: CI above it
[0.6, 0.7]
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["FRACTION", "METHOD", "subsample_size", "subsample_scale", "subsample_indices", "subsample_ci"]

FRACTION = 0.5
METHOD = ("subsampling without replacement (m = floor(n/2) prompts per set; Politis & Romano 1994) with the "
          "finite-population factor c = sqrt(m/(n-m)) (Wu 1990): CI = [T - c(q_hi - T), T - c(q_lo - T)], q = the "
          "2.5 % / 97.5 % quantiles of the statistic over the subsets, T = the full-sample value")


def subsample_size(n: int, fraction: float = FRACTION) -> int:
    """Prompts per subset: ``floor(fraction * n)``, at least 2 (so that a centred basis has energy) and below
    ``n``. Raises ``ValueError`` for ``n < 3`` (no proper subset of two prompts exists)."""
    n = int(n)
    if n < 3:
        raise ValueError(f"subsampling needs at least 3 items per set, got {n}")
    if not 0 < fraction < 1:
        raise ValueError(f"the subsample fraction must be in (0, 1), got {fraction}")
    return min(n - 1, max(2, int(math.floor(fraction * n))))


def subsample_scale(sizes: Sequence[int], fraction: float = FRACTION) -> float:
    """``c = sqrt(mean_s m_s / (n_s - m_s))`` over the sets' sizes ``n_s`` (1.0 for even sizes at 1/2)."""
    r = [subsample_size(n, fraction) / (int(n) - subsample_size(n, fraction)) for n in sizes]
    return float(math.sqrt(sum(r) / len(r)))


def subsample_indices(rng: np.random.Generator, n: int, fraction: float = FRACTION) -> np.ndarray:
    """One subset: ``subsample_size(n)`` distinct indices of ``range(n)``, sorted."""
    return np.sort(rng.choice(int(n), size=subsample_size(n, fraction), replace=False))


def subsample_ci(draws: Sequence[float] | np.ndarray, point: float, scale: float, *, alpha: float = 0.05,
                 bounds: tuple[float, float] | None = None) -> list[float] | None:
    """The subsampling interval ``[T - c (q_hi - T), T - c (q_lo - T)]`` of the full-sample value ``T = point``
    from the statistic on each subset (``draws``; non-finite ones dropped), clipped to ``bounds`` when given
    (e.g. ``(0, 1)`` for an MSO). ``None`` when no finite draw is left or ``point`` is not finite."""
    v = np.asarray(draws, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0 or point is None or not math.isfinite(float(point)):
        return None
    t = float(point)
    q_lo, q_hi = (float(x) for x in np.quantile(v, [alpha / 2, 1 - alpha / 2]))
    lo, hi = t - scale * (q_hi - t), t - scale * (q_lo - t)
    if bounds is not None:
        lo, hi = min(max(lo, bounds[0]), bounds[1]), min(max(hi, bounds[0]), bounds[1])
    return [lo, hi]
