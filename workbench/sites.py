"""Activation sites: a layer and a component, named like TransformerLens hook points.

>>> Site(3, "resid_post").name
'blocks.3.hook_resid_post'
>>> Site.parse("blocks.0.hook_attn_out")
Site(layer=0, component='attn_out')
>>> [s.name for s in parse_sites("0,-1", n_layers=4)]
['blocks.0.hook_resid_post', 'blocks.3.hook_resid_post']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from workbench.errors import WorkbenchError

COMPONENTS = ("resid_pre", "resid_post", "attn_out", "mlp_out")


@dataclass(frozen=True, order=True)
class Site:
    """Where an activation lives: ``layer`` (0-based) and ``component`` (one of COMPONENTS)."""

    layer: int
    component: str = "resid_post"

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise WorkbenchError(f"unknown site component '{self.component}'. Valid: {', '.join(COMPONENTS)}")

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.component}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> "Site":
        m = re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", name)
        if not m:
            raise WorkbenchError(f"bad site name '{name}'; expected e.g. 'blocks.3.hook_resid_post'")
        return cls(int(m.group(1)), m.group(2))


def parse_layers(spec: str | int | Sequence[int] | None, n_layers: int) -> list[int]:
    """Layers from 'all', '5', '0,3,-1', '4-10' (inclusive) or a list; negatives count from the end."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    if isinstance(spec, int):
        items: list[int] = [spec]
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", part)
            if m:
                a, b = _norm(int(m.group(1)), n_layers), _norm(int(m.group(2)), n_layers)
                items.extend(range(a, b + 1))
            else:
                try:
                    items.append(int(part))
                except ValueError:
                    raise WorkbenchError(
                        f"bad layer spec '{spec}': use 'all', an index, a list '0,3,-1' or a range '4-10'"
                    ) from None
    else:
        items = list(spec)
    out: list[int] = []
    for i in items:
        j = _norm(int(i), n_layers)
        if j not in out:
            out.append(j)
    if not out:
        raise WorkbenchError(f"layer spec '{spec}' selects no layers (model has {n_layers})")
    return out


def _norm(i: int, n: int) -> int:
    if not -n <= i < n:
        raise WorkbenchError(f"layer {i} is out of range: this model has {n} layers (valid: 0..{n - 1}, or -{n}..-1)")
    return i % n


def parse_sites(layers: str | int | Sequence[int] | None, n_layers: int,
                components: Iterable[str] = ("resid_post",)) -> list[Site]:
    comps = list(components)
    return [Site(layer, c) for layer in parse_layers(layers, n_layers) for c in comps]
