"""One SVD per tensor, then every basis a grid needs (eta or rho, TopK / RandomK / Random).

The math is :mod:`workbench.subspace`'s: :func:`~workbench.subspace.svd_spectrum` computes the spectrum,
:func:`~workbench.subspace.k_for_energy` / :func:`~workbench.subspace.k_for_rank_fraction` pick ``k``, and
the bases are built with the same rules as :func:`~workbench.subspace.bases_for_grid` and
:func:`~workbench.subspace.basis_by_rank_fraction` (the tests check they are identical for TopK and
RandomK), so a grid of eta or rho values costs one SVD per tensor instead of one per grid point. The
``"random"`` control differs from the core's on purpose: it is the first ``k`` columns of one seeded random
orthonormal frame per tensor (:func:`random_frame`), so it is nested across rho as in the study.

Compute dtype: float64 (the core default) unless the matrix is large. ``svd_dtype="auto"`` switches to
float32 above ``AUTO_FLOAT64_MAX`` elements (e.g. a 151936 x 896 or 49152 x 576 embedding), where a float64
SVD needs about 8x the tensor's float32 size (float32: about 3x); pass ``"float64"`` to force it.

Example::

    >>> import torch
    >>> M = torch.diag(torch.tensor([2., 3**0.5, 2**0.5, 1.]))
    >>> sp = spectrum_of(M)
    >>> {e: b.k for e, b in sp.eta_bases([0.4, 0.7, 1.0]).items()}
    {0.4: 1, 0.7: 2, 1.0: 4}
    >>> sp.rank_basis(0.5, "topk").k
    2
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.subspace import Basis, SpectrumTooShortError, k_for_energy, k_for_rank_fraction, svd_spectrum

__all__ = ["AUTO_FLOAT64_MAX", "KINDS", "EMBEDDING_ORIENTATIONS", "Spectrum", "spectrum_of", "compute_dtype",
           "tensor_seed", "random_basis", "random_frame", "random_unit_vector", "check_fraction", "check_grid",
           "check_orientation", "effective_side"]

AUTO_FLOAT64_MAX = 1 << 24  # 16.8 M elements (134 MB as float64)
KINDS = ("topk", "randomk", "random")
SVD_DTYPES = ("auto", "float64", "float32")
EMBEDDING_ORIENTATIONS = ("stored", "transposed")
RANDOM_BLOCK = 32  # columns of the random frame drawn per seeded block (the frame is nested across k)


def check_orientation(value: str) -> str:
    """``value`` if it is an embedding orientation (``"stored"`` or ``"transposed"``), else a WorkbenchError.

    Example::

        >>> check_orientation("stored")
        'stored'
    """
    if value not in EMBEDDING_ORIENTATIONS:
        raise WorkbenchError(f"embedding_orientation must be one of {', '.join(EMBEDDING_ORIENTATIONS)}, "
                             f"got {value!r}")
    return value


def effective_side(info: Any, side: str, orientation: str) -> str:
    """The side (in the analysis layout) whose space is "the left space of the weight" for ``orientation``.

    Embedding tables are stored ``[vocab, d_model]`` and analysed transposed (``[d_model, vocab]``, see
    :mod:`weightspace.naming`). The study takes the left space of every weight *as stored*
    (``orientation="stored"``, the default of delta references and overlaps): for an embedding that is
    the vocabulary space, i.e. the *right* space of the analysis layout, so the side flips.
    ``"transposed"`` keeps the analysis layout (left = ``d_model``). Other tensors are unaffected.

    Example::

        >>> from weightspace.naming import classify
        >>> from weightspace.plan import TensorInfo
        >>> emb = TensorInfo(classify("model.embed_tokens.weight"), (384, 64), "F32")
        >>> effective_side(emb, "left", "stored"), effective_side(emb, "left", "transposed")
        ('right', 'left')
    """
    check_orientation(orientation)
    role = getattr(info, "role", None)
    if (orientation == "stored" and role is not None and role.transpose and role.module in ("embed", "pos_embed")
            and len(info.stored_shape) == 2):
        return "right" if side == "left" else "left"
    return side


def check_fraction(x: float, name: str) -> float:
    """``x`` as a float in ``(0, 1]`` or a :class:`WorkbenchError`.

    Example::

        >>> check_fraction(0.5, "rho")
        0.5
    """
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise WorkbenchError(f"{name} must be a number in (0, 1], got {x!r}") from None
    if not (0.0 < v <= 1.0):
        raise WorkbenchError(f"{name} must be in (0, 1], got {x!r}")
    return v


def check_grid(values: Sequence[float] | str, name: str) -> list[float]:
    """A non-empty list of distinct fractions in ``(0, 1]`` (a comma string is accepted).

    Example::

        >>> check_grid("0.25,0.5", "rho")
        [0.25, 0.5]
    """
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    out = [check_fraction(v, name) for v in values]
    if not out:
        raise WorkbenchError(f"the {name} grid is empty")
    if len(set(out)) != len(out):
        raise WorkbenchError(f"the {name} grid has repeated values: {out}")
    return out


def compute_dtype(numel: int, policy: str = "auto") -> torch.dtype:
    """The SVD compute dtype for a matrix of ``numel`` elements.

    Example::

        >>> compute_dtype(64 * 64), compute_dtype(151936 * 896), compute_dtype(10, "float32")
        (torch.float64, torch.float32, torch.float32)
    """
    if policy not in SVD_DTYPES:
        raise WorkbenchError(f"svd dtype must be one of {', '.join(SVD_DTYPES)}, got {policy!r}")
    if policy == "float64":
        return torch.float64
    if policy == "float32":
        return torch.float32
    return torch.float64 if numel <= AUTO_FLOAT64_MAX else torch.float32


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed derived from a run seed and the tensor's name (stable across runs and machines).

    Different tensors get independent random controls; the same (seed, name) always gives the same one.

    Example::

        >>> tensor_seed(0, "a") == tensor_seed(0, "a") != tensor_seed(0, "b")
        True
    """
    h = hashlib.sha256(f"{int(seed)}:{name}".encode()).hexdigest()
    return int(h[:8], 16) & 0x7FFFFFFF


def random_frame(d: int, k: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The first ``k`` columns of ONE seeded Haar-random orthonormal ``d x d`` frame (``[d, k]``).

    The Gaussian columns are drawn in seeded blocks of ``RANDOM_BLOCK`` (block ``b`` from
    ``tensor_seed(seed, "#random-block-b")``), so column ``j`` does not depend on ``k``; the QR of the first
    ``k`` columns (sign fixed on ``diag(R)``) gives the first ``k`` columns of the QR of any wider prefix.
    Hence the random control is *nested* across rho: the rho=0.25 subspace lies inside the rho=0.5 one,
    as in the study (the first ``k`` columns of one random orthonormal matrix per tensor).

    Example::

        >>> a, b = random_frame(10, 2, 0), random_frame(10, 5, 0)
        >>> bool(torch.allclose(a, b[:, :2], atol=1e-12))
        True
    """
    if not 1 <= k <= d:
        raise WorkbenchError(f"internal: a random frame needs 1 <= k <= d, got k={k}, d={d}")
    blocks = []
    for b in range(-(-k // RANDOM_BLOCK)):
        gen = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, f"#random-block-{b}"))
        blocks.append(torch.randn(RANDOM_BLOCK, d, generator=gen, dtype=dtype))
    G = torch.cat(blocks)[:k].T
    Q, R = torch.linalg.qr(G)
    s = torch.sign(torch.diagonal(R))
    s[s == 0] = 1
    return (Q * s).contiguous()


def random_unit_vector(numel: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A seeded uniformly random unit vector of ``R^numel`` (the random control of 1-D tensors).

    Example::

        >>> round(float(random_unit_vector(5, 0).norm()), 12)
        1.0
    """
    gen = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, "#random-vector"))
    v = torch.randn(max(1, int(numel)), generator=gen, dtype=dtype)
    return v / v.norm()


def random_basis(d: int, n: int, rho: float | None, seed: int, *, k: int | None = None,
                 dtype: torch.dtype = torch.float64) -> Basis:
    """The ``"random"`` control: a Haar-random ``k``-dim subspace of ``R^d``, nested across ``k``.

    ``k`` is ``k_for_rank_fraction(d, n, rho)`` unless given; the basis is :func:`random_frame`'s first
    ``k`` columns (one random orthonormal matrix per seed, as the study does), so a grid of rho values
    gives nested subspaces. ``energy`` is ``nan``.

    Example::

        >>> random_basis(8, 4, 0.5, seed=0).k
        2
    """
    if k is None:
        k = k_for_rank_fraction(d, n, check_fraction(rho, "rho"))
    return Basis(vectors=random_frame(d, int(k), seed, dtype), k=int(k), d=d, energy=float("nan"), kind="random")


@dataclass
class Spectrum:
    """Left singular vectors ``U [m, r]``, singular values ``S [r]`` and total energy of one matrix.

    ``m x n`` is the oriented matrix (``side="right"`` transposes first). ``r = min(m, n)`` for the exact
    SVD; a randomized sketch may be shorter (``full`` is then False).
    """

    U: torch.Tensor
    S: torch.Tensor
    total: float
    m: int
    n: int
    method: str
    seed: int

    @property
    def full(self) -> bool:
        return self.S.numel() == min(self.m, self.n)

    @property
    def cumulative(self) -> torch.Tensor:
        return torch.cumsum(self.S.to(torch.float64) ** 2, dim=0)

    def k_for_eta(self, eta: float) -> int:
        return k_for_energy(self.S, check_fraction(eta, "eta"), self.total)

    def eta_bases(self, etas: Sequence[float]) -> dict[float, Basis]:
        """Top-``k(eta)`` bases (same as :func:`workbench.subspace.bases_for_grid`), sharing one ``U``."""
        ks = {e: self.k_for_eta(e) for e in etas}
        cum = self.cumulative
        kmax = max(ks.values())
        U = self.U[:, :kmax].clone() if kmax < self.U.shape[1] else self.U
        return {e: Basis(vectors=U[:, :k], k=k, d=self.m, energy=min(1.0, float(cum[k - 1]) / self.total),
                         kind="topk", indices=tuple(range(k))) for e, k in ks.items()}

    def rank_basis(self, rho: float, kind: str = "topk", seed: int = 0) -> Basis:
        """The ``k(rho)`` basis of ``kind`` (TopK / RandomK: as :func:`workbench.subspace.basis_by_rank_fraction`;
        Random: :func:`random_basis`, nested across rho)."""
        rho = check_fraction(rho, "rho")
        if kind not in KINDS:
            raise WorkbenchError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        k = k_for_rank_fraction(self.m, self.n, rho)
        if kind == "random":
            return random_basis(self.m, self.n, rho, seed, dtype=self.U.dtype)
        if kind == "topk":
            if k > self.S.numel():
                raise WorkbenchError(f"the spectrum has {self.S.numel()} values; TopK at rho={rho} needs k={k}")
            idx = torch.arange(k)
        else:
            if not self.full:
                raise WorkbenchError("RandomK needs the full (exact) spectrum")
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            idx = torch.sort(torch.randperm(min(self.m, self.n), generator=gen)[:k]).values
        S = self.S[idx]
        energy = float((S.to(torch.float64) ** 2).sum()) / self.total
        return Basis(vectors=self.U[:, idx].contiguous(), k=k, d=self.m, energy=min(1.0, energy), kind=kind,
                     indices=tuple(int(i) for i in idx))


def spectrum_of(M: torch.Tensor, *, side: str = "left", method: str = "exact", seed: int = 0,
                rank: int | None = None, svd_dtype: str = "auto", need: float | None = None) -> Spectrum | None:
    """The spectrum of ``M`` (``side="right"``: of ``M.T``), or ``None`` for a zero matrix.

    ``method="randomized"`` sketches ``rank`` triplets (default ``min(m, n) // 4 + 1``) and falls back to
    the exact SVD when the sketch cannot reach the energy fraction ``need`` (as ``bases_for_grid`` does).
    """
    if side not in ("left", "right"):
        raise WorkbenchError(f"side must be 'left' or 'right', got {side!r}")
    if M.ndim != 2:
        raise WorkbenchError(f"internal: spectrum_of needs a matrix, got shape {tuple(M.shape)}")
    A = M if side == "left" else M.T
    m, n = A.shape
    dtype = compute_dtype(m * n, svd_dtype)
    if not bool(A.any()):  # a reduction: no tensor-sized temporary
        return None
    if method == "randomized":
        r = rank if rank is not None else min(m, n) // 4 + 1
        U, S, total = svd_spectrum(A, method="randomized", rank=r, seed=seed, dtype=dtype)
        sp = Spectrum(U, S, total, m, n, "randomized", seed)
        if need is None:
            return sp
        try:
            sp.k_for_eta(need)
            return sp
        except SpectrumTooShortError:
            pass
    elif method != "exact":
        raise WorkbenchError(f"svd method must be 'exact' or 'randomized', got {method!r}")
    U, S, total = svd_spectrum(A, method="exact", dtype=dtype)
    return Spectrum(U, S, total, m, n, "exact", seed)
