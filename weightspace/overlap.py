"""Experiment 3: how much do updates share subspaces? MSO over the eta grid, tensor by tensor.

For every matrix and every update ``Delta_j`` (e.g. ``Delta_A`` or ``Delta_S``, ``Delta_useful``,
``Delta_harmful``), the top-``k(eta)`` left (or right) singular subspace is computed from one SVD; every
pair of updates is compared with the mode subspace overlap ``MSO = ||Qa^T Qb||_F^2 / min(ka, kb)``, its
random baseline ``max(ka, kb) / d``, and the principal angles. The flattened cosine between updates is
accumulated over all tensors (1-D ones included) in row blocks. An optional activation-direction
reference (:class:`~weightspace.reference.DirectionReference`) joins as one more "update" whose subspace
is the span of the directions, on the matrices whose width matches ``d_model``.

Embedding tables: ``embedding_orientation="stored"`` (default, the study's convention) takes the left space
of the table as stored (``[vocab, d_model]``: the vocabulary space); ``"transposed"`` the ``d_model`` space.
The setting is recorded in :meth:`OverlapConfig.describe`.

Memory: one update of one tensor at a time, plus the bases kept for the pairs of that tensor.

Example::

    >>> res = update_overlap([DeltaSpec("useful", ft_u, aligned), DeltaSpec("harmful", ft_h, aligned)],
    ...                      plan, OverlapConfig(etas=(0.5, 0.9)))                # doctest: +SKIP
    >>> res.table.rows("model")[0]["mso_pooled"]                                   # doctest: +SKIP
    0.31
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.subspace import Basis, CosineAccumulator, mso, mso_random_baseline, principal_angles

from weightspace.deltas import DeltaSpec, delta_blocks, load_delta
from weightspace.grouping import CosineTable, OverlapTable
from weightspace.plan import Selection, TensorInfo, TensorPlan
from weightspace.reference import DirectionReference
from weightspace.spectral import check_grid, check_orientation, compute_dtype, effective_side, spectrum_of, tensor_seed

__all__ = ["DEFAULT_ETAS", "OverlapConfig", "OverlapResult", "update_overlap", "pair_name"]

DEFAULT_ETAS = (0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)


def pair_name(a: str, b: str) -> str:
    """``"a~b"``.

    Example::

        >>> pair_name("useful", "harmful")
        'useful~harmful'
    """
    return f"{a}~{b}"


@dataclass(frozen=True)
class OverlapConfig:
    """Settings of an overlap analysis.

    Example::

        >>> OverlapConfig(etas=(0.5, 0.9)).etas
        (0.5, 0.9)
    """

    etas: tuple[float, ...] = DEFAULT_ETAS
    side: str = "left"
    method: str = "exact"
    svd_dtype: str = "auto"
    selection: Selection | None = None
    seed: int = 0
    keep_angles: bool = True
    embedding_orientation: str = "stored"

    def __post_init__(self) -> None:
        check_orientation(self.embedding_orientation)
        object.__setattr__(self, "etas", tuple(check_grid(list(self.etas), "eta")))
        if self.side not in ("left", "right"):
            raise WorkbenchError(f"side must be 'left' or 'right', got {self.side!r}")
        if self.method not in ("exact", "randomized"):
            raise WorkbenchError(f"svd method must be 'exact' or 'randomized', got {self.method!r}")
        compute_dtype(1, self.svd_dtype)

    def describe(self) -> dict[str, Any]:
        return {"etas": list(self.etas), "side": self.side, "method": self.method, "svd_dtype": self.svd_dtype,
                "selection": self.selection.describe() if self.selection else "all", "seed": self.seed,
                "embedding_orientation": self.embedding_orientation}


@dataclass
class OverlapResult:
    """Everything an overlap analysis measured (see :func:`update_overlap`)."""

    labels: list[str]
    pairs: list[str]
    etas: tuple[float, ...]
    table: OverlapTable
    cosines: CosineTable
    tensor_rows: list[dict[str, Any]] = field(default_factory=list)  # tensor x pair x eta
    rank_rows: list[dict[str, Any]] = field(default_factory=list)  # tensor x label x eta: k(eta), d, energy
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)  # "label|tensor" -> singular values
    angles: dict[str, torch.Tensor] = field(default_factory=dict)  # "pair|eta|tensor" -> radians, ascending
    zero_updates: list[dict[str, str]] = field(default_factory=list)
    n_matrices: int = 0
    n_other: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Model-level MSO per pair and eta (pooled and mean, with baselines) and the flattened cosines."""
        per: dict[str, Any] = {}
        for r in self.table.rows("model"):
            per.setdefault(r["pair"], {})[str(r["eta"])] = {
                k: r[k] for k in ("mso_pooled", "baseline_pooled", "over_baseline", "mso_mean", "baseline_mean",
                                  "n_tensors", "k_a_mean", "k_b_mean")}
        largest = {}
        for eta in self.etas:
            cand = [(v[str(eta)]["mso_pooled"], p) for p, v in per.items() if str(eta) in v]
            if cand:
                largest[str(eta)] = max(cand)[1]
        cos = {r["pair"]: r["cosine"] for r in self.cosines.rows("model")}
        return {"labels": self.labels, "pairs": self.pairs, "etas": list(self.etas), "mso": per,
                "largest_pair_by_eta": largest, "flattened_cosine": cos, "n_matrices": self.n_matrices,
                "n_other_tensors": self.n_other, "zero_updates": self.zero_updates,
                "seconds": round(self.seconds, 2)}


def _progress(items: list, enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor")


def _cosines(specs: Sequence[DeltaSpec], info: TensorInfo) -> dict[tuple[int, int], CosineAccumulator]:
    accs = {(i, j): CosineAccumulator() for i, j in itertools.combinations(range(len(specs)), 2)}
    for blocks in delta_blocks(list(specs), info):
        for (i, j), acc in accs.items():
            acc.add(blocks[i], blocks[j])
    return accs


def update_overlap(deltas: Sequence[DeltaSpec], plan: TensorPlan, cfg: OverlapConfig, *,
                   directions: DirectionReference | None = None, progress: bool = True) -> OverlapResult:
    """MSO, baselines, principal angles, spectra and flattened cosines among ``deltas`` (and ``directions``).

    MSO is defined for matrices only; 1-D and other tensors enter the flattened cosine. Updates that are
    zero on a tensor (e.g. a frozen embedding) are listed in ``zero_updates`` and skipped for that tensor.
    """
    t0 = time.perf_counter()
    labels = [d.label for d in deltas]
    if len(set(labels)) != len(labels):
        raise WorkbenchError(f"update labels must be unique, got {labels}")
    if len(deltas) + (directions is not None) < 2:
        raise WorkbenchError("overlap needs at least two updates (or one update and directions)")
    all_labels = labels + ([directions.label] if directions is not None else [])
    if directions is not None and directions.label in labels:
        raise WorkbenchError(f"the label {directions.label!r} is used twice")
    pairs = [pair_name(a, b) for a, b in itertools.combinations(all_labels, 2)]
    tensors = plan.select(cfg.selection)
    if not tensors:
        raise WorkbenchError("the selection matches no tensor")
    if directions is not None and plan.d_model is not None and plan.d_model != directions.d_model:
        raise WorkbenchError(f"the directions have width {directions.d_model} but the model's d_model is {plan.d_model}")
    res = OverlapResult(all_labels, pairs, cfg.etas, OverlapTable(), CosineTable())
    need = max(cfg.etas)
    for info in _progress(tensors, progress, "overlap"):
        if len(deltas) >= 2:
            for (i, j), acc in _cosines(deltas, info).items():
                res.cosines.add(pair_name(labels[i], labels[j]), info.role, acc)
        if not info.is_matrix:
            res.n_other += 1
            continue
        res.n_matrices += 1
        bases: dict[str, dict[float, Basis]] = {}
        side = effective_side(info, cfg.side, cfg.embedding_orientation)
        d = info.m if side == "left" else info.n
        for spec in deltas:
            D = load_delta(spec, info)
            sp = spectrum_of(D, side=side, method=cfg.method, seed=tensor_seed(cfg.seed, info.name),
                             svd_dtype=cfg.svd_dtype, need=need)
            del D
            if sp is None:
                res.zero_updates.append({"tensor": info.name, "label": spec.label})
                continue
            res.spectra[f"{spec.label}|{info.name}"] = sp.S.to(torch.float32).clone()
            bases[spec.label] = sp.eta_bases(cfg.etas)
            del sp
            for eta, b in bases[spec.label].items():
                res.rank_rows.append({"tensor": info.name, "layer": info.role.layer_key, "module": info.module,
                                      "label": spec.label, "eta": eta, "k": b.k, "d": d, "energy": b.energy})
        if directions is not None and directions.covers(info) and directions.side_of(info) == side:
            span = directions.basis
            bases[directions.label] = {eta: span for eta in cfg.etas}
        for a, b in itertools.combinations(all_labels, 2):
            if a not in bases or b not in bases:
                continue
            pair = pair_name(a, b)
            for eta in cfg.etas:
                qa, qb = bases[a][eta], bases[b][eta]
                value = mso(qa, qb, check=False)
                base = mso_random_baseline(qa.k, qb.k, d)
                res.table.add(pair, eta, info.role, mso=value, ka=qa.k, kb=qb.k, d=d)
                ang = principal_angles(qa, qb, check=False)
                if cfg.keep_angles:
                    res.angles[f"{pair}|{eta}|{info.name}"] = ang.to(torch.float32)
                deg = torch.rad2deg(ang)
                res.tensor_rows.append({
                    "tensor": info.name, "layer": info.role.layer_key, "module": info.module, "pair": pair,
                    "eta": eta, "k_a": qa.k, "k_b": qb.k, "d": d, "energy_a": qa.energy, "energy_b": qb.energy,
                    "mso": value, "baseline": base, "over_baseline": value / base if base > 0 else math.nan,
                    "angle_min_deg": float(deg.min()), "angle_median_deg": float(deg.median()),
                    "angle_max_deg": float(deg.max())})
        del bases
    res.seconds = time.perf_counter() - t0
    return res


def save_overlap(run: Any, res: OverlapResult, plan: TensorPlan, cfg: OverlapConfig, plot_eta: float,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write CSV/JSON tables, spectra and angles (safetensors) and PNG plots into a run folder.

    Returns the summary (also written to ``summary.json``).
    """
    from workbench.io import save_tensors

    from weightspace import plots

    run.write_csv("overlap_tensors.csv", res.tensor_rows)
    groups = res.table.all_rows()
    run.write_csv("overlap_groups.csv", groups)
    run.write_csv("ranks.csv", res.rank_rows)
    run.write_csv("cosine.csv", res.cosines.all_rows())
    if res.spectra:
        save_tensors(run.path / "spectra.safetensors", res.spectra, metadata={"key": "label|tensor", "values": "singular values"})
    if res.angles:
        save_tensors(run.path / "principal_angles.safetensors", res.angles,
                     metadata={"key": "pair|eta|tensor", "values": "principal angles in radians, ascending"})
    summary = res.summary() | {"config": cfg.describe(), "plan": plan.describe(), **(extra or {})}
    run.write_json("summary.json", summary)
    model_rows = res.table.rows("model")
    if model_rows:
        run.save_figure("mso_vs_eta.png", plots.mso_vs_eta(model_rows, "update overlap (MSO) vs η, all matrices"))
        for pair in res.pairs:
            if any(r["pair"] == pair and r["eta"] == plot_eta for r in res.tensor_rows):
                run.save_figure(f"heatmap_{pair.replace('~', '_vs_')}_eta{plot_eta:g}.png",
                                plots.layer_module_heatmap(res.tensor_rows, pair, plot_eta, f"{pair}, η = {plot_eta:g}"))
        vals = {r["pair"]: r["mso_pooled"] for r in model_rows if r["eta"] == plot_eta}
        run.save_figure(f"pairs_eta{plot_eta:g}.png",
                        plots.pair_matrix(res.labels, vals, f"pooled MSO at η = {plot_eta:g}"))
    if res.spectra:
        mods = {t.name: t.module for t in plan.tensors}
        labels = [lab for lab in res.labels if any(k.startswith(lab + "|") for k in res.spectra)]
        run.save_figure("spectra.png", plots.spectra_curves(res.spectra, mods, labels, "spectra of the updates"))
    return summary
