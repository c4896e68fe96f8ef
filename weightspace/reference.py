"""Reference subspaces, tensor by tensor: from a reference update, or from activation-space directions.

A reference turns one tensor into a :class:`TensorOperator` ``P`` that the projection applies to an update:

* :class:`DeltaReference` - the top-k (``"topk"``), random-k (``"randomk"``) singular vectors of a reference
  update ``Delta_ref`` (``Delta_A = W_A - W_0``, ``Delta_S = W_S - W_A`` or any ``Delta_T``), or a random
  k-dim subspace (``"random"``), ``k = k(rho)``; left (output) space by default, right (input) space as an
  option. 1-D (and other non-matrix) tensors use the rank-1 rule ``(<D, Dref> / ||Dref||^2) Dref``. Where
  ``Delta_ref`` is zero the TopK / RandomK operator is zero (no subspace to project on). The ``"random"``
  control never looks at ``Delta_ref``: a seeded random ``k(rho)``-dim subspace (nested across rho) for
  matrices, a seeded random unit direction for 1-D tensors, also where ``Delta_ref`` is zero. Embedding
  tables use the left space of the weight *as stored* (``[vocab, d_model]``: vocabulary space) unless
  ``embedding_orientation="transposed"`` (``d_model`` space). The SafeLoRA operator ``V V^T / ||V||_F``
  (``V = Delta_ref``) is available as ``operator="safelora"``.
* :class:`DirectionReference` - the span of activation-space directions (a refusal direction, probe
  directions; :func:`workbench.vectors.load_directions`) in the output space of every matrix whose output
  width equals ``d_model`` (``side="right"``: input width), optionally only the modules that write to
  (read from) the residual stream. ``"random"`` gives a random subspace of the same dimension.

Example::

    >>> import torch
    >>> from workbench.subspace import orthonormalize
    >>> op = TensorOperator("basis", basis=orthonormalize(torch.eye(3)[:, :1]))
    >>> op.apply(torch.ones(3, 2)).tolist(), op.k, op.d
    ([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]], 1, 3)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.subspace import Basis, energy_kept, k_for_rank_fraction, orthonormalize, project, project_rank1

from weightspace.checkpoints import Checkpoint
from weightspace.deltas import DeltaSpec, load_delta
from weightspace.naming import RESIDUAL_READERS, RESIDUAL_WRITERS
from weightspace.plan import TensorInfo
from weightspace.spectral import (KINDS, Spectrum, check_fraction, check_orientation, compute_dtype,
                                  effective_side, random_basis, random_unit_vector, spectrum_of, tensor_seed)

__all__ = ["TensorOperator", "Reference", "Prepared", "DeltaReference", "DirectionReference", "OPERATORS"]

OPERATORS = ("projector", "safelora")


@dataclass
class TensorOperator:
    """The operator ``P`` a reference gives one tensor.

    kinds: ``"basis"`` (orthogonal projector ``U U^T`` on ``side``), ``"rank1"`` (projection on the flattened
    reference update), ``"safelora"`` (``V V^T / ||V||_F``), ``"zero"`` (``P = 0``: the reference update of
    this tensor is zero).

    ``k``/``d`` give the random expectation ``k / d`` of the energy kept (``nan`` for SafeLoRA).
    """

    kind: str
    side: str = "left"
    basis: Basis | None = None
    vector: torch.Tensor | None = None  # rank1: the reference update; safelora: V (analysis layout)
    d: int = 0
    ref_energy: float = float("nan")  # fraction of the reference update's energy the subspace holds
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind == "basis" and self.basis is not None:
            self.d = self.basis.d

    @property
    def k(self) -> int:
        if self.kind == "basis":
            return self.basis.k  # type: ignore[union-attr]
        return 1 if self.kind == "rank1" else 0

    @property
    def random_expectation(self) -> float:
        """Expected energy fraction kept by a uniformly random subspace of the same dimension."""
        if self.kind == "safelora":
            return float("nan")
        return self.k / self.d if self.d else 0.0

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """``P delta`` in ``delta``'s dtype and layout."""
        if self.kind == "zero":
            return torch.zeros_like(delta)
        if self.kind == "rank1":
            return project_rank1(delta, self.vector)
        if self.kind == "basis":
            return project(delta, self.basis, self.side)  # type: ignore[arg-type]
        if self.kind == "safelora":
            V = self.vector
            ct = V.dtype
            D = delta.to(ct)
            norm = torch.linalg.matrix_norm(V) if V.ndim == 2 else V.norm()
            if V.ndim != 2:
                out = V * (V.reshape(-1) @ D.reshape(-1)) / norm
            elif self.side == "left":
                out = V @ (V.T @ D) / norm
            else:
                out = (D @ V.T) @ V / norm
            return out.to(delta.dtype)
        raise WorkbenchError(f"internal: unknown operator kind {self.kind!r}")

    def energy(self, delta: torch.Tensor, projected: torch.Tensor | None = None) -> tuple[float, float]:
        """``(||P delta||^2, ||delta||^2)`` in float64 (core :func:`energy_kept` for bases)."""
        if self.kind == "basis" and delta.ndim <= 2:
            return energy_kept(delta, self.basis, self.side)  # type: ignore[arg-type]
        p = self.apply(delta) if projected is None else projected
        return float(torch.sum(p.double() ** 2)), float(torch.sum(delta.double() ** 2))


class Reference:
    """Interface: a reference subspace defined tensor by tensor."""

    label: str = "reference"
    side: str = "left"
    kinds: tuple[str, ...] = KINDS
    uses_rho: bool = True

    def checkpoints(self) -> dict[str, Checkpoint]:
        """Checkpoints the reference reads (validated together with the others before any work)."""
        return {}

    def check_kind(self, kind: str) -> None:
        """Raise a :class:`WorkbenchError` when ``kind`` is not available for this reference."""
        if kind not in self.kinds:
            extra = " (RandomK needs a reference update)" if kind == "randomk" else ""
            raise WorkbenchError(f"kind {kind!r} is not available for this reference; valid: "
                                 f"{', '.join(self.kinds)}{extra}")

    def covers(self, info: TensorInfo) -> bool:
        return True

    def prepare(self, info: TensorInfo, *, operator: str = "projector", kinds: Sequence[str] = KINDS,
                max_rho: float = 1.0) -> Any:
        """Per-tensor state reused across grid points (an SVD, a vector)."""
        raise NotImplementedError

    def operator(self, info: TensorInfo, prepared: Any, rho: float | None, kind: str, seed: int,
                 operator: str = "projector") -> TensorOperator:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "side": self.side}


def _check_side(side: str) -> str:
    if side not in ("left", "right"):
        raise WorkbenchError(f"side must be 'left' (output space) or 'right' (input space), got {side!r}")
    return side


@dataclass
class Prepared:
    """Per-tensor reference state reused across grid points."""

    zero: bool  # the reference update of this tensor is zero
    spectrum: Spectrum | None = None  # matrices, projector operator
    vector: torch.Tensor | None = None  # non-matrices (rank-1 rule) and the SafeLoRA operator


class DeltaReference(Reference):
    """Subspaces of a reference update ``Delta_ref = new - old`` (see the module docstring).

    Args:
        spec: the reference update.
        side: ``"left"`` (output space, default) or ``"right"`` (input space).
        svd_dtype: ``"auto"`` (float64 unless huge), ``"float64"`` or ``"float32"``.
        method: ``"exact"`` SVD, or ``"randomized"`` (seeded sketch of the top ``k``; TopK only).
        embedding_orientation: ``"stored"`` (default, the study's convention: the left space of the
            embedding as stored, i.e. the vocabulary space) or ``"transposed"`` (``d_model`` space).

    Example::

        >>> ref = DeltaReference(DeltaSpec("alignment", aligned, base))                    # doctest: +SKIP
        >>> P = ref.operator(info, ref.prepare(info), rho=0.25, kind="topk", seed=0)       # doctest: +SKIP
        >>> P.k, P.random_expectation                                                     # doctest: +SKIP
        (16, 0.25)
    """

    def __init__(self, spec: DeltaSpec, *, side: str = "left", svd_dtype: str = "auto", method: str = "exact",
                 embedding_orientation: str = "stored") -> None:
        self.spec = spec
        self.embedding_orientation = check_orientation(embedding_orientation)
        self.label = spec.label
        self.side = _check_side(side)
        compute_dtype(1, svd_dtype)  # validate early
        if method not in ("exact", "randomized"):
            raise WorkbenchError(f"svd method must be 'exact' or 'randomized', got {method!r}")
        self.svd_dtype = svd_dtype
        self.method = method

    def side_of(self, info: TensorInfo) -> str:
        """The side of this tensor's analysis layout that the reference subspace lives in."""
        return effective_side(info, self.side, self.embedding_orientation)

    def checkpoints(self) -> dict[str, Checkpoint]:
        return {self.spec.new.label: self.spec.new, self.spec.old.label: self.spec.old}

    def prepare(self, info: TensorInfo, *, operator: str = "projector", kinds: Sequence[str] = KINDS,
                max_rho: float = 1.0) -> Prepared:
        """Load ``Delta_ref`` for this tensor and compute what the operators need (one SVD at most)."""
        D = load_delta(self.spec, info)
        if not bool(D.any()):
            return Prepared(zero=True)
        if not info.is_matrix or operator == "safelora":
            return Prepared(zero=False, vector=D.to(compute_dtype(info.numel, self.svd_dtype)))
        if set(kinds) <= {"random"}:
            return Prepared(zero=False)  # the random control needs only the shape
        exact = self.method == "exact" or "randomk" in kinds
        side = self.side_of(info)
        m, n = (info.m, info.n) if side == "left" else (info.n, info.m)
        rank = None if exact else k_for_rank_fraction(m, n, max_rho)
        sp = spectrum_of(D, side=side, method="exact" if exact else "randomized",
                         seed=tensor_seed(0, info.name), rank=rank, svd_dtype=self.svd_dtype)
        return Prepared(zero=False, spectrum=sp)

    def operator(self, info: TensorInfo, prepared: Prepared, rho: float | None, kind: str, seed: int,
                 operator: str = "projector") -> TensorOperator:
        if kind not in KINDS:
            raise WorkbenchError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if operator not in OPERATORS:
            raise WorkbenchError(f"operator must be one of {', '.join(OPERATORS)}, got {operator!r}")
        matrix = info.is_matrix
        side = self.side_of(info) if matrix else self.side
        d = (info.m if side == "left" else info.n) if matrix else info.numel
        sd = tensor_seed(seed, info.name)
        meta = {"zero_reference": True} if prepared.zero else {}
        if kind == "random" and operator == "projector":
            # the random control ignores Delta_ref (its direction and whether it is zero)
            if not matrix:
                v = random_unit_vector(info.numel, sd).reshape(info.shape)
                return TensorOperator("rank1", side, vector=v, d=d, meta={"random": True, **meta})
            rho = check_fraction(rho, "rho")
            other = info.n if side == "left" else info.m
            b = random_basis(d, other, rho, sd, dtype=compute_dtype(info.numel, self.svd_dtype))
            return TensorOperator("basis", side, basis=b, ref_energy=b.energy, meta=meta)
        if prepared.zero:
            return TensorOperator("zero", side, d=d, meta=meta)
        if not matrix:
            return TensorOperator("rank1", side, vector=prepared.vector, d=d, ref_energy=1.0)
        if operator == "safelora":
            return TensorOperator("safelora", side, vector=prepared.vector, d=d)
        rho = check_fraction(rho, "rho")
        b = prepared.spectrum.rank_basis(rho, kind, sd)  # type: ignore[union-attr]
        return TensorOperator("basis", side, basis=b, ref_energy=b.energy)

    def describe(self) -> dict[str, Any]:
        return {"type": "delta", **self.spec.describe(), "side": self.side, "svd_dtype": self.svd_dtype,
                "method": self.method, "embedding_orientation": self.embedding_orientation}


class DirectionReference(Reference):
    """The span of activation-space directions, in every matrix whose output (input) width is ``d_model``.

    Args:
        vectors: ``[d_model, r]`` tensor, a list of 1-D tensors, or :class:`workbench.vectors.Direction` s.
        side: ``"left"`` (output space: matrices that write vectors of width ``d_model``) or ``"right"``.
        residual_only: only modules that really write to (left) / read from (right) the residual stream
            (``embed, o, down`` / ``q, k, v, gate, up, lm_head``); without it, any matrix of matching width
            is covered (e.g. ``q_proj`` when heads x head_dim = d_model).

    ``"topk"`` means the span itself; ``"random"`` a random subspace of the same dimension; ``rho`` is
    not used. Biases of matching width in residual writers are projected on the span too.

    ``embedding_orientation`` defaults to ``"transposed"`` here (unlike :class:`DeltaReference`): activation
    directions live in ``d_model``, which is the embedding's output space only in the transposed layout;
    ``"stored"`` takes the embedding's stored left space (vocabulary), which no direction covers. The
    setting is recorded in :meth:`describe`.

    Example::

        >>> ref = DirectionReference(torch.eye(4)[:, :1])
        >>> ref.k, ref.d_model
        (1, 4)
    """

    uses_rho = False
    kinds = ("topk", "random")

    def __init__(self, vectors: Any, *, side: str = "left", residual_only: bool = False, label: str = "directions",
                 meta: dict[str, Any] | None = None, embedding_orientation: str = "transposed") -> None:
        from workbench.vectors import Direction

        if isinstance(vectors, torch.Tensor):
            V = vectors.unsqueeze(1) if vectors.ndim == 1 else vectors
        else:
            vecs = [v.vector if isinstance(v, Direction) else torch.as_tensor(v) for v in vectors]
            if not vecs:
                raise WorkbenchError("no directions given")
            widths = {int(v.numel()) for v in vecs}
            if len(widths) != 1:
                raise WorkbenchError(f"directions have different widths {sorted(widths)}; they must share d_model")
            V = torch.stack([v.reshape(-1).to(torch.float64) for v in vecs], dim=1)
        if not bool(torch.isfinite(V).all()):
            raise WorkbenchError("directions contain non-finite values")
        try:
            self.basis = orthonormalize(V.to(torch.float64))
        except ValueError as e:
            raise WorkbenchError(f"directions do not span a subspace: {e}") from e
        self.side = _check_side(side)
        self.embedding_orientation = check_orientation(embedding_orientation)
        self.residual_only = residual_only
        self.label = label
        self.meta = meta or {}

    @classmethod
    def from_file(cls, path: str, *, layer: int | None = None, method: str | None = None, **kw: Any) -> "DirectionReference":
        """Directions from a saved-vector file, optionally only those of one layer and/or method."""
        from workbench.vectors import load_directions

        dirs = load_directions(path)
        sel = [d for d in dirs if (layer is None or d.layer == layer) and (method is None or d.method == method)]
        if not sel:
            have = ", ".join(sorted({f"{d.method}@{d.layer}" for d in dirs}))
            raise WorkbenchError(f"{path}: no direction with layer={layer} method={method}; available: {have}")
        meta = {"file": str(path), "directions": [{"layer": d.layer, "method": d.method, "model_id": d.model_id}
                                                  for d in sel]}
        return cls(sel, meta=meta, **kw)

    @property
    def k(self) -> int:
        return self.basis.k

    @property
    def d_model(self) -> int:
        return self.basis.d

    def side_of(self, info: TensorInfo) -> str:
        """The side of this tensor's analysis layout that the directions act on."""
        return effective_side(info, self.side, self.embedding_orientation) if info.is_matrix else "left"

    def covers(self, info: TensorInfo) -> bool:
        if info.is_matrix:
            width = info.m if self.side_of(info) == "left" else info.n
            if width != self.d_model:
                return False
            if self.residual_only:
                return info.module in (RESIDUAL_WRITERS if self.side == "left" else RESIDUAL_READERS)
            return True
        return (self.side == "left" and len(info.shape) == 1 and info.m == self.d_model
                and info.role.param == "bias" and info.module in RESIDUAL_WRITERS)

    def prepare(self, info: TensorInfo, *, operator: str = "projector", kinds: Sequence[str] = KINDS,
                max_rho: float = 1.0) -> Any:
        return None

    def operator(self, info: TensorInfo, prepared: Any, rho: float | None, kind: str, seed: int,
                 operator: str = "projector") -> TensorOperator:
        self.check_kind(kind)
        if operator != "projector":
            raise WorkbenchError("the SafeLoRA operator needs a reference update, not directions")
        side = self.side_of(info)
        if not self.covers(info):
            return TensorOperator("zero", side, d=self.d_model, meta={"uncovered": True})
        dtype = compute_dtype(info.numel)
        if kind == "topk":
            b = Basis(vectors=self.basis.vectors.to(dtype), k=self.k, d=self.d_model, energy=1.0, kind="given")
        else:
            other = (info.n if side == "left" else info.m) if info.is_matrix else self.d_model
            b = random_basis(self.d_model, max(other, self.k), None, tensor_seed(seed, info.name), k=self.k, dtype=dtype)
        return TensorOperator("basis", side, basis=b, ref_energy=float("nan"))

    def describe(self) -> dict[str, Any]:
        return {"type": "directions", "label": self.label, "k": self.k, "d_model": self.d_model, "side": self.side,
                "residual_only": self.residual_only, "embedding_orientation": self.embedding_orientation, **self.meta}
