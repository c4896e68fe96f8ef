"""Activation-subspace overlap per layer (the study's experiment 4, shown layer by layer).

For each prompt set, at each layer: the energy-η basis of its activation matrix (rows = prompts,
centred or not), then the mode subspace overlap (MSO) of every pair of sets, with the random
baseline max(k)/d and 95 % intervals over prompt subsamples. Two disjoint halves of the
same set (e.g. H1, H2) give the same-distribution overlap: the noise ceiling.

Intervals: subsampling WITHOUT replacement (:mod:`workbench.subsampling`; Politis & Romano 1994, with the
finite-population factor of Wu 1990). Each draw takes ``m = floor(n / 2)`` distinct prompts of every set; with
``T`` the full-sample value, ``q_lo, q_hi`` the 2.5 % / 97.5 % quantiles of the statistic over the draws and
``c = sqrt(m / (n - m))`` (1 for even ``n``), the interval is ``[T - c (q_hi - T), T - c (q_lo - T)]``
(clipped to [0, 1] for an MSO). The with-replacement percentile bootstrap used before repeats prompts, which
shifts the energy bases and biases the MSO of every resample downwards: its intervals sat below the estimate
(SmolLM2 H1~H2 slice mean 0.741, interval [0.522, 0.635]) and missed a planted overlap in 18 of 20
replicate datasets, where the subsampling interval missed it in 1 and always covered the estimate
(``tests/test_overlap.py``). ``n_boot`` is the number of subsample draws; every set needs at least 3 prompts
when ``n_boot > 0``.

Two protocols (:data:`PROTOCOLS`, run side by side by :func:`protocol_overlap` on one capture):

* ``"study"``: the study's protocol. UNcentred energy bases; MSO per layer and averaged over the 65-90 %
  depth slice (:func:`depth_slice`); H1 = the built-in ``harmful`` set, H2 = ``harmful_styled`` (a second
  harmful source in another style), U = ``useful_requests`` (benign requests in the same imperative form as
  the harmful ones).
* ``"workbench"``: the workbench's earlier protocol. Centred bases; MSO per layer and averaged over all
  layers; H1 / H2 = two disjoint halves of ``harmful``, U = ``utility`` (arithmetic word problems).

Centring is a choice made after capture, so both protocols read the same activations; every role has the
same number of prompts.

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
from workbench.subsampling import METHOD as CI_METHOD
from workbench.subsampling import subsample_ci, subsample_indices, subsample_scale
from workbench.subspace import k_for_energy, mso, mso_random_baseline
from workbench.verdict_rules import exp4_from_block

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
    scale = _check_subsampling({k: len(v) for k, v in T.items()}, n_boot)
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
            for _ in range(n_boot):  # subsamples without replacement (module docstring)
                boots.append({k: bases_for_etas(T[k][subsample_indices(rng, len(T[k])), j], etas, c)
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
                        row["mso_lo"], row["mso_hi"] = subsample_ci(bs, val, scale, bounds=(0.0, 1.0))
                    rows.append(row)
    return OverlapResult(rows, int(d))


def _check_subsampling(sizes: dict[str, int], n_boot: int) -> float:
    """The subsampling factor ``c`` for sets of these sizes (1.0 without draws); refuses sets too small."""
    if n_boot <= 0:
        return 1.0
    small = {k: n for k, n in sizes.items() if n < 3}
    if small:
        raise WorkbenchError(f"subsampling intervals need at least 3 prompts per set, got {small}; give more "
                             f"prompts or n_boot = 0 (no intervals)")
    return subsample_scale(list(sizes.values()))


# -- experiment 4 protocols: the study's and the workbench's, computed from one set of activations ----------

STUDY_SLICE = (0.65, 0.90)
ROLES = ("U", "H1", "H2")


def depth_slice(n_layers: int, lo: float = STUDY_SLICE[0], hi: float = STUDY_SLICE[1]) -> list[int]:
    """The layers of the study's depth slice: ``l`` (0-based) with ``lo <= l / (n_layers - 1) <= hi``.

    ``docs/study.md``, experiment 4: "The original averaged layers 65–90 % of depth; the workbench shows each
    layer, with bootstrap intervals over prompt resamples." Depth is read as ``l / (n_layers - 1)`` (the first
    layer at 0 %, the last at 100 %), both ends included. A model too shallow to have a layer inside (e.g. 2 or
    3 layers) gets the one layer nearest the slice's middle, so the slice average is never empty.

    >>> depth_slice(24), depth_slice(30), depth_slice(21)
    ([15, 16, 17, 18, 19, 20], [19, 20, 21, 22, 23, 24, 25, 26], [13, 14, 15, 16, 17, 18])
    """
    if n_layers < 1:
        raise WorkbenchError(f"n_layers must be >= 1, got {n_layers}")
    if not 0 <= lo <= hi <= 1:
        raise WorkbenchError(f"the depth slice must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
    if n_layers == 1:
        return [0]
    eps = 1e-9
    inside = [j for j in range(n_layers) if lo - eps <= j / (n_layers - 1) <= hi + eps]
    return inside or [round((lo + hi) / 2 * (n_layers - 1))]


@dataclass(frozen=True)
class Protocol:
    """One way of running experiment 4: which prompt source fills each role, centring, the headline average."""

    name: str
    centered: bool
    headline: str  # "slice": the depth-slice average leads; "all": the all-layer average leads
    sources: dict[str, str]  # role -> where its prompts come from (built-in set names)
    description: str


PROTOCOLS: dict[str, Protocol] = {
    "study": Protocol(
        "study", centered=False, headline="slice",
        sources={"U": "useful_requests", "H1": "harmful", "H2": "harmful_styled"},
        description="the study's protocol: UNcentred energy bases, MSO averaged over the 65-90 % depth slice; "
                    "H1 and H2 from two different harmful sources (built-in harmful and harmful_styled, another "
                    "style), U = useful requests in the same form as the harmful ones (useful_requests)"),
    "workbench": Protocol(
        "workbench", centered=True, headline="all",
        sources={"U": "utility", "H1": "harmful (one half)", "H2": "harmful (the other half)"},
        description="the workbench's earlier protocol: centred energy bases, MSO averaged over all layers; H1 and "
                    "H2 two disjoint halves of the built-in harmful set, U = arithmetic word problems (utility)"),
}
PROTOCOL_CHOICES = ("both", *PROTOCOLS)


def protocol_names(choice: str) -> list[str]:
    """``"both"`` -> every protocol; a protocol's name -> that one."""
    if choice == "both":
        return list(PROTOCOLS)
    if choice not in PROTOCOLS:
        raise WorkbenchError(f"unknown protocol {choice!r}; choose one of {', '.join(PROTOCOL_CHOICES)}")
    return [choice]


@dataclass
class ProtocolOverlap:
    """Per-layer rows of every protocol plus layer averages (all layers, depth slice) with subsampling CIs.

    ``boot[(protocol, pair, eta)]`` is ``[n_layers, n_boot]``: every draw subsamples each SET's prompts once
    (without replacement) and uses that subset at every layer and in every protocol and pair, so layer
    averages and differences between pairs get proper (paired) intervals; ``scale`` is the subsampling factor
    ``c`` of :func:`workbench.subsampling.subsample_ci` and ``sizes`` the sets' prompt counts.
    """

    rows: list[dict[str, Any]]
    d: int
    n_layers: int
    slice_layers: list[int]
    assignments: dict[str, dict[str, str]]
    boot: dict[tuple[str, str, float], np.ndarray]
    etas: list[float]
    scale: float = 1.0
    sizes: dict[str, int] | None = None

    def table(self, protocol: str, eta: float) -> dict[str, list[dict[str, Any]]]:
        """``{pair: per-layer rows}`` of one protocol at one η (the shape :func:`probes.plots.overlap_vs_layer`
        draws)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.rows:
            if r["protocol"] == protocol and abs(r["eta"] - eta) < 1e-9:
                out.setdefault(r["pair"], []).append(r)
        return out

    def average(self, protocol: str, pair: str, eta: float, layers: str) -> dict[str, Any]:
        """Mean MSO and mean baseline over ``layers`` ("all" or "slice") with a 95 % subsampling interval."""
        idx = list(range(self.n_layers)) if layers == "all" else list(self.slice_layers)
        rows = self.table(protocol, eta)[pair]
        vals = np.array([rows[j]["mso"] for j in idx])
        out = {"layers": layers, "n_layers": len(idx), "mean_mso": float(vals.mean()),
               "mean_baseline": float(np.mean([rows[j]["baseline"] for j in idx])), "ci": None}
        B = self.boot.get((protocol, pair, _eta_key(eta)))
        if B is not None and B.shape[1]:
            out["ci"] = subsample_ci(B[idx].mean(0), out["mean_mso"], self.scale, bounds=(0.0, 1.0))
        return out

    def exp4(self, protocol: str, eta: float, layers: str) -> dict[str, Any] | None:
        """The statistic experiment 4's claim needs: U~H (mean of U~H1 and U~H2) against the H1~H2 ceiling,
        averaged over ``layers``; value and paired 95 % subsampling CI of each, of their difference and of their
        ratio, the subsample draws themselves (``boot``) and the experiment-4 verdict
        (:func:`workbench.verdict_rules.exp4_activation_overlap`, under ``verdict``).
        ``None`` when the protocol's roles are not U, H1, H2."""
        if set(self.assignments[protocol]) != set(ROLES):
            return None
        idx = list(range(self.n_layers)) if layers == "all" else list(self.slice_layers)
        t = self.table(protocol, eta)
        point = {p: np.array([t[p][j]["mso"] for j in idx]).mean() for p in ("U~H1", "U~H2", "H1~H2")}
        u_h, h1_h2 = float((point["U~H1"] + point["U~H2"]) / 2), float(point["H1~H2"])
        out: dict[str, Any] = {
            "claim": "useful and harmful activation subspaces overlap about as much as two harmful sets",
            "statistic": "U~H = mean(MSO(U,H1), MSO(U,H2)) against the noise ceiling MSO(H1,H2), each averaged "
                         "over the layers (paired subsampling over prompt subsets: diff = U~H - H1~H2, "
                         "ratio = U~H / H1~H2)",
            "protocol": protocol, "centered": PROTOCOLS[protocol].centered,
            "layers": layers, "layer_ids": idx, "eta": eta, "u_h": u_h, "h1_h2": h1_h2,
            "u_h1": float(point["U~H1"]), "u_h2": float(point["U~H2"]),
            "diff": u_h - h1_h2, "ratio": u_h / h1_h2 if h1_h2 > 0 else None,
            "baseline": float(np.mean([t[p][j]["baseline"] for p in ("U~H1", "U~H2", "H1~H2") for j in idx])),
            "u_h_baseline": float(np.mean([t[p][j]["baseline"] for p in ("U~H1", "U~H2") for j in idx])),
            "h1_h2_baseline": float(np.mean([t["H1~H2"][j]["baseline"] for j in idx])),
            "u_h_ci": None, "h1_h2_ci": None, "diff_ci": None, "ratio_ci": None, "n_boot": 0,
            "ci_method": CI_METHOD, "ci_scale": self.scale,
            "per_layer": {p: [float(t[p][j]["mso"]) for j in idx] for p in ("U~H1", "U~H2", "H1~H2")},
        }
        k = _eta_key(eta)
        B = {p: self.boot.get((protocol, p, k)) for p in ("U~H1", "U~H2", "H1~H2")}
        if all(b is not None and b.shape[1] for b in B.values()):
            bu = (B["U~H1"][idx].mean(0) + B["U~H2"][idx].mean(0)) / 2
            bh = B["H1~H2"][idx].mean(0)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(bh > 0, bu / bh, np.nan)
            c = self.scale
            ratio_ci = None if out["ratio"] is None else subsample_ci(ratio, out["ratio"], c, bounds=(0.0, np.inf))
            out.update(u_h_ci=subsample_ci(bu, u_h, c, bounds=(0.0, 1.0)),
                       h1_h2_ci=subsample_ci(bh, h1_h2, c, bounds=(0.0, 1.0)),
                       diff_ci=subsample_ci(bu - bh, out["diff"], c, bounds=(-1.0, 1.0)),
                       ratio_ci=ratio_ci, n_boot=int(bu.size),
                       # the half-sample estimate of each value's small-sample bias: mean over the subsets minus the
                       # full-sample value (for a bias ~ a / n and m = n / 2 this IS the full-sample bias); when it
                       # exceeds the spread the interval lies beside the estimate, on the side away from the bias
                       bias={"u_h": float(bu.mean() - u_h), "h1_h2": float(bh.mean() - h1_h2),
                             "diff": float((bu - bh).mean() - out["diff"])},
                       boot={"u_h": [float(x) for x in bu], "h1_h2": [float(x) for x in bh]})
        out["verdict"] = exp4_from_block(out)
        return out


def _eta_key(eta: float) -> float:
    return round(float(eta), 9)


def protocol_overlap(
    sets: dict[str, Any],
    assignments: dict[str, dict[str, str]],
    *,
    etas: Sequence[float] = DEFAULT_ETAS,
    n_boot: int = 30,
    seed: int = 0,
    slice_bounds: tuple[float, float] = STUDY_SLICE,
    progress: bool = False,
) -> ProtocolOverlap:
    """Every protocol of ``assignments`` on one set of activations (capture once, analyse twice).

    ``sets[name]`` is ``[n, n_layers, d]``; ``assignments[protocol] = {role: set name}`` (protocol one of
    :data:`PROTOCOLS`, which fixes the centring). Each set's energy bases are computed once per centring that a
    protocol needs, and each draw subsamples every set once (without replacement) for all layers, protocols
    and pairs.
    Pairs are the role pairs in the roles' order (``U~H1, U~H2, H1~H2`` for the standard roles).
    """
    for e in etas:
        if not 0 < e <= 1:
            raise WorkbenchError(f"eta must be in (0, 1], got {e}")
    if not assignments:
        raise WorkbenchError("give at least one protocol")
    for proto, roles in assignments.items():
        if proto not in PROTOCOLS:
            raise WorkbenchError(f"unknown protocol {proto!r}; choose from {', '.join(PROTOCOLS)}")
        if len(roles) < 2:
            raise WorkbenchError(f"protocol {proto!r} needs at least two sets, got {list(roles)}")
        missing = sorted(set(roles.values()) - set(sets))
        if missing:
            raise WorkbenchError(f"protocol {proto!r} names sets {missing} that were not given; the sets are "
                                 f"{list(sets)}")
    used = list(dict.fromkeys(s for roles in assignments.values() for s in roles.values()))
    T = {k: torch.as_tensor(sets[k]).to(torch.float64) for k in used}
    shapes = {k: tuple(v.shape) for k, v in T.items()}
    if any(v.ndim != 3 for v in T.values()):
        raise WorkbenchError(f"all sets must be [n, layers, d] with equal layers and d; got {shapes}")
    L, d = next(iter(T.values())).shape[1:]
    for k, v in T.items():
        if v.shape[1:] != (L, d):
            raise WorkbenchError(f"all sets must be [n, layers, d] with equal layers and d; got {shapes}")
        if v.shape[0] < 2:
            raise WorkbenchError(f"set '{k}' has {v.shape[0]} prompts; need at least 2")
    etas = list(etas)
    sizes = {k: int(len(T[k])) for k in used}
    scale = _check_subsampling(sizes, n_boot)
    rng = np.random.default_rng(seed)
    # subsamples without replacement, shared by every layer, protocol and pair (paired intervals)
    draws = [{k: subsample_indices(rng, sizes[k]) for k in used} for _ in range(n_boot)]
    needs = sorted({(s, PROTOCOLS[p].centered) for p, roles in assignments.items() for s in roles.values()},
                   key=lambda x: (used.index(x[0]), x[1]))
    pairs = {p: list(combinations(list(roles), 2)) for p, roles in assignments.items()}
    boot = {(p, f"{a}~{b}", _eta_key(e)): np.zeros((L, n_boot)) for p in pairs for a, b in pairs[p] for e in etas}
    sl = set(depth_slice(int(L), *slice_bounds))
    rows: list[dict[str, Any]] = []
    it: Any = range(L)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="overlap", unit="layer")
    for j in it:
        point = {(s, c): bases_for_etas(T[s][:, j], etas, c) for s, c in needs}
        boots = [{(s, c): bases_for_etas(T[s][dr[s], j], etas, c) for s, c in needs} for dr in draws]
        for p, roles in assignments.items():
            c = PROTOCOLS[p].centered
            for a, b in pairs[p]:
                sa, sb = roles[a], roles[b]
                for eta in etas:
                    Qa, Qb = point[(sa, c)][eta], point[(sb, c)][eta]
                    row = {"protocol": p, "layer": j, "depth": round(j / max(int(L) - 1, 1), 4), "in_slice": j in sl,
                           "eta": eta, "centered": c, "pair": f"{a}~{b}", "sets": f"{sa}~{sb}",
                           "mso": mso(Qa, Qb, check=False), "k_a": Qa.shape[1], "k_b": Qb.shape[1],
                           "baseline": mso_random_baseline(Qa.shape[1], Qb.shape[1], d)}
                    if boots:
                        bs = np.array([mso(bb[(sa, c)][eta], bb[(sb, c)][eta], check=False) for bb in boots])
                        boot[(p, f"{a}~{b}", _eta_key(eta))][j] = bs
                        row["mso_lo"], row["mso_hi"] = subsample_ci(bs, row["mso"], scale, bounds=(0.0, 1.0))
                    rows.append(row)
    return ProtocolOverlap(rows, int(d), int(L), sorted(sl), {p: dict(r) for p, r in assignments.items()}, boot, etas,
                           scale, sizes)
