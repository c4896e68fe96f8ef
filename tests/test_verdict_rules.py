"""weightspace.verdicts rule by rule (issue #15, mutation testing of the verdict module).

Every expectation here is derived independently of the function under test: by hand on tiny arrays, from
planted values on both sides of (and exactly at) each threshold fixed in advance, or from a percentile
bootstrap written out below (:func:`_percentile_bootstrap`: the documented procedure, ``numpy.random.
default_rng(seed)``, items resampled with replacement ``n_boot`` times, together when paired, non-finite
statistics dropped, the ``alpha / 2`` and ``1 - alpha / 2`` percentiles). No fixtures, no models: fast.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from weightspace import verdicts as V

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


def _percentile_bootstrap(stat, *samples, paired, n_boot, seed, alpha=0.05):
    """The reference: a seeded percentile bootstrap, written independently of ``verdicts.bootstrap_ci``."""
    data = [np.array([float(v) for v in s]) for s in samples]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        if paired:
            n = len(data[0])
            pick = rng.integers(0, n, n)
            out.append(stat(*[d[pick] for d in data]))
        else:
            out.append(stat(*[d[rng.integers(0, len(d), len(d))] for d in data]))
    vals = np.array(out, dtype=float)
    vals = vals[np.isfinite(vals)]
    return [float(np.percentile(vals, 100 * alpha / 2)), float(np.percentile(vals, 100 - 100 * alpha / 2))]


def _mean(a):
    return sum(float(x) for x in a) / len(a)


def _close(got, want):
    assert got is not None and len(got) == 2
    assert list(got) == pytest.approx(want, rel=1e-12, abs=1e-15)


# irregular values: many distinct resample statistics, so every percentile moves with the seed or n_boot
A12 = [0.13, 0.57, 0.21, 0.94, 0.38, 0.72, 0.05, 0.66, 0.49, 0.81, 0.27, 0.33]
B12 = [0.31, 0.12, 0.58, 0.44, 0.09, 0.97, 0.63, 0.26, 0.75, 0.18, 0.52, 0.4]


# -- decide: each rule's boundaries ------------------------------------------------------------------

def test_decide_above_boundaries():
    assert V.decide(0.5, [0.0, 1.0], above=0.0) == INCONCLUSIVE  # low end == threshold: not above it
    assert V.decide(0.5, [1e-9, 1.0], above=0.0) == HOLDS
    assert V.decide(-0.5, [-1.0, 0.0], above=0.0) == FAILS  # high end == threshold: does not hold
    assert V.decide(-0.5, [-1.0, 1e-9], above=0.0) == INCONCLUSIVE
    assert V.decide(0.0, None, above=0.0) == FAILS and V.decide(0.01, None, above=0.0) == HOLDS
    assert V.decide(5.0, (-1.0, -0.5), above=0.0) == FAILS  # the interval decides, not the value
    assert V.decide(-5.0, np.array([0.5, 1.0]), above=0.0) == HOLDS


def test_decide_below_boundaries():
    assert V.decide(0.05, [0.0, 0.1], below=0.1) == HOLDS  # high end == threshold: holds
    assert V.decide(0.05, [0.0, 0.1 + 1e-9], below=0.1) == INCONCLUSIVE
    assert V.decide(0.5, [0.1, 0.9], below=0.1) == INCONCLUSIVE  # low end == threshold: not beyond it
    assert V.decide(0.5, [0.1 + 1e-9, 0.9], below=0.1) == FAILS
    assert V.decide(0.1, None, below=0.1) == HOLDS and V.decide(0.11, None, below=0.1) == FAILS


def test_decide_inside_boundaries():
    t = 0.05
    assert V.decide(0.0, [-0.05, 0.05], inside=t) == HOLDS  # both ends exactly on the band's edges
    assert V.decide(0.0, [-0.05 - 1e-9, 0.05], inside=t) == INCONCLUSIVE
    assert V.decide(0.0, [-0.05, 0.05 + 1e-9], inside=t) == INCONCLUSIVE
    assert V.decide(0.1, [0.05, 0.2], inside=t) == INCONCLUSIVE  # touches the band from above
    assert V.decide(-0.1, [-0.2, -0.05], inside=t) == INCONCLUSIVE  # touches it from below
    assert V.decide(0.1, [0.06, 0.2], inside=t) == FAILS
    assert V.decide(-0.1, [-0.2, -0.06], inside=t) == FAILS
    assert V.decide(0.0, [-0.2, 0.01], inside=t) == INCONCLUSIVE
    assert V.decide(0.0, [-0.01, 0.2], inside=t) == INCONCLUSIVE
    assert V.decide(0.0, [-0.2, 0.2], inside=t) == INCONCLUSIVE
    assert V.decide(0.03, None, inside=t) == HOLDS and V.decide(-0.07, None, inside=t) == FAILS


def test_decide_needs_a_rule_and_a_value():
    with pytest.raises(ValueError):
        V.decide(0.1, [0.0, 0.2])
    assert V.decide(None, [0.1, 0.2], above=0.0) == INCONCLUSIVE
    assert V.decide(None, None, inside=0.05) == INCONCLUSIVE


def test_combine():
    assert V.combine([]) == INCONCLUSIVE
    assert V.combine([HOLDS]) == HOLDS and V.combine([HOLDS, HOLDS]) == HOLDS
    assert V.combine([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert V.combine([INCONCLUSIVE, FAILS, HOLDS]) == FAILS
    assert V.combine([FAILS]) == FAILS


def test_pooled_ratio():
    assert V.pooled_ratio(np.array([0.1, 0.2]), np.array([0.3, 0.5])) == pytest.approx(0.3 / 0.8)  # total < 1
    assert V.pooled_ratio(np.array([2.0, 1.0]), np.array([4.0, 2.0])) == pytest.approx(0.5)
    assert V.pooled_ratio(np.array([0.25]), np.array([1.0])) == 0.25  # total exactly 1
    assert math.isnan(V.pooled_ratio(np.array([0.0, 0.0]), np.array([0.0, 0.0])))


# -- bootstrap_ci: the seeded percentile bootstrap ------------------------------------------------------

def test_bootstrap_ci_defaults_are_the_paired_percentile_bootstrap_seed_0_2000_resamples():
    mean = lambda a: float(a.mean())  # noqa: E731
    _close(V.bootstrap_ci(mean, A12), _percentile_bootstrap(mean, A12, paired=True, n_boot=2000, seed=0))
    paired_gap = lambda a, b: float(np.mean(a - b) / np.mean(a + b))  # noqa: E731
    _close(V.bootstrap_ci(paired_gap, A12, B12),
           _percentile_bootstrap(paired_gap, A12, B12, paired=True, n_boot=2000, seed=0))


def test_bootstrap_ci_seed_n_boot_alpha_and_reproducibility():
    mean = lambda a: float(a.mean())  # noqa: E731
    ci = V.bootstrap_ci(mean, A12, seed=7, n_boot=500)
    _close(ci, _percentile_bootstrap(mean, A12, paired=True, n_boot=500, seed=7))
    assert V.bootstrap_ci(mean, A12, seed=7, n_boot=500) == ci  # reproducible
    assert V.bootstrap_ci(mean, A12, seed=8, n_boot=500) != ci  # another seed, another interval
    _close(V.bootstrap_ci(mean, A12, seed=3, n_boot=400, alpha=0.2),
           _percentile_bootstrap(mean, A12, paired=True, n_boot=400, seed=3, alpha=0.2))


def test_bootstrap_ci_unpaired_resamples_each_sample_on_its_own():
    diff = lambda a, b: float(a.mean() - b.mean())  # noqa: E731
    b7 = B12[:7]
    _close(V.bootstrap_ci(diff, A12, b7, paired=False, seed=3, n_boot=400),
           _percentile_bootstrap(diff, A12, b7, paired=False, n_boot=400, seed=3))
    with pytest.raises(ValueError):  # paired samples must share one index
        V.bootstrap_ci(diff, A12, b7)


def test_bootstrap_ci_casts_the_samples_to_float():
    # 0/1 flags given as booleans: the statistic sees numbers (numpy refuses `-` on boolean arrays)
    x = [True, False, True, True, False, True, False, True]
    y = [False, False, True, False, True, False, False, False]
    diff = lambda a, b: float((a - b).mean())  # noqa: E731
    _close(V.bootstrap_ci(diff, x, y, seed=1, n_boot=300),
           _percentile_bootstrap(diff, [float(v) for v in x], [float(v) for v in y], paired=True, n_boot=300, seed=1))


def test_bootstrap_ci_needs_two_items_per_sample():
    mean = lambda a: float(a.mean())  # noqa: E731
    assert V.bootstrap_ci(mean) is None
    assert V.bootstrap_ci(mean, [0.4]) is None
    assert V.bootstrap_ci(lambda a, b: float(a.mean() - b.mean()), [0.1, 0.2, 0.3], [0.5], paired=False) is None
    # two items are enough: resample means of [1, 3] are 1, 2 or 3 (probabilities 1/4, 1/2, 1/4)
    ci = V.bootstrap_ci(mean, [1.0, 3.0], seed=2, n_boot=300)
    _close(ci, _percentile_bootstrap(mean, [1.0, 3.0], paired=True, n_boot=300, seed=2))
    assert ci == [1.0, 3.0]


def test_bootstrap_ci_drops_non_finite_statistics():
    mean = lambda a: float(a.mean())  # noqa: E731
    assert V.bootstrap_ci(lambda a: float("nan"), A12, n_boot=50) is None
    # a statistic undefined on some resamples (no item above 0.9 drawn): those resamples are left out
    odd = lambda a: float(a.mean()) if (a > 0.9).any() else float("nan")  # noqa: E731
    _close(V.bootstrap_ci(odd, A12, seed=4, n_boot=300), _percentile_bootstrap(odd, A12, paired=True, n_boot=300,
                                                                             seed=4))
    # one resample: both ends are its statistic
    one = V.bootstrap_ci(mean, A12, seed=5, n_boot=1)
    rng = np.random.default_rng(5)
    m = float(np.array(A12)[rng.integers(0, 12, 12)].mean())
    assert one == pytest.approx([m, m], rel=1e-12)


# -- Exp 1a: energy parity --------------------------------------------------------------------------

def _gap(uk, ut, hk, ht):
    return sum(uk) / sum(ut) - sum(hk) / sum(ht)


def test_exp1_energy_parity_threshold_is_ek_gap_0_05():
    r = V.exp1_energy_parity({0.25: {"useful": 0.27, "harmful": 0.20}})  # gap 0.07 > 0.05
    assert r["verdict"] == FAILS and r["value"] == pytest.approx(0.07) and r["ci"] is None
    assert r["threshold"] == 0.05
    assert V.exp1_energy_parity({0.25: {"useful": 0.20, "harmful": 0.27}})["verdict"] == FAILS
    assert V.exp1_energy_parity({0.25: {"useful": 0.23, "harmful": 0.20}})["verdict"] == HOLDS  # gap 0.03
    # exactly on the band's edges (0.05 - 0 and 0 - 0.05 are exact): inside, holds
    assert V.exp1_energy_parity({0.25: {"useful": 0.05, "harmful": 0.0}})["verdict"] == HOLDS
    assert V.exp1_energy_parity({0.25: {"useful": 0.0, "harmful": 0.05}})["verdict"] == HOLDS
    r = V.exp1_energy_parity({0.25: {"useful": 0.27, "harmful": 0.20}}, threshold=0.1)
    assert r["verdict"] == HOLDS and r["threshold"] == 0.1 and "[-0.1, 0.1]" in r["rule"]


def test_exp1_energy_parity_missing_values_are_inconclusive():
    for x in ({"useful": None, "harmful": 0.2}, {"useful": 0.2, "harmful": None}, {"useful": float("nan"),
                                                                                   "harmful": 0.2}, {}):
        r = V.exp1_energy_parity({0.25: x})
        assert r["verdict"] == INCONCLUSIVE and r["value"] is None and r["ci"] is None
        assert r["per_rho"][0]["gap"] is None and r["per_rho"][0]["verdict"] == INCONCLUSIVE
    r = V.exp1_energy_parity({0.25: {"useful": float("nan"), "harmful": 0.2}})
    assert r["per_rho"][0]["ek_useful"] is None and r["per_rho"][0]["ek_harmful"] == 0.2
    r = V.exp1_energy_parity({})
    assert r["verdict"] == INCONCLUSIVE and r["value"] is None and r["per_rho"] == []
    # integers are numbers too
    r = V.exp1_energy_parity({0.25: {"useful": 1, "harmful": 0}})
    assert r["value"] == 1.0 and r["verdict"] == FAILS and r["per_rho"][0]["ek_useful"] == 1.0
    # one rho missing, the other measured: the reported value is the measured one, the verdict inconclusive
    r = V.exp1_energy_parity({0.25: {"useful": None, "harmful": 0.2}, 0.5: {"useful": 0.22, "harmful": 0.2}})
    assert r["value"] == pytest.approx(0.02) and r["verdict"] == INCONCLUSIVE


# per-tensor energies (5 tensors); rho 0.25: pooled gap about +0.03, rho 0.5: about -0.09
E_TOTAL = [3.1, 1.7, 4.4, 2.3, 5.9]
E25 = {"useful_kept": [1.02, 0.61, 1.33, 0.81, 2.0], "harmful_kept": [0.93, 0.52, 1.31, 0.64, 1.91]}
E50 = {"useful_kept": [1.4, 0.5, 2.1, 0.9, 2.6], "harmful_kept": [1.8, 0.71, 2.4, 1.22, 3.0]}  # gap about -0.09


def _per_rho():
    return {0.5: {"useful": 0.5, "harmful": 0.58, "useful_total": E_TOTAL, "harmful_total": E_TOTAL, **E50},
            0.25: {"useful": 0.3, "harmful": 0.27, "useful_total": E_TOTAL, "harmful_total": E_TOTAL, **E25}}


def test_exp1_energy_parity_pooled_gaps_bootstrap_and_worst_rho():
    stat = lambda a, b, c, d: float(a.sum() / b.sum() - c.sum() / d.sum())  # noqa: E731
    g25 = _gap(E25["useful_kept"], E_TOTAL, E25["harmful_kept"], E_TOTAL)
    g50 = _gap(E50["useful_kept"], E_TOTAL, E50["harmful_kept"], E_TOTAL)
    assert 0.02 < g25 < 0.04 and -0.12 < g50 < -0.07
    r = V.exp1_energy_parity(_per_rho(), seed=4, n_boot=300)
    rows = r["per_rho"]
    assert [x["rho"] for x in rows] == [0.25, 0.5]  # sorted; the bootstrap seed is seed + the rho's index
    ci25 = _percentile_bootstrap(stat, E25["useful_kept"], E_TOTAL, E25["harmful_kept"], E_TOTAL, paired=True,
                                 n_boot=300, seed=4)
    ci50 = _percentile_bootstrap(stat, E50["useful_kept"], E_TOTAL, E50["harmful_kept"], E_TOTAL, paired=True,
                                 n_boot=300, seed=5)
    assert rows[0]["gap"] == pytest.approx(g25, rel=1e-12) and rows[1]["gap"] == pytest.approx(g50, rel=1e-12)
    _close(rows[0]["ci"], ci25)
    _close(rows[1]["ci"], ci50)
    assert (rows[0]["ek_useful"], rows[0]["ek_harmful"], rows[1]["ek_useful"], rows[1]["ek_harmful"]) == \
        (0.3, 0.27, 0.5, 0.58)
    # the reported value is the largest |gap| (rho 0.5's, negative), with its interval
    assert r["value"] == pytest.approx(g50, rel=1e-12)
    _close(r["ci"], ci50)
    # each rho's verdict by its interval against [-0.05, 0.05]; overall: one rho outside -> does not hold
    for row, ci in ((rows[0], ci25), (rows[1], ci50)):
        want = HOLDS if (ci[0] >= -0.05 and ci[1] <= 0.05) else FAILS if (ci[0] > 0.05 or ci[1] < -0.05) \
            else INCONCLUSIVE
        assert row["verdict"] == want
    assert rows[1]["verdict"] == FAILS and r["verdict"] == FAILS
    assert r["threshold"] == 0.05 and set(r) >= {"claim", "statistic", "value", "ci", "rule", "verdict"}


def test_exp1_energy_parity_default_bootstrap():
    stat = lambda a, b, c, d: float(a.sum() / b.sum() - c.sum() / d.sum())  # noqa: E731
    r = V.exp1_energy_parity(_per_rho())
    _close(r["per_rho"][0]["ci"], _percentile_bootstrap(stat, E25["useful_kept"], E_TOTAL, E25["harmful_kept"],
                                                        E_TOTAL, paired=True, n_boot=2000, seed=0))
    _close(r["per_rho"][1]["ci"], _percentile_bootstrap(stat, E50["useful_kept"], E_TOTAL, E50["harmful_kept"],
                                                        E_TOTAL, paired=True, n_boot=2000, seed=1))


def test_exp1_energy_parity_sums_float32_energies_in_float64():
    # 2**24 + 1 is not a float32: summed in float32, the three unit energies next to 2**24 would vanish
    kept = np.array([2.0**24, 1.0, 1.0, 1.0], dtype=np.float32)
    total = np.array([2.0**25, 1.0, 1.0, 1.0], dtype=np.float32)
    hk = np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    ht = np.array([4.0, 4.0, 4.0, 4.0], dtype=np.float32)
    want = (2**24 + 3) / (2**25 + 3) - 4 / 16  # 0.25000004..., not the 0.25 of float32 sums
    r = V.exp1_energy_parity({0.5: {"useful_kept": kept, "useful_total": total, "harmful_kept": hk,
                                    "harmful_total": ht}}, n_boot=20)
    assert r["per_rho"][0]["gap"] == pytest.approx(want, rel=1e-13, abs=0)


# -- Exp 1b: rise together --------------------------------------------------------------------------

U_LOW = [0.2, 0.5, 0.1, 0.7, 0.3, 0.4, 0.6]
U_HIGH = [0.9, 0.4, 0.8, 0.75, 0.95, 0.3, 0.85]
H_LOW = [0.1, 0.3, 0.2, 0.6, 0.05]
H_HIGH = [0.5, 0.2, 0.9, 0.7, 0.65]


def test_exp1_rise_together_statistic_and_intervals():
    du = [h - lo for h, lo in zip(U_HIGH, U_LOW)]
    dh = [h - lo for h, lo in zip(H_HIGH, H_LOW)]
    min_of_means = lambda a, b: float(min(a.mean(), b.mean()))  # noqa: E731
    mean = lambda a: float(a.mean())  # noqa: E731
    r = V.exp1_rise_together(U_LOW, U_HIGH, H_LOW, H_HIGH, seed=2, n_boot=300, scores="continuous")
    assert r["value"] == pytest.approx(min(_mean(du), _mean(dh)), rel=1e-12)
    assert r["utility_rise"] == pytest.approx(_mean(du), rel=1e-12)
    assert r["harm_rise"] == pytest.approx(_mean(dh), rel=1e-12)
    ci = _percentile_bootstrap(min_of_means, du, dh, paired=False, n_boot=300, seed=2)  # 7 and 5 prompts
    _close(r["ci"], ci)
    _close(r["utility_rise_ci"], _percentile_bootstrap(mean, du, paired=True, n_boot=300, seed=2))
    _close(r["harm_rise_ci"], _percentile_bootstrap(mean, dh, paired=True, n_boot=300, seed=2))
    assert r["scores"] == "continuous"
    assert r["verdict"] == (HOLDS if ci[0] > 0 else FAILS if ci[1] <= 0 else INCONCLUSIVE)
    # the defaults: seed 0, 2000 resamples, rates
    r = V.exp1_rise_together(U_LOW, U_HIGH, H_LOW, H_HIGH)
    assert r["scores"] == "rates"
    _close(r["ci"], _percentile_bootstrap(min_of_means, du, dh, paired=False, n_boot=2000, seed=0))
    _close(r["utility_rise_ci"], _percentile_bootstrap(mean, du, paired=True, n_boot=2000, seed=0))
    _close(r["harm_rise_ci"], _percentile_bootstrap(mean, dh, paired=True, n_boot=2000, seed=0))


def test_exp1_rise_together_threshold_is_zero():
    r = V.exp1_rise_together([0.0] * 3, [0.5] * 3, [0.25] * 4, [1.0] * 4)  # rises 0.5 and 0.75 everywhere
    assert r["value"] == 0.5 and r["ci"] == [0.5, 0.5] and r["verdict"] == HOLDS
    r = V.exp1_rise_together([0.0] * 3, [0.5] * 3, [0.25] * 4, [0.25] * 4)  # harm does not move: 0 is not above 0
    assert r["value"] == 0.0 and r["verdict"] == FAILS


def test_exp1_rise_together_one_prompt_and_no_prompts():
    r = V.exp1_rise_together([0.0], [1.0], [0.25], [0.75])  # one prompt each: no interval, the value decides
    assert r["value"] == 0.5 and r["ci"] is None and r["verdict"] == HOLDS
    assert r["utility_rise_ci"] is None and r["harm_rise_ci"] is None
    for args in (([], [], [0.0, 0.0], [1.0, 1.0]), ([0.0, 0.0], [1.0, 1.0], [], []), ([], [], [], [])):
        r = V.exp1_rise_together(*args)
        assert r["verdict"] == INCONCLUSIVE and r["value"] is None and r["ci"] is None
        assert r["rule"] == "no per-prompt data"


# -- Exp 2: no selective removal --------------------------------------------------------------------

# two rhos x eight utility prompts, two rhos x five harmful prompts
UT = [[0.1, 0.4, 0.2, 0.3, 0.15, 0.05, 0.33, 0.12], [0.0, 0.35, 0.1, 0.2, 0.11, 0.02, 0.3, 0.1]]
UR = [[0.6, 0.5, 0.45, 0.9, 0.37, 0.81, 0.52, 0.29], [0.7, 0.4, 0.5, 0.85, 0.41, 0.77, 0.46, 0.33]]
HT = [[0.3, 0.5, 0.2, 0.6, 0.4], [0.25, 0.45, 0.1, 0.55, 0.3]]
HR = [[0.35, 0.48, 0.27, 0.62, 0.38], [0.3, 0.5, 0.12, 0.6, 0.37]]


def _extras(topk, random, scale=1.0):
    n = len(topk[0])
    return [sum(random[r][j] / scale - topk[r][j] / scale for r in range(len(topk))) / len(topk) for j in range(n)]


def test_exp2_statistic_parts_and_intervals():
    ue, he = _extras(UT, UR), _extras(HT, HR)  # per prompt, averaged over the rhos
    assert all(x > 0.05 for x in ue) and all(abs(x) < 0.06 for x in he)
    adv = lambda h, u: float(h.mean() - u.mean())  # noqa: E731
    mean = lambda a: float(a.mean())  # noqa: E731
    r = V.exp2_no_selective_removal(UT, UR, HT, HR, seed=3, n_boot=300)
    assert r["value"] == pytest.approx(_mean(he) - _mean(ue), rel=1e-12)
    ci = _percentile_bootstrap(adv, he, ue, paired=False, n_boot=300, seed=3)
    _close(r["ci"], ci)
    u_ci = _percentile_bootstrap(mean, ue, paired=True, n_boot=300, seed=3)
    h_ci = _percentile_bootstrap(mean, he, paired=True, n_boot=300, seed=3)
    assert r["utility_lost_beyond_random"] == pytest.approx(_mean(ue), rel=1e-12)
    assert r["harm_removed_beyond_random"] == pytest.approx(_mean(he), rel=1e-12)
    _close(r["utility_lost_beyond_random_ci"], u_ci)
    _close(r["harm_removed_beyond_random_ci"], h_ci)
    parts = r["parts"]
    assert set(parts) == {"utility_cost_faster", "harm_at_random_rate"}
    assert parts["utility_cost_faster"]["value"] == pytest.approx(_mean(ue), rel=1e-12)
    _close(parts["utility_cost_faster"]["ci"], u_ci)
    assert parts["harm_at_random_rate"]["value"] == pytest.approx(_mean(he), rel=1e-12)
    _close(parts["harm_at_random_rate"]["ci"], h_ci)
    # every prompt loses utility beyond Random, harm moves by under 0.06 everywhere: both parts hold
    assert parts["utility_cost_faster"]["verdict"] == HOLDS and parts["harm_at_random_rate"]["verdict"] == HOLDS
    assert r["verdict"] == HOLDS and ci[1] <= 0.1
    assert (r["threshold"], r["scores"], r["utility_scale"], r["harm_scale"]) == (0.1, "rates", 1.0, 1.0)
    assert "averaged over the rho grid (rates)" in r["statistic"]
    # the defaults: seed 0, 2000 resamples
    r = V.exp2_no_selective_removal(UT, UR, HT, HR)
    _close(r["ci"], _percentile_bootstrap(adv, he, ue, paired=False, n_boot=2000, seed=0))
    _close(r["utility_lost_beyond_random_ci"], _percentile_bootstrap(mean, ue, paired=True, n_boot=2000, seed=0))
    _close(r["harm_removed_beyond_random_ci"], _percentile_bootstrap(mean, he, paired=True, n_boot=2000, seed=0))


def test_exp2_scales_divide_the_scores():
    ue, he = _extras(UT, UR, 0.5), _extras(HT, HR, 4.0)
    r = V.exp2_no_selective_removal(UT, UR, HT, HR, utility_scale=0.5, harm_scale=4.0, scores="continuous",
                                    seed=1, n_boot=200)
    assert r["utility_lost_beyond_random"] == pytest.approx(_mean(ue), rel=1e-12)
    assert r["harm_removed_beyond_random"] == pytest.approx(_mean(he), rel=1e-12)
    assert r["value"] == pytest.approx(_mean(he) - _mean(ue), rel=1e-12)
    assert (r["utility_scale"], r["harm_scale"], r["scores"]) == (0.5, 4.0, "continuous")
    assert "(continuous, in shares of the contaminated fine-tune's effect)" in r["statistic"]
    _close(r["ci"], _percentile_bootstrap(lambda h, u: float(h.mean() - u.mean()), he, ue, paired=False,
                                          n_boot=200, seed=1))


def test_exp2_computes_in_float64_on_float32_scores():
    f32 = lambda x: np.array(x, dtype=np.float32)  # noqa: E731
    ut, ur, ht, hr = f32(UT), f32(UR), f32(HT), f32(HR)
    as64 = lambda a: [[float(v) for v in row] for row in a]  # noqa: E731 (the exact float32 values)
    ue, he = _extras(as64(ut), as64(ur), 3.0), _extras(as64(ht), as64(hr), 7.0)
    r = V.exp2_no_selective_removal(ut, ur, ht, hr, utility_scale=3.0, harm_scale=7.0, n_boot=20)
    assert r["utility_lost_beyond_random"] == pytest.approx(_mean(ue), rel=1e-13, abs=0)
    assert r["harm_removed_beyond_random"] == pytest.approx(_mean(he), rel=1e-13, abs=0)


def test_exp2_threshold_is_selectivity_0_1():
    u = [[0.5, 0.5]]  # one rho, two utility prompts, TopK = Random
    # TopK removes 0.15 more harm than Random at every prompt: selective beyond 0.1 -> does not hold
    r = V.exp2_no_selective_removal(u, u, [[0.0, 0.0, 0.0]], [[0.15, 0.15, 0.15]])
    assert r["value"] == pytest.approx(0.15) and r["verdict"] == FAILS
    assert r["parts"]["harm_at_random_rate"]["verdict"] == FAILS  # 0.15 lies outside [-0.1, 0.1]
    assert r["parts"]["utility_cost_faster"]["verdict"] == FAILS  # no utility lost beyond Random: 0 is not > 0
    r = V.exp2_no_selective_removal(u, u, [[0.0, 0.0, 0.0]], [[0.15, 0.15, 0.15]], threshold=0.2)
    assert r["verdict"] == HOLDS and r["threshold"] == 0.2
    assert r["parts"]["harm_at_random_rate"]["verdict"] == HOLDS
    # exactly at the threshold: 0.1 (an exact mean of [0.1, 0.1]) is not more selective than 0.1
    r = V.exp2_no_selective_removal(u, u, [[0.0, 0.0]], [[0.1, 0.1]])
    assert r["value"] == 0.1 and r["ci"] == [0.1, 0.1] and r["verdict"] == HOLDS
    assert V.exp2_no_selective_removal(u, u, [[0.0, 0.0]], [[0.05, 0.05]])["verdict"] == HOLDS
    # utility lost beyond Random 0.5 at every prompt: the cost part holds (its threshold is 0)
    r = V.exp2_no_selective_removal([[0.0, 0.0]], [[0.5, 0.5]], [[0.0, 0.0]], [[0.0, 0.0]])
    assert r["parts"]["utility_cost_faster"]["verdict"] == HOLDS and r["value"] == -0.5 and r["verdict"] == HOLDS


def test_exp2_invalid_scales_and_missing_data_are_inconclusive():
    for us, hs in ((0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (1.0, -2.0)):
        r = V.exp2_no_selective_removal(UT, UR, HT, HR, utility_scale=us, harm_scale=hs, scores="continuous")
        assert r["verdict"] == INCONCLUSIVE and r["value"] is None and r["ci"] is None
        assert r["scores"] == "continuous"
    for args in (([], [], HT, HR), (UT, UR, [], []), (UT, UR[:1], HT, HR), (UT, UR, HT, HR[:1]), ([], [], [], [])):
        r = V.exp2_no_selective_removal(*args)
        assert r["verdict"] == INCONCLUSIVE and r["value"] is None and r["rule"] == "no comparable data"
    # scales below 1 are valid scales
    assert V.exp2_no_selective_removal(UT, UR, HT, HR, utility_scale=0.5, n_boot=10)["value"] is not None
    assert V.exp2_no_selective_removal(UT, UR, HT, HR, harm_scale=0.5, n_boot=10)["value"] is not None


def test_exp2_one_rho_one_prompt():
    r = V.exp2_no_selective_removal([[0.25]], [[0.5]], [[0.0]], [[0.5]])  # no interval: the value decides
    assert r["value"] == 0.25 and r["ci"] is None and r["verdict"] == FAILS
    assert r["utility_lost_beyond_random"] == 0.25 and r["utility_lost_beyond_random_ci"] is None


# -- separability and Exp 3 -------------------------------------------------------------------------

MSO = [0.31, 0.52, 0.18, 0.44, 0.27, 0.6]
BASE = [0.06, 0.11, 0.05, 0.09, 0.12, 0.07]


def _ratio(m, b):
    return float(m.mean() / b.mean())


def test_separability_threshold_is_well_above_2():
    r = V.separability([0.3] * 4, [0.1] * 4)  # three times the baseline
    assert r["value"] == pytest.approx(3.0) and r["verdict"] == "entangled"
    assert V.separability([0.15] * 4, [0.1] * 4)["verdict"] == "distinct"  # 1.5 times
    assert V.separability([0.2, 0.2], [0.1, 0.1])["verdict"] == "distinct"  # exactly 2: not above it
    assert V.separability([0.3] * 4, [0.1] * 4, threshold=4.0)["verdict"] == "distinct"


def test_separability_interval_and_details():
    r = V.separability(MSO, BASE, seed=5, n_boot=300)
    assert r["value"] == pytest.approx(_mean(MSO) / _mean(BASE), rel=1e-12)
    ci = _percentile_bootstrap(_ratio, MSO, BASE, paired=True, n_boot=300, seed=5)
    _close(r["ci"], ci)
    assert r["verdict"] == ("entangled" if ci[0] > 2.0 else "distinct" if ci[1] <= 2.0 else INCONCLUSIVE)
    assert r["mso_mean"] == pytest.approx(_mean(MSO), rel=1e-12)
    assert r["baseline_mean"] == pytest.approx(_mean(BASE), rel=1e-12)
    assert r["n_tensors"] == 6
    _close(V.separability(MSO, BASE)["ci"], _percentile_bootstrap(_ratio, MSO, BASE, paired=True, n_boot=2000,
                                                                  seed=0))


def test_separability_edge_cases():
    r = V.separability([0.5], [0.1])  # one tensor: no interval, the ratio decides
    assert r["value"] == pytest.approx(5.0) and r["ci"] is None and r["verdict"] == "entangled"
    assert V.separability([0.1], [0.1])["verdict"] == "distinct"
    r = V.separability([], [])
    assert r["verdict"] == INCONCLUSIVE and r["value"] is None and r["ci"] is None
    r = V.separability([0.5, 0.4], [0.0, 0.0])  # no baseline to compare with
    assert math.isnan(r["value"]) and r["ci"] is None and r["verdict"] == INCONCLUSIVE


def test_separability_means_float32_in_float64():
    m = np.array([0.1, 0.7, 0.3, 0.9, 0.55, 0.21, 0.13], dtype=np.float32)
    b = np.array([0.03, 0.07, 0.05, 0.11, 0.02, 0.09, 0.04], dtype=np.float32)
    r = V.separability(m, b, n_boot=20)
    assert r["mso_mean"] == pytest.approx(_mean(m), rel=1e-14, abs=0)
    assert r["value"] == pytest.approx(_mean(m) / _mean(b), rel=1e-14, abs=0)


UH = {"mso": [0.61, 0.48, 0.72, 0.55, 0.66], "baseline": [0.06, 0.05, 0.07, 0.06, 0.05]}
SH = {"mso": [0.58, 0.5, 0.64, 0.57, 0.6], "baseline": [0.06, 0.05, 0.07, 0.06, 0.05]}
SU = {"mso": [0.2, 0.35, 0.28, 0.3, 0.22], "baseline": [0.06, 0.05, 0.07, 0.06, 0.05]}


def test_exp3_statistic_intervals_and_pairs():
    diff = [a - b for a, b in zip(UH["mso"], SH["mso"])]
    mean_diff = lambda a, b: float((a - b).mean())  # noqa: E731
    r = V.exp3_overlap(UH, SH, {"safety~useful": SU}, seed=6, n_boot=300, threshold=2.5, margin=0.05)
    assert r["value"] == pytest.approx(_mean(diff), rel=1e-12)
    ci = _percentile_bootstrap(mean_diff, UH["mso"], SH["mso"], paired=True, n_boot=300, seed=6)
    _close(r["ci"], ci)
    assert r["noninferiority"] == (HOLDS if ci[0] > -0.05 else FAILS if ci[1] <= -0.05 else INCONCLUSIVE)
    assert set(r["pairs"]) == {"useful~harmful", "safety~harmful", "safety~useful"}
    for name, pair in (("useful~harmful", UH), ("safety~harmful", SH), ("safety~useful", SU)):
        got = r["pairs"][name]
        assert got["value"] == pytest.approx(_mean(pair["mso"]) / _mean(pair["baseline"]), rel=1e-12)
        _close(got["ci"], _percentile_bootstrap(_ratio, pair["mso"], pair["baseline"], paired=True, n_boot=300,
                                                seed=6))
    assert (r["margin"], r["threshold"], r["n_tensors"]) == (0.05, 2.5, 5)
    # the defaults: seed 0, 2000 resamples, margin 0.02, threshold 2
    r = V.exp3_overlap(UH, SH)
    _close(r["ci"], _percentile_bootstrap(mean_diff, UH["mso"], SH["mso"], paired=True, n_boot=2000, seed=0))
    _close(r["pairs"]["safety~harmful"]["ci"], _percentile_bootstrap(_ratio, SH["mso"], SH["baseline"], paired=True,
                                                                     n_boot=2000, seed=0))
    assert (r["margin"], r["threshold"]) == (0.02, 2.0) and set(r["pairs"]) == {"useful~harmful", "safety~harmful"}


def test_exp3_margin_is_0_02_and_equal_overlaps_are_not_inferior():
    base = [0.05] * 4
    ms = [0.53, 0.63, 0.73, 0.58]
    below = {"mso": [m - 0.03 for m in ms], "baseline": base}  # 0.03 below safety~harmful at every tensor
    r = V.exp3_overlap(below, {"mso": ms, "baseline": base})
    assert r["value"] == pytest.approx(-0.03) and r["noninferiority"] == FAILS and r["verdict"] == FAILS
    r = V.exp3_overlap(below, {"mso": ms, "baseline": base}, margin=0.05)
    assert r["noninferiority"] == HOLDS and r["verdict"] == HOLDS
    slightly = {"mso": [m - 0.01 for m in ms], "baseline": base}  # 0.01 below: within the margin
    assert V.exp3_overlap(slightly, {"mso": ms, "baseline": base})["noninferiority"] == HOLDS
    r = V.exp3_overlap({"mso": ms, "baseline": base}, {"mso": ms, "baseline": base})  # equal overlaps
    assert r["value"] == 0.0 and r["ci"] == [0.0, 0.0] and r["noninferiority"] == HOLDS and r["verdict"] == HOLDS


def test_exp3_every_pair_must_be_well_above_the_baseline():
    distinct = {"mso": [0.07, 0.06, 0.08, 0.07, 0.06], "baseline": UH["baseline"]}  # about 1.2x the baseline
    r = V.exp3_overlap(UH, SH, {"safety~useful": distinct})
    assert r["pairs"]["safety~useful"]["verdict"] == "distinct" and r["verdict"] == FAILS
    assert r["pairs"]["useful~harmful"]["verdict"] == "entangled"
    # a threshold of 20x the baseline: every pair here (about 10x) is distinct
    r = V.exp3_overlap(UH, SH, threshold=20.0)
    assert r["pairs"]["useful~harmful"]["verdict"] == "distinct" and r["verdict"] == FAILS
    # a ratio of 3 is above 2 (WELL_ABOVE) but not above 4
    three = {"mso": [0.3] * 3, "baseline": [0.1] * 3}
    r = V.exp3_overlap(three, three)
    assert r["pairs"]["useful~harmful"]["verdict"] == "entangled" and r["verdict"] == HOLDS


def test_exp3_one_tensor_and_no_tensors():
    r = V.exp3_overlap({"mso": [0.6], "baseline": [0.1]}, {"mso": [0.5], "baseline": [0.1]})
    assert r["value"] == pytest.approx(0.1) and r["ci"] is None and r["noninferiority"] == HOLDS
    assert r["verdict"] == HOLDS and r["n_tensors"] == 1
    for uh, sh in (({"mso": [], "baseline": []}, {"mso": [], "baseline": []}),
                   (UH, {"mso": SH["mso"][:3], "baseline": SH["baseline"][:3]})):
        r = V.exp3_overlap(uh, sh)
        assert r["verdict"] == INCONCLUSIVE and r["value"] is None and r["ci"] is None and r["pairs"] == {}


# -- Exp 4 (workbench.verdict_rules, re-exported by weightspace.verdicts): the subsampling interval by hand ----
# CI = [D - c (q_hi - D), D - c (q_lo - D)], q = the alpha/2 and 1 - alpha/2 quantiles of the draws (linear
# interpolation: with five sorted draws and alpha = 0.5 they are the 2nd and the 4th), clipped to [-1, 1] for D
# and to [0, 1] for each MSO.

U5 = [0.60, 0.65, 0.70, 0.75, 0.80]  # MSO(U~H) on five subsample draws
H5 = [0.70, 0.71, 0.72, 0.73, 0.74]  # MSO(H1~H2) on the same draws: D per draw -0.10, -0.06, -0.02, 0.02, 0.06


def _exp4(u, h, du=None, dh=None, base=0.05, **kw):
    return V.exp4_activation_overlap(u, h, u_h_baseline=base, h1_h2_baseline=base, u_h_draws=du, h1_h2_draws=dh,
                                     **kw)


def test_exp4_interval_alpha_and_default_scale_by_hand():
    r = _exp4(0.70, 0.72, U5, H5, alpha=0.5)  # quantiles: D -0.06 / 0.02, U 0.65 / 0.75, H 0.71 / 0.73
    assert r["value"] == pytest.approx(-0.02, abs=1e-12) and r["scale"] == 1.0 and r["n_draws"] == 5
    assert r["ci"] == pytest.approx([-0.06, 0.02], abs=1e-12)
    assert r["well_above_baseline"]["u_h"]["ci"] == pytest.approx([0.65, 0.75], abs=1e-12)
    assert r["well_above_baseline"]["h1_h2"]["ci"] == pytest.approx([0.71, 0.73], abs=1e-12)
    assert r["verdict"] == HOLDS and r["direction"] == "within"
    # the default alpha 0.05: quantiles at positions 0.1 and 3.9 of the five sorted draws
    r = _exp4(0.70, 0.72, U5, H5)
    assert r["ci"] == pytest.approx([-0.02 - (0.056 + 0.02), -0.02 - (-0.096 + 0.02)], abs=1e-12)
    assert r["well_above_baseline"]["u_h"]["ci"] == pytest.approx([0.70 - (0.795 - 0.70), 0.70 - (0.605 - 0.70)],
                                                                  abs=1e-12)


def test_exp4_intervals_are_clipped_to_the_range_of_an_mso():
    # U~H far above H1~H2: D's interval [0.90, 1.10] is cut at 1, U's [0.95, 1.05] at 1, H's [-0.05, 0.05] at 0
    r = _exp4(0.95, 0.10, [0.80, 0.85, 0.90, 0.95, 1.00], [0.30, 0.25, 0.20, 0.15, 0.10], alpha=0.5)
    assert r["ci"] == pytest.approx([0.90, 1.0], abs=1e-12)
    assert r["well_above_baseline"]["u_h"]["ci"] == pytest.approx([0.95, 1.0], abs=1e-12)
    assert r["well_above_baseline"]["h1_h2"]["ci"] == pytest.approx([0.0, 0.05], abs=1e-12)
    assert r["verdict"] == FAILS and r["direction"] == "above"
    # the mirror image: D's [-1.10, -0.90] cut at -1, U's at 0, H's at 1
    r = _exp4(0.10, 0.95, [0.30, 0.25, 0.20, 0.15, 0.10], [0.80, 0.85, 0.90, 0.95, 1.00], alpha=0.5)
    assert r["ci"] == pytest.approx([-1.0, -0.90], abs=1e-12)
    assert r["well_above_baseline"]["u_h"]["ci"] == pytest.approx([0.0, 0.05], abs=1e-12)
    assert r["well_above_baseline"]["h1_h2"]["ci"] == pytest.approx([0.95, 1.0], abs=1e-12)
    assert r["verdict"] == FAILS and r["direction"] == "below"


def test_exp4_missing_values_are_inconclusive():
    for u, h in ((None, 0.72), (0.70, None), (float("inf"), 0.72)):
        r = _exp4(u, h, U5, H5)
        assert r["value"] is None and r["ci"] is None and r["direction"] is None and r["n_draws"] == 0
        assert r["verdict"] == INCONCLUSIVE
    r = V.exp4_activation_overlap(0.70, 0.72, u_h_baseline=None, h1_h2_baseline=0.05)  # no baseline for U~H
    assert r["equivalence"] == HOLDS and r["verdict"] == INCONCLUSIVE
    assert r["well_above_baseline"]["u_h"]["threshold"] is None
    assert r["well_above_baseline"]["u_h"]["verdict"] == INCONCLUSIVE
    assert r["well_above_baseline"]["h1_h2"]["threshold"] == pytest.approx(0.10)


def test_exp4_layers_and_the_summary_block():
    r = _exp4(0.70, 0.72, U5, H5)
    assert r["layers"] == "slice" and "averaged over the 65-90 % depth slice" in r["statistic"]
    r = _exp4(0.70, 0.72, U5, H5, layers="all")
    assert r["layers"] == "all" and "averaged over all layers" in r["statistic"]
    block = {"u_h": 0.70, "h1_h2": 0.72, "u_h_baseline": 0.05, "h1_h2_baseline": 0.05, "ci_scale": 2.0,
             "layers": "all", "boot": {"u_h": U5, "h1_h2": H5}}
    r = V.exp4_from_block(block, alpha=0.5)  # c = 2 doubles the deviations: [-0.02 - 0.08, -0.02 + 0.08]
    assert r["ci"] == pytest.approx([-0.10, 0.06], abs=1e-12) and r["scale"] == 2.0
    assert r["layers"] == "all" and "all layers" in r["statistic"] and r["n_draws"] == 5
    plain = {k: v for k, v in block.items() if k not in ("ci_scale", "layers")}
    r = V.exp4_from_block(plain, alpha=0.5)  # the block's defaults: c = 1, the slice
    assert r["ci"] == pytest.approx([-0.06, 0.02], abs=1e-12) and r["scale"] == 1.0 and r["layers"] == "slice"
    r = V.exp4_from_block(dict(plain, boot=None))  # no draws: the point values decide
    assert r["ci"] is None and r["n_draws"] == 0 and r["verdict"] == HOLDS and r["value"] == pytest.approx(-0.02)
