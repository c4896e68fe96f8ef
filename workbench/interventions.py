"""Interventions: functions applied to the activation at a site, on a chosen set of positions.

Interventions are plain Python objects, independent of the hooking backend: every backend calls
``intervention(act, ctx)`` with the activation ``[batch, tokens, d]`` of the current forward chunk
and a :class:`HookContext` that knows which of those tokens are padding, prompt or generated.

>>> import torch
>>> from workbench.sites import Site
>>> v = torch.zeros(4); v[0] = 1.0
>>> iv = Addition(Site(0, "resid_post"), v, alpha=2.0)
>>> ctx = HookContext(pads=torch.tensor([0]), prompt_width=3, n_post=1, offset=0)
>>> iv(torch.zeros(1, 3, 4), ctx)[0, :, 0].tolist()
[2.0, 2.0, 2.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence, Union

import torch

from workbench.errors import WorkbenchError
from workbench.sites import Site

# Where an intervention writes: a keyword or explicit prompt positions (negative = from the prompt's end).
ApplyTo = Union[str, Sequence[int]]
APPLY_TO = ("all", "prompt", "generated", "last", "post_instruction")


@dataclass
class HookContext:
    """What a hook needs to know about the current forward chunk.

    ``offset`` is the absolute (padded) index of the chunk's first token: 0 for a full forward or a
    generation prefill, then prompt_width, prompt_width+1, ... for cached decoding steps.
    ``shared``: the number of leading prompt tokens every row shares that were computed in a separate pass
    (the native backend's shared-prefix cache). A chunk then starts at ``offset = shared`` and row ``i``'s
    column ``c`` is real when ``c >= pads[i]`` (absolute index ``>= pads[i] + shared``); every other rule
    (``last``, ``post_instruction``, indices from either end) keeps its meaning in the full padded layout.
    """

    pads: torch.Tensor  # [B] left pads per row
    prompt_width: int  # padded prompt length T0
    n_post: int
    offset: int = 0
    shared: int = 0
    #: the caller's row ids of the current batch rows (``None``: 0..B-1); rows dropped mid-generation keep
    #: the others' ids stable, so a row-restricted intervention (:class:`OnRows`) still finds its rows
    rows: torch.Tensor | None = None

    def row_ids(self, device: torch.device) -> torch.Tensor:
        """The caller's id of every current row ``[B]``."""
        if self.rows is None:
            return torch.arange(self.pads.shape[0], device=device)
        return self.rows.to(device)

    def mask(self, apply_to: ApplyTo, chunk_len: int, device: torch.device) -> torch.Tensor:
        """Boolean [B, chunk_len] of the positions to touch."""
        b = self.pads.shape[0]
        idx = torch.arange(self.offset, self.offset + chunk_len, device=device).unsqueeze(0).expand(b, -1)
        pads = self.pads.to(device).unsqueeze(1)
        real = idx >= pads + self.shared
        t0 = self.prompt_width
        if isinstance(apply_to, str):
            if apply_to == "all":
                return real
            if apply_to == "prompt":
                return real & (idx < t0)
            if apply_to == "generated":
                return idx >= t0
            if apply_to == "last":
                return idx == t0 - 1
            if apply_to == "post_instruction":
                return (idx >= t0 - self.n_post) & (idx < t0)
            raise WorkbenchError(f"unknown position set '{apply_to}'. Valid: {', '.join(APPLY_TO)} or a list of indices")
        m = torch.zeros_like(real)
        for p in apply_to:
            p = int(p)
            absolute = (t0 + p) * torch.ones_like(pads) if p < 0 else pads + p
            m |= idx == absolute
        return m & real & (idx < t0)


class Intervention:
    """Base class: ``site``, ``apply_to`` and ``edit(act) -> new act`` on the selected positions."""

    site: Site
    apply_to: ApplyTo = "all"
    #: the edit of one position depends on that position's activation only (so a forward may be split into
    #: chunks, e.g. a shared prompt prefix computed once); subclasses that look across positions say False
    position_wise: ClassVar[bool] = False

    def edit(self, act: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, act: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        m = ctx.mask(self.apply_to, act.shape[1], act.device)
        if not bool(m.any()):
            return act
        new = self.edit(act)
        return torch.where(m.unsqueeze(-1), new, act)


def _unit(v: torch.Tensor, what: str = "direction") -> torch.Tensor:
    v = v.detach().reshape(-1).float()
    if not torch.isfinite(v).all():
        raise WorkbenchError(f"the {what} has non-finite values")
    n = v.norm()
    if n == 0:
        raise WorkbenchError(f"the {what} is the zero vector")
    return v / n


def _check_width(v: torch.Tensor, act: torch.Tensor, what: str) -> None:
    if v.shape[-1] != act.shape[-1]:
        raise WorkbenchError(f"{what} has size {v.shape[-1]} but the model's activations have size {act.shape[-1]}")


def _set_projection(act: torch.Tensor, unit: torch.Tensor, value: float) -> torch.Tensor:
    """``act + (value - act . r) r``: ablation is value 0."""
    _check_width(unit, act, "the direction")
    r = unit.to(device=act.device, dtype=act.dtype)
    return act + (value - act @ r).unsqueeze(-1) * r


@dataclass
class Addition(Intervention):
    """Activation addition: ``act + alpha * vector`` (the vector is used as given, not normalised)."""

    position_wise: ClassVar[bool] = True

    site: Site
    vector: torch.Tensor
    alpha: float = 1.0
    apply_to: ApplyTo = "all"

    def __post_init__(self) -> None:
        if not torch.isfinite(self.vector).all():
            raise WorkbenchError("the steering vector has non-finite values")

    def edit(self, act: torch.Tensor) -> torch.Tensor:
        _check_width(self.vector, act, "the steering vector")
        return act + self.alpha * self.vector.to(device=act.device, dtype=act.dtype)


@dataclass
class Ablation(Intervention):
    """Directional ablation: ``act - weight * (act . r) r`` with ``r`` the unit direction.

    ``weight`` 1 (the default) removes the direction; a weight in [0, 1] removes that fraction of the
    projection (the per-layer weights of :mod:`steering.kernel`); 0 leaves the activation unchanged.
    """

    position_wise: ClassVar[bool] = True

    site: Site
    direction: torch.Tensor
    apply_to: ApplyTo = "all"
    weight: float = 1.0
    _unit_dir: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._unit_dir = _unit(self.direction)
        try:
            w = float(self.weight)
        except (TypeError, ValueError):
            w = math.nan
        if not math.isfinite(w):
            raise WorkbenchError(f"the ablation weight must be a finite number, got {self.weight!r}")
        self.weight = w

    def edit(self, act: torch.Tensor) -> torch.Tensor:
        # at weight 1 this is bit for bit the earlier ``act + (0 - act . r) r`` (1 * x = x, a - y = a + (-y))
        _check_width(self._unit_dir, act, "the direction")
        r = self._unit_dir.to(device=act.device, dtype=act.dtype)
        return act - (self.weight * (act @ r)).unsqueeze(-1) * r


@dataclass
class Clamp(Intervention):
    """Set the projection on a unit direction to ``value``: ``act + (value - act . r) r``."""

    position_wise: ClassVar[bool] = True

    site: Site
    direction: torch.Tensor
    value: float = 0.0
    apply_to: ApplyTo = "all"
    _unit_dir: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._unit_dir = _unit(self.direction)

    def edit(self, act: torch.Tensor) -> torch.Tensor:
        return _set_projection(act, self._unit_dir, self.value)


@dataclass
class FunctionIntervention(Intervention):
    """Any function of the activation, e.g. ``lambda a: a * 0.5`` (positions chosen by ``apply_to``)."""

    site: Site
    fn: Callable[[torch.Tensor], torch.Tensor]
    apply_to: ApplyTo = "all"

    def edit(self, act: torch.Tensor) -> torch.Tensor:
        out = self.fn(act)
        if not isinstance(out, torch.Tensor) or out.shape != act.shape:
            raise WorkbenchError(f"an intervention function must return a tensor of shape {tuple(act.shape)}")
        return out


class OnRows(Intervention):
    """``inner`` applied to some rows of the batch only, so several settings share one batched pass
    (each prompt repeated once per setting; the caller's row ids, :attr:`HookContext.rows`).

    >>> import torch
    >>> from workbench.sites import Site
    >>> iv = OnRows(Addition(Site(0, "resid_pre"), torch.ones(2)), rows=[1])
    >>> ctx = HookContext(pads=torch.zeros(2, dtype=torch.long), prompt_width=1, n_post=0)
    >>> iv(torch.zeros(2, 1, 2), ctx)[:, 0].tolist()
    [[0.0, 0.0], [1.0, 1.0]]
    """

    # not split into a shared-prefix pass: the prefix pass runs one row for every setting
    position_wise: ClassVar[bool] = False

    def __init__(self, inner: Intervention, rows: Sequence[int] | torch.Tensor) -> None:
        self.inner = inner
        self.site = inner.site
        self.apply_to = inner.apply_to
        self.rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)

    def edit(self, act: torch.Tensor) -> torch.Tensor:
        return self.inner.edit(act)

    def __call__(self, act: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        on = torch.isin(ctx.row_ids(act.device), self.rows.to(act.device))
        if not bool(on.any()):
            return act
        m = ctx.mask(self.apply_to, act.shape[1], act.device) & on.unsqueeze(1)
        if not bool(m.any()):
            return act
        return torch.where(m.unsqueeze(-1), self.inner.edit(act), act)

    def __repr__(self) -> str:
        return f"OnRows({self.inner!r}, rows={self.rows.tolist()})"


def ablation_everywhere(direction: torch.Tensor, n_layers: int) -> list[Intervention]:
    """Arditi et al.'s directional ablation: residual input of every layer and every attention / MLP output."""
    out: list[Intervention] = []
    for i in range(n_layers):
        for comp in ("resid_pre", "attn_out", "mlp_out"):
            out.append(Ablation(Site(i, comp), direction))
    return out
