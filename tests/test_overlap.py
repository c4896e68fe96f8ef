"""Activation-subspace overlap (study experiment 4): energy bases agree with a direct SVD on both code
paths, planted subspaces give the MSO they must, and bad input is refused clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.overlap import activation_overlap, bases_for_etas
from workbench.errors import WorkbenchError
from workbench.subspace import k_for_energy, mso

ETAS = (0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0)


def decaying(n: int, d: int, seed: int) -> torch.Tensor:
    """[n, d] with a spread-out, non-degenerate spectrum (and a non-zero mean)."""
    g = torch.Generator().manual_seed(seed)
    scales = 1.0 / (1.0 + torch.arange(d, dtype=torch.float64)) ** 0.7
    R, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scales @ R.T + 0.3


def direct_bases(X: torch.Tensor, centered: bool) -> dict[float, torch.Tensor]:
    X = X.to(torch.float64)
    if centered:
        X = X - X.mean(0, keepdim=True)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    total = float((X * X).sum())
    return {eta: Vh[: k_for_energy(S, eta, total)].T for eta in ETAS}


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("n, d, path", [(12, 40, "gram"), (60, 20, "svd")])
def test_bases_match_a_direct_svd_on_both_paths(n, d, path, centered, monkeypatch):
    X = decaying(n, d, seed=n)
    ref = direct_bases(X, centered)  # computed before the spy is installed
    calls = {"svd": 0}
    real_svd = torch.linalg.svd

    def spy(*a, **kw):
        calls["svd"] += 1
        return real_svd(*a, **kw)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    got = bases_for_etas(X, ETAS, centered)
    assert calls["svd"] == (0 if path == "gram" else 1)  # n < d: the small Gram matrix, no SVD at all
    assert list(got) == list(ETAS)
    ks = [got[e].shape[1] for e in ETAS]
    assert ks == sorted(ks) and ks[0] >= 1 and ks[-1] <= min(n - int(centered), d)
    assert ks[0] < ks[-1]
    for eta in ETAS:
        Q, Qd = got[eta], ref[eta]
        assert Q.shape == Qd.shape, (eta, Q.shape, Qd.shape)  # same k as k_for_energy on the exact spectrum
        torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1], dtype=torch.float64), atol=1e-9, rtol=0)
        assert mso(Q, Qd) == pytest.approx(1.0, abs=1e-9)


def test_zero_energy_is_refused():
    X = torch.ones(5, 8)
    with pytest.raises(WorkbenchError, match="no energy"):
        bases_for_etas(X, [0.5], centered=True)
    assert bases_for_etas(X, [0.5], centered=False)[0.5].shape == (8, 1)  # uncentred: the mean direction


def planted_sets(n: int = 30, d: int = 16, L: int = 2, noise: float = 0.0) -> dict[str, torch.Tensor]:
    """A and C live in span(e0..e2), B in span(e3..e6): A~B orthogonal, A~C the same subspace."""
    g = torch.Generator().manual_seed(0)

    def in_span(lo: int, hi: int) -> torch.Tensor:
        X = torch.zeros(n, L, d, dtype=torch.float64)
        X[:, :, lo:hi] = torch.randn(n, L, hi - lo, generator=g, dtype=torch.float64) * torch.linspace(
            3, 1, hi - lo, dtype=torch.float64) + 1.0
        return X + noise * torch.randn(n, L, d, generator=g, dtype=torch.float64)

    return {"A": in_span(0, 3), "B": in_span(3, 7), "C": in_span(0, 3)}


def test_identical_sets_overlap_completely():
    X = decaying(20, 16, seed=1).reshape(20, 1, 16).repeat(1, 2, 1)
    res = activation_overlap({"A": X, "B": X.clone()}, etas=[0.3, 0.9], n_boot=0)
    assert res.d == 16 and len(res.rows) == 2 * 2 * 2  # layers x centred x etas
    for r in res.rows:
        assert r["pair"] == "A~B" and r["k_a"] == r["k_b"]
        assert r["mso"] == pytest.approx(1.0, abs=1e-9)
        assert r["baseline"] == r["k_a"] / 16


@pytest.mark.parametrize("centered", [False, True])
def test_planted_orthogonal_and_shared_subspaces(centered):
    res = activation_overlap(planted_sets(), etas=[0.5, 0.99], centered=[centered], n_boot=0)
    assert {r["pair"] for r in res.rows} == {"A~B", "A~C", "B~C"}
    for r in res.rows:
        assert r["centered"] is centered
        assert r["baseline"] == max(r["k_a"], r["k_b"]) / 16
        if r["pair"] in ("A~B", "B~C"):
            assert r["mso"] <= 1e-12, r
        elif r["eta"] == 0.99:
            assert (r["k_a"], r["k_b"]) == (3, 3) and r["mso"] == pytest.approx(1.0, abs=1e-9)


def test_noisy_planted_subspaces_stay_apart_and_beat_the_baseline():
    res = activation_overlap(planted_sets(noise=1e-3), etas=[0.9], centered=[False], n_boot=0)
    t = res.table(0.9, centered=False)
    assert sorted(t) == ["A~B", "A~C", "B~C"] and [r["layer"] for r in t["A~B"]] == [0, 1]
    for r in t["A~B"]:
        assert r["mso"] < 1e-3 < r["baseline"]
    for r in t["A~C"]:
        assert r["mso"] > 0.5 > r["baseline"]


def test_bootstrap_intervals_pairs_and_layers():
    sets = planted_sets()
    res = activation_overlap(sets, etas=[0.99], centered=[False], n_boot=6, seed=3, pairs=[("A", "B"), ("A", "C")],
                             layers=[1])
    assert {r["pair"] for r in res.rows} == {"A~B", "A~C"} and len(res.rows) == 2
    for r in res.rows:
        assert r["layer"] == 1 and {"mso_lo", "mso_hi"} <= set(r)
        assert 0.0 <= r["mso_lo"] <= r["mso_hi"] <= 1.0
    ab, ac = (next(r for r in res.rows if r["pair"] == p) for p in ("A~B", "A~C"))
    assert ab["mso_hi"] <= 1e-12  # every resample of orthogonal subspaces is still orthogonal
    assert ac["mso_lo"] == pytest.approx(1.0, abs=1e-9)  # and every resample of the shared one still shares it
    again = activation_overlap(sets, etas=[0.99], centered=[False], n_boot=6, seed=3, pairs=[("A", "B"), ("A", "C")],
                               layers=[1])
    assert again.rows == res.rows
    res0 = activation_overlap(sets, etas=[0.99], centered=[False], n_boot=0, layers=[1])
    assert all("mso_lo" not in r for r in res0.rows)


def test_bootstrap_interval_brackets_same_distribution_overlap():
    g = torch.Generator().manual_seed(7)
    A, B = (torch.randn(40, 1, 12, generator=g) * torch.linspace(3, 0.2, 12) for _ in range(2))
    res = activation_overlap({"A": A, "B": B}, etas=[0.5], centered=[True], n_boot=20)
    (r,) = res.rows
    assert r["mso_lo"] <= r["mso_hi"] and r["mso_hi"] - r["mso_lo"] > 0
    assert r["mso"] > r["baseline"]  # same distribution: well above two random subspaces


@pytest.mark.parametrize(
    "sets, kw, match",
    [
        ({"A": torch.randn(5, 2, 8)}, {}, "at least two"),
        ({"A": torch.randn(5, 2, 8), "B": torch.randn(5, 2, 8)}, {"etas": [0.0]}, "eta"),
        ({"A": torch.randn(5, 2, 8), "B": torch.randn(5, 2, 8)}, {"etas": [0.5, 1.5]}, "eta"),
        ({"A": torch.randn(5, 2, 8), "B": torch.randn(5, 2, 7)}, {}, r"\[n, layers, d\]"),
        ({"A": torch.randn(5, 2, 8), "B": torch.randn(5, 3, 8)}, {}, r"\[n, layers, d\]"),
        ({"A": torch.randn(5, 8), "B": torch.randn(5, 2, 8)}, {}, r"\[n, layers, d\]"),
        ({"A": torch.randn(5, 2, 8), "B": torch.randn(5, 8)}, {}, r"\[n, layers, d\]"),
        ({"A": torch.randn(5, 2, 8), "B": torch.randn(1, 2, 8)}, {}, "at least 2"),
        ({"A": torch.randn(5, 2, 8), "B": torch.randn(5, 2, 8)}, {"pairs": [("A", "Z")]}, "unknown sets"),
    ],
)
def test_errors(sets, kw, match):
    with pytest.raises(WorkbenchError, match=match):
        activation_overlap(sets, n_boot=0, **kw)


# -- interval coverage on planted data with a known overlap (issue #10: bootstrap intervals biased low) ------

COVER_N, COVER_D, COVER_SIGMA, COVER_ETA, COVER_COS2 = 60, 64, 0.15, 0.79, 0.5


def planted_pair(seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Two sets of ``COVER_N`` uncentred rows ``x = U z + sigma e`` in R^64: signal z ~ N(0, 4 I_2) in a plane
    (A: span(e0, e1); B: span(e0, cos t e1 + sin t e2), cos^2 t = 0.5) plus isotropic noise e ~ N(0, I).

    The population energy-η basis of each set is its plane: the second-moment spectrum is 4 + s^2 (twice) and
    s^2 (62 times), s = 0.15, so the top two directions hold 2 (4 + s^2) / (8 + 64 s^2) = 0.852 >= η = 0.79 of
    the energy and the first alone 0.426 < η: k = 2. The true MSO is (1 + cos^2 t) / 2 = 0.75. With n = 60 < d the
    sample bases tilt into the 62 noise directions, so the full-sample MSO is biased low (about 0.74) by about
    one standard error: exactly the situation in which an interval must not move further down.
    """
    rng = np.random.default_rng(seed)
    UA = np.eye(COVER_D)[:, :2]
    UB = UA.copy()
    UB[1, 1], UB[2, 1] = COVER_COS2 ** 0.5, (1 - COVER_COS2) ** 0.5

    def draw(U: np.ndarray) -> torch.Tensor:
        X = rng.standard_normal((COVER_N, 2)) * 2.0 @ U.T + COVER_SIGMA * rng.standard_normal((COVER_N, COVER_D))
        return torch.from_numpy(X)[:, None, :]

    A, B = draw(UA), draw(UB)
    return A, B, (1 + COVER_COS2) / 2


def _population_k() -> int:
    s2 = COVER_SIGMA ** 2
    spectrum = torch.tensor([4 + s2, 4 + s2] + [s2] * (COVER_D - 2), dtype=torch.float64)
    return k_for_energy(spectrum.sqrt(), COVER_ETA, float(spectrum.sum()))


def _old_percentile_bootstrap(A: torch.Tensor, B: torch.Tensor, n_boot: int, seed: int) -> tuple[float, float]:
    """The interval this module used before: prompts resampled WITH replacement, 2.5 / 97.5 percentiles."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        qa = bases_for_etas(A[rng.integers(0, len(A), len(A)), 0], [COVER_ETA], False)[COVER_ETA]
        qb = bases_for_etas(B[rng.integers(0, len(B), len(B)), 0], [COVER_ETA], False)[COVER_ETA]
        vals.append(mso(qa, qb, check=False))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def test_subsampling_interval_coverage_of_the_estimate_and_a_planted_truth_vs_the_old_bootstrap():
    assert _population_k() == 2  # the truth below is the MSO of the two planted planes
    new_truth = new_point = old_truth = old_point = 0
    below = 0
    for seed in range(20):
        A, B, truth = planted_pair(seed)
        (r,) = activation_overlap({"A": A, "B": B}, etas=[COVER_ETA], centered=[False], n_boot=100, seed=seed).rows
        assert r["k_a"] == r["k_b"] == 2 and r["mso"] < truth
        new_truth += r["mso_lo"] <= truth <= r["mso_hi"]
        new_point += r["mso_lo"] <= r["mso"] <= r["mso_hi"]
        lo, hi = _old_percentile_bootstrap(A, B, 100, seed)
        old_truth += lo <= truth <= hi
        old_point += lo <= r["mso"] <= hi
        below += hi < truth
    # measured: subsampling covers the truth in 19/20 and the estimate in 20/20; the old with-replacement
    # percentile interval covers the estimate in 20/20 but the truth in 2/20 (this test fails on it: checked by
    # running it against the previous probes/overlap.py)
    assert new_truth >= 17 and new_point >= 17, (new_truth, new_point)
    assert old_truth <= 10 and below >= 10, (old_truth, below)  # the old interval sits below the truth
