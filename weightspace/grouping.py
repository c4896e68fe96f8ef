"""Aggregate per-tensor numbers per tensor, per layer, per module type and for the whole model.

Aggregation is explicit: every table reports all four levels (``LEVELS``), one row per group, so a
per-layer view can never silently collapse into one group. Sums are pooled (ratios of sums), which is the
study's definition for the energy kept ``E_k = sum ||P D||^2 / sum ||D||^2`` and for the flattened cosine.
For MSO both the mean over tensors and the pooled value ``sum ||Qa^T Qb||^2 / sum min(ka, kb)`` are given.

Example::

    >>> from weightspace.naming import classify
    >>> t = EnergyTable()
    >>> t.add(classify("model.layers.0.self_attn.q_proj.weight"), kept=1.0, total=4.0, expected=0.25)
    >>> t.add(classify("model.layers.1.self_attn.q_proj.weight"), kept=3.0, total=4.0, expected=0.25)
    >>> [(r["group"], r["energy_kept"]) for r in t.rows("layer")]
    [('0', 0.25), ('1', 0.75)]
    >>> t.rows("model")[0]["energy_kept"], t.rows("model")[0]["over_random"]
    (0.5, 2.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from workbench.subspace import CosineAccumulator

from weightspace.naming import TensorRole

__all__ = ["LEVELS", "group_keys", "EnergyTable", "CosineTable", "OverlapTable", "merge_cosine"]

LEVELS = ("tensor", "layer", "module", "model")


def group_keys(role: TensorRole) -> dict[str, str]:
    """The group of a tensor at each level.

    Example::

        >>> from weightspace.naming import classify
        >>> group_keys(classify("lm_head.weight"))
        {'tensor': 'lm_head.weight', 'layer': 'none', 'module': 'lm_head', 'model': 'all'}
    """
    return {"tensor": role.name, "layer": role.layer_key, "module": role.module, "model": "all"}


def _sort_key(level: str, key: str) -> tuple:
    if level == "layer":
        return (0, int(key), "") if key.isdigit() else (1, 0, key)
    return (0, 0, key)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


@dataclass
class _Energy:
    kept: float = 0.0
    total: float = 0.0
    expected: float = 0.0  # sum of (k/d) * ||D||^2: the random subspace's expected kept energy
    n: int = 0


class EnergyTable:
    """Pooled energy kept ``sum ||P D||^2 / sum ||D||^2`` with its random expectation, at every level."""

    def __init__(self) -> None:
        self._g: dict[str, dict[str, _Energy]] = {lv: {} for lv in LEVELS}

    def add(self, role: TensorRole, *, kept: float, total: float, expected: float) -> None:
        """Add one tensor: kept and total energy, and the random expectation ``k / d`` of its ratio."""
        for lv, key in group_keys(role).items():
            e = self._g[lv].setdefault(key, _Energy())
            e.kept += kept
            e.total += total
            e.expected += expected * total if not math.isnan(expected) else float("nan")
            e.n += 1

    def rows(self, level: str) -> list[dict[str, Any]]:
        out = []
        for key in sorted(self._g[level], key=lambda k: _sort_key(level, k)):
            e = self._g[level][key]
            ek, er = _ratio(e.kept, e.total), _ratio(e.expected, e.total)
            out.append({"level": level, "group": key, "n_tensors": e.n, "energy_kept": ek, "energy_random": er,
                        "over_random": _ratio(ek, er) if not math.isnan(er) else float("nan"),
                        "kept": e.kept, "total": e.total})
        return out

    def all_rows(self) -> list[dict[str, Any]]:
        return [r for lv in LEVELS for r in self.rows(lv)]

    def summary(self) -> dict[str, Any]:
        rows = self.rows("model")
        return rows[0] if rows else {}


def merge_cosine(into: CosineAccumulator, part: CosineAccumulator) -> None:
    """Add the sums of ``part`` to ``into`` (pooling cosines of several tensors).

    Example::

        >>> import torch
        >>> a, b = CosineAccumulator(), CosineAccumulator()
        >>> a.add(torch.tensor([1., 0.]), torch.tensor([1., 0.])); b.add(torch.tensor([0., 1.]), torch.tensor([0., -1.]))
        >>> merge_cosine(a, b); a.value
        0.0
    """
    into.dot += part.dot
    into.norm_a_sq += part.norm_a_sq
    into.norm_b_sq += part.norm_b_sq
    into.count += part.count


class CosineTable:
    """Flattened cosines ``sum <a, b> / (sqrt(sum ||a||^2) sqrt(sum ||b||^2))`` per pair and group."""

    def __init__(self) -> None:
        self._g: dict[str, dict[str, dict[str, CosineAccumulator]]] = {}

    def add(self, pair: str, role: TensorRole, acc: CosineAccumulator) -> None:
        for lv, key in group_keys(role).items():
            g = self._g.setdefault(pair, {lv2: {} for lv2 in LEVELS})[lv]
            merge_cosine(g.setdefault(key, CosineAccumulator()), acc)

    def rows(self, level: str) -> list[dict[str, Any]]:
        out = []
        for pair, levels in self._g.items():
            for key in sorted(levels[level], key=lambda k: _sort_key(level, k)):
                acc = levels[level][key]
                out.append({"pair": pair, "level": level, "group": key, "n_tensors": acc.count, "cosine": acc.value,
                            "norm_a": math.sqrt(acc.norm_a_sq), "norm_b": math.sqrt(acc.norm_b_sq), "dot": acc.dot})
        return out

    def all_rows(self) -> list[dict[str, Any]]:
        return [r for lv in LEVELS for r in self.rows(lv)]

    def value(self, pair: str, level: str = "model", group: str = "all") -> float:
        return self._g[pair][level][group].value


@dataclass
class _Overlap:
    mso_sum: float = 0.0  # sum of per-tensor MSO (for the mean)
    base_sum: float = 0.0  # sum of per-tensor baselines max(ka, kb) / d
    inner: float = 0.0  # sum ||Qa^T Qb||_F^2
    inner_random: float = 0.0  # sum ka kb / d (its expectation for random subspaces)
    min_k: float = 0.0  # sum min(ka, kb)
    n: int = 0
    ka: list[int] = field(default_factory=list)
    kb: list[int] = field(default_factory=list)


class OverlapTable:
    """MSO per (pair, eta) and group: mean over tensors, pooled, and their random baselines."""

    def __init__(self) -> None:
        self._g: dict[tuple[str, float], dict[str, dict[str, _Overlap]]] = {}

    def add(self, pair: str, eta: float, role: TensorRole, *, mso: float, ka: int, kb: int, d: int) -> None:
        for lv, key in group_keys(role).items():
            g = self._g.setdefault((pair, eta), {lv2: {} for lv2 in LEVELS})[lv]
            o = g.setdefault(key, _Overlap())
            o.mso_sum += mso
            o.base_sum += max(ka, kb) / d
            o.inner += mso * min(ka, kb)
            o.inner_random += ka * kb / d
            o.min_k += min(ka, kb)
            o.n += 1
            o.ka.append(ka)
            o.kb.append(kb)

    def rows(self, level: str, pairs: Iterable[tuple[str, float]] | None = None) -> list[dict[str, Any]]:
        out = []
        for (pair, eta) in (pairs if pairs is not None else self._g):
            levels = self._g.get((pair, eta))
            if levels is None:
                continue
            for key in sorted(levels[level], key=lambda k: _sort_key(level, k)):
                o = levels[level][key]
                mean, base = o.mso_sum / o.n, o.base_sum / o.n
                pooled, pooled_base = _ratio(o.inner, o.min_k), _ratio(o.inner_random, o.min_k)
                out.append({"pair": pair, "eta": eta, "level": level, "group": key, "n_tensors": o.n,
                            "mso_mean": mean, "baseline_mean": base, "mso_pooled": pooled,
                            "baseline_pooled": pooled_base, "over_baseline": _ratio(pooled, pooled_base),
                            "k_a_mean": sum(o.ka) / o.n, "k_b_mean": sum(o.kb) / o.n})
        return out

    def all_rows(self) -> list[dict[str, Any]]:
        return [r for lv in LEVELS for r in self.rows(lv)]
