"""Classification metrics with seeded bootstrap 95 % intervals.

>>> import numpy as np
>>> y = np.array([0, 0, 1, 1]); s = np.array([0.1, 0.2, 0.8, 0.9])
>>> m = scored_metrics(y, s, threshold=0.5, n_boot=50, seed=0)
>>> m["auroc"], m["accuracy"]
(1.0, 1.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score


def _metrics(y: np.ndarray, s: np.ndarray, thr: float) -> tuple[float, float, float]:
    pred = (s > thr).astype(int)
    auroc = roc_auc_score(y, s) if len(np.unique(y)) == 2 else float("nan")
    return float(accuracy_score(y, pred)), float(auroc), float(f1_score(y, pred, zero_division=0))


def scored_metrics(y: np.ndarray, scores: np.ndarray, *, threshold: float, n_boot: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """Accuracy, AUROC and F1 of ``scores > threshold`` with percentile bootstrap 95 % intervals."""
    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    acc, auc, f1 = _metrics(y, s, threshold)
    out: dict[str, Any] = {"accuracy": acc, "auroc": auc, "f1": f1}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        boots = []
        n = len(y)
        for _ in range(n_boot):
            idx = rng.integers(0, n, n)
            if len(np.unique(y[idx])) < 2:
                continue
            boots.append(_metrics(y[idx], s[idx], threshold))
        b = np.array(boots)
        for j, name in enumerate(("accuracy", "auroc", "f1")):
            lo, hi = np.percentile(b[:, j], [2.5, 97.5])
            out[f"{name}_lo"], out[f"{name}_hi"] = float(lo), float(hi)
    return out


from workbench.stats import bootstrap_mean_ci  # noqa: E402,F401  (re-exported)
