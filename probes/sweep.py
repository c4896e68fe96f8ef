"""Layer-by-layer linear probes: logistic regression and difference-in-means, held-out metrics.

A scikit-learn-like estimator over per-layer activation matrices ``[n, n_layers, d]``.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> pos, neg = torch.randn(40, 3, 8, generator=g) + 1.0, torch.randn(40, 3, 8, generator=g)
>>> sw = ProbeSweep(n_boot=0, n_jobs=1).fit(pos[:30], neg[:30])
>>> res = sw.evaluate(pos[30:], neg[30:])
>>> res.rows[0]["logistic_auroc"] > 0.8
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError

# scikit-learn is imported where it is used: every `workbench` command loads this plugin, most never fit a probe.


def _xy(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([pos, neg]), np.concatenate([np.ones(len(pos), int), np.zeros(len(neg), int)])


@dataclass
class LayerProbe:
    """The two probes of one layer, with directions in raw activation space (unit norm)."""

    layer: int
    logistic: Any  # fitted sklearn pipeline
    logistic_direction: np.ndarray
    mean_diff_direction: np.ndarray
    mean_diff_threshold: float  # on the unnormalised mean difference
    mean_diff: np.ndarray
    C: float


def _fit_layer(layer: int, X: np.ndarray, y: np.ndarray, Cs: Sequence[float], cv: int, seed: int) -> LayerProbe:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    inner = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    gs = GridSearchCV(pipe, {"logisticregression__C": list(Cs)}, cv=inner, scoring="roc_auc", n_jobs=1)
    gs.fit(X, y)
    best = gs.best_estimator_
    scaler, lr = best[0], best[1]
    w = lr.coef_[0] / np.where(scaler.scale_ == 0, 1.0, scaler.scale_)
    w = w / (np.linalg.norm(w) or 1.0)
    mu1, mu0 = X[y == 1].mean(0), X[y == 0].mean(0)
    md = mu1 - mu0
    thr = float(((mu1 + mu0) / 2) @ md)
    return LayerProbe(layer, best, w, md / (np.linalg.norm(md) or 1.0), thr, md,
                      float(gs.best_params_["logisticregression__C"]))


@dataclass
class SweepResult:
    """Per-layer metrics rows and the fitted probes."""

    rows: list[dict[str, Any]]
    probes: list[LayerProbe] = field(default_factory=list)

    def best_layer(self, metric: str = "logistic_auroc") -> int:
        return int(max(self.rows, key=lambda r: (r[metric], -r["layer"]))["layer"])


class ProbeSweep:
    """Fit a logistic probe (standardised, C by inner CV) and a mean-difference probe at every layer.

    ``fit(pos, neg)`` takes ``[n, n_layers, d]`` tensors/arrays; ``evaluate`` scores held-out ones
    (accuracy, AUROC, F1 with bootstrap 95 % intervals).

    ``n_jobs``: layers fitted at once, in threads of this process (never worker processes, so nothing
    outlives the call). ``None`` (default) follows ``torch.get_num_threads()`` (``workbench --threads``):
    one thread fits the layers one after the other without joblib.
    """

    def __init__(self, *, Cs: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0), cv: int = 4, n_boot: int = 1000,
                 n_jobs: int | None = None, seed: int = 0, layers: Sequence[int] | None = None) -> None:
        self.Cs, self.cv, self.n_boot, self.n_jobs, self.seed = list(Cs), cv, n_boot, n_jobs, seed
        self.layer_ids = list(layers) if layers is not None else None
        self.probes_: list[LayerProbe] = []
        self.fit_seconds_ = 0.0

    def resolved_n_jobs(self, n_layers: int | None = None) -> int:
        """Threads used for fitting: ``n_jobs``, or ``torch.get_num_threads()`` when ``None``; at most one per layer."""
        n = self.n_jobs if self.n_jobs is not None else torch.get_num_threads()
        if n < 1:
            raise WorkbenchError(f"n_jobs must be >= 1 or None, got {self.n_jobs}")
        return max(1, min(int(n), n_layers or int(n)))

    @staticmethod
    def _check(pos: Any, neg: Any) -> tuple[np.ndarray, np.ndarray]:
        p = pos.numpy() if isinstance(pos, torch.Tensor) else np.asarray(pos)
        n = neg.numpy() if isinstance(neg, torch.Tensor) else np.asarray(neg)
        if p.ndim != 3 or n.ndim != 3 or p.shape[1:] != n.shape[1:]:
            raise WorkbenchError(f"expected [n, layers, d] arrays of equal layers/d, got {p.shape} and {n.shape}")
        if len(p) < 2 or len(n) < 2:
            raise WorkbenchError(f"each class needs at least 2 examples (got {len(p)} and {len(n)})")
        if not (np.isfinite(p).all() and np.isfinite(n).all()):
            raise WorkbenchError("activations contain non-finite values")
        return p.astype(np.float64), n.astype(np.float64)

    def fit(self, pos: Any, neg: Any) -> "ProbeSweep":
        import time

        from joblib import Parallel, delayed

        p, n = self._check(pos, neg)
        cv = max(2, min(self.cv, len(p), len(n)))
        layers = self.layer_ids if self.layer_ids is not None else list(range(p.shape[1]))
        if len(layers) != p.shape[1]:
            raise WorkbenchError(f"{len(layers)} layer labels given for activations with {p.shape[1]} layers")
        t0 = time.perf_counter()
        jobs = (delayed(_fit_layer)(i, *_xy(p[:, j], n[:, j]), self.Cs, cv, self.seed) for j, i in enumerate(layers))
        n_jobs = self.resolved_n_jobs(len(layers))
        if n_jobs == 1:
            self.probes_ = [fn(*a, **kw) for fn, a, kw in jobs]
        else:
            from threadpoolctl import threadpool_limits

            # threads, not loky processes: no workers outlive the fit; one BLAS thread each (no oversubscription)
            with threadpool_limits(limits=1):
                self.probes_ = list(Parallel(n_jobs=n_jobs, backend="threading")(jobs))
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def evaluate(self, pos: Any, neg: Any) -> SweepResult:
        from probes.metrics import scored_metrics

        if not self.probes_:
            raise WorkbenchError("call fit() before evaluate()")
        p, n = self._check(pos, neg)
        d_fit = len(self.probes_[0].mean_diff)
        if p.shape[1:] != (len(self.probes_), d_fit):
            raise WorkbenchError(f"test activations are [n, {p.shape[1]}, {p.shape[2]}] but the probes were fitted "
                                 f"on [n, {len(self.probes_)}, {d_fit}]")
        rows = []
        for j, pr in enumerate(self.probes_):
            X, y = _xy(p[:, j], n[:, j])
            s_log = pr.logistic.predict_proba(X)[:, 1]
            s_md = X @ pr.mean_diff
            row: dict[str, Any] = {"layer": pr.layer, "C": pr.C}
            for name, s, thr in (("logistic", s_log, 0.5), ("mean_diff", s_md, pr.mean_diff_threshold)):
                m = scored_metrics(y, s, threshold=thr, n_boot=self.n_boot, seed=self.seed + pr.layer)
                row.update({f"{name}_{k}": v for k, v in m.items()})
            row["cos_logistic_mean_diff"] = float(pr.logistic_direction @ pr.mean_diff_direction)
            rows.append(row)
        return SweepResult(rows, self.probes_)

    def direction_cosines(self, kind: str = "logistic") -> np.ndarray:
        """Cosine between the unit directions of every pair of layers."""
        D = np.stack([getattr(p, f"{kind}_direction") for p in self.probes_])
        return D @ D.T


def generalisation_matrix(pairs: dict[str, tuple[Any, Any]], *, layer_index: int, seed: int = 0,
                          Cs: Sequence[float] = (1e-2, 1e-1, 1.0), test_pairs: dict[str, tuple[Any, Any]] | None = None
                          ) -> tuple[list[str], list[str], np.ndarray]:
    """Train a logistic probe on each named (pos, neg) pair at one layer and test AUROC on every other pair.

    Arrays are ``[n, n_layers, d]``; ``layer_index`` indexes their layer axis. Where a test pair is the
    training pair itself, the score is in-sample (use ``test_pairs`` with held-out data to avoid that).
    """
    from sklearn.metrics import roc_auc_score

    test_pairs = test_pairs or pairs
    names_tr, names_te = list(pairs), list(test_pairs)
    M = np.zeros((len(names_tr), len(names_te)))
    for a, name_a in enumerate(names_tr):
        p, n = ProbeSweep._check(*pairs[name_a])
        pr = _fit_layer(layer_index, *_xy(p[:, layer_index], n[:, layer_index]), Cs, 3, seed)
        for b, name_b in enumerate(names_te):
            q, m = ProbeSweep._check(*test_pairs[name_b])
            X, y = _xy(q[:, layer_index], m[:, layer_index])
            M[a, b] = roc_auc_score(y, pr.logistic.predict_proba(X)[:, 1])
    return names_tr, names_te, M
