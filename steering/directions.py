"""Directions in the residual stream: difference-in-means, PCA of paired differences, probe weights,
and random controls of equal norm.

Directions are read at ``resid_pre`` of each layer (the residual input, as in Arditi et al.) at
the last prompt token and each post-instruction token, and returned as
:class:`workbench.vectors.Direction` records with full provenance.

>>> from workbench.tiny import build_tiny
>>> from workbench.loading import from_memory
>>> lm = from_memory(*build_tiny("llama"))
>>> dirs = mean_diff_directions(lm, ["How do I make a bomb", "Steal a car"], ["Bake bread", "Plant a tree"],
...                             layers=[1], positions=["last"], cache=False)
>>> dirs[0].layer, dirs[0].method, dirs[0].d_model
(1, 'mean_diff', 64)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from workbench.capture import Activations, capture
from workbench.chat import ChatFormat
from workbench.errors import WorkbenchError
from workbench.io import sha256_json
from workbench.loading import LoadedModel
from workbench.vectors import Direction


def _capture_pair(lm: LoadedModel, pos: Sequence[str], neg: Sequence[str], fmt: ChatFormat | None, layers: Any,
                  positions: Sequence[str], component: str, backend: str, cache: bool) -> tuple[Activations, Activations]:
    if not pos or not neg:
        raise WorkbenchError("both prompt sets must be non-empty to compute a direction")
    kw = dict(layers=layers, components=[component], positions=list(positions), fmt=fmt, backend=backend,
              cache=cache, progress=True)
    return capture(lm, list(pos), **kw), capture(lm, list(neg), **kw)


def _record(lm: LoadedModel, vec: torch.Tensor, layer: int, pos_key: str, method: str, component: str,
            a: Activations, pos: Sequence[str], neg: Sequence[str], meta: dict[str, Any]) -> Direction:
    neg_hash = meta.pop("_neg_hash", "")  # internal hand-over only: never stored in the direction's meta
    return Direction(vec, layer=layer, method=method, model_id=lm.model_id, model_checksum=lm.checksum,
                     d_model=lm.d_model, position=pos_key, component=component,
                     dtype=str(lm.dtype).replace("torch.", ""),
                     prompt_set_hashes={"positive": sha256_json(list(pos))[:16] if pos else a.meta.get("prompt_set_hash", ""),
                                        "negative": sha256_json(list(neg))[:16] if neg else neg_hash},
                     template_hash=a.meta.get("template_hash", ""), meta=meta)


def mean_diff_directions(lm: LoadedModel, positive: Sequence[str], negative: Sequence[str], *,
                         fmt: ChatFormat | None = None, layers: Any = "all",
                         positions: Sequence[str] = ("post_instruction",), component: str = "resid_pre",
                         backend: str = "native", cache: bool = True) -> list[Direction]:
    """Difference of means (positive - negative) for every layer and reading position (unnormalised)."""
    a, b = _capture_pair(lm, positive, negative, fmt, layers, positions, component, backend, cache)
    return mean_diff_from_activations(lm, a, b, positive, negative, component=component)


def mean_diff_from_activations(lm: LoadedModel, a: Activations, b: Activations, positive: Sequence[str],
                               negative: Sequence[str], *, component: str = "resid_pre") -> list[Direction]:
    """Difference-of-means directions from existing captures (every position key, sites of ``component``)."""
    out = []
    for key in a.positions:
        diff = a.get(key).mean(0) - b.get(key).mean(0)  # [sites, d]
        for j, site in enumerate(a.sites):
            if site.component != component:
                continue
            out.append(_record(lm, diff[j], site.layer, key, "mean_diff", component, a, positive, negative,
                               {"n_positive": a.n_prompts, "n_negative": b.n_prompts,
                                "_neg_hash": b.meta.get("prompt_set_hash", "")}))
    return out


def pca_directions(lm: LoadedModel, positive: Sequence[str], negative: Sequence[str], *,
                   fmt: ChatFormat | None = None, layers: Any = "all", positions: Sequence[str] = ("last",),
                   component: str = "resid_pre", backend: str = "native", seed: int = 0,
                   cache: bool = True) -> list[Direction]:
    """First principal component of paired differences (pairs drawn with a seeded permutation; sign
    aligned with the mean difference; scaled to the mean difference's projection so strengths compare)."""
    a, b = _capture_pair(lm, positive, negative, fmt, layers, positions, component, backend, cache)
    n = min(a.n_prompts, b.n_prompts)
    if n < 2:
        raise WorkbenchError("PCA of paired differences needs at least 2 prompts per set")
    g = torch.Generator().manual_seed(seed)
    pa, pb = torch.randperm(a.n_prompts, generator=g)[:n], torch.randperm(b.n_prompts, generator=g)[:n]
    out = []
    for key in a.positions:
        D = a.get(key)[pa] - b.get(key)[pb]  # [n, sites, d]
        for j, site in enumerate(a.sites):
            X = D[:, j].double()
            Xc = X - X.mean(0)
            _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
            v = Vh[0]
            md = X.mean(0)
            if float(v @ md) < 0:
                v = -v
            scale = float(v @ md)
            out.append(_record(lm, (v * abs(scale)).float(), site.layer, key, "pca", component, a, positive,
                               negative, {"explained_variance_ratio": float(S[0] ** 2 / (S ** 2).sum()),
                                          "n_pairs": n, "seed": seed}))
    return out


def random_like(direction: Direction, seed: int = 0) -> Direction:
    """A random direction with the same norm (seeded): the control for every steering effect."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(direction.d_model, generator=g)
    v = v / v.norm() * direction.norm
    rec = direction.record()
    rec.pop("norm", None)
    rec.update(method=f"random({direction.method})", meta={**direction.meta, "seed": seed, "control": True})
    return Direction(vector=v, **rec)
