"""workbench.subspace: details surviving mutants showed untested (benchmarks/mutation.py, subspace).

Plain-list and 1 x 1 inputs, a one-value spectrum, the documented defaults of the randomized paths (bit-exact
for a seed), small-norm energies and the compute dtype of activation bases. Expected values by hand.
"""

from __future__ import annotations

import pytest
import torch

from workbench import subspace as ss
from workbench.subspace import (activation_basis, bases_for_grid, basis_by_rank_fraction, k_for_energy,
                                orthonormalize, svd_spectrum)


def test_plain_lists_and_one_by_one_matrices():
    U, S, total = svd_spectrum([[3.0, 0.0], [0.0, -1.0]])
    assert S.tolist() == [3.0, 1.0] and total == 10.0
    assert U.abs().tolist() == [[1.0, 0.0], [0.0, 1.0]]
    U, S, total = svd_spectrum(torch.tensor([[-2.0]]))
    assert (U.tolist(), S.tolist(), total) == ([[1.0]], [2.0], 4.0)  # sign fixed: largest entry positive
    with pytest.raises(ValueError, match="non-empty"):
        svd_spectrum(torch.zeros(0, 3))


def test_k_for_energy_on_a_single_value_and_bad_shapes():
    assert k_for_energy(torch.tensor([2.0]), 0.5, 4.0) == 1
    assert k_for_energy(torch.tensor([2.0]), 1.0, 4.0) == 1
    with pytest.raises(ValueError, match="1-D"):
        k_for_energy(torch.tensor([[2.0, 1.0]]), 0.5, 5.0)
    with pytest.raises(ValueError, match="1-D"):
        k_for_energy(torch.tensor([]), 0.5, 5.0)


def _planted(m: int, n: int, svals, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(svals), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(svals), generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(svals, dtype=torch.float64)) @ V.T


def test_randomized_topk_basis_uses_the_seed_and_the_documented_defaults():
    M = _planted(40, 30, [float(30 - i) for i in range(30)], seed=1)  # slowly decaying: the sketch is inexact
    k = ss.k_for_rank_fraction(40, 30, 0.2)
    for seed in (0, 7):
        b = basis_by_rank_fraction(M, 0.2, kind="topk", method="randomized", seed=seed)
        U, S, _ = svd_spectrum(M, method="randomized", rank=k, seed=seed, niter=4, oversample=10)
        assert torch.equal(b.vectors, U), seed  # bit-exact: seed passed through, niter 4 / oversample 10
    b0 = basis_by_rank_fraction(M, 0.2, kind="topk", method="randomized", seed=0)
    b7 = basis_by_rank_fraction(M, 0.2, kind="topk", method="randomized", seed=7)
    assert not torch.equal(b0.vectors, b7.vectors)


def test_grid_randomized_path_sketches_a_quarter_of_the_rank(monkeypatch):
    M = _planted(24, 16, [8.0, 4.0, 2.0, 1.0], seed=2)  # rank 4: a sketch of rank 16 // 4 + 1 = 5 reaches it
    calls = []
    real = ss._randomized_left

    def spy(A, rank, **kw):
        calls.append(rank)
        return real(A, rank, **kw)

    monkeypatch.setattr(ss, "_randomized_left", spy)
    grid = bases_for_grid(M, [0.5, 0.99], method="randomized", seed=3)
    assert calls == [5]
    exact = bases_for_grid(M, [0.5, 0.99])
    assert calls == [5]  # the exact path never sketches
    for e in (0.5, 0.99):
        assert grid[e].k == exact[e].k
        assert ss.mso(grid[e], exact[e]) == pytest.approx(1.0, abs=1e-9)


def test_orthonormalize_energy_of_small_vectors():
    b = orthonormalize(0.1 * torch.eye(4)[:, :2])
    assert b.k == 2 and b.energy == pytest.approx(1.0, abs=1e-12)
    # a tiny dependent column is dropped; its energy share is what the basis misses
    v = torch.tensor([[0.3, 0.0], [0.0, 1e-13]], dtype=torch.float64)
    d = orthonormalize(v, rtol=1e-6)
    assert d.k == 1 and d.energy == pytest.approx(0.09 / (0.09 + 1e-26), rel=1e-12)


def test_activation_basis_honours_the_compute_dtype():
    X = torch.tensor([[1.0, 0.0, 0.5], [2.0, 0.1, 0.0], [3.0, 0.0, -0.5], [4.0, -0.1, 0.0]])
    b32 = activation_basis(X, 0.9, dtype=torch.float32)
    b64 = activation_basis(X, 0.9)
    assert b32.vectors.dtype == torch.float32 and b64.vectors.dtype == torch.float64
    assert b32.k == b64.k == 1
    assert torch.allclose(b32.vectors.double(), b64.vectors, atol=1e-6)
