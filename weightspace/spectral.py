"""One SVD per tensor, then every basis a grid needs (eta or rho, TopK / RandomK / Random).

The math is :mod:`workbench.subspace`'s: :func:`~workbench.subspace.svd_spectrum` computes the spectrum,
:func:`~workbench.subspace.k_for_energy` / :func:`~workbench.subspace.k_for_rank_fraction` pick ``k``, and
the bases are built with the same rules as :func:`~workbench.subspace.bases_for_grid` and
:func:`~workbench.subspace.basis_by_rank_fraction` (the tests check they are identical), so a grid of
eta or rho values costs one SVD per tensor instead of one per grid point.

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
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.subspace import (Basis, SpectrumTooShortError, basis_by_rank_fraction, k_for_energy,
                                k_for_rank_fraction, svd_spectrum)

__all__ = ["AUTO_FLOAT64_MAX", "KINDS", "Spectrum", "spectrum_of", "compute_dtype", "tensor_seed",
           "random_basis", "check_fraction", "check_grid"]

AUTO_FLOAT64_MAX = 1 << 24  # 16.8 M elements (134 MB as float64)
KINDS = ("topk", "randomk", "random")
SVD_DTYPES = ("auto", "float64", "float32")


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


def random_basis(d: int, n: int, rho: float | None, seed: int, *, k: int | None = None,
                 dtype: torch.dtype = torch.float64) -> Basis:
    """The core ``"random"`` control: a Haar-random ``k``-dim subspace of ``R^d``.

    ``k`` is ``k_for_rank_fraction(d, n, rho)`` unless given. Calls
    :func:`workbench.subspace.basis_by_rank_fraction` on a zero-stride placeholder of shape ``[d, n]``, so
    the control is exactly the core's for the same seed (and costs no ``d x n`` memory).

    Example::

        >>> random_basis(8, 4, 0.5, seed=0).k
        2
    """
    if k is not None:
        rho = min(1.0, k / min(d, n))
        while k_for_rank_fraction(d, n, rho) < k:  # guard against round-off in k / min(d, n)
            rho = min(1.0, math.nextafter(rho, 2.0))
    placeholder = torch.zeros((), dtype=dtype).expand(d, n)
    return basis_by_rank_fraction(placeholder, rho, kind="random", seed=seed, dtype=dtype)


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
        """The ``k(rho)`` basis of ``kind`` (same as :func:`workbench.subspace.basis_by_rank_fraction`)."""
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
