"""Match tensors across checkpoints (names, shapes) before any work, and select the tensors to analyse.

:func:`match_checkpoints` reads only file headers. It fails with a :class:`WorkbenchError` listing every
difference (names present in only some checkpoints, shapes that disagree, different model types); the one
allowed difference is a tied ``lm_head.weight`` that some checkpoints omit, which is left out of the
analysis and reported in :attr:`TensorPlan.skipped`.

Example::

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from weightspace.checkpoints import open_checkpoint
    >>> a, b = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 2)}, a + "/model.safetensors")
    >>> save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(4, 2)}, b + "/model.safetensors")
    >>> plan = match_checkpoints({"aligned": open_checkpoint(a), "ft": open_checkpoint(b)})
    >>> [(t.name, t.shape, t.module, t.layer) for t in plan.tensors]
    [('model.layers.0.mlp.up_proj.weight', (4, 2), 'up', 0)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from workbench.errors import WorkbenchError

from weightspace.checkpoints import Checkpoint
from weightspace.naming import MODULE_TYPES, TensorRole, classify, is_lm_head, uses_conv1d

__all__ = ["TensorInfo", "TensorPlan", "Selection", "match_checkpoints", "MAX_LISTED"]

MAX_LISTED = 30


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the analysis: its stored layout and its analysis (``[out, in]``) layout.

    Example::

        >>> from weightspace.naming import classify
        >>> t = TensorInfo(classify("transformer.h.0.mlp.c_fc.weight", conv1d=True), (64, 128), "F32")
        >>> t.shape, t.m, t.n, t.is_matrix
        ((128, 64), 128, 64, True)
    """

    role: TensorRole
    stored_shape: tuple[int, ...]
    dtype: str  # safetensors dtype code of the reference (first) checkpoint

    @property
    def name(self) -> str:
        return self.role.name

    @property
    def layer(self) -> int | None:
        return self.role.layer

    @property
    def module(self) -> str:
        return self.role.module

    @property
    def transpose(self) -> bool:
        return self.role.transpose

    @property
    def shape(self) -> tuple[int, ...]:
        """Analysis shape (``[out, in]`` for matrices)."""
        return tuple(reversed(self.stored_shape)) if self.transpose else self.stored_shape

    @property
    def is_matrix(self) -> bool:
        return len(self.stored_shape) == 2

    @property
    def m(self) -> int:
        """Output dimension (rows of the analysis layout); the length for vectors."""
        return int(self.shape[0]) if self.shape else 1

    @property
    def n(self) -> int:
        return int(self.shape[1]) if len(self.shape) >= 2 else 1

    @property
    def numel(self) -> int:
        k = 1
        for s in self.stored_shape:
            k *= int(s)
        return k


@dataclass
class TensorPlan:
    """The matched tensors of a set of checkpoints, in a stable order (blocks by layer, then the rest).

    ``skipped`` lists names left out (a tied ``lm_head`` missing from some checkpoints) with the reason;
    ``notes`` records harmless differences (e.g. stored dtypes that differ between checkpoints).
    """

    tensors: list[TensorInfo]
    checkpoints: dict[str, Checkpoint]
    conv1d: bool
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        layers = [t.layer for t in self.tensors if t.layer is not None]
        return max(layers) + 1 if layers else 0

    @property
    def d_model(self) -> int | None:
        for ck in self.checkpoints.values():
            if ck.d_model:
                return ck.d_model
        return None

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def select(self, selection: "Selection | None") -> list[TensorInfo]:
        return [t for t in self.tensors if selection is None or selection.accepts(t)]

    def describe(self) -> dict:
        return {"n_tensors": len(self.tensors), "n_layers": self.n_layers, "conv1d": self.conv1d,
                "skipped": self.skipped, "notes": self.notes,
                "checkpoints": {k: v.describe() for k, v in self.checkpoints.items()}}


@dataclass(frozen=True)
class Selection:
    """Which tensors an analysis or projection touches: layers, module types, and the non-layer tensors.

    ``nonlayer`` (embeddings, head, final norm) defaults to *included* when all layers are selected and
    *excluded* when a layer range is given (a projection "only for layers 4-10" leaves them alone).

    Example::

        >>> s = Selection.parse("1", "q,down", n_layers=2)
        >>> sorted(s.layers), sorted(s.modules), s.nonlayer
        ([1], ['down', 'q'], False)
    """

    layers: frozenset[int] | None = None
    modules: frozenset[str] | None = None
    nonlayer: bool = True

    @classmethod
    def parse(cls, layers: str | Iterable[int] | None, modules: str | Iterable[str] | None, *, n_layers: int,
              nonlayer: bool | None = None) -> "Selection":
        from workbench.sites import parse_layers

        lay = None
        if layers is not None and layers != "all" and layers != "":
            if n_layers < 1:
                raise WorkbenchError("a layer selection was given but no tensor belongs to a numbered layer")
            lay = frozenset(parse_layers(layers if isinstance(layers, str) else list(layers), n_layers))
        mods = None
        if modules is not None and modules != "all" and modules != "":
            items = [m.strip() for m in (modules.split(",") if isinstance(modules, str) else modules) if m.strip()]
            bad = [m for m in items if m not in MODULE_TYPES]
            if bad:
                raise WorkbenchError(f"unknown module type(s) {', '.join(bad)}; valid: {', '.join(MODULE_TYPES)}")
            mods = frozenset(items)
        nl = (lay is None) if nonlayer is None else bool(nonlayer)
        return cls(layers=lay, modules=mods, nonlayer=nl)

    def accepts(self, t: TensorInfo) -> bool:
        if self.modules is not None and t.module not in self.modules:
            return False
        if t.layer is None:
            return self.nonlayer
        return self.layers is None or t.layer in self.layers

    def describe(self) -> dict:
        return {"layers": sorted(self.layers) if self.layers is not None else "all",
                "modules": sorted(self.modules) if self.modules is not None else "all",
                "nonlayer": self.nonlayer}


def _fmt_shape(s: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(x) for x in s) + "]"


def _order_key(t: TensorInfo) -> tuple:
    return (0 if t.layer is not None else 1, t.layer if t.layer is not None else 0, t.name)


def match_checkpoints(checkpoints: Mapping[str, Checkpoint]) -> TensorPlan:
    """Match names and shapes across labelled checkpoints (headers only); fail with every difference.

    The first checkpoint is the reference for stored dtypes, the config (``model_type``, ``Conv1D``) and
    the order of labels in messages.

    Raises:
        WorkbenchError: names present in only some checkpoints (other than a tied ``lm_head.weight``),
            shapes that differ, or configs with different ``model_type``; the message lists them all
            (up to ``MAX_LISTED``).
    """
    cks = dict(checkpoints)
    if not cks:
        raise WorkbenchError("no checkpoints given")
    labels = list(cks)
    if len(set(labels)) != len(labels):
        raise WorkbenchError(f"checkpoint labels must be unique, got {labels}")
    first = cks[labels[0]]
    diffs: list[str] = []
    types = {lab: ck.model_type for lab, ck in cks.items() if ck.model_type is not None}
    if len(set(types.values())) > 1:
        diffs.append("model_type differs: " + ", ".join(f"'{v}' in '{k}'" for k, v in types.items()))
    all_names = sorted(set().union(*(set(ck.names) for ck in cks.values())))
    common: list[str] = []
    skipped: list[dict[str, str]] = []
    for name in all_names:
        have = [lab for lab in labels if name in cks[lab].index]
        if len(have) < len(labels):
            lacking = [lab for lab in labels if lab not in have]
            if is_lm_head(name):
                skipped.append({"name": name, "reason": f"tied output head: present in {have}, absent in {lacking} "
                                "(absent means tied to the embedding); left out of the analysis"})
                continue
            diffs.append(f"{name}: missing in {', '.join(repr(x) for x in lacking)} "
                         f"(present in {', '.join(repr(x) for x in have)})")
            continue
        shapes = {lab: cks[lab].shape(name) for lab in labels}
        if len(set(shapes.values())) > 1:
            diffs.append(f"{name}: shape differs: " + ", ".join(f"{_fmt_shape(s)} in '{lab}'" for lab, s in shapes.items()))
            continue
        common.append(name)
    if diffs:
        listed = "\n  - ".join(diffs[:MAX_LISTED])
        more = f"\n  ... and {len(diffs) - MAX_LISTED} more" if len(diffs) > MAX_LISTED else ""
        raise WorkbenchError(
            f"the checkpoints {', '.join(repr(x) for x in labels)} do not match ({len(diffs)} difference(s)); "
            f"nothing was computed:\n  - {listed}{more}"
        )
    if not common:
        raise WorkbenchError(f"the checkpoints {labels} share no tensors")
    conv1d = uses_conv1d(first.model_type, common)
    notes: list[str] = []
    mixed = [n for n in common if len({cks[lab].meta(n).dtype for lab in labels}) > 1]
    if mixed:
        notes.append(f"{len(mixed)} tensor(s) are stored in different dtypes across checkpoints (e.g. {mixed[0]}: "
                     + ", ".join(f"{cks[lab].meta(mixed[0]).dtype} in '{lab}'" for lab in labels)
                     + "); deltas are computed in float32 from each stored dtype")
    tensors = []
    for name in common:
        meta = first.meta(name)
        tensors.append(TensorInfo(classify(name, conv1d=conv1d, ndim=len(meta.shape)), meta.shape, meta.dtype))
    tensors.sort(key=_order_key)
    return TensorPlan(tensors=tensors, checkpoints=cks, conv1d=conv1d, skipped=skipped, notes=notes)
