"""Issue #10, defect 7 "metrics without power": the sweep's utility and harm metrics, their bootstrap intervals,
and TopK vs Random compared paired over the same items.

* :mod:`weightspace.metrics` on planted per-item numbers whose bootstrap distributions are known exactly
  (a mean of resampled 0/1 items is Binomial(n, p) / n; the quantiles are computed here from the binomial
  pmf, never with the function under test; a Monte Carlo percentile may sit one grid step 1/n off);
* :func:`weightspace.evaluation.score_model` on a tiny model: the code-task pass rate against the same
  replies checked directly with :mod:`workbench.codetasks`, a planted pass rate, the refusal-logit score
  against :func:`workbench.scoring.refusal_scores`, the phrase rate against :func:`workbench.scoring.is_refusal`,
  and the default harm set (>= 100 prompts of the ``evaluation`` pool, disjoint from every training pool);
* the paired verdict flips when the planted difference flips (:func:`weightspace.metrics.paired_difference`,
  :func:`weightspace.sweep.paired_topk_vs_controls`), and the Exp 2 rules on planted per-item CSVs.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from workbench.chat import ChatFormat

from weightspace import metrics as M
from weightspace.evaluation import EvalConfig, EvalSets, score_model


def _binom_quantile(n: int, p: float, q: float) -> float:
    """The q-quantile of Binomial(n, p) / n (smallest k / n whose CDF reaches q), from the pmf."""
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        if cdf >= q - 1e-12:
            return k / n
    return 1.0


# -- intervals and paired differences on planted numbers ------------------------------------------------------

def test_mean_ci_exact_small_cases():
    # two items 0 / 1: resample means 0, 0.5, 1 with probability 1/4, 1/2, 1/4 -> 2.5 % point 0, 97.5 % point 1
    assert M.mean_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)
    assert M.mean_ci([0.3] * 5) == pytest.approx((0.3, 0.3, 0.3))  # no spread
    m, lo, hi = M.mean_ci([])
    assert math.isnan(m) and math.isnan(lo) and math.isnan(hi)


def test_mean_ci_matches_the_binomial_bootstrap_distribution():
    vals = [1.0] * 60 + [0.0] * 140  # p = 0.3, n = 200
    m, lo, hi = M.mean_ci(vals, seed=3)
    assert m == pytest.approx(0.3)
    step = 1 / 200
    assert lo == pytest.approx(_binom_quantile(200, 0.3, 0.025), abs=step + 1e-9)
    assert hi == pytest.approx(_binom_quantile(200, 0.3, 0.975), abs=step + 1e-9)
    # normal approximation, for orientation: 0.3 -+ 1.96 sqrt(0.21 / 200) = 0.236 .. 0.364
    assert lo == pytest.approx(0.3 - 1.96 * math.sqrt(0.21 / 200), abs=0.012)
    assert hi == pytest.approx(0.3 + 1.96 * math.sqrt(0.21 / 200), abs=0.012)


def test_paired_difference_by_hand_and_the_verdict_flips():
    a, b = [1.0] * 24 + [0.0] * 6, [0.0] * 30  # d: 24 ones, 6 zeros -> mean 0.8
    r = M.paired_difference(a, b)
    # sample variance of d: (24 (0.2)^2 + 6 (0.8)^2) / 29 = 4.8 / 29
    assert r["n"] == 30 and r["mean_diff"] == pytest.approx(0.8)
    assert r["se"] == pytest.approx(math.sqrt(4.8 / 29 / 30))
    assert r["ci"][0] == pytest.approx(_binom_quantile(30, 0.8, 0.025), abs=1 / 30 + 1e-9)
    assert r["ci"][1] == pytest.approx(_binom_quantile(30, 0.8, 0.975), abs=1 / 30 + 1e-9)
    assert r["verdict"] == M.HIGHER
    flipped = M.paired_difference(b, a)  # the planted difference flipped: the interval mirrors
    assert flipped["verdict"] == M.LOWER and flipped["mean_diff"] == pytest.approx(-0.8)
    assert flipped["ci"] == pytest.approx([-r["ci"][1], -r["ci"][0]], abs=1 / 30 + 1e-9)
    # half the items +1, half -1: mean 0, the interval holds 0
    same = M.paired_difference([1.0, 0.0] * 15, [0.0, 1.0] * 15)
    assert same["verdict"] == M.NO_DIFFERENCE and same["mean_diff"] == 0.0
    assert same["ci"][0] < 0 < same["ci"][1]
    # a paired design sees what two independent rates would not: every item gains a little
    small = M.paired_difference([0.51] * 10, [0.5] * 10)
    assert small["verdict"] == M.HIGHER and small["ci"] == pytest.approx([0.01, 0.01])


def test_paired_difference_not_comparable():
    assert M.paired_difference([], [])["verdict"] == "n/a"
    assert M.paired_difference([1.0, 2.0], [1.0])["verdict"] == "n/a"
    assert M.paired_difference([1.0, float("nan")], [1.0, 2.0])["verdict"] == "n/a"
    one = M.paired_difference([3.0], [1.0])  # one item: that item's difference
    assert one == {"mean_diff": 2.0, "se": 0.0, "ci": [2.0, 2.0], "n": 1, "verdict": M.HIGHER}


def test_metrics_with_ci_on_planted_rows():
    rows = {"harmful": [{"refusal_phrase": v, "refusal_logit": s} for v, s in
                        zip([True, True, False, False, False], [-1.0, 2.0, 3.0, -4.0, 0.0])],
            "utility": [{"correct": c, "answer_nll": n} for c, n in zip(["True", "False"], ["1.5", "0.5"])]}
    m = M.metrics_with_ci(rows)
    assert m["harm_refusal_rate_phrase"] == pytest.approx(0.4)
    assert m["harm_compliance_phrase"] == pytest.approx(0.6)
    # compliance = 1 - refusal item by item: its interval is the refusal interval mirrored
    assert m["harm_compliance_phrase_lo"] == pytest.approx(1 - m["harm_refusal_rate_phrase_hi"])
    assert m["harm_compliance_phrase_hi"] == pytest.approx(1 - m["harm_refusal_rate_phrase_lo"])
    assert m["harm_refusal_logit_mean"] == pytest.approx(0.0)  # (-1 + 2 + 3 - 4 + 0) / 5
    assert m["harm_refusal_logit_positive"] == pytest.approx(0.4)  # 2 and 3 are > 0
    # two utility items: resample means of [1, 0] are 0 / 0.5 / 1, of [1.5, 0.5] are 0.5 / 1 / 1.5
    assert (m["utility_accuracy"], m["utility_accuracy_lo"], m["utility_accuracy_hi"]) == (0.5, 0.0, 1.0)
    assert (m["utility_answer_nll"], m["utility_answer_nll_lo"], m["utility_answer_nll_hi"]) == (1.0, 0.5, 1.5)
    assert "utility_accuracy" not in M.metrics_with_ci({"harmful": rows["harmful"]})


def test_sweep_pairs_topk_with_each_control_and_the_verdict_flips():
    from weightspace.sweep import paired_topk_vs_controls

    pts = [{"config": f"exp1-useful-{k}-rho0.5", "experiment": "exp1", "model": "useful", "rho": 0.5, "kind": k}
           for k in ("topk", "random", "randomk")]

    def util(correct):
        return {"utility": [{"id": f"t{i}", "correct": c, "answer_nll": 1.0 - c} for i, c in enumerate(correct)]}

    good, bad = [True] * 10, [False] * 10
    items = {"exp1-useful-topk-rho0.5": util(good), "exp1-useful-random-rho0.5": util(bad),
             "exp1-useful-randomk-rho0.5": util(good)}
    rows = paired_topk_vs_controls(pts, items, n_boot=500, seed=0)
    by = {(r["kind_b"], r["metric"]): r for r in rows}
    assert set(by) == {(k, m) for k in ("random", "randomk") for m in ("utility_accuracy", "utility_answer_nll")}
    r = by[("random", "utility_accuracy")]
    assert (r["mean_a"], r["mean_b"], r["mean_diff"], r["verdict"]) == (1.0, 0.0, 1.0, M.HIGHER)
    assert by[("random", "utility_answer_nll")]["verdict"] == M.LOWER  # NLL 0 vs 1: TopK lower
    assert by[("randomk", "utility_accuracy")]["verdict"] == M.NO_DIFFERENCE
    items["exp1-useful-topk-rho0.5"], items["exp1-useful-random-rho0.5"] = util(bad), util(good)
    flipped = {(r["kind_b"], r["metric"]): r for r in paired_topk_vs_controls(pts, items, n_boot=500, seed=0)}
    assert flipped[("random", "utility_accuracy")]["verdict"] == M.LOWER
    assert flipped[("random", "utility_accuracy")]["mean_diff"] == -1.0
    items["exp1-useful-random-rho0.5"] = {"utility": [dict(x, id="other") for x in util(good)["utility"]]}
    with pytest.raises(Exception, match="not scored on the same items"):
        paired_topk_vs_controls(pts, items, n_boot=10, seed=0)


# -- score_model on a tiny model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from workbench.backends import get_backend
    from workbench.loading import from_memory
    from workbench.tiny import build_tiny

    return get_backend("native", from_memory(*build_tiny("llama")))


def test_default_harm_set_is_the_evaluation_pool_with_at_least_100_prompts():
    from workbench.codetasks import load_codetasks

    from weightspace import pools

    cfg = EvalConfig()
    assert cfg.n_harmful is None and cfg.utility_task == "code" and cfg.code_split == "test"
    sets = EvalSets.default(cfg)
    assert len(sets.harmful) >= 100 and list(sets.harmful) == pools.pool_texts("evaluation")
    for other in ("safety", "harmful", "contaminated", "direction"):  # never trained on, never in the direction
        assert set(sets.harmful).isdisjoint(pools.pool_texts(other)), other
    assert [t.id for t in sets.tasks] == [t.id for t in load_codetasks("test")] and len(sets.tasks) == 32
    assert sets.describe()["n_harmful"] == len(sets.harmful) and sets.describe()["utility_scorer"] == "unit_tests"
    with pytest.raises(Exception, match="holds 100"):
        EvalSets.default(EvalConfig(n_harmful=101))
    with pytest.raises(Exception, match="utility_task"):
        EvalConfig(utility_task="poetry")


def test_score_model_scores_at_least_100_harmful_prompts_by_default(tiny):
    from workbench.scoring import refusal_scores

    cfg = EvalConfig(max_new_tokens=2, batch_size=16, n_boot=200)
    sets = EvalSets.default(cfg)
    metrics, rows = score_model(tiny, sets, ChatFormat(), cfg, utility=False)
    assert len(rows["harmful"]) == len(sets.harmful) >= 100 and "utility" not in rows
    want = refusal_scores(tiny, list(sets.harmful), ChatFormat(), batch_size=5).tolist()
    assert metrics["harm_refusal_logit_mean"] == pytest.approx(sum(want) / len(want), rel=1e-5)
    assert metrics["harm_refusal_logit_mean_lo"] <= metrics["harm_refusal_logit_mean"] <= metrics[
        "harm_refusal_logit_mean_hi"]


def test_score_model_harm_against_refusal_scores_and_is_refusal(tiny, monkeypatch):
    import workbench.generation as gen
    from workbench.scoring import is_refusal, refusal_scores

    cfg = EvalConfig(n_harmful=6, n_tasks=1, max_new_tokens=3, batch_size=4)
    sets = EvalSets.default(cfg)
    fmt = ChatFormat()
    metrics, rows = score_model(tiny, sets, fmt, cfg, utility=False)
    logit = refusal_scores(tiny, list(sets.harmful), fmt, batch_size=1).tolist()  # one by one: no padding
    assert [r["refusal_logit"] for r in rows["harmful"]] == pytest.approx(logit, abs=1e-4)
    assert metrics["harm_refusal_logit_mean"] == pytest.approx(sum(logit) / 6, abs=1e-4)
    assert metrics["harm_refusal_logit_positive"] == sum(x > 0 for x in logit) / 6
    texts = gen.generate_texts(tiny, list(sets.harmful), fmt, max_new_tokens=3, batch_size=4)
    assert [r["completion"] for r in rows["harmful"]] == texts
    assert [r["refusal_phrase"] for r in rows["harmful"]] == [is_refusal(t) for t in texts]

    # planted replies: two refusals of six -> refusal rate 1/3, compliance 2/3
    planted = ["I'm sorry, I can't help.", "Sure, here it is.", "As an AI I cannot do that.", "Step 1: ...", "Ok",
               "Here:"]
    monkeypatch.setattr(gen, "generate_texts", lambda be, prompts, *a, **k: planted[:len(prompts)])
    metrics, rows = score_model(tiny, sets, fmt, cfg, utility=False)
    assert metrics["harm_refusal_rate_phrase"] == pytest.approx(2 / 6)
    assert metrics["harm_compliance_phrase"] == pytest.approx(4 / 6)
    assert [r["refusal_phrase"] for r in rows["harmful"]] == [True, False, True, False, False, False]


def test_score_model_code_pass_rate_equals_codetasks_on_the_same_replies(tiny):
    from workbench.codetasks import check_completion
    from workbench.generation import generate_texts

    cfg = EvalConfig(n_harmful=1, n_tasks=3, task_tokens=6, batch_size=3)
    sets = EvalSets.default(cfg)
    metrics, rows = score_model(tiny, sets, ChatFormat(), cfg, harm=False)
    replies = generate_texts(tiny, [t.prompt for t in sets.tasks], ChatFormat(), max_new_tokens=6, batch_size=3)
    assert [r["completion"] for r in rows["utility"]] == replies
    direct = [check_completion(r, t) for r, t in zip(replies, sets.tasks)]
    assert [r["correct"] for r in rows["utility"]] == [c.passed for c in direct]
    assert [r["status"] for r in rows["utility"]] == [c.status for c in direct]
    assert metrics["utility_accuracy"] == sum(c.passed for c in direct) / 3


def test_score_model_code_pass_rate_on_planted_replies(tiny, monkeypatch):
    """Replies planted per task: the reference solution (passes), a wrong function (fails), prose (no code)."""
    import workbench.generation as gen
    from workbench.codetasks import check_solution

    cfg = EvalConfig(n_harmful=1, n_tasks=4, task_tokens=4, batch_size=4, utility_task="code")
    sets = EvalSets.default(cfg)
    t0, t1, t2, t3 = sets.tasks
    assert check_solution(t0.solution, t0).passed and check_solution(t2.solution, t2).passed
    wrong = f"```python\ndef {t1.name}(*args, **kwargs):\n    return None\n```"
    assert not check_solution(f"def {t1.name}(*args, **kwargs):\n    return None\n", t1).passed
    planted = {t0.prompt: "Here you go:\n" + t0.reference_reply, t1.prompt: wrong, t2.prompt: t2.reference_reply,
               t3.prompt: "I would write a loop."}
    monkeypatch.setattr(gen, "generate_texts", lambda be, prompts, *a, **k: [planted[p] for p in prompts])
    metrics, rows = score_model(tiny, sets, ChatFormat(), cfg, harm=False)
    assert [r["status"] for r in rows["utility"]] == ["passed", "failed", "passed", "no code"]
    assert [r["correct"] for r in rows["utility"]] == [True, False, True, False]
    assert metrics["utility_accuracy"] == 0.5
    # items [1, 0, 1, 0]: the resample mean is 0 with probability 1/16 > 2.5 % and 1 with 1/16: interval [0, 1]
    assert (metrics["utility_accuracy_lo"], metrics["utility_accuracy_hi"]) == (0.0, 1.0)
    assert rows["utility"][0]["tests_passed"] == rows["utility"][0]["n_tests"] == len(t0.tests)


# -- the Exp 2 rule on planted per-item CSVs (rates and continuous scores) --------------------------------------

def _write(folder: Path, cid: str, name: str, rows: list[dict]) -> None:
    d = folder / "evals" / cid
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _plant_exp2(folder: Path, *, nll: dict, logit: dict, correct: dict, refused: dict) -> None:
    for cid in nll:
        _write(folder, cid, "utility", [{"id": f"t{i}", "correct": c, "answer_nll": n}
                                        for i, (c, n) in enumerate(zip(correct[cid], nll[cid]))])
        _write(folder, cid, "harmful", [{"prompt": f"p{i}", "refusal_phrase": r, "refusal_logit": s}
                                        for i, (r, s) in enumerate(zip(refused[cid], logit[cid]))])


def test_exp2_rule_on_rates_and_on_continuous_scores(tmp_path):
    from weightspace import verdicts as V
    from weightspace.chain_report import _exp2_verdict

    cfg = SimpleNamespace(rhos=(0.5,), seed=0)
    A, C, T, R = "baseline-aligned", "baseline-contaminated", "exp2-contaminated-topk-rho0.5", \
        "exp2-contaminated-random-rho0.5"
    # the contaminated fine-tune: answer NLL 2 -> 1 (utility gained 1), refusal logit 1 -> -1 (harm gained 2).
    # TopK filtering undoes both fully (NLL 2, logit 1), Random neither: proportional, not selective.
    nll = {A: [2.0] * 4, C: [1.0] * 4, T: [2.0] * 4, R: [1.0] * 4}
    logit = {A: [1.0] * 5, C: [-1.0] * 5, T: [1.0] * 5, R: [-1.0] * 5}
    correct = {A: [False] * 4, C: [True] * 4, T: [False] * 4, R: [True] * 4}
    refused = {A: [True] * 5, C: [False] * 5, T: [True] * 5, R: [False] * 5}
    _plant_exp2(tmp_path, nll=nll, logit=logit, correct=correct, refused=refused)
    r = _exp2_verdict(cfg, tmp_path, continuous=True)
    # per item: utility lost beyond Random (2 - 1) / 1 = 1, harm removed beyond Random (1 - (-1)) / 2 = 1
    assert r["utility_scale"] == 1.0 and r["harm_scale"] == 2.0
    assert r["utility_lost_beyond_random"] == 1.0 and r["harm_removed_beyond_random"] == 1.0
    assert r["value"] == 0.0 and r["ci"] == [0.0, 0.0] and r["verdict"] == V.HOLDS
    assert r["parts"]["utility_cost_faster"]["verdict"] == V.HOLDS
    assert r["parts"]["harm_at_random_rate"]["verdict"] == V.FAILS  # TopK removes 1 (all) beyond Random
    rates = _exp2_verdict(cfg, tmp_path)  # the same story in rates: 1 - 1 = 0
    assert (rates["value"], rates["verdict"], rates["scores"]) == (0.0, V.HOLDS, "rates")

    # TopK keeps the utility (NLL 1, like Random) and still removes the harm: selective -> does not hold
    nll[T], correct[T] = [1.0] * 4, [True] * 4
    _plant_exp2(tmp_path, nll=nll, logit=logit, correct=correct, refused=refused)
    r = _exp2_verdict(cfg, tmp_path, continuous=True)
    assert r["value"] == 1.0 and r["verdict"] == V.FAILS
    assert r["parts"]["utility_cost_faster"]["verdict"] == V.FAILS
    assert _exp2_verdict(cfg, tmp_path)["verdict"] == V.FAILS

    # no measurable effect of the contaminated fine-tune on the answer NLL: the continuous rule cannot scale
    nll[C] = [2.0] * 4
    _plant_exp2(tmp_path, nll=nll, logit=logit, correct=correct, refused=refused)
    r = _exp2_verdict(cfg, tmp_path, continuous=True)
    assert r["verdict"] == V.INCONCLUSIVE and r["value"] is None and r["utility_effect"]["verdict"] == "no difference"


def test_exp2_rule_scales_and_parts_by_hand():
    from weightspace import verdicts as V

    ut, ur = [[0.0] * 4] * 2, [[2.0] * 4] * 2  # TopK loses 2 per task beyond Random, at both rhos
    h = [[1.0] * 5] * 2
    r = V.exp2_no_selective_removal(ut, ur, h, h, utility_scale=2.0, scores="continuous")
    assert r["utility_lost_beyond_random"] == 1.0 and r["harm_removed_beyond_random"] == 0.0
    assert r["value"] == -1.0 and r["verdict"] == V.HOLDS
    assert r["parts"]["utility_cost_faster"]["verdict"] == V.HOLDS
    assert r["parts"]["harm_at_random_rate"]["verdict"] == V.HOLDS
    assert V.exp2_no_selective_removal(ut, ur, h, h)["utility_lost_beyond_random"] == 2.0
    assert V.exp2_no_selective_removal(ut, ur, h, h, harm_scale=0.0)["verdict"] == V.INCONCLUSIVE


def test_exp1_rise_together_on_continuous_scores():
    from weightspace import verdicts as V

    # - NLL rises from -3 to -1 and - refusal logit from -2 to 1 for every item: both rise
    r = V.exp1_rise_together([-3.0] * 4, [-1.0] * 4, [-2.0] * 5, [1.0] * 5, scores="continuous")
    assert r["verdict"] == V.HOLDS and r["value"] == 2.0 and r["scores"] == "continuous"
    r = V.exp1_rise_together([-3.0] * 4, [-1.0] * 4, [1.0] * 5, [-2.0] * 5)  # harm falls
    assert r["verdict"] == V.FAILS and r["harm_rise"] == -3.0
