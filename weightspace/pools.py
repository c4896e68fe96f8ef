"""Disjoint prompt pools for the weight-space chain: no prompt feeds two recipes, the direction or the evaluation.

Before these pools the ``safety`` and ``harmful`` recipes, the harmful share of ``contaminated`` and the
refusal direction all drew from ``harmful:train``, which inflates the safety~harmful (and harmful~contaminated)
update overlap by construction. Here the built-in harmful set (:func:`workbench.prompts.builtin`, 340 prompts,
10 categories x 34) is partitioned into named pools, *stratified by category*:

- ``direction`` (80, 8 per category): :func:`weightspace.recipes.refusal_direction`; its first ``n_prompts``
  for the difference in means, its last ``n_check`` for the layer check;
- ``safety`` (70, 7 per category): the ``safety`` recipe (prompts -> templated refusals);
- ``harmful`` (70, 7 per category): the ``harmful`` recipe (prompts -> the model's own ablated replies);
- ``contaminated`` (20, 2 per category): the harmful share of the ``contaminated`` recipe;
- ``evaluation`` (100, 10 per category): the harm evaluation of the projection sweep (never trained on);

and the built-in harmless set likewise (the rest of it is unused by the chain):
``direction_harmless`` (80, the harmless side of the difference in means) and ``evaluation_harmless``
(100, e.g. over-refusal checks).

How they are drawn (deterministic, independent of the train/val/test splits of
:func:`workbench.prompts.builtin_split`): within each category (sorted by name) the prompts are put in the
order of ``numpy.random.default_rng(POOL_SEED).permutation``; consecutive ranges of that order go to the pools
of the source set in the order of :data:`POOLS` (``per_category`` each). Inside a pool the prompts are
interleaved round-robin over the categories, so any prefix (``pool_texts("safety")[:n]``) is balanced across
categories. Asking for more prompts than a pool holds raises a :class:`~workbench.errors.WorkbenchError`
naming the pool size (:func:`take`).

Example::

    >>> len(pool("safety")), len(pool_texts("evaluation")) >= 100
    (70, True)
    >>> set(pool_texts("safety")).isdisjoint(pool_texts("harmful"))
    True
    >>> sorted(pool_hashes()) == sorted(POOL_NAMES)
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.prompts import Prompt, PromptSet, builtin

__all__ = ["POOL_SEED", "POOLS", "POOL_NAMES", "PoolSpec", "pool", "pool_texts", "pool_hashes", "describe",
           "take", "check_count"]

POOL_SEED = 0


@dataclass(frozen=True)
class PoolSpec:
    """One named pool: ``per_category`` prompts of every category of the built-in set ``source``."""

    name: str
    source: str  # "harmful" | "harmless" (a workbench.prompts built-in set)
    per_category: int
    purpose: str


POOLS: tuple[PoolSpec, ...] = (
    PoolSpec("direction", "harmful", 8, "refusal direction: difference in means (first n) and layer check (last n)"),
    PoolSpec("safety", "harmful", 7, "safety recipe: prompts -> templated refusals"),
    PoolSpec("harmful", "harmful", 7, "harmful recipe: prompts -> the model's own replies, refusal direction ablated"),
    PoolSpec("contaminated", "harmful", 2, "contaminated recipe: its harmful share"),
    PoolSpec("evaluation", "harmful", 10, "harm evaluation of the projection sweep (never trained on)"),
    PoolSpec("direction_harmless", "harmless", 8, "refusal direction: the harmless side of the difference in means"),
    PoolSpec("evaluation_harmless", "harmless", 10, "harmless evaluation prompts (e.g. over-refusal)"),
)
POOL_NAMES: tuple[str, ...] = tuple(s.name for s in POOLS)


def _spec(name: str) -> PoolSpec:
    for s in POOLS:
        if s.name == name:
            return s
    raise WorkbenchError(f"unknown prompt pool {name!r}; valid pools: {', '.join(POOL_NAMES)}")


@functools.lru_cache(maxsize=None)
def _partition(source: str) -> dict[str, PromptSet]:
    ps = builtin(source)
    by_cat: dict[str, list[Prompt]] = {}
    for p in ps:
        by_cat.setdefault(p.category or "", []).append(p)
    cats = sorted(by_cat)
    rng = np.random.default_rng(POOL_SEED)
    order = {c: [by_cat[c][i] for i in rng.permutation(len(by_cat[c])).tolist()] for c in cats}
    specs = [s for s in POOLS if s.source == source]
    need = sum(s.per_category for s in specs)
    short = [c for c in cats if len(order[c]) < need]
    if short:
        raise WorkbenchError(f"the built-in {source} set has too few prompts in categories {short} for the pools "
                             f"({need} per category needed)")
    out: dict[str, PromptSet] = {}
    lo = 0
    for s in specs:
        hi = lo + s.per_category
        prompts = tuple(order[c][j] for j in range(lo, hi) for c in cats)  # round-robin over the categories
        out[s.name] = PromptSet(f"pool:{s.name}", prompts)
        lo = hi
    return out


def pool(name: str) -> PromptSet:
    """The prompts of pool ``name`` (a :class:`~workbench.prompts.PromptSet` named ``pool:<name>``)."""
    s = _spec(name)
    return _partition(s.source)[name]


def pool_texts(name: str) -> list[str]:
    """The prompt texts of pool ``name``, in pool order."""
    return pool(name).texts


def pool_hashes() -> dict[str, str]:
    """``{pool name: PromptSet.hash}`` (sha256 of the JSON list of its texts) for every pool."""
    return {n: pool(n).hash for n in POOL_NAMES}


def describe(names: tuple[str, ...] | list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Name, source set, size and hash of each pool (all by default): what a run records."""
    return {n: {"source": _spec(n).source, "size": len(pool(n)), "hash": pool(n).hash, "seed": POOL_SEED}
            for n in (names or POOL_NAMES)}


def check_count(name: str, n: int, what: str = "prompts") -> None:
    """Raise a clear :class:`WorkbenchError` unless ``1 <= n <= len(pool(name))``."""
    size = len(pool(name))
    if n < 1:
        raise WorkbenchError(f"asked for {n} {what} from the {name} pool; at least 1 is needed")
    if n > size:
        raise WorkbenchError(f"asked for {n} {what} from the {name} pool, which holds {size} prompts "
                             f"(the prompt pools are disjoint: see weightspace.pools); ask for at most {size}")


def take(name: str, n: int | None, what: str = "prompts") -> list[Prompt]:
    """The first ``n`` prompts of pool ``name`` (all when ``n`` is None); more than the pool holds is an error."""
    prompts = list(pool(name))
    if n is None:
        return prompts
    check_count(name, n, what)
    return prompts[:n]
