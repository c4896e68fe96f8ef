"""Steering interventions built from :class:`~workbench.vectors.Direction` s.

>>> import torch
>>> from workbench.vectors import Direction
>>> d = Direction(torch.ones(8), layer=3, method="mean_diff", model_id="m", model_checksum="c", d_model=8,
...               component="resid_pre")
>>> [iv.site.name for iv in addition(d, alpha=2.0)]
['blocks.3.hook_resid_pre']
>>> len(ablation(d, n_layers=4))
12
"""

from __future__ import annotations

from typing import Sequence

from workbench.errors import WorkbenchError
from workbench.interventions import Ablation, Addition, ApplyTo, Clamp, Intervention, ablation_everywhere
from workbench.sites import Site
from workbench.vectors import Direction


def addition(direction: Direction, alpha: float = 1.0, *, layers: Sequence[int] | None = None,
             apply_to: ApplyTo = "all", component: str | None = None) -> list[Intervention]:
    """Add ``alpha * vector`` at the direction's layer (or the given layers), at its component."""
    comp = component or direction.component
    if comp not in ("resid_pre", "resid_post"):
        raise WorkbenchError(f"addition is applied to the residual stream; got component '{comp}'")
    ls = list(layers) if layers is not None else [direction.layer]
    return [Addition(Site(layer, comp), direction.vector, float(alpha), apply_to) for layer in ls]


def ablation(direction: Direction, n_layers: int) -> list[Intervention]:
    """Directional ablation of the unit direction everywhere (residual input of every layer, every
    attention and MLP output, all positions)."""
    return ablation_everywhere(direction.unit, n_layers)


def clamp(direction: Direction, value: float, *, layers: Sequence[int], apply_to: ApplyTo = "all") -> list[Intervention]:
    """Clamp the projection on the unit direction to ``value`` at the residual input of the given layers."""
    return [Clamp(Site(layer, "resid_pre"), direction.unit, float(value), apply_to) for layer in layers]


__all__ = ["addition", "ablation", "clamp", "Ablation", "Addition"]
