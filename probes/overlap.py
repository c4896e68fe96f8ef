"""Activation-subspace overlap per layer (the study's experiment 4, shown layer by layer).

For each prompt set, at each layer: the energy-η basis of its activation matrix (rows = prompts,
centred or not), then the mode subspace overlap (MSO) of every pair of sets, with the random
baseline max(k)/d and bootstrap 95 % intervals over prompt resamples. Two disjoint halves of the
same set (e.g. H1, H2) give the same-distribution overlap: the noise ceiling.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> a = torch.randn(30, 2, 16, generator=g); b = torch.randn(30, 2, 16, generator=g)
>>> res = activation_overlap({"A": a, "B": b}, etas=[0.5], n_boot=0)
>>> sorted({r["pair"] for r in res.rows})
['A~B']
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.subspace import k_for_energy, mso, mso_random_baseline

DEFAULT_ETAS = (0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)


def bases_for_etas(X: torch.Tensor, etas: Sequence[float], centered: bool) -> dict[float, torch.Tensor]:
    """Energy-η orthonormal bases ``[d, k]`` of the row space of ``X [n, d]``, one SVD for all η."""
    X = X.to(torch.float64)
    if centered:
        X = X - X.mean(0, keepdim=True)
    total = float((X * X).sum())
    if total <= 0:
        raise WorkbenchError("activation matrix has no energy (all rows identical?)")
    if X.shape[0] < X.shape[1]:
        # Fewer prompts than dimensions: eigen-decompose the small Gram matrix X Xᵀ (n×n), V = Xᵀ U / S.
        evals, U = torch.linalg.eigh(X @ X.T)
        evals, U = evals.flip(0).clamp(min=0), U.flip(1)
        S = evals.sqrt()
        ks = {eta: k_for_energy(S, eta, total) for eta in etas}
        kmax = max(ks.values())
        if float(S[kmax - 1]) > 1e-6 * float(S[0]):  # well conditioned: Xᵀ U / S is orthonormal
            V = (X.T @ U[:, :kmax]) / S[:kmax]
            return {eta: V[:, :k] for eta, k in ks.items()}
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return {eta: Vh[: k_for_energy(S, eta, total)].T for eta in etas}


@dataclass
class OverlapResult:
    rows: list[dict[str, Any]]
    d: int

    def table(self, eta: float, centered: bool = True) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.rows:
            if abs(r["eta"] - eta) < 1e-9 and r["centered"] == centered:
                out.setdefault(r["pair"], []).append(r)
        return out


def activation_overlap(
    sets: dict[str, Any],
    *,
    etas: Sequence[float] = DEFAULT_ETAS,
    centered: Sequence[bool] = (True, False),
    n_boot: int = 30,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    progress: bool = False,
) -> OverlapResult:
    """MSO for every pair of sets at every layer and η. ``sets[name]`` is ``[n, n_layers, d]``."""
    if len(sets) < 2:
        raise WorkbenchError(f"need at least two prompt sets to compare, got {list(sets)}")
    for e in etas:
        if not 0 < e <= 1:
            raise WorkbenchError(f"eta must be in (0, 1], got {e}")
    T = {k: torch.as_tensor(v).to(torch.float64) for k, v in sets.items()}
    shapes = {k: tuple(v.shape) for k, v in T.items()}
    if any(v.ndim != 3 for v in T.values()):
        raise WorkbenchError(f"all sets must be [n, layers, d] with equal layers and d; got {shapes}")
    L, d = next(iter(T.values())).shape[1:]
    for k, v in T.items():
        if v.ndim != 3 or v.shape[1:] != (L, d):
            raise WorkbenchError(f"all sets must be [n, layers, d] with equal layers and d; got {shapes}")
        if v.shape[0] < 2:
            raise WorkbenchError(f"set '{k}' has {v.shape[0]} prompts; need at least 2")
    names = list(T)
    pairs = list(pairs) if pairs else list(combinations(names, 2))
    unknown = sorted({x for pair in pairs for x in pair} - set(names))
    if unknown:
        raise WorkbenchError(f"pairs name unknown sets {unknown}; the sets are {names}")
    layer_ids = list(layers) if layers is not None else list(range(L))
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    it = layer_ids
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(layer_ids, desc="overlap", unit="layer")
    for j in it:
        for c in centered:
            point = {k: bases_for_etas(T[k][:, j], etas, c) for k in names}
            boots: list[dict[str, dict[float, torch.Tensor]]] = []
            for _ in range(n_boot):
                boots.append({k: bases_for_etas(T[k][rng.integers(0, len(T[k]), len(T[k])), j], etas, c)
                              for k in names})
            for a, b in pairs:
                for eta in etas:
                    Qa, Qb = point[a][eta], point[b][eta]
                    val = mso(Qa, Qb, check=False)
                    row = {"layer": j, "eta": eta, "centered": c, "pair": f"{a}~{b}", "mso": val,
                           "k_a": Qa.shape[1], "k_b": Qb.shape[1],
                           "baseline": mso_random_baseline(Qa.shape[1], Qb.shape[1], d)}
                    if boots:
                        bs = [mso(bb[a][eta], bb[b][eta], check=False) for bb in boots]
                        row["mso_lo"], row["mso_hi"] = (float(x) for x in np.percentile(bs, [2.5, 97.5]))
                    rows.append(row)
    return OverlapResult(rows, int(d))
