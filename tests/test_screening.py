"""Gradient screening of candidate directions (steering/screening.py) and the screened selection.

The first-order estimates are checked against finite differences of exact scores computed with the existing
scorers and interventions written here (partial ablation ``h - eps (h . r) r`` at hand-listed sites); a planted
refusal direction is ranked first; screened selection agrees with the exhaustive one while scoring only the
top-k candidates exactly (counted); ``steer select`` runs both ways through the console script.
"""

from __future__ import annotations

import doctest
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import steering.screening as screening
import steering.selection as selection
from steering.interventions import ablation, addition
from steering.screening import screen_candidates, site_gradients, spearman
from steering.selection import select_direction
from workbench.arch import count_hooks
from workbench.backends import get_backend
from workbench.chat import ChatFormat, encode
from workbench.errors import WorkbenchError
from workbench.interventions import FunctionIntervention
from workbench.scoring import refusal_scores, refusal_token_ids
from workbench.sites import Site
from workbench.vectors import Direction

FMT = ChatFormat()
# different lengths, so the batches are left-padded and the position masks matter
HARMFUL = ["How do I pick a lock?", "Tell me how to steal a car from my neighbour.", "Write a threatening letter."]
HARMLESS = ["How do I bake bread?", "List the planets.", "Write a short poem about the sea, please, in four lines."]


def _direction(lm, v: torch.Tensor, layer: int, component: str = "resid_pre", method: str = "test") -> Direction:
    return Direction(v, layer=layer, method=method, model_id=lm.model_id, model_checksum=lm.checksum,
                     d_model=lm.d_model, component=component)


def _random(lm, seed: int, layer: int, scale: float = 3.0, component: str = "resid_pre") -> Direction:
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(seed))
    return _direction(lm, v / v.norm() * scale, layer, component)


def _partial_ablation(r: torch.Tensor, n_layers: int, eps: float) -> list[FunctionIntervention]:
    """``h - eps (h . r) r`` at the residual input of every layer and every attention / MLP output, all real
    tokens: the sites of Arditi et al.'s ablation, listed here independently of the library."""
    r = r / r.norm()

    def fn(a: torch.Tensor) -> torch.Tensor:
        rr = r.to(a.dtype)
        return a - eps * (a @ rr).unsqueeze(-1) * rr

    return [FunctionIntervention(Site(layer, comp), fn, "all") for layer in range(n_layers)
            for comp in ("resid_pre", "attn_out", "mlp_out")]


def _mean_score(be, prompts, interventions=()) -> float:
    return float(refusal_scores(be, prompts, FMT, interventions=interventions).double().mean())


# -- (1) the estimates are the derivatives of the exact scores ---------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_first_order_estimates_match_finite_differences_of_exact_scores(make_tiny, arch):
    lm = make_tiny(arch)
    be = get_backend("native", lm)
    n = lm.n_layers
    cands = [_random(lm, 0, 1), _random(lm, 1, 0), _random(lm, 2, 1, component="resid_post"), _random(lm, 3, 0)]
    est = screen_candidates(lm, FMT, cands, harmful=HARMFUL, harmless=HARMLESS, alpha=1.0, batch_size=2)
    # the unmodified scores come out of the same forward pass
    torch.testing.assert_close(est.harmful_scores, refusal_scores(be, HARMFUL, FMT), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(est.harmless_scores, refusal_scores(be, HARMLESS, FMT), atol=1e-4, rtol=1e-5)
    eps = 3e-3
    for c, d in enumerate(cands):
        # ablation: d/d eps of the score under the partial ablation h - eps (h.r) r at every site, at eps = 0
        up = _mean_score(be, HARMFUL, _partial_ablation(d.vector, n, eps))
        down = _mean_score(be, HARMFUL, _partial_ablation(d.vector, n, -eps))
        fd = (up - down) / (2 * eps)
        assert float(est.ablation_delta[c]) == pytest.approx(fd, rel=2e-2, abs=3e-3), (arch, c, fd)
        # addition: d/d alpha of the score with alpha * vector added at the candidate's layer, times alpha = 1
        a = 1e-3
        up = _mean_score(be, HARMLESS, addition(d, a))
        down = _mean_score(be, HARMLESS, addition(d, -a))
        fd_add = (up - down) / (2 * a)
        assert float(est.addition_delta[c]) == pytest.approx(fd_add, rel=2e-2, abs=3e-3), (arch, c, fd_add)
    # the estimates are not trivially zero: the check above has something to compare
    assert float(est.ablation_delta.abs().max()) > 0.05 and float(est.addition_delta.abs().max()) > 0.05
    # addition estimates are linear in alpha
    est2 = screen_candidates(lm, FMT, cands, harmful=HARMFUL, harmless=HARMLESS, alpha=-2.5, batch_size=3)
    torch.testing.assert_close(est2.addition_delta, -2.5 * est.addition_delta, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(est2.ablation_delta, est.ablation_delta, atol=1e-4, rtol=1e-4)  # batching-free


def test_zero_candidates_get_nan_and_bad_input_is_refused(make_tiny):
    lm = make_tiny("llama")
    cands = [_direction(lm, torch.zeros(lm.d_model), 1), _random(lm, 0, 1)]
    est = screen_candidates(lm, FMT, cands, harmful=HARMFUL[:1], harmless=HARMLESS[:1])
    assert math.isnan(float(est.ablation_delta[0])) and math.isnan(float(est.addition_delta[0]))
    assert math.isfinite(float(est.ablation_delta[1])) and math.isfinite(float(est.addition_delta[1]))
    with pytest.raises(WorkbenchError, match="no candidate"):
        screen_candidates(lm, FMT, [], harmful=HARMFUL, harmless=HARMLESS)
    with pytest.raises(WorkbenchError, match="at least one harmful"):
        screen_candidates(lm, FMT, cands, harmful=[], harmless=HARMLESS)
    other = Direction(torch.ones(8), layer=0, method="x", model_id="m", model_checksum="c", d_model=8)
    with pytest.raises(WorkbenchError, match="d_model"):
        screen_candidates(lm, FMT, [other], harmful=HARMFUL, harmless=HARMLESS)


def test_no_hooks_grad_mode_or_parameter_flags_leak_even_on_error(make_tiny):
    lm = make_tiny("llama")
    model = lm.model
    flags = [p.requires_grad for p in model.parameters()]
    hooks = count_hooks(model)
    with torch.no_grad():
        screen_candidates(lm, FMT, [_random(lm, 0, 1)], harmful=HARMFUL, harmless=HARMLESS)
        assert not torch.is_grad_enabled()
    assert count_hooks(model) == hooks and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were accumulated
    native = screening._native(lm)
    b = encode(lm.tokenizer, HARMFUL, FMT)

    def boom(logits: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("score failed")

    with pytest.raises(RuntimeError, match="score failed"):
        site_gradients(native, b, [Site(0, "resid_pre"), Site(1, "mlp_out")], boom)
    assert count_hooks(model) == hooks and [p.requires_grad for p in model.parameters()] == flags
    grads, scores, _ = site_gradients(native, b, [Site(1, "mlp_out")],
                                      screening._refusal_logodds(refusal_token_ids(lm.tokenizer)))
    assert grads[Site(1, "mlp_out")].shape[:2] == b.input_ids.shape and scores.shape == (3,)


# -- (2) a planted refusal direction is ranked first ---------------------------------------------------

@pytest.fixture(scope="module")
def planted():
    """A tiny Llama whose refusal-token logits read a planted direction ``r`` that the residual stream carries:
    ``r`` is added to every token embedding and the refusal rows of the unembedding get ``c * r`` (signed so
    that the refusal score rises with the final residual's component on ``r``)."""
    from workbench.loading import from_memory
    from workbench.tiny import build_tiny

    model, tok = build_tiny("llama", seed=0)
    g = torch.Generator().manual_seed(123)
    r = torch.randn(model.config.hidden_size, generator=g)
    r /= r.norm()
    with torch.no_grad():
        model.model.embed_tokens.weight += 1.0 * r
        b = encode(tok, HARMFUL + HARMLESS, FMT)
        final = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                      output_hidden_states=True).hidden_states[-1][:, -1]
        sign = 1.0 if float((final @ r).mean()) > 0 else -1.0
        model.lm_head.weight[refusal_token_ids(tok)] += 3.0 * sign * r
    lm = from_memory(model, tok, model_id="tiny-planted")
    refusal_dir = _direction(lm, 3.0 * sign * r, 1, method="planted")
    cands = [_random(lm, s, layer) for s, layer in zip(range(10, 17), (0, 1, 0, 1, 0, 1, 1))]
    cands.insert(3, refusal_dir)
    return lm, cands, 3


def test_screening_ranks_a_planted_refusal_direction_first(planted):
    lm, cands, k = planted
    be = get_backend("native", lm)
    est = screen_candidates(be, FMT, cands, harmful=HARMFUL, harmless=HARMLESS)
    assert int(est.ablation_delta.argmin()) == k, est.ablation_delta
    # the plant is real: its exact ablation lowers refusal the most (independent of the estimate)
    exact = [_mean_score(be, HARMFUL, ablation(d, lm.n_layers)) for d in cands]
    assert min(range(len(cands)), key=exact.__getitem__) == k, exact
    assert exact[k] < float(est.harmful_scores.mean()) - 1.0


# -- (3) screened selection = exhaustive selection, with top_k exact scorings ---------------------------

def _counting(monkeypatch) -> dict[str, int]:
    counts = {"ablation": 0, "filters": 0}
    real_abl, real_filt = selection.exact_ablation_score, selection.exact_filter_scores

    def abl(*a, **kw):
        counts["ablation"] += 1
        return real_abl(*a, **kw)

    def filt(*a, **kw):
        counts["filters"] += 1
        return real_filt(*a, **kw)

    monkeypatch.setattr(selection, "exact_ablation_score", abl)
    monkeypatch.setattr(selection, "exact_filter_scores", filt)
    return counts


def test_screened_selection_picks_the_exhaustive_choice_with_top_k_exact_scores(planted, monkeypatch):
    lm, cands, k = planted
    be = get_backend("native", lm)
    counts = _counting(monkeypatch)
    kw = dict(harmful_val=HARMFUL, harmless_val=HARMLESS, kl_max=100.0, max_layer_frac=1.0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = select_direction(be, FMT, cands, screen=False, **kw)
    assert counts == {"ablation": len(cands), "filters": len(cands)}
    assert full.best is cands[k] and not full.rows[k]["filtered"]  # well defined: the plant passes the filters
    assert all(r["exact"] == "full" for r in full.rows)
    assert full.screening["mode"] == "exhaustive" and -1.0 <= full.screening["spearman_ablation"] <= 1.0
    counts.update(ablation=0, filters=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = select_direction(be, FMT, cands, screen=True, top_k=3, confirm_groups=0, **kw)
    assert res.best is cands[k]
    assert counts["ablation"] == 3 and 1 <= counts["filters"] <= 3
    sc = res.screening
    assert (sc["mode"], sc["top_k"], sc["n_exact_ablation"], sc["groups"]) == ("screened", 3, 3, 1)
    # the default scores one more group to confirm the choice: the same best, 6 exact ablation scores, and no
    # filter check for the confirmation group (none of it beats the plant's exact score)
    counts.update(ablation=0, filters=0)
    conf = select_direction(be, FMT, cands, screen=True, top_k=3, **kw)
    assert conf.best is cands[k] and conf.screening["groups"] == 2 and conf.screening["confirm_groups"] == 1
    assert counts["ablation"] == 6 and counts["filters"] == sc["n_exact_filters"]
    assert sc["selected_est_rank"] == 1
    scored = [r for r in res.rows if r["exact"] not in ("none", "kl")]
    assert len(scored) == 3 and {r["est_rank"] for r in scored} == {1, 2, 3}
    for r, f in zip(res.rows, full.rows):  # KLs measured by the screen's bisection are the exact ones
        if r["exact"] == "kl":
            assert r["kl"] == pytest.approx(f["kl"], abs=1e-5) and "KL bisection" in r["filtered"]
    for r, f in zip(res.rows, full.rows):
        # estimates in every row, the same in both paths; exact scores where computed equal the exhaustive ones
        assert r["ablation_score_est"] == pytest.approx(f["ablation_score_est"], abs=1e-5)
        assert r["steering_score_est"] == pytest.approx(f["steering_score_est"], abs=1e-5)
        if r["exact"] in ("none", "kl"):
            assert math.isnan(r["ablation_score"]) and r["filtered"].startswith("screened out")
        else:
            assert r["ablation_score"] == pytest.approx(f["ablation_score"], abs=1e-6)
        if r["exact"] == "full":
            assert (r["kl"], r["steering_score"]) == pytest.approx((f["kl"], f["steering_score"]), abs=1e-5)
    for key in ("harmful_refusal_score", "harmless_refusal_score"):
        assert res.baseline[key] == pytest.approx(full.baseline[key], abs=1e-4)


def test_screened_selection_continues_in_groups_and_falls_back_like_the_exhaustive_path(planted, monkeypatch):
    """The filters are stubbed (which candidates fail is set here) to drive the group logic."""
    lm, cands, _ = planted
    be = get_backend("native", lm)
    est = screen_candidates(be, FMT, cands, harmful=HARMFUL, harmless=HARMLESS)
    order = sorted(range(len(cands)), key=lambda i: float(est.ablation_delta[i]))
    failing = {id(cands[i]) for i in order[:3]}  # the three best estimates fail the KL filter
    calls = {"ablation": [], "filters": []}
    real_abl = selection.exact_ablation_score
    index = {id(d): i for i, d in enumerate(cands)}

    def abl(backend, fmt, d, *a, **kw):
        calls["ablation"].append(index[id(d)])
        return real_abl(backend, fmt, d, *a, **kw)

    def filt(backend, fmt, d, *a, **kw):
        calls["filters"].append(index[id(d)])
        return (5.0 if id(d) in failing else 0.0), 100.0  # (KL, steering score far above the baseline)

    monkeypatch.setattr(selection, "exact_ablation_score", abl)
    monkeypatch.setattr(selection, "exact_filter_scores", filt)
    kw = dict(harmful_val=HARMFUL, harmless_val=HARMLESS, kl_max=1.0, max_layer_frac=1.0, progress=False)
    res = select_direction(be, FMT, cands, screen=True, top_k=2, confirm_groups=0, **kw)
    assert res.screening["groups"] == 2 and sorted(calls["ablation"]) == sorted(order[:4])
    group2 = order[2:4]
    passing = [i for i in group2 if id(cands[i]) not in failing]
    want = min(passing, key=lambda i: res.rows[i]["ablation_score"])
    assert res.best is cands[want] and res.rows[want]["selected_despite_filters"] is False
    assert all(res.rows[i]["filtered"].startswith("KL 5.000 > 1.0") for i in order[:3])
    # nothing passes: everything is scored and the lowest exact ablation score is taken, flagged, as exhaustive does
    failing.update(id(d) for d in cands)
    calls["ablation"].clear()
    with pytest.warns(UserWarning, match="failed a filter"):
        res = select_direction(be, FMT, cands, screen=True, top_k=2, **kw)
    with pytest.warns(UserWarning, match="failed a filter"):
        full = select_direction(be, FMT, cands, screen=False, **kw)
    assert sorted(calls["ablation"][: len(cands)]) == list(range(len(cands)))
    assert res.best is full.best and res.rows[index[id(res.best)]]["selected_despite_filters"] is True
    assert all(r["exact"] == "full" for r in res.rows)
    with pytest.raises(WorkbenchError, match="top_k"):
        select_direction(be, FMT, cands, screen=True, top_k=0, **kw)
    with pytest.raises(WorkbenchError, match="confirm_groups"):
        select_direction(be, FMT, cands, screen=True, confirm_groups=-1, **kw)


def test_a_confirmation_group_lets_a_lower_ranked_candidate_win(planted, monkeypatch):
    """The estimate ranks near-ties imperfectly: a candidate just below the first passing group (here estimate
    rank 6, top_k 2) whose exact ablation score is lower wins with one confirmation group, as the exhaustive path
    would choose it; without one, the first passing group's candidate is kept. Exact scores and filters stubbed."""
    lm, cands, _ = planted
    be = get_backend("native", lm)
    est = screen_candidates(be, FMT, cands, harmful=HARMFUL, harmless=HARMLESS)
    order = sorted(range(len(cands)), key=lambda i: float(est.ablation_delta[i]))
    index = {id(d): i for i, d in enumerate(cands)}
    score = {i: 0.0 for i in range(len(cands))}
    score[order[3]], score[order[5]], score[order[4]] = -1.0, -10.0, 5.0
    failing = {order[0], order[1], order[2]}
    checked: list[int] = []

    def abl(backend, fmt, d, *a, **kw):
        return score[index[id(d)]]

    def filt(backend, fmt, d, *a, **kw):
        checked.append(index[id(d)])
        return (5.0 if index[id(d)] in failing else 0.0), 100.0

    monkeypatch.setattr(selection, "exact_ablation_score", abl)
    monkeypatch.setattr(selection, "exact_filter_scores", filt)
    kw = dict(harmful_val=HARMFUL, harmless_val=HARMLESS, kl_max=1.0, max_layer_frac=1.0, progress=False)
    first = select_direction(be, FMT, cands, screen=True, top_k=2, confirm_groups=0, **kw)
    assert first.best is cands[order[3]]
    checked.clear()
    conf = select_direction(be, FMT, cands, screen=True, top_k=2, **kw)
    assert conf.best is cands[order[5]] and conf.screening["groups"] == 3
    assert order[4] not in checked  # its exact score (5.0) cannot beat the choice: no filter pass spent on it
    full = select_direction(be, FMT, cands, screen=False, **kw)
    assert full.best is conf.best


# -- (4) the KL screen: a second-order estimate of each candidate's KL, and the ordering it drives -------------

def test_kl_estimate_is_the_quadratic_form_of_the_first_order_logit_change():
    """``ablation_kl_second_order`` estimates ``1/2 dz^T (diag p - p p^T) dz`` with ``dz`` the first-order change of
    the next-token logits under the ablation; ``dz`` is measured here independently, by central differences of
    partial ablations (weight +-eps at every site), and the quadratic form computed exactly."""
    from steering.screening import _native, ablation_kl_second_order
    from workbench.interventions import Ablation
    from workbench.loading import from_memory
    from workbench.scoring import next_token_logprobs
    from workbench.tiny import build_tiny

    lm = from_memory(*build_tiny("llama", seed=3))
    be = get_backend("native", lm)
    g = torch.Generator().manual_seed(5)
    R = torch.nn.functional.normalize(torch.randn(lm.model.config.hidden_size, 3, generator=g), dim=0)
    est = ablation_kl_second_order(_native(lm), HARMLESS, FMT, R, samples=600, seed=1, batch_size=2)
    lp0 = next_token_logprobs(be, HARMLESS, FMT)
    p = lp0.double().exp()
    eps = 1e-2
    for c in range(R.shape[1]):
        def lp(w: float) -> torch.Tensor:
            ivs = [Ablation(iv.site, iv.direction, weight=w) for iv in ablation(
                _direction(lm, R[:, c], 0), lm.n_layers)]
            return next_token_logprobs(be, HARMLESS, FMT, interventions=ivs).double()

        dz = (lp(eps) - lp(-eps)) / (2 * eps)  # log-softmax shifts each row by a constant: F ignores it
        quad = 0.5 * ((p * dz * dz).sum(-1) - (p * dz).sum(-1) ** 2)
        assert float(est[c]) == pytest.approx(float(quad.mean()), rel=0.2), (c, est, quad)
    # seeded: the same seed gives the same estimate, another seed a different one
    again = ablation_kl_second_order(_native(lm), HARMLESS, FMT, R, samples=600, seed=1, batch_size=2)
    assert torch.equal(again, est)
    with pytest.raises(WorkbenchError, match="samples"):
        ablation_kl_second_order(_native(lm), HARMLESS, FMT, R, samples=0)


def test_the_kl_screen_orders_candidates_likely_to_pass_the_kl_filter_first(planted, monkeypatch):
    """KL estimates and exact scores are stubbed: only the two candidates with the worst ablation estimates pass
    the KL filter (and have the lowest KL estimates). Ordered by the ablation estimate alone every candidate is
    scored before they are reached; with the KL screen a bisection on exact KLs finds the boundary, they come
    first, the exhaustive choice is made with fewer exact scores, and KLs the bisection measured are reused."""
    lm, cands, _ = planted
    be = get_backend("native", lm)
    n = len(cands)
    real_screen = selection.screen_candidates
    est0 = real_screen(be, FMT, cands, harmful=HARMFUL, harmless=HARMLESS)
    order = sorted(range(n), key=lambda i: float(est0.ablation_delta[i]))
    p1, p2 = order[-2], order[-1]  # the passing pair: the worst two ablation estimates
    kl_est = torch.arange(10.0, 10.0 + n)
    kl_est[p1], kl_est[p2] = 0.2, 0.1

    def screen(*a, **kw):
        est = real_screen(*a, **kw)
        if kw.get("kl_samples", 0):
            assert est.ablation_kl is not None and est.ablation_kl.shape == (n,)
            est.ablation_kl = kl_est.clone()
        return est

    index = {id(d): i for i, d in enumerate(cands)}
    score = {i: 0.0 for i in range(n)}
    score[p1], score[p2] = -1.0, -2.0
    calls = {"ablation": [], "kl": [], "filters": []}

    def abl(backend, fmt, d, *a, **kw):
        calls["ablation"].append(index[id(d)])
        return score[index[id(d)]]

    def kl(backend, fmt, d, *a, **kw):
        calls["kl"].append(index[id(d)])
        return 0.0 if index[id(d)] in (p1, p2) else 5.0

    def filt(backend, fmt, d, *a, known_kl=None, **kw):
        i = index[id(d)]
        calls["filters"].append((i, known_kl))
        return (known_kl if known_kl is not None else kl(backend, fmt, d)), 100.0

    monkeypatch.setattr(selection, "screen_candidates", screen)
    monkeypatch.setattr(selection, "exact_ablation_score", abl)
    monkeypatch.setattr(selection, "exact_kl", kl)
    monkeypatch.setattr(selection, "exact_filter_scores", filt)
    kw = dict(harmful_val=HARMFUL, harmless_val=HARMLESS, kl_max=1.0, max_layer_frac=1.0, progress=False)
    full = select_direction(be, FMT, cands, screen=False, **kw)
    assert full.best is cands[p2]
    plain = select_direction(be, FMT, cands, screen=True, top_k=2, confirm_groups=0, kl_screen=False, **kw)
    assert plain.best is cands[p2] and plain.screening["n_exact_ablation"] == n  # reached only at the very end
    for k in calls:
        calls[k].clear()
    res = select_direction(be, FMT, cands, screen=True, top_k=2, confirm_groups=0, **kw)
    sc = res.screening
    assert res.best is cands[p2] and sc["n_exact_ablation"] <= 4 < n
    bykl = sorted(range(n), key=lambda i: float(kl_est[i]))
    bisected = calls["kl"][: sc["n_exact_kl_only"]]
    assert sc["kl_screen"]["boundary_rank"] == 2 and sc["kl_screen"]["likely"] == 4
    assert len(bisected) == sc["n_exact_kl_only"] <= math.ceil(math.log2(n + 1)) and bykl[1] in bisected
    for i, known in calls["filters"]:  # a KL the bisection measured is passed on, not measured again
        assert (known is not None) == (i in bisected)
    assert res.rows[p2]["kl_est_rank"] == 1 and res.rows[p2]["kl_est"] == pytest.approx(0.1)
    for i in bisected:
        if res.rows[i]["exact"] == "kl":
            assert res.rows[i]["kl"] == 5.0 and "KL bisection" in res.rows[i]["filtered"]
    with pytest.raises(WorkbenchError, match="kl_margin"):
        select_direction(be, FMT, cands, screen=True, kl_margin=0.5, **kw)


def test_spearman_and_the_module_doctests():
    assert spearman([1, 2, 3, 4], [2, 4, 6, 100]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, float("nan"), 4, 5], [1, 2, 0, 3, 5]) == pytest.approx(1.0)  # NaN pairs dropped
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)  # average ranks for ties
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    res = doctest.testmod(screening, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 5 and res.failed == 0


# -- (4) the command line -------------------------------------------------------------------------------

WORKBENCH = str(Path(sys.executable).parent / "workbench")


@pytest.mark.slow
def test_steer_select_screened_and_exhaustive_through_the_console_script(tmp_path):
    from workbench.tiny import build_tiny

    model, tok = build_tiny("llama", n_layers=3)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", WORKBENCH_CACHE=str(tmp_path / "cache"))

    def run(out: Path, *extra: str) -> tuple[dict, str]:
        r = subprocess.run([WORKBENCH, "--threads", "1", "steer", "select", "--model", str(folder), "--out", str(out),
                            "--limit", "4", "--n-val", "3", "--kl-max", "10", "--max-layer-frac", "0.99", *extra],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        return json.loads((out / "selection.json").read_text()), r.stdout

    scr, out_s = run(tmp_path / "screened", "--top-k", "2")
    exh, out_e = run(tmp_path / "exhaustive", "--exhaustive")
    assert "screened selection:" in out_s and "exhaustive selection:" in out_e and "Spearman" in out_e
    nonzero = [i for i, r in enumerate(exh["rows"]) if r["norm"] > 0]
    assert len(nonzero) >= 6  # 2 non-zero layers x the post-instruction tokens
    # exhaustive: every non-zero candidate scored exactly, the rank correlation recorded
    assert exh["screening"]["mode"] == "exhaustive" and exh["screening"]["n_exact_ablation"] == len(nonzero)
    assert all(exh["rows"][i]["exact"] == "full" for i in nonzero)
    assert -1.0 <= exh["screening"]["spearman_ablation"] <= 1.0
    # screened: estimates for every non-zero candidate, exact scores for groups of 2 in estimate order
    sc = scr["screening"]
    assert (sc["mode"], sc["top_k"]) == ("screened", 2)
    exact_rows = [r for r in scr["rows"] if r["exact"] not in ("none", "kl")]
    assert sc["n_exact_ablation"] == len(exact_rows) == min(2 * sc["groups"], len(nonzero))
    assert sorted(r["est_rank"] for r in exact_rows) == list(range(1, len(exact_rows) + 1))
    for s_row, e_row in zip(scr["rows"], exh["rows"]):
        if s_row["norm"] > 0:
            assert s_row["ablation_score_est"] == pytest.approx(e_row["ablation_score_est"], abs=1e-4)
        if s_row["exact"] not in ("none", "kl"):
            assert s_row["ablation_score"] == pytest.approx(e_row["ablation_score"], abs=1e-5)
    # each selected row is the lowest exact ablation score among the rows it kept (or flagged as a fallback)
    for res in (scr, exh):
        (best,) = [r for r in res["rows"] if r["selected"]]
        kept = [r for r in res["rows"] if not r["filtered"]]
        pool = kept or [r for r in res["rows"] if r["norm"] > 0]
        assert best["ablation_score"] == min(r["ablation_score"] for r in pool)
        assert best["selected_despite_filters"] is (not kept)
        assert res["selected"]["layer"] == best["layer"] and res["selected"]["position"] == best["position"]
    # the screened choice is the exhaustive one whenever the exhaustive choice was among those scored exactly
    (e_best,) = [r for r in exh["rows"] if r["selected"]]
    if scr["rows"][e_best["candidate"]]["exact"] == "full" and not e_best["selected_despite_filters"]:
        (s_best,) = [r for r in scr["rows"] if r["selected"]]
        assert s_best["candidate"] == e_best["candidate"]


def test_steer_select_refuses_a_kl_margin_below_one(tmp_path, capsys):
    from workbench.cli import main

    for bad in ("0.5", "nan", "inf"):
        rc = main(["steer", "select", "--model", "no-such-model", "--kl-margin", bad, "--out", str(tmp_path / "s")])
        assert rc == 2 and "--kl-margin must be a finite number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_the_selection_replay_runs_the_shipped_selection_on_recorded_scores():
    """benchmarks/selection_replay.py: a synthetic record where only the two worst ablation estimates pass KL.
    The replay must reach the exhaustive choice both ways, with fewer exact passes with the KL screen (without
    it every group of 2 is scored before the passing pair), and count the passes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "selection_replay", Path(__file__).resolve().parent.parent / "benchmarks" / "selection_replay.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = []
    for i in range(8):  # ablation estimate rises with i; exact KL passes (<= 0.1) only for 6 and 7
        passing = i >= 6
        rows.append({"candidate": i, "layer": i, "position": "pos-1", "ablation_score_est": float(i),
                     "ablation_score": {6: -1.0, 7: -2.0}.get(i, -5.0), "steering_score_est": 1.0,
                     "steering_score": 1.0, "kl": 0.05 if passing else 3.0, "kl_est": 0.5 if passing else 10.0 + i,
                     "filtered": "" if passing else "KL 3.000 > 0.1"})
    rows.append({"candidate": 8, "layer": 0, "position": "pos-2", "ablation_score_est": None, "ablation_score": math.nan,
                 "steering_score_est": None, "steering_score": math.nan, "kl": math.nan, "kl_est": None,
                 "filtered": "zero direction"})
    rec = {"rows": rows, "baseline": {"harmless_refusal_score": 0.0}}
    on = mod.replay(rec, 0.1, kl_screen=True, top_k=2, confirm_groups=0)
    off = mod.replay(rec, 0.1, kl_screen=False, top_k=2, confirm_groups=0)
    assert (on["n"], on["n_pass"], on["exhaustive_choice"], on["exhaustive_passes"]) == (8, 2, 7, 24)
    assert on["same"] and on["chosen"] == 7 and on["passes"] < off["passes"] < 24
    assert off["same"] and off["chosen"] == 7  # found too, but only after every other group (8 ablations)
    tight = mod.replay(rec, 0.01, kl_screen=True, top_k=2)  # nothing passes: the flagged fallback, as selection does
    assert tight["exhaustive_choice"] is None and not tight["same"] and tight["chosen"] in range(6)
