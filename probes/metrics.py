"""Classification metrics with seeded bootstrap 95 % intervals.

The bootstrap is vectorised: all resamples are drawn at once (the same draws, in the same order, as one
``rng.integers(0, n, n)`` call per resample) and accuracy, AUROC (Mann-Whitney with average ranks for ties,
which is what ``sklearn.metrics.roc_auc_score`` computes) and F1 are computed for every resample in numpy.
Resamples with a single class are skipped, as before.

>>> import numpy as np
>>> y = np.array([0, 0, 1, 1]); s = np.array([0.1, 0.2, 0.8, 0.9])
>>> m = scored_metrics(y, s, threshold=0.5, n_boot=50, seed=0)
>>> m["auroc"], m["accuracy"]
(1.0, 1.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score


def _metrics(y: np.ndarray, s: np.ndarray, thr: float) -> tuple[float, float, float]:
    pred = (s > thr).astype(int)
    auroc = roc_auc_score(y, s) if len(np.unique(y)) == 2 else float("nan")
    return float(accuracy_score(y, pred)), float(auroc), float(f1_score(y, pred, zero_division=0))


def batch_metrics(y: np.ndarray, s: np.ndarray, thr: float) -> np.ndarray:
    """Accuracy, AUROC and F1 of ``s > thr`` for every row of ``y``/``s`` (``[n_resamples, n]``, every row with
    both classes): an ``[n_resamples, 3]`` array equal to :func:`_metrics` row by row (to float rounding).

    >>> y = np.array([[0, 1, 1], [0, 0, 1]]); s = np.array([[0.2, 0.9, 0.1], [0.3, 0.3, 0.7]])
    >>> batch_metrics(y, s, 0.5).round(3).tolist()
    [[0.667, 0.5, 0.667], [1.0, 1.0, 1.0]]
    """
    y = y.astype(bool)
    pred = s > thr
    n = y.shape[1]
    n1 = y.sum(1).astype(np.float64)
    n0 = n - n1
    acc = (pred == y).mean(1)
    ranks = rankdata(s, axis=1)  # average ranks for ties
    auc = ((ranks * y).sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    tp = (pred & y).sum(1).astype(np.float64)
    denom = pred.sum(1) + n1  # 2 tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return np.stack([acc, auc, f1], axis=1)


def scored_metrics(y: np.ndarray, scores: np.ndarray, *, threshold: float, n_boot: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """Accuracy, AUROC and F1 of ``scores > threshold`` with percentile bootstrap 95 % intervals."""
    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    acc, auc, f1 = _metrics(y, s, threshold)
    out: dict[str, Any] = {"accuracy": acc, "auroc": auc, "f1": f1}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        n = len(y)
        idx = rng.integers(0, n, (n_boot, n))
        yb = y[idx]
        both = yb.min(1) != yb.max(1)  # resamples with a single class are skipped
        b = batch_metrics(yb[both], s[idx[both]], threshold)
        for j, name in enumerate(("accuracy", "auroc", "f1")):
            lo, hi = np.percentile(b[:, j], [2.5, 97.5])
            out[f"{name}_lo"], out[f"{name}_hi"] = float(lo), float(hi)
    return out


from workbench.stats import bootstrap_mean_ci  # noqa: E402,F401  (re-exported)
