"""Experiment 4's verdict rule (workbench.verdict_rules, re-exported by weightspace.verdicts) and the subsampling
interval it and probes/overlap.py use (workbench.subsampling). Planted numbers only: no models, fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probes.overlap import protocol_overlap
from workbench import subsampling as S
from workbench import verdict_rules as R
from workbench.errors import WorkbenchError

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


# -- the subsampling interval ---------------------------------------------------------------------------------

def test_subsample_size_scale_and_indices():
    assert [S.subsample_size(n) for n in (3, 4, 5, 6, 30, 31, 150)] == [2, 2, 2, 3, 15, 15, 75]
    for n in (0, 1, 2):
        with pytest.raises(ValueError, match="at least 3"):
            S.subsample_size(n)
    with pytest.raises(ValueError, match="fraction"):
        S.subsample_size(10, 1.0)
    assert S.subsample_scale([30, 30, 150]) == 1.0  # even sizes at one half: m / (n - m) = 1
    assert S.subsample_scale([31]) == pytest.approx(math.sqrt(15 / 16))
    assert S.subsample_scale([3]) == pytest.approx(math.sqrt(2 / 1))  # m = 2 of 3
    assert S.subsample_scale([30, 31]) == pytest.approx(math.sqrt((1 + 15 / 16) / 2))
    assert S.subsample_scale([100], 0.1) == pytest.approx(math.sqrt(10 / 90))  # -> sqrt(m / n) as m / n -> 0
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = S.subsample_indices(rng, 9)
        assert len(idx) == 4 == len(set(idx.tolist())) and idx.min() >= 0 and idx.max() < 9  # without replacement
        assert list(idx) == sorted(idx)


def test_subsample_ci_formula_by_hand():
    draws = np.linspace(0.30, 0.70, 401)  # quantiles 2.5 % / 97.5 %: 0.31 and 0.69
    # T = 0.5, c = 1: [0.5 - (0.69 - 0.5), 0.5 - (0.31 - 0.5)]
    assert S.subsample_ci(draws, 0.5, 1.0) == pytest.approx([0.31, 0.69])
    # subsets lower than the estimate (a statistic biased at small n): the interval is reflected above it
    assert S.subsample_ci(draws - 0.2, 0.5, 1.0) == pytest.approx([0.51, 0.89])
    # c scales the deviations
    assert S.subsample_ci(draws, 0.5, 0.5) == pytest.approx([0.405, 0.595])
    assert S.subsample_ci(draws, 0.5, 1.0, alpha=0.0) == pytest.approx([0.30, 0.70])
    assert S.subsample_ci(draws + 0.4, 0.5, 1.0, bounds=(0.0, 1.0)) == pytest.approx([0.0, 0.29])
    assert S.subsample_ci([np.nan, 0.4, 0.6], 0.5, 1.0, alpha=0.0) == pytest.approx([0.4, 0.6])  # nan dropped
    assert S.subsample_ci([np.nan], 0.5, 1.0) is None and S.subsample_ci([], 0.5, 1.0) is None
    assert S.subsample_ci([0.4], float("nan"), 1.0) is None


def test_subsampling_interval_of_a_mean_has_the_right_width():
    """For a mean the factor sqrt(m / (n - m)) makes the subsampling spread match the sampling spread."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(200)
    draws = [x[S.subsample_indices(rng, 200)].mean() for _ in range(4000)]
    lo, hi = S.subsample_ci(draws, float(x.mean()), S.subsample_scale([200]))
    assert (hi - lo) / 2 == pytest.approx(1.96 * x.std(ddof=1) / math.sqrt(200), rel=0.08)


# -- the rule on planted draws --------------------------------------------------------------------------------

def _draws(center: float, half: float, n: int = 201) -> list[float]:
    """Draws spread symmetrically around ``center`` so that the interval (c = 1) is about center +- half."""
    return list(np.linspace(center - half * 1.026, center + half * 1.026, n))


def _rule(u, h, du, dh, base=0.05, **kw):
    return R.exp4_activation_overlap(u, h, u_h_baseline=base, h1_h2_baseline=base, u_h_draws=du,
                                     h1_h2_draws=dh, **kw)


def test_exp4_holds_when_the_difference_is_inside_the_margin_and_both_overlaps_beat_chance():
    r = _rule(0.68, 0.72, _draws(0.68, 0.05), _draws(0.72, 0.02))
    assert r["verdict"] == HOLDS and r["equivalence"] == HOLDS and r["direction"] == "within"
    assert r["value"] == pytest.approx(-0.04)
    lo, hi = r["ci"]
    assert -0.10 <= lo < -0.04 < hi <= 0.10
    assert {k: v["verdict"] for k, v in r["well_above_baseline"].items()} == {"u_h": HOLDS, "h1_h2": HOLDS}
    assert r["well_above_baseline"]["u_h"]["threshold"] == pytest.approx(0.10)  # 2 x the baseline 0.05
    assert r["n_draws"] == 201 and r["margin"] == R.EXP4_MARGIN == 0.10 and r["threshold"] == R.WELL_ABOVE == 2.0
    assert set(r) >= {"claim", "statistic", "value", "ci", "rule", "verdict"}
    assert r["claim"] == R.EXP4_CLAIM and "subsampling" in r["ci_method"]


def test_exp4_does_not_hold_when_useful_overlaps_clearly_less():
    # U~H 0.35 vs ceiling 0.72: D = -0.37, its CI entirely below -0.10
    r = _rule(0.35, 0.72, _draws(0.35, 0.05), _draws(0.72, 0.02))
    assert r["verdict"] == FAILS and r["direction"] == "below" and r["ci"][1] < -0.10


def test_exp4_does_not_hold_when_useful_overlaps_clearly_more_and_says_so():
    r = _rule(0.90, 0.60, _draws(0.90, 0.03), _draws(0.60, 0.03))
    assert r["verdict"] == FAILS and r["direction"] == "above" and r["ci"][0] > 0.10


def test_exp4_inconclusive_when_the_interval_straddles_the_margin():
    # D = -0.08 with a wide interval: inside at its high end, beyond -0.10 at its low end
    u_draws, h_draws = _draws(0.64, 0.0), _draws(0.72, 0.0)
    u_draws = list(np.array(u_draws) + np.linspace(-0.06, 0.06, 201))  # the spread lives in the difference
    r = _rule(0.64, 0.72, u_draws, h_draws)
    assert r["verdict"] == INCONCLUSIVE and r["equivalence"] == INCONCLUSIVE
    assert r["ci"][0] < -0.10 < r["ci"][1]


def test_exp4_inconclusive_when_the_overlaps_are_not_clearly_above_chance():
    # equal overlaps, but both at the random baseline: "about as much" confirms nothing
    r = _rule(0.06, 0.06, _draws(0.06, 0.02), _draws(0.06, 0.02), base=0.05)
    assert r["equivalence"] == HOLDS and r["verdict"] == INCONCLUSIVE
    assert r["well_above_baseline"]["u_h"]["verdict"] == FAILS
    # one above chance, the other straddling 2x: still inconclusive
    r = _rule(0.30, 0.30, _draws(0.30, 0.02), _draws(0.30, 0.25), base=0.05)
    assert r["equivalence"] == INCONCLUSIVE or r["well_above_baseline"]["h1_h2"]["verdict"] == INCONCLUSIVE
    assert r["verdict"] == INCONCLUSIVE


def test_exp4_without_draws_the_point_values_decide_and_bad_input():
    r = R.exp4_activation_overlap(0.70, 0.75, u_h_baseline=0.05, h1_h2_baseline=0.05)
    assert r["ci"] is None and r["verdict"] == HOLDS and r["n_draws"] == 0 and "point" in r["ci_method"]
    assert R.exp4_activation_overlap(0.30, 0.75, u_h_baseline=0.05, h1_h2_baseline=0.05)["verdict"] == FAILS
    assert R.exp4_activation_overlap(float("nan"), 0.75, u_h_baseline=0.05, h1_h2_baseline=0.05)["verdict"] \
        == INCONCLUSIVE
    with pytest.raises(ValueError, match="same length"):
        _rule(0.7, 0.7, [0.7, 0.7], [0.7])
    assert R.exp4_from_block(None) is None and R.exp4_from_block({}) is None


def test_exp4_rule_uses_the_subsampling_scale():
    du, dh = _draws(0.70, 0.06), _draws(0.70, 0.0)
    wide = _rule(0.70, 0.70, du, dh, scale=2.0)  # c = 2 doubles the interval: [-0.12, 0.12] straddles 0.10
    narrow = _rule(0.70, 0.70, du, dh, scale=1.0)
    assert narrow["verdict"] == HOLDS and wide["verdict"] == INCONCLUSIVE
    assert wide["ci"][1] - wide["ci"][0] == pytest.approx(2 * (narrow["ci"][1] - narrow["ci"][0]))


def test_weightspace_verdicts_re_exports_the_same_rule():
    from weightspace import verdicts as V

    for name in ("HOLDS", "FAILS", "INCONCLUSIVE", "WELL_ABOVE", "ALPHA", "EXP4_MARGIN", "EXP4_CLAIM", "decide",
                 "combine", "exp4_activation_overlap", "exp4_from_block"):
        assert getattr(V, name) is getattr(R, name), name
        assert name in V.__all__


# -- the rule on the block probes/overlap.py writes -----------------------------------------------------------

def _planted_roles(n: int = 12, d: int = 16, L: int = 6) -> dict[str, torch.Tensor]:
    """H1, H2 in span(e0..e2) at every layer; U in that span at layers >= 3, in span(e5..e7) below."""
    g = torch.Generator().manual_seed(1)
    sets = {k: torch.zeros(n, L, d, dtype=torch.float64) for k in ("U", "H1", "H2")}
    for j in range(L):
        for k in ("H1", "H2"):
            sets[k][:, j, 0:3] = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0])
        lo = 0 if j >= 3 else 5
        sets["U"][:, j, lo:lo + 3] = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0])
    return sets


def test_protocol_overlap_block_carries_the_verdict_and_the_json_recomputes_it():
    import json

    roles = {"U": "U", "H1": "H1", "H2": "H2"}
    res = protocol_overlap(_planted_roles(), {"study": roles}, etas=[0.99], n_boot=6, seed=0)
    s, a = res.exp4("study", 0.99, "slice"), res.exp4("study", 0.99, "all")
    # the slice (layer 4): U shares the harmful span exactly as H2 does -> holds
    assert s["verdict"]["verdict"] == HOLDS and s["verdict"]["value"] == pytest.approx(0.0, abs=1e-9)
    assert s["ci_scale"] == 1.0 and s["u_h_baseline"] == pytest.approx(3 / 16)
    assert s["bias"] == pytest.approx({"u_h": 0.0, "h1_h2": 0.0, "diff": 0.0}, abs=1e-9)  # planted spans: exact
    # all layers: half of U's layers are orthogonal to H -> D = -0.5, clearly below: does not hold
    assert a["verdict"]["verdict"] == FAILS and a["verdict"]["direction"] == "below"
    assert a["verdict"]["ci"] == pytest.approx(a["diff_ci"])  # the rule's interval is the block's own
    # weightspace (or anyone) can recompute the verdict from the JSON alone
    block = json.loads(json.dumps(s))
    again = R.exp4_from_block(block)
    assert again == json.loads(json.dumps(s["verdict"]))


def test_sets_too_small_to_subsample_are_refused_when_intervals_are_asked_for():
    sets = {k: v[:2] for k, v in _planted_roles().items()}
    roles = {"U": "U", "H1": "H1", "H2": "H2"}
    with pytest.raises(WorkbenchError, match="at least 3 prompts"):
        protocol_overlap(sets, {"study": roles}, etas=[0.99], n_boot=4)
    res = protocol_overlap(sets, {"study": roles}, etas=[0.99], n_boot=0)  # no intervals: fine
    assert res.exp4("study", 0.99, "slice")["verdict"]["n_draws"] == 0
