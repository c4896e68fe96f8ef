"""Tests for workbench.subspace (fast: pure CPU, small matrices)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from workbench import subspace as ss
from workbench.subspace import (
    Basis,
    CosineAccumulator,
    SpectrumTooShortError,
    activation_basis,
    bases_for_grid,
    basis_by_energy,
    basis_by_rank_fraction,
    energy_kept,
    flat_cosine,
    k_for_energy,
    k_for_rank_fraction,
    mso,
    mso_random_baseline,
    orthonormalize,
    principal_angles,
    project,
    project_orthogonal,
    project_rank1,
    svd_spectrum,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_orth(d: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen(seed), dtype=torch.float64))
    return q


def planted(m: int, n: int, svals, seed: int = 0) -> torch.Tensor:
    """Matrix with exactly the given singular values and random singular vectors."""
    r = len(svals)
    U = rand_orth(m, r, seed)
    V = rand_orth(n, r, seed + 1)
    return U @ torch.diag(torch.as_tensor(svals, dtype=torch.float64)) @ V.T


# ---------------------------------------------------------------- MSO / angles


def test_mso_matches_scipy_principal_angles():
    for seed, (d, kv, kw) in enumerate([(20, 3, 5), (16, 4, 4), (30, 7, 2)]):
        A = rand_orth(d, kv, 10 + seed)
        B = rand_orth(d, kw, 20 + seed)
        ang = scipy.linalg.subspace_angles(A.numpy(), B.numpy())
        assert mso(A, B) == pytest.approx(float(np.mean(np.cos(ang) ** 2)), abs=1e-12)
        ours = principal_angles(A, B)
        assert ours.shape == (min(kv, kw),)
        assert torch.all(ours[1:] >= ours[:-1])  # ascending
        np.testing.assert_allclose(ours.numpy(), np.sort(ang), atol=1e-10)


def test_principal_angles_small_angles_accurate():
    d = 10
    A = rand_orth(d, 3, 1)
    eps = 1e-9
    # rotate A slightly: tiny principal angles that arccos alone can't resolve
    B = A + eps * rand_orth(d, 3, 2)
    B, _ = torch.linalg.qr(B)
    ang_ref = np.sort(scipy.linalg.subspace_angles(A.numpy(), B.numpy()))
    ours = principal_angles(A, B).numpy()
    np.testing.assert_allclose(ours, ang_ref, rtol=1e-5, atol=1e-15)
    assert ours.max() > 0


def test_mso_planted_nested_and_orthogonal():
    Q = rand_orth(12, 8, 3)
    big = Q[:, :5]
    rot = rand_orth(5, 3, 4)
    nested = big @ rot  # 3-dim subspace inside the 5-dim one
    assert mso(nested, big) == pytest.approx(1.0, abs=1e-12)
    assert mso(big, nested) == pytest.approx(1.0, abs=1e-12)
    ortho = Q[:, 5:8]
    assert mso(big, ortho) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(principal_angles(big, ortho).numpy(), [math.pi / 2] * 3, atol=1e-7)
    np.testing.assert_allclose(principal_angles(big, nested).numpy(), 0.0, atol=1e-7)
    # Basis objects are accepted too
    assert mso(orthonormalize(big), orthonormalize(nested)) == pytest.approx(1.0, abs=1e-12)


def test_mso_random_baseline_matches_monte_carlo():
    d, kv, kw, draws = 64, 4, 8, 2000
    g = gen(123)
    G1 = torch.randn(draws, d, kv, generator=g, dtype=torch.float64)
    G2 = torch.randn(draws, d, kw, generator=g, dtype=torch.float64)
    Q1, _ = torch.linalg.qr(G1)
    Q2, _ = torch.linalg.qr(G2)
    vals = (Q1.transpose(1, 2) @ Q2).pow(2).sum(dim=(1, 2)) / min(kv, kw)
    # spot-check the batched formula against the function
    assert mso(Q1[0], Q2[0]) == pytest.approx(float(vals[0]), abs=1e-12)
    assert float(vals.mean()) == pytest.approx(mso_random_baseline(kv, kw, d), abs=0.01)
    assert mso_random_baseline(kv, kw, d) == 8 / 64


def test_random_control_basis_matches_baseline():
    M = torch.randn(48, 40, generator=gen(0), dtype=torch.float64)
    ref = basis_by_rank_fraction(M, 0.1, kind="topk")
    vals = [mso(ref, basis_by_rank_fraction(M, 0.1, kind="random", seed=s)) for s in range(300)]
    assert np.mean(vals) == pytest.approx(ref.k / 48, abs=0.02)


# ---------------------------------------------------------------- k selection


def test_k_for_energy_planted_spectrum_exact():
    s2 = torch.tensor([40.0, 30.0, 20.0, 5.0, 4.0, 1.0], dtype=torch.float64)  # sums to 100
    S = s2.sqrt()
    total = 100.0
    assert k_for_energy(S, 0.4, total) == 1
    assert k_for_energy(S, 0.41, total) == 2
    assert k_for_energy(S, 0.7, total) == 2
    assert k_for_energy(S, 0.9, total) == 3
    assert k_for_energy(S, 0.95, total) == 4
    assert k_for_energy(S, 0.99, total) == 5
    assert k_for_energy(S, 1.0, total) == 6
    M = planted(20, 15, S.tolist(), seed=5)
    U, Sm, tot = svd_spectrum(M)
    assert tot == pytest.approx(100.0, rel=1e-12)
    grid = bases_for_grid(M, [0.4, 0.41, 0.7, 0.9, 0.95, 0.99, 1.0])
    assert [b.k for b in grid.values()] == [1, 2, 2, 3, 4, 5, 6]
    assert grid[0.9].energy == pytest.approx(0.9, abs=1e-12)
    assert basis_by_energy(M, 0.9).k == 3
    assert basis_by_energy(M.T, 0.9, side="right").k == 3


def test_k_for_rank_fraction():
    assert k_for_rank_fraction(4096, 11008, 0.1) == 410
    assert k_for_rank_fraction(10, 3, 0.01) == 1
    assert k_for_rank_fraction(10, 3, 1.0) == 3
    assert k_for_rank_fraction(100, 200, 0.25) == 25


def test_energy_total_is_full_frobenius_with_truncated_randomized():
    S = [10.0, 5.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.5]
    M = planted(30, 25, S, seed=7)
    full = float((M ** 2).sum())
    U, Sr, tot = svd_spectrum(M, method="randomized", rank=3, seed=1)
    assert U.shape == (30, 3) and Sr.shape == (3,)
    assert tot == pytest.approx(full, rel=1e-14)
    assert tot == pytest.approx(140.5, rel=1e-12)
    assert float((Sr ** 2).sum()) == pytest.approx(134.0, rel=1e-10)  # truncated sum differs
    # cumulative: 100, 125, 134 of 140.5 -> 0.712, 0.890, 0.954
    assert k_for_energy(Sr, 0.8, tot) == 2
    assert k_for_energy(Sr, 0.9, tot) == 3
    with pytest.raises(SpectrumTooShortError, match="cannot reach eta"):
        k_for_energy(Sr, 0.96, tot)  # would pass if total were the truncated 134
    # basis_by_energy falls back to the exact SVD when the sketch is too short
    b = basis_by_energy(M, 0.99, method="randomized", rank=3, seed=1)
    assert b.k == basis_by_energy(M, 0.99).k
    assert b.energy >= 0.99
    rb = basis_by_rank_fraction(M, 0.2, method="randomized", seed=1)
    assert rb.energy == pytest.approx(sum(s * s for s in S[: rb.k]) / full, rel=1e-10)


def test_randomized_svd_reproducible_and_accurate():
    M = planted(80, 60, [9.0, 7.0, 4.0, 2.0, 1.0], seed=11)
    M = M + 1e-8 * torch.randn(80, 60, generator=gen(99), dtype=torch.float64)
    torch.manual_seed(0)
    U1, S1, _ = svd_spectrum(M, method="randomized", rank=5, seed=42)
    torch.manual_seed(12345)  # global RNG must not matter
    U2, S2, _ = svd_spectrum(M, method="randomized", rank=5, seed=42)
    assert torch.equal(U1, U2) and torch.equal(S1, S2)
    U3, _, _ = svd_spectrum(M, method="randomized", rank=5, seed=43, niter=0)
    assert not torch.equal(U1, U3)
    Ue, Se, _ = svd_spectrum(M, rank=5)
    torch.testing.assert_close(S1, Se, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(U1, Ue, rtol=0, atol=1e-6)  # signs normalised
    assert mso(U1, Ue) == pytest.approx(1.0, abs=1e-10)
    b1 = basis_by_rank_fraction(M, 0.1, method="randomized", seed=3)
    b2 = basis_by_rank_fraction(M, 0.1, method="randomized", seed=3)
    assert torch.equal(b1.vectors, b2.vectors)


def test_controls_randomk_and_random():
    M = torch.randn(40, 30, generator=gen(1), dtype=torch.float64)
    U, S, tot = svd_spectrum(M)
    rk = basis_by_rank_fraction(M, 0.2, kind="randomk", seed=5)
    assert rk.kind == "randomk" and rk.k == 6 and rk.d == 40
    idx = list(rk.indices)
    assert idx == sorted(idx) and len(set(idx)) == 6 and max(idx) < 30
    torch.testing.assert_close(rk.vectors, U[:, idx])
    assert rk.energy == pytest.approx(float((S[idx] ** 2).sum()) / tot)
    assert torch.equal(rk.vectors, basis_by_rank_fraction(M, 0.2, kind="randomk", seed=5).vectors)
    assert basis_by_rank_fraction(M, 0.2, kind="randomk", seed=6).indices != rk.indices
    r = basis_by_rank_fraction(M, 0.2, kind="random", seed=5)
    assert r.kind == "random" and math.isnan(r.energy) and r.vectors.shape == (40, 6)
    torch.testing.assert_close(r.vectors.T @ r.vectors, torch.eye(6, dtype=torch.float64))
    assert torch.equal(r.vectors, basis_by_rank_fraction(M, 0.2, kind="random", seed=5).vectors)
    rr = basis_by_rank_fraction(M, 0.2, side="right", kind="random", seed=5)
    assert rr.d == 30 and rr.k == 6
    top = basis_by_rank_fraction(M, 0.2)
    assert top.kind == "topk" and top.indices == tuple(range(6))
    assert top.energy > rk.energy or idx == list(range(6))


def test_orthonormalize_drops_dependent_columns():
    r = torch.tensor([1.0, 2.0, 2.0, 0.0])
    b = orthonormalize(r)
    assert b.k == 1 and b.kind == "given"
    torch.testing.assert_close(b.vectors[:, 0], r.double() / 3)
    V = torch.randn(10, 2, generator=gen(0), dtype=torch.float64)
    Vd = torch.cat([V, V[:, :1] * 2 + V[:, 1:], torch.zeros(10, 1, dtype=torch.float64)], dim=1)
    b2 = orthonormalize(Vd)
    assert b2.k == 2 and b2.d == 10
    assert mso(b2, orthonormalize(V)) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="zero"):
        orthonormalize(torch.zeros(5, 2))


# ---------------------------------------------------------------- projections


def test_project_plus_orthogonal_is_delta():
    M = torch.randn(24, 16, generator=gen(2), dtype=torch.float64)
    D = torch.randn(24, 16, generator=gen(3), dtype=torch.float32)
    bl = basis_by_energy(M, 0.6)
    br = basis_by_energy(M, 0.6, side="right")
    for basis, side in ((bl, "left"), (br, "right")):
        p = project(D, basis, side=side)
        q = project_orthogonal(D, basis, side=side)
        assert p.dtype == D.dtype
        torch.testing.assert_close(p + q, D)
    # matches the dense projector
    P = bl.vectors @ bl.vectors.T
    torch.testing.assert_close(project(D.double(), bl), P @ D.double())
    Pr = br.vectors @ br.vectors.T
    torch.testing.assert_close(project(D.double(), br, side="right"), D.double() @ Pr)
    # 1-D delta (bias) projected as a vector
    v = torch.randn(24, generator=gen(4), dtype=torch.float64)
    torch.testing.assert_close(project(v, bl), P @ v)


def test_energy_kept_planted():
    Q = rand_orth(20, 6, 8)
    basis = orthonormalize(Q[:, :3])
    inside = Q[:, :3] @ torch.randn(3, 7, generator=gen(1), dtype=torch.float64)
    outside = Q[:, 3:] @ torch.randn(3, 7, generator=gen(2), dtype=torch.float64)
    kept, total = energy_kept(inside, basis)
    assert kept / total == pytest.approx(1.0, abs=1e-12)
    kept, total = energy_kept(outside, basis)
    assert kept / total == pytest.approx(0.0, abs=1e-12)
    assert total == pytest.approx(float((outside ** 2).sum()))
    # right side
    kept, total = energy_kept(inside.T, basis, side="right")
    assert kept / total == pytest.approx(1.0, abs=1e-12)
    # summed ratio over a mix
    k1, t1 = energy_kept(inside, basis)
    k2, t2 = energy_kept(outside, basis)
    assert (k1 + k2) / (t1 + t2) == pytest.approx(t1 / (t1 + t2))


def test_energy_kept_random_expectation():
    d, k = 50, 5
    basis = orthonormalize(rand_orth(d, k, 0))
    D = torch.randn(d, 4000, generator=gen(1), dtype=torch.float64)
    kept, total = energy_kept(D, basis)
    assert kept / total == pytest.approx(k / d, abs=0.005)


def test_project_rank1():
    t = torch.tensor([1.0, 2.0, 3.0])
    a = torch.tensor([0.0, 2.0, 0.0])
    torch.testing.assert_close(project_rank1(t, a), torch.tensor([0.0, 2.0, 0.0]))
    z = project_rank1(t, torch.zeros(3))
    assert torch.equal(z, torch.zeros(3))
    t2 = torch.randn(4, 5, generator=gen(0))
    a2 = torch.randn(4, 5, generator=gen(1))
    p = project_rank1(t2, a2)
    assert p.shape == t2.shape
    expected = (t2 * a2).sum() / (a2 * a2).sum() * a2
    torch.testing.assert_close(p, expected)
    # residual orthogonal to a
    assert float(((t2 - p) * a2).sum()) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        project_rank1(t, torch.zeros(4))


# ---------------------------------------------------------------- cosine


def test_flat_cosine_global_not_mean():
    a = [torch.tensor([[1.0, 0.0]]), torch.tensor([0.0, 100.0, 0.0])]
    b = [torch.tensor([[1.0, 1.0]]), torch.tensor([0.0, -1.0, 1.0])]
    dot = 1.0 + (-100.0)
    na = math.sqrt(1.0 + 100.0 ** 2)
    nb = math.sqrt(2.0 + 2.0)
    manual = dot / (na * nb)
    assert flat_cosine(a, b) == pytest.approx(manual, rel=1e-12)
    per = [float((x * y).sum() / (x.norm() * y.norm())) for x, y in zip(a, b)]
    mean_per = sum(per) / len(per)  # = 0 here: +0.707 and -0.707
    assert mean_per == pytest.approx(0.0, abs=1e-6)
    assert abs(mean_per - flat_cosine(a, b)) > 0.4
    acc = CosineAccumulator()
    for x, y in zip(a, b):
        acc.add(x, y)
    assert acc.value == pytest.approx(manual, rel=1e-12)
    assert acc.count == 2
    assert math.isnan(CosineAccumulator().value)
    assert math.isnan(flat_cosine([torch.zeros(3)], [torch.ones(3)]))
    with pytest.raises(ValueError, match="length"):
        flat_cosine(a, b[:1])
    with pytest.raises(ValueError, match="shapes differ"):
        flat_cosine([torch.zeros(2)], [torch.zeros(3)])


# ---------------------------------------------------------------- activations


def test_activation_basis_centered_vs_uncentered():
    d, n = 10, 400
    g = gen(0)
    e = torch.eye(d, dtype=torch.float64)
    mean_dir = e[0]
    var_dir = e[1]
    # large constant offset along e0, variance only along e1 (+ tiny noise)
    X = 50.0 * mean_dir + torch.randn(n, 1, generator=g, dtype=torch.float64) * var_dir
    X = X + 1e-4 * torch.randn(n, d, generator=g, dtype=torch.float64)
    bc = activation_basis(X, 0.9, centered=True)
    assert bc.k == 1 and bc.d == d
    assert abs(float(bc.vectors[:, 0] @ var_dir)) == pytest.approx(1.0, abs=1e-6)
    bu = activation_basis(X, 0.9, centered=False)
    assert bu.k == 1
    assert abs(float(bu.vectors[:, 0] @ mean_dir)) == pytest.approx(1.0, abs=1e-3)
    bu2 = activation_basis(X, 0.9999, centered=False)
    assert bu2.k == 2
    assert mso(bc, bu2) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="after centering"):
        activation_basis(torch.ones(5, 3), 0.9, centered=True)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_fraction_validation(bad):
    M = torch.randn(6, 4, generator=gen(0))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        basis_by_energy(M, bad)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        basis_by_rank_fraction(M, bad)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        k_for_rank_fraction(6, 4, bad)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        k_for_energy(torch.ones(3), bad, 3.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        bases_for_grid(M, [0.5, bad])


def test_other_validation_messages():
    M = torch.randn(6, 4, generator=gen(0))
    for bad_val in (float("nan"), float("inf")):
        Mb = M.clone()
        Mb[2, 1] = bad_val
        with pytest.raises(ValueError, match="non-finite"):
            basis_by_energy(Mb, 0.5)
        with pytest.raises(ValueError, match="non-finite"):
            svd_spectrum(Mb)
    with pytest.raises(ValueError, match="2-D"):
        svd_spectrum(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="2-D"):
        basis_by_energy(torch.randn(7), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        activation_basis(torch.randn(7), 0.5)
    with pytest.raises(ValueError, match=r"\(10, 2\).*\(12, 3\)"):
        mso(rand_orth(10, 2, 0), rand_orth(12, 3, 1))
    with pytest.raises(ValueError, match=r"\(10, 2\).*\(12, 3\)"):
        principal_angles(rand_orth(10, 2, 0), rand_orth(12, 3, 1))
    with pytest.raises(ValueError, match="not orthonormal"):
        mso(torch.randn(10, 2, dtype=torch.float64, generator=gen(0)), rand_orth(10, 2, 1))
    with pytest.raises(ValueError, match="side"):
        basis_by_energy(M, 0.5, side="up")
    with pytest.raises(ValueError, match="method"):
        svd_spectrum(M, method="lanczos")
    with pytest.raises(ValueError, match="kind"):
        basis_by_rank_fraction(M, 0.5, kind="bottomk")
    with pytest.raises(ValueError, match="zero"):
        basis_by_energy(torch.zeros(4, 3), 0.5)
    with pytest.raises(ValueError, match="left projection"):
        project(torch.randn(5, 6), rand_orth(6, 2, 0))
    with pytest.raises(ValueError, match="right projection"):
        project(torch.randn(6, 5), rand_orth(6, 2, 0), side="right")
    with pytest.raises(ValueError):
        mso_random_baseline(5, 2, 4)


def test_float32_compute_and_input_dtypes():
    M = planted(16, 12, [4.0, 2.0, 1.0], seed=3).float()
    b64 = basis_by_energy(M, 0.99)  # cumulative 16, 20, 21 of 21
    b32 = basis_by_energy(M, 0.99, dtype=torch.float32)
    assert b64.vectors.dtype == torch.float64 and b32.vectors.dtype == torch.float32
    assert b64.k == b32.k == 3
    assert mso(b64, b32) == pytest.approx(1.0, abs=1e-5)
    bb = basis_by_energy(M.to(torch.bfloat16), 0.5)
    assert bb.k == 1


def test_doctests():
    import doctest

    res = doctest.testmod(ss, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0
