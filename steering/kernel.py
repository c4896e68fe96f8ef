"""Parametrised directional ablation: per-layer weights from a small kernel, a direction that may lie between
two layers, applied at run time or baked into the weights.

A weight ``w`` at a write ``h`` into the residual stream (an attention output, an MLP output, the embedding)
removes that fraction of the write's projection on the unit direction ``r``::

    h <- h - w (h . r) r          w = 1: the direction is removed from the write; w = 0: untouched

**Kernel** (one per component, attention and MLP outputs separately): a tent on a pedestal over the layers::

    w(l) = floor + (peak - floor) * max(0, 1 - |l - position| / width)        0 <= floor <= peak <= 1, width > 0

``peak`` is the largest weight, reached at layer ``position`` (fractional allowed: between two layers neither
gets the full peak), falling linearly to ``floor`` at ``width`` layers from it; every layer further away gets
``floor``, which is therefore the smallest weight. (The peer tool heretic uses the same four numbers but gives
the layers beyond the window weight 0 and ``floor`` only at its edge; here the profile is continuous and
``floor = 0`` is heretic's shape with its edge weight 0.)

**Which writes.** Every layer's attention output (``attn`` kernel) and MLP output (``mlp`` kernel), and the
embedding, i.e. the residual input of layer 0 (one scalar ``embed``; position embeddings too where the model
has them). The full ablation of :func:`workbench.interventions.ablation_everywhere` also ablates the residual
input of every later layer; with a weight below 1 that would rescale all earlier writes from that layer on,
which no weight edit can reproduce, so the kernel ablation leaves it out. With weight 1 everywhere the stream
then holds no component along ``r`` and those extra ablations are no-ops: :meth:`AblationProfile.uniform`
(1.0) equals the full ablation (up to rounding), and weight 0 everywhere is the unmodified model.

**Direction**: a fixed :class:`~workbench.vectors.Direction`, or :func:`interpolate_direction` between the
mean-difference directions of two adjacent layers at a fractional index.

**Run time or weights**: :meth:`KernelAblation.interventions` (``Ablation`` interventions with per-site
weights: every backend runs them) and :meth:`KernelAblation.bake` (weighted orthogonalisation
``W <- W - w r r^T W``, :func:`steering.orthogonalize.orthogonalize_model`) give the same logits.

>>> Kernel(peak=1.0, position=2.0, floor=0.25, width=2.0).weights(5)
[0.25, 0.625, 1.0, 0.625, 0.25]
>>> Kernel(peak=1.0, position=1.5, floor=0.0, width=1.0).weights(4)
[0.0, 0.5, 0.5, 0.0]
>>> import torch
>>> from workbench.tiny import build_tiny
>>> from workbench.loading import from_memory
>>> from workbench.vectors import Direction
>>> lm = from_memory(*build_tiny("llama"))
>>> d = Direction(torch.ones(64), layer=1, method="mean_diff", model_id=lm.model_id,
...               model_checksum=lm.checksum, d_model=64, component="resid_pre")
>>> ka = KernelAblation(AblationProfile(attn=Kernel(1.0, 0.0, 0.5, 1.0), mlp=Kernel(0.5, 1.0, 0.0, 1.0)), d)
>>> [(iv.site.name, iv.weight) for iv in ka.interventions(lm.n_layers)]
[('blocks.0.hook_attn_out', 1.0), ('blocks.1.hook_attn_out', 0.5), ('blocks.1.hook_mlp_out', 0.5)]
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.interventions import Ablation, Intervention
from workbench.sites import Site
from workbench.vectors import Direction

FORMAT = "workbench-kernel-ablation/1"
COMPONENTS = ("attn_out", "mlp_out")


def _finite(name: str, v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        raise WorkbenchError(f"kernel {name} must be a finite number, got {v!r}")
    return x


@dataclass(frozen=True)
class Kernel:
    """Per-layer ablation weights ``floor + (peak - floor) * max(0, 1 - |l - position| / width)``.

    ``peak`` in [0, 1]; ``floor`` in [0, peak]; ``position``: the peak's layer (any finite number, fractional
    allowed); ``width`` > 0 layers: the distance at which the weight has fallen to ``floor``.
    """

    peak: float
    position: float
    floor: float
    width: float

    def __post_init__(self) -> None:
        for name in ("peak", "position", "floor", "width"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        if not 0.0 <= self.peak <= 1.0:
            raise WorkbenchError(f"kernel peak must be in [0, 1], got {self.peak}")
        if not 0.0 <= self.floor <= self.peak:
            raise WorkbenchError(f"kernel floor must be in [0, peak] = [0, {self.peak}], got {self.floor}")
        if not self.width > 0:
            raise WorkbenchError(f"kernel width must be > 0 layers, got {self.width}")

    def weight(self, layer: float) -> float:
        """The weight at one layer."""
        tent = max(0.0, 1.0 - abs(layer - self.position) / self.width)
        return self.floor + (self.peak - self.floor) * tent

    def weights(self, n_layers: int) -> list[float]:
        """The weights of layers ``0 .. n_layers - 1``."""
        if n_layers < 1:
            raise WorkbenchError(f"n_layers must be >= 1, got {n_layers}")
        return [self.weight(layer) for layer in range(n_layers)]

    @classmethod
    def constant(cls, w: float) -> "Kernel":
        """The same weight ``w`` at every layer."""
        return cls(peak=w, position=0.0, floor=w, width=1.0)


@dataclass(frozen=True)
class AblationProfile:
    """Ablation weights for a whole model: a kernel for the attention outputs, one for the MLP outputs and a
    scalar for the embedding (the residual input of layer 0; 0 by default, as heretic leaves it alone)."""

    attn: Kernel
    mlp: Kernel
    embed: float = 0.0

    def __post_init__(self) -> None:
        e = _finite("embed weight", self.embed)
        if not 0.0 <= e <= 1.0:
            raise WorkbenchError(f"the embedding weight must be in [0, 1], got {e}")
        object.__setattr__(self, "embed", e)

    @classmethod
    def uniform(cls, w: float) -> "AblationProfile":
        """Weight ``w`` on every write (1.0: the full ablation; 0.0: the unmodified model)."""
        return cls(Kernel.constant(w), Kernel.constant(w), embed=w)

    def layer_weights(self, n_layers: int) -> dict[str, list[float]]:
        """``{"attn_out": [w_0, ...], "mlp_out": [...]}`` for ``n_layers`` layers."""
        return {"attn_out": self.attn.weights(n_layers), "mlp_out": self.mlp.weights(n_layers)}

    def interventions(self, direction: torch.Tensor, n_layers: int) -> list[Intervention]:
        """Runtime ablation: ``Ablation(site, r, weight=w)`` at every write with a non-zero weight."""
        out: list[Intervention] = []
        if self.embed > 0:
            out.append(Ablation(Site(0, "resid_pre"), direction, weight=self.embed))
        lw = self.layer_weights(n_layers)
        for layer in range(n_layers):
            for comp in COMPONENTS:
                w = lw[comp][layer]
                if w > 0:
                    out.append(Ablation(Site(layer, comp), direction, weight=w))
        return out

    def module_weights(self, model: nn.Module) -> dict[str, float]:
        """``{writer name: w}`` for :func:`steering.orthogonalize.orthogonalize_model` (names as
        :meth:`workbench.arch.Arch.writes_to_residual` gives them; position embeddings take ``embed``)."""
        from workbench.arch import get_arch

        arch = get_arch(model)
        lw = self.layer_weights(arch.n_layers)
        out: dict[str, float] = {}
        for name, _ in arch.writes_to_residual():
            if name in ("embed", "pos_embed"):
                out[name] = self.embed
            else:
                _, i, comp = name.split(".")
                out[name] = lw[comp][int(i)]
        return out

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "AblationProfile":
        try:
            return cls(attn=Kernel(**rec["attn"]), mlp=Kernel(**rec["mlp"]), embed=rec["embed"])
        except (KeyError, TypeError) as e:
            raise WorkbenchError(f"not an ablation profile record ({type(e).__name__}: {e}); expected "
                                 f"{{'attn': {{peak, position, floor, width}}, 'mlp': {{...}}, 'embed': w}}") from e


def interpolate_direction(directions: Sequence[Direction], index: float) -> Direction:
    """The unit direction at fractional layer ``index`` between per-layer directions.

    ``r = normalise((1 - t) u_a + t u_b)`` with ``a = floor(index)``, ``b = a + 1``, ``t = index - a`` and
    ``u_a``, ``u_b`` the *unit* directions of layers a and b. Both endpoints are normalised first (as heretic
    does), so ``t`` is the mixing proportion whatever the layers' mean-difference norms, which grow with depth
    (mixing the raw vectors would pull the mix towards the deeper layer); the mix of two unit vectors is shorter
    than 1 and is normalised again. An integer index gives that layer's unit direction.

    ``directions``: one per layer (same position and component), e.g. :func:`steering.mean_diff_directions`
    at one position. The result keeps their provenance; ``layer`` is ``a``, ``meta`` records the index.

    >>> mk = lambda v, l: Direction(torch.tensor(v), layer=l, method="mean_diff", model_id="m",
    ...                             model_checksum="c", d_model=2)
    >>> r = interpolate_direction([mk([2.0, 0.0], 0), mk([0.0, 5.0], 1)], 0.5)
    >>> [round(x, 4) for x in r.vector.tolist()], r.method, r.meta["direction_index"]
    ([0.7071, 0.7071], 'interpolated(mean_diff)', 0.5)
    """
    idx = _finite("direction index", index)
    by_layer: dict[int, Direction] = {}
    for d in directions:
        if d.layer in by_layer:
            raise WorkbenchError(f"two directions for layer {d.layer}: give one per layer (a single position, "
                                 f"e.g. pick with --position)")
        by_layer[d.layer] = d
    if not by_layer:
        raise WorkbenchError("no directions to interpolate between")
    lo, hi = min(by_layer), max(by_layer)
    if not lo <= idx <= hi:
        raise WorkbenchError(f"direction index {idx} is outside the layers with a direction ({lo}..{hi})")
    a = int(math.floor(idx))
    t = idx - a
    if a not in by_layer or (t > 0 and a + 1 not in by_layer):
        need = [x for x in ([a, a + 1] if t > 0 else [a]) if x not in by_layer]
        raise WorkbenchError(f"direction index {idx} needs the direction of layer(s) {need}, which the file lacks")
    da = by_layer[a]
    v = da.unit.double()
    if t > 0:
        v = (1 - t) * v + t * by_layer[a + 1].unit.double()
    n = float(v.norm())
    if n < 1e-8:
        raise WorkbenchError(f"the directions of layers {a} and {a + 1} are opposite: their mix at {idx} is zero")
    rec = da.record()
    rec.pop("norm", None)
    rec.update(method=f"interpolated({da.method})",
               meta={**da.meta, "direction_index": idx, "layers": [a, a + 1] if t > 0 else [a], "mix": t})
    return Direction(vector=(v / n).float(), **rec)


@dataclass(frozen=True)
class KernelAblation:
    """An ablation profile and the direction it removes: what ``steer optimize`` writes.

    ``interventions(n_layers)`` applies it at run time, ``bake(model)`` writes it into the weights (in place).
    """

    profile: AblationProfile
    direction: Direction

    def interventions(self, n_layers: int) -> list[Intervention]:
        return self.profile.interventions(self.direction.unit, n_layers)

    def bake(self, model: nn.Module, *, allow_post_norm: bool = False) -> list[str]:
        """Weighted orthogonalisation of ``model`` in place; returns the edited writers."""
        from steering.orthogonalize import orthogonalize_model

        return orthogonalize_model(model, self.direction.unit, allow_post_norm=allow_post_norm,
                                   weights=self.profile.module_weights(model))


def save_kernel_ablation(path: str | Path, ka: KernelAblation, meta: dict[str, Any] | None = None) -> Path:
    """Write ``ka`` to one safetensors file (atomic): tensor ``direction`` and, in the metadata, the format,
    the direction's record (provenance), the profile and ``meta`` (JSON)."""
    from safetensors.torch import save_file

    from workbench.io import _atomic

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    md = {"format": FORMAT, "direction": json.dumps(ka.direction.record()),
          "profile": json.dumps(ka.profile.record()), "meta": json.dumps(meta or {})}
    _atomic(path, lambda tmp: save_file({"direction": ka.direction.vector.contiguous()}, tmp, metadata=md))
    return path


def load_kernel_ablation(path: str | Path) -> KernelAblation:
    """Read a file written by :func:`save_kernel_ablation` (e.g. ``chosen_ablation.safetensors`` of
    ``steer optimize``). Check the direction against the model with ``ka.direction.check_compatible(lm)``."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise WorkbenchError(f"no such kernel-ablation file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != FORMAT:
                raise WorkbenchError(f"{path} is not a kernel-ablation file (format {md.get('format')!r}); give the "
                                     f"chosen_ablation.safetensors written by 'steer optimize'")
            rec = json.loads(md["direction"])
            rec.pop("norm", None)
            direction = Direction(vector=f.get_tensor("direction"), **rec)
            profile = AblationProfile.from_record(json.loads(md["profile"]))
    except WorkbenchError:
        raise
    except Exception as e:
        raise WorkbenchError(f"could not read {path} as a kernel-ablation file ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'})") from e
    return KernelAblation(profile, direction)


def read_kernel_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` JSON stored by :func:`save_kernel_ablation` (e.g. the trial it came from)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))


__all__ = ["Kernel", "AblationProfile", "KernelAblation", "interpolate_direction", "save_kernel_ablation",
           "load_kernel_ablation", "read_kernel_meta"]
