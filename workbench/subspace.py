"""Shared subspace math for activation-overlap and weight-space analyses.

Conventions (following Ponkshe et al. 2026, "Safety Subspaces are Not Linearly
Distinct"):

* Matrices follow the Hugging Face ``nn.Linear.weight`` layout ``[m, n]`` with
  ``m`` = output dimension.  ``side="left"`` bases live in the output space
  (left singular vectors ``U``, ``d = m``); ``side="right"`` bases live in the
  input space (right singular vectors ``V``, ``d = n``).
* A :class:`Basis` always stores a ``[d, k]`` matrix with orthonormal columns.
* **Precision.**  All SVDs and reductions are computed in ``float64`` by
  default (inputs of any floating dtype, e.g. ``float32``/``bfloat16``, are
  upcast).  This costs speed but makes energy fractions and ``k(eta)``
  thresholds stable on the small-to-medium matrices the workbench handles.
  Pass ``dtype=torch.float32`` to trade accuracy for speed.
* **Energy totals.**  The total energy is always ``||M||_F^2`` computed
  directly from ``M``, never the sum of a (possibly truncated) spectrum.
* **Randomized SVD.**  ``method="randomized"`` uses an in-house seeded
  range finder (Halko, Martinsson & Tropp 2011) driven by a private
  :class:`torch.Generator`; unlike :func:`torch.svd_lowrank` it does not touch
  the global RNG, so the same ``seed`` gives bit-identical results (on the same
  machine / thread configuration).  When a truncated spectrum cannot reach a
  requested energy fraction, :func:`k_for_energy` raises
  :class:`SpectrumTooShortError`, and :func:`basis_by_energy` /
  :func:`bases_for_grid` catch it and **fall back to the exact SVD**.
* **Sign convention.**  Singular vectors are sign-normalised so that the
  largest-magnitude entry of each column is positive, so exact and randomized
  results are directly comparable.

Example::

    >>> import torch
    >>> from workbench.subspace import basis_by_energy, mso
    >>> M = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    >>> B = basis_by_energy(M, 0.9)
    >>> round(mso(B, B), 6)
    1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence, Union

import torch

__all__ = [
    "Basis",
    "SpectrumTooShortError",
    "svd_spectrum",
    "k_for_energy",
    "k_for_rank_fraction",
    "basis_by_energy",
    "basis_by_rank_fraction",
    "bases_for_grid",
    "orthonormalize",
    "mso",
    "mso_random_baseline",
    "principal_angles",
    "project",
    "project_orthogonal",
    "energy_kept",
    "project_rank1",
    "flat_cosine",
    "CosineAccumulator",
    "activation_basis",
]

Side = Literal["left", "right"]
Method = Literal["exact", "randomized"]
Kind = Literal["topk", "randomk", "random"]

DEFAULT_DTYPE = torch.float64


class SpectrumTooShortError(ValueError):
    """A truncated spectrum does not carry enough energy to reach ``eta``."""


# --------------------------------------------------------------------------
# Basis container
# --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Basis:
    """Orthonormal basis of a ``k``-dimensional subspace of ``R^d``.

    Attributes:
        vectors: ``[d, k]`` tensor with orthonormal columns (float64 by default).
        k: number of basis vectors.
        d: ambient dimension.
        energy: fraction of ``||M||_F^2`` explained by these ``k`` directions
            (``nan`` for the ``"random"`` control; for ``"given"`` bases the
            fraction of the input vectors' energy retained after dropping
            numerically null directions).
        kind: ``"topk" | "randomk" | "random" | "given"``.
        indices: for SVD-derived bases, the singular-value indices
            (0 = largest) of the chosen vectors; ``None`` otherwise.

    ``eq=False`` because comparing tensors element-wise is ambiguous; compare
    ``vectors`` explicitly if needed.

    Example::

        >>> B = orthonormalize(torch.eye(4)[:, :2])
        >>> (B.d, B.k, B.kind)
        (4, 2, 'given')
    """

    vectors: torch.Tensor
    k: int
    d: int
    energy: float
    kind: str
    indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        v = self.vectors
        if not isinstance(v, torch.Tensor) or v.ndim != 2:
            raise ValueError("Basis.vectors must be a 2-D tensor [d, k]")
        if tuple(v.shape) != (self.d, self.k):
            raise ValueError(
                f"Basis.vectors has shape {tuple(v.shape)} but (d, k) = ({self.d}, {self.k})"
            )
        if self.kind not in ("topk", "randomk", "random", "given"):
            raise ValueError(f"unknown Basis.kind {self.kind!r}")

    @property
    def projector(self) -> torch.Tensor:
        """Dense ``[d, d]`` projector ``U U^T`` (avoid for large ``d``).

        Example::

            >>> orthonormalize(torch.eye(3)[:, :1]).projector.diagonal().tolist()
            [1.0, 0.0, 0.0]
        """
        return self.vectors @ self.vectors.T


BasisLike = Union[Basis, torch.Tensor]


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------


def _check_fraction(x: float, name: str) -> float:
    try:
        xf = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in the range (0, 1], got {x!r}") from None
    if not (0.0 < xf <= 1.0):  # also rejects nan
        raise ValueError(f"{name} must be in the range (0, 1], got {x!r}")
    return xf


def _check_side(side: str) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def _check_method(method: str) -> None:
    if method not in ("exact", "randomized"):
        raise ValueError(f"method must be 'exact' or 'randomized', got {method!r}")


def _as_matrix(M, name: str = "M", dtype: torch.dtype = DEFAULT_DTYPE) -> torch.Tensor:
    """Validate ``M`` as a finite, non-empty 2-D tensor and cast to ``dtype``."""
    if not isinstance(M, torch.Tensor):
        M = torch.as_tensor(M)
    if M.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(M.shape)}")
    if M.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(M.shape)}")
    if M.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {M.dtype}")
    M = M.detach().to(dtype)
    if not bool(torch.isfinite(M).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return M


def _basis_matrix(Q: BasisLike, name: str) -> torch.Tensor:
    v = Q.vectors if isinstance(Q, Basis) else Q
    if not isinstance(v, torch.Tensor):
        v = torch.as_tensor(v)
    if v.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [d, k] basis, got shape {tuple(v.shape)}")
    return v


def _fix_signs(U: torch.Tensor) -> torch.Tensor:
    """Make the largest-|.| entry of every column positive (deterministic signs)."""
    if U.numel() == 0:
        return U
    idx = U.abs().argmax(dim=0)
    s = torch.sign(U.gather(0, idx.unsqueeze(0)))
    s[s == 0] = 1
    return U * s


def _frob_sq(M: torch.Tensor) -> float:
    return float(torch.sum(M * M))


def _energy_rtol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-4


# --------------------------------------------------------------------------
# SVD
# --------------------------------------------------------------------------


def _randomized_left(
    M: torch.Tensor, rank: int, *, seed: int, niter: int, oversample: int
) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = M.shape
    r = min(m, n)
    ell = min(rank + oversample, r)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(n, ell, generator=gen, dtype=M.dtype, device="cpu").to(M.device)
    Q, _ = torch.linalg.qr(M @ omega)
    for _ in range(niter):  # power iterations with re-orthonormalisation
        Z, _ = torch.linalg.qr(M.T @ Q)
        Q, _ = torch.linalg.qr(M @ Z)
    B = Q.T @ M  # [ell, n]
    Ub, S, _ = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub
    return U[:, :rank], S[:rank]


def svd_spectrum(
    M: torch.Tensor,
    *,
    method: Method = "exact",
    rank: int | None = None,
    seed: int = 0,
    niter: int = 4,
    oversample: int = 10,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Left singular vectors, singular values and total energy of ``M``.

    Args:
        M: ``[m, n]`` finite matrix.
        method: ``"exact"`` (``torch.linalg.svd``) or ``"randomized"`` (seeded
            range finder; bit-reproducible for a fixed ``seed``).
        rank: number of leading triplets to return (default: all ``min(m, n)``).
        seed, niter, oversample: randomized-SVD parameters.
        dtype: compute dtype (float64 by default).

    Returns:
        ``(U [m, r], S [r] descending, total)`` where ``total = ||M||_F^2`` is
        computed directly from ``M`` (not from the possibly truncated ``S``).
        For right singular vectors call it on ``M.T``.

    Example::

        >>> U, S, tot = svd_spectrum(torch.diag(torch.tensor([3., 1.])))
        >>> S.tolist(), tot
        ([3.0, 1.0], 10.0)
    """
    _check_method(method)
    M = _as_matrix(M, dtype=dtype)
    m, n = M.shape
    r = min(m, n)
    if rank is None:
        rank = r
    rank = int(rank)
    if not (1 <= rank):
        raise ValueError(f"rank must be >= 1, got {rank}")
    rank = min(rank, r)
    if niter < 0 or oversample < 0:
        raise ValueError("niter and oversample must be >= 0")
    total = _frob_sq(M)
    if method == "exact":
        U, S, _ = torch.linalg.svd(M, full_matrices=False)
        U, S = U[:, :rank], S[:rank]
    else:
        U, S = _randomized_left(M, rank, seed=seed, niter=niter, oversample=oversample)
    return _fix_signs(U).contiguous(), S.contiguous(), total


def k_for_energy(S: torch.Tensor, eta: float, total: float) -> int:
    """Smallest ``k`` with ``sum_{i<=k} S_i^2 >= eta * total``.

    A tiny relative tolerance (1e-10 for float64 spectra, 1e-4 otherwise)
    absorbs round-off between the SVD and the directly computed ``total``.

    Raises:
        ValueError: ``eta`` outside ``(0, 1]`` or ``total <= 0``.
        SpectrumTooShortError: the (truncated) spectrum cannot reach ``eta``.

    Example::

        >>> k_for_energy(torch.tensor([2., 3**0.5, 2**0.5, 1.]), 0.7, 10.0)
        2
    """
    eta = _check_fraction(eta, "eta")
    S = torch.as_tensor(S)
    if S.ndim != 1 or S.numel() == 0:
        raise ValueError(f"S must be a non-empty 1-D spectrum, got shape {tuple(S.shape)}")
    total = float(total)
    if not math.isfinite(total) or total <= 0.0:
        raise ValueError(f"total energy must be finite and > 0 (zero matrix?), got {total}")
    dt = S.dtype if S.is_floating_point() else DEFAULT_DTYPE
    cum = torch.cumsum(S.to(torch.float64) ** 2, dim=0)
    target = eta * total * (1.0 - _energy_rtol(dt))
    hit = torch.nonzero(cum >= target)
    if hit.numel() == 0:
        reached = float(cum[-1]) / total
        raise SpectrumTooShortError(
            f"spectrum of length {S.numel()} explains only {reached:.6g} of the total "
            f"energy; cannot reach eta={eta}"
        )
    return int(hit[0, 0]) + 1


def k_for_rank_fraction(m: int, n: int, rho: float) -> int:
    """``k = max(1, round(rho * min(m, n)))`` (Python ``round``: exact halves go to even).

    Example::

        >>> k_for_rank_fraction(4096, 11008, 0.1)
        410
    """
    rho = _check_fraction(rho, "rho")
    m, n = int(m), int(n)
    if m < 1 or n < 1:
        raise ValueError(f"matrix dims must be >= 1, got ({m}, {n})")
    r = min(m, n)
    return min(r, max(1, round(rho * r)))


def _oriented(M, side: str, dtype: torch.dtype) -> torch.Tensor:
    _check_side(side)
    M = _as_matrix(M, dtype=dtype)
    return M if side == "left" else M.T


def basis_by_energy(
    M: torch.Tensor,
    eta: float,
    *,
    side: Side = "left",
    method: Method = "exact",
    seed: int = 0,
    rank: int | None = None,
    niter: int = 4,
    oversample: int = 10,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> Basis:
    """Top-``k(eta)`` singular subspace of ``M`` (``kind="topk"``).

    With ``method="randomized"`` a rank-``rank`` sketch is computed (default
    ``min(m, n) // 4 + 1``); if it cannot reach ``eta`` the function falls
    back to the exact SVD.

    Example::

        >>> M = torch.diag(torch.tensor([2., 3**0.5, 2**0.5, 1.]))
        >>> basis_by_energy(M, 0.7).k
        2
    """
    eta = _check_fraction(eta, "eta")
    _check_method(method)
    A = _oriented(M, side, dtype)
    return bases_for_grid(
        A, [eta], side="left", method=method, seed=seed, rank=rank,
        niter=niter, oversample=oversample, dtype=dtype,
    )[eta]


def bases_for_grid(
    M: torch.Tensor,
    etas: Sequence[float],
    side: Side = "left",
    *,
    method: Method = "exact",
    seed: int = 0,
    rank: int | None = None,
    niter: int = 4,
    oversample: int = 10,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> dict[float, Basis]:
    """Top-``k(eta)`` bases for a whole grid of ``eta`` from a single SVD.

    Keys are the ``etas`` as given.  Randomized sketches that cannot reach the
    largest ``eta`` trigger one exact SVD for the whole grid.

    Example::

        >>> M = torch.diag(torch.tensor([2., 3**0.5, 2**0.5, 1.]))
        >>> {e: b.k for e, b in bases_for_grid(M, [0.4, 0.7, 1.0]).items()}
        {0.4: 1, 0.7: 2, 1.0: 4}
    """
    etas = list(etas)
    if not etas:
        raise ValueError("etas must be a non-empty sequence")
    for e in etas:
        _check_fraction(e, "eta")
    _check_method(method)
    A = _oriented(M, side, dtype)
    m, n = A.shape
    total = _frob_sq(A)
    if total <= 0.0:
        raise ValueError("M is the zero matrix; energy fractions are undefined")

    def _run(meth: str):
        if meth == "randomized":
            r = rank if rank is not None else min(m, n) // 4 + 1
            U, S, _ = svd_spectrum(A, method="randomized", rank=r, seed=seed,
                                   niter=niter, oversample=oversample, dtype=dtype)
        else:
            U, S, _ = svd_spectrum(A, method="exact", dtype=dtype)
        ks = {float(e): k_for_energy(S, e, total) for e in etas}
        return U, S, ks

    if method == "randomized":
        try:
            U, S, ks = _run("randomized")
        except SpectrumTooShortError:
            U, S, ks = _run("exact")
    else:
        U, S, ks = _run("exact")

    cum = torch.cumsum(S.to(torch.float64) ** 2, dim=0)
    out: dict[float, Basis] = {}
    for e in etas:
        k = ks[float(e)]
        out[e] = Basis(
            vectors=U[:, :k].clone(), k=k, d=m,
            energy=min(1.0, float(cum[k - 1]) / total), kind="topk",
            indices=tuple(range(k)),
        )
    return out


def _gaussian_basis(d: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    G = torch.randn(d, k, generator=gen, dtype=dtype)
    Q, R = torch.linalg.qr(G)
    s = torch.sign(torch.diagonal(R))
    s[s == 0] = 1
    return Q * s  # Haar-distributed (uniformly random) orthonormal frame


def basis_by_rank_fraction(
    M: torch.Tensor,
    rho: float,
    *,
    side: Side = "left",
    kind: Kind = "topk",
    method: Method = "exact",
    seed: int = 0,
    niter: int = 4,
    oversample: int = 10,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> Basis:
    """``k = k_for_rank_fraction(m, n, rho)``-dimensional basis of ``M``.

    Kinds:
        * ``"topk"``: leading ``k`` singular vectors (``method`` honoured).
        * ``"randomk"``: ``k`` singular vectors of ``M`` chosen uniformly at
          random without replacement among all ``min(m, n)`` (seeded; always
          uses the exact SVD since the full set is needed); stored in
          ascending singular-index order.
        * ``"random"``: control independent of ``M``: QR of a seeded i.i.d.
          Gaussian ``[d, k]`` matrix (with the sign fix on ``diag(R)``), i.e. a
          uniformly (Haar) random ``k``-dim subspace.  ``energy`` is ``nan``.

    ``energy`` is always relative to the full ``||M||_F^2``.

    Example::

        >>> M = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
        >>> [basis_by_rank_fraction(M, 0.25, kind=c).k for c in ("topk", "randomk", "random")]
        [4, 4, 4]
    """
    rho = _check_fraction(rho, "rho")
    if kind not in ("topk", "randomk", "random"):
        raise ValueError(f"kind must be 'topk', 'randomk' or 'random', got {kind!r}")
    _check_method(method)
    A = _oriented(M, side, dtype)
    m, n = A.shape
    k = k_for_rank_fraction(m, n, rho)
    if kind == "random":
        return Basis(vectors=_gaussian_basis(m, k, seed, dtype), k=k, d=m,
                     energy=float("nan"), kind="random")
    total = _frob_sq(A)
    if kind == "topk":
        U, S, _ = svd_spectrum(A, method=method, rank=k, seed=seed, niter=niter,
                               oversample=oversample, dtype=dtype)
        idx = torch.arange(k)
    else:
        U, S, _ = svd_spectrum(A, method="exact", dtype=dtype)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        idx = torch.sort(torch.randperm(min(m, n), generator=gen)[:k]).values
        U, S = U[:, idx], S[idx]
    energy = float((S.to(torch.float64) ** 2).sum()) / total if total > 0 else float("nan")
    return Basis(vectors=U.contiguous(), k=k, d=m, energy=min(1.0, energy), kind=kind,
                 indices=tuple(int(i) for i in idx))


def orthonormalize(
    vectors: torch.Tensor,
    *,
    rtol: float | None = None,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> Basis:
    """Orthonormal basis (``kind="given"``) for the span of ``vectors`` ``[d, k]``.

    Uses an SVD and drops directions whose singular value is below
    ``rtol * sigma_max`` (default ``rtol = max(d, k) * eps(dtype)``), so
    linearly dependent or zero columns do not create spurious dimensions.  A
    1-D tensor is treated as a single column (e.g. a refusal direction).

    Example::

        >>> r = torch.tensor([3., 4., 0.])
        >>> [round(x, 6) for x in orthonormalize(r).vectors.squeeze(1).tolist()]
        [0.6, 0.8, 0.0]
    """
    v = vectors if isinstance(vectors, torch.Tensor) else torch.as_tensor(vectors)
    if v.ndim == 1:
        v = v.unsqueeze(1)
    V = _as_matrix(v, name="vectors", dtype=dtype)
    d, k = V.shape
    U, S, _ = torch.linalg.svd(V, full_matrices=False)
    if rtol is None:
        rtol = max(d, k) * torch.finfo(dtype).eps
    if float(S[0]) <= 0.0:
        raise ValueError("vectors span the zero subspace (all columns are zero)")
    keep = S > rtol * S[0]
    r = int(keep.sum())
    total = float((S.to(torch.float64) ** 2).sum())
    energy = float((S[:r].to(torch.float64) ** 2).sum()) / total
    return Basis(vectors=_fix_signs(U[:, :r]).contiguous(), k=r, d=d,
                 energy=min(1.0, energy), kind="given")


# --------------------------------------------------------------------------
# Subspace comparison
# --------------------------------------------------------------------------


def _pair(Qv: BasisLike, Qw: BasisLike, check: bool, atol: float) -> tuple[torch.Tensor, torch.Tensor]:
    A = _basis_matrix(Qv, "Qv")
    B = _basis_matrix(Qw, "Qw")
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"basis ambient dims differ: Qv has shape {tuple(A.shape)}, Qw has shape "
            f"{tuple(B.shape)} (need the same d = number of rows)"
        )
    if A.shape[1] == 0 or B.shape[1] == 0:
        raise ValueError(f"bases must have k >= 1, got shapes {tuple(A.shape)} and {tuple(B.shape)}")
    A = A.detach().to(torch.float64)
    B = B.detach().to(torch.float64)
    if check:
        for X, name in ((A, "Qv"), (B, "Qw")):
            if not bool(torch.isfinite(X).all()):
                raise ValueError(f"{name} contains non-finite values")
            err = (X.T @ X - torch.eye(X.shape[1], dtype=X.dtype, device=X.device)).abs().max()
            if float(err) > atol:
                raise ValueError(
                    f"{name} columns are not orthonormal (max |Q^T Q - I| = {float(err):.3g}); "
                    "use orthonormalize() first"
                )
    return A, B


def mso(Qv: BasisLike, Qw: BasisLike, *, check: bool = True, atol: float = 1e-3) -> float:
    """Mode subspace overlap ``||Qv^T Qw||_F^2 / min(k_v, k_w)`` in ``[0, 1]``.

    Equals the mean squared cosine of the ``min(k_v, k_w)`` principal angles.
    Accepts :class:`Basis` objects or ``[d, k]`` tensors with orthonormal
    columns (checked to ``atol`` unless ``check=False``).

    Example::

        >>> I = torch.eye(6)
        >>> mso(I[:, :3], I[:, :5]), mso(I[:, :3], I[:, 3:])
        (1.0, 0.0)
    """
    A, B = _pair(Qv, Qw, check, atol)
    val = float(torch.sum((A.T @ B) ** 2)) / min(A.shape[1], B.shape[1])
    return min(1.0, max(0.0, val))


def mso_random_baseline(kv: int, kw: int, d: int) -> float:
    """Expected MSO of two independent uniformly random subspaces: ``max(kv, kw) / d``.

    (``E||Qv^T Qw||_F^2 = kv*kw/d``, divided by ``min(kv, kw)``.)

    Example::

        >>> mso_random_baseline(4, 8, 64)
        0.125
    """
    kv, kw, d = int(kv), int(kw), int(d)
    if d < 1 or kv < 1 or kw < 1:
        raise ValueError(f"need kv, kw, d >= 1, got kv={kv}, kw={kw}, d={d}")
    if kv > d or kw > d:
        raise ValueError(f"subspace dims must not exceed d: kv={kv}, kw={kw}, d={d}")
    return max(kv, kw) / d


def principal_angles(Qv: BasisLike, Qw: BasisLike, *, check: bool = True, atol: float = 1e-3) -> torch.Tensor:
    """Principal angles (radians, ascending, float64) between two subspaces.

    Cosines are the singular values of ``Qv^T Qw`` clamped to ``[0, 1]``;
    small angles (``cos^2 >= 1/2``) are recomputed from sines for accuracy
    (as in :func:`scipy.linalg.subspace_angles`, which returns them
    descending).  Returns ``min(k_v, k_w)`` angles.

    Example::

        >>> I = torch.eye(3)
        >>> principal_angles(I[:, :1], I[:, 1:2]).tolist() == [math.pi / 2]
        True
    """
    A, B = _pair(Qv, Qw, check, atol)
    if A.shape[1] < B.shape[1]:
        A, B = B, A  # A has more columns; B's columns determine the angles
    C = A.T @ B
    cos = torch.linalg.svdvals(C).clamp(0.0, 1.0)  # descending -> angles ascending
    theta = torch.arccos(cos)
    small = cos ** 2 >= 0.5
    if bool(small.any()):
        sin = torch.linalg.svdvals(B - A @ C).clamp(0.0, 1.0)  # descending
        theta_sin = torch.arcsin(torch.flip(sin, dims=[0]))  # ascending
        theta = torch.where(small, theta_sin, theta)
    return theta


# --------------------------------------------------------------------------
# Projections and energy
# --------------------------------------------------------------------------


def _proj_impl(delta: torch.Tensor, basis: BasisLike, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (delta_in_compute_dtype, U, coefficients) for P delta."""
    _check_side(side)
    U = _basis_matrix(basis, "basis")
    if not isinstance(delta, torch.Tensor):
        delta = torch.as_tensor(delta)
    if delta.ndim not in (1, 2):
        raise ValueError(f"delta must be a 1-D or 2-D tensor, got shape {tuple(delta.shape)}")
    d = U.shape[0]
    if delta.ndim == 1:
        if delta.shape[0] != d:
            raise ValueError(f"delta of shape {tuple(delta.shape)} does not match basis d={d}")
    elif side == "left" and delta.shape[0] != d:
        raise ValueError(
            f"left projection needs delta.shape[0] == d: delta {tuple(delta.shape)}, basis {tuple(U.shape)}"
        )
    elif side == "right" and delta.shape[1] != d:
        raise ValueError(
            f"right projection needs delta.shape[1] == d: delta {tuple(delta.shape)}, basis {tuple(U.shape)}"
        )
    ct = torch.promote_types(U.dtype, delta.dtype) if delta.is_floating_point() else U.dtype
    if ct not in (torch.float32, torch.float64):
        ct = torch.float32
    U = U.to(ct)
    D = delta.detach().to(ct)
    if delta.ndim == 1 or side == "left":
        coef = U.T @ D  # [k, n] or [k]
    else:
        coef = D @ U  # [m, k]
    return D, U, coef


def project(delta: torch.Tensor, basis: BasisLike, side: Side = "left") -> torch.Tensor:
    """``P Delta`` without forming the ``d x d`` projector.

    ``side="left"``: ``U (U^T Delta)``; ``side="right"``: ``(Delta V) V^T``.
    A 1-D ``delta`` (e.g. a bias) is projected as a vector.  Computed in the
    promoted dtype of basis and delta, returned in ``delta.dtype``.

    Example::

        >>> B = orthonormalize(torch.eye(3)[:, :1])
        >>> project(torch.ones(3, 2), B).tolist()
        [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    """
    D, U, coef = _proj_impl(delta, basis, side)
    out = coef @ U.T if (delta.ndim == 2 and side == "right") else U @ coef
    return out.to(delta.dtype) if delta.is_floating_point() else out


def project_orthogonal(delta: torch.Tensor, basis: BasisLike, side: Side = "left") -> torch.Tensor:
    """``Delta - P Delta`` (component outside the subspace).

    Example::

        >>> B = orthonormalize(torch.eye(3)[:, :1])
        >>> project_orthogonal(torch.ones(3, 1), B).squeeze(1).tolist()
        [0.0, 1.0, 1.0]
    """
    D, U, coef = _proj_impl(delta, basis, side)
    out = D - (coef @ U.T if (delta.ndim == 2 and side == "right") else U @ coef)
    return out.to(delta.dtype) if delta.is_floating_point() else out


def energy_kept(delta: torch.Tensor, basis: BasisLike, side: Side = "left") -> tuple[float, float]:
    """``(||P Delta||_F^2, ||Delta||_F^2)`` in float64, for summing across tensors.

    The energy-kept ratio over a set is ``sum(kept) / sum(total)``; its
    expectation for a uniformly random ``k``-dim subspace of ``R^d`` is ``k/d``.

    Example::

        >>> B = orthonormalize(torch.eye(4)[:, :1])
        >>> energy_kept(torch.ones(4, 1), B)
        (1.0, 4.0)
    """
    if isinstance(delta, torch.Tensor) and delta.is_floating_point():
        delta = delta.detach().to(torch.float64)
    U = _basis_matrix(basis, "basis").detach().to(torch.float64)
    D, _, coef = _proj_impl(delta, U, side)
    return float(torch.sum(coef ** 2)), float(torch.sum(D ** 2))


def project_rank1(delta_t: torch.Tensor, delta_a: torch.Tensor) -> torch.Tensor:
    """Rank-1 rule for 1-D (or any) tensors: ``(<dT, dA> / ||dA||^2) dA``.

    Both are flattened; the result has ``delta_t``'s shape and dtype and is all
    zeros when ``||dA|| = 0``.

    Example::

        >>> project_rank1(torch.tensor([1., 2.]), torch.tensor([0., 3.])).tolist()
        [0.0, 2.0]
    """
    if delta_t.shape != delta_a.shape:
        raise ValueError(
            f"delta_t and delta_a must have the same shape, got {tuple(delta_t.shape)} "
            f"and {tuple(delta_a.shape)}"
        )
    t = delta_t.detach().reshape(-1).to(torch.float64)
    a = delta_a.detach().reshape(-1).to(torch.float64)
    na2 = torch.dot(a, a)
    if float(na2) == 0.0:
        return torch.zeros_like(delta_t)
    out = (torch.dot(t, a) / na2) * a
    return out.reshape(delta_t.shape).to(delta_t.dtype)


# --------------------------------------------------------------------------
# Flattened cosine
# --------------------------------------------------------------------------


class CosineAccumulator:
    """Streaming flattened cosine over many tensor pairs (float64 sums).

    ``value = sum <a_i, b_i>_F / (sqrt(sum ||a_i||^2) * sqrt(sum ||b_i||^2))``;
    ``nan`` if either side has zero total norm (or nothing was added).

    Example::

        >>> acc = CosineAccumulator()
        >>> acc.add(torch.tensor([1., 0.]), torch.tensor([1., 0.]))
        >>> acc.add(torch.tensor([0., 1.]), torch.tensor([0., -1.]))
        >>> acc.value
        0.0
    """

    def __init__(self) -> None:
        self.dot = 0.0
        self.norm_a_sq = 0.0
        self.norm_b_sq = 0.0
        self.count = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Accumulate one pair (shapes must match)."""
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"tensor shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        x = a.detach().reshape(-1).to(torch.float64)
        y = b.detach().reshape(-1).to(torch.float64)
        self.dot += float(torch.dot(x, y))
        self.norm_a_sq += float(torch.dot(x, x))
        self.norm_b_sq += float(torch.dot(y, y))
        self.count += 1

    @property
    def value(self) -> float:
        """Current flattened cosine (``nan`` if undefined)."""
        denom = math.sqrt(self.norm_a_sq) * math.sqrt(self.norm_b_sq)
        if denom == 0.0:
            return float("nan")
        return max(-1.0, min(1.0, self.dot / denom))


def flat_cosine(a_list: Iterable[torch.Tensor], b_list: Iterable[torch.Tensor]) -> float:
    """Global flattened cosine over paired tensors (not the mean of per-tensor cosines).

    Example::

        >>> flat_cosine([torch.tensor([1., 0.])], [torch.tensor([1., 1.])])  # doctest: +ELLIPSIS
        0.7071...
    """
    a_list, b_list = list(a_list), list(b_list)
    if len(a_list) != len(b_list):
        raise ValueError(f"lists differ in length: {len(a_list)} vs {len(b_list)}")
    acc = CosineAccumulator()
    for a, b in zip(a_list, b_list):
        acc.add(a, b)
    return acc.value


# --------------------------------------------------------------------------
# Activation bases
# --------------------------------------------------------------------------


def activation_basis(
    X: torch.Tensor,
    eta: float,
    centered: bool = True,
    *,
    method: Method = "exact",
    seed: int = 0,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> Basis:
    """Energy-``eta`` basis ``[d, k]`` of the row space of activations ``X [n_samples, d]``.

    Right singular vectors of ``X`` (after subtracting the per-feature mean
    over samples when ``centered``); ``energy`` is relative to the (centred)
    ``||X||_F^2``.

    Example::

        >>> X = torch.tensor([[1., 0.], [2., 0.], [3., 0.]])
        >>> activation_basis(X, 0.99).vectors.squeeze(1).tolist()
        [1.0, 0.0]
    """
    eta = _check_fraction(eta, "eta")
    X = _as_matrix(X, name="X", dtype=dtype)
    if centered:
        X = X - X.mean(dim=0, keepdim=True)
    if _frob_sq(X) <= 0.0:
        raise ValueError(
            "X has zero energy" + (" after centering (all samples identical?)" if centered else "")
        )
    return basis_by_energy(X, eta, side="right", method=method, seed=seed, dtype=dtype)
