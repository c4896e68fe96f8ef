"""``steer optimize`` (steering/optimize.py): the optimiser recovers a planted kernel on a synthetic objective
(no model), the Pareto and choice rules on planted rows, and the command end to end on a tiny Llama: files,
the chosen artefact reproducing its trial's scores, resume continuing the same study, and no test prompt ever
seen (checked by prompt hash)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics

import optuna
import pytest
import torch

from steering.kernel import load_kernel_ablation, read_kernel_meta
from steering.optimize import (Candidate, ModelObjective, SearchSpace, TrialScore, choose_trial, cost_to_trial,
                               kl_upper_bound, pareto_front, row_kl_upper, run_study, sampler_seed, trial_rows)
from workbench.argtypes import fraction_range
from workbench.errors import WorkbenchError

# -- the optimiser on a synthetic objective with a planted optimum -----------------------------------------

PLANTED = {"attn_peak": 0.9, "attn_position": 7.3, "attn_floor_frac": 0.2, "attn_width": 3.5,
           "mlp_peak": 0.6, "mlp_position": 4.0, "mlp_floor_frac": 0.5, "mlp_width": 6.0,
           "embed": 0.3, "direction_index": 5.6}


def _synthetic(space: SearchSpace):
    """refusal = squared distance to the planted kernel parameters (each scaled by its search range), KL = 0.02 +
    0.05 x the L1 distance: both lowest at the planted point, so the chosen trial should land next to it."""
    planted = space.candidate(PLANTED)
    target = planted.row()
    ranges = space.ranges()
    scale = {k: (ranges[k][1] - ranges[k][0]) for k in target if k in ranges}
    scale.update({"attn_floor": 1.0, "mlp_floor": 1.0})  # a floor lies in [0, peak] within [0, 1]
    calls = []

    def objective(cand: Candidate) -> tuple[float, float]:
        calls.append(cand)
        row = cand.row()
        z = [(row[k] - target[k]) / s for k, s in scale.items()]
        return sum(x * x for x in z), 0.02 + 0.05 * sum(abs(x) for x in z)

    return planted, target, scale, objective, calls


@pytest.mark.parametrize("seed", [0, 1])
def test_optimiser_recovers_a_planted_kernel_on_a_synthetic_objective(seed):
    """300 trials over the 10 parameters (two kernels, embedding weight, direction index). The tolerance, 20 % of
    each search range, holds for seeds 0..9 (largest error seen: 0.17, seed 1); TPE in ten dimensions gets
    close in a few hundred trials, not exact."""
    space = SearchSpace.for_model(12, index_range=(0.2, 0.9))
    planted, target, scale, objective, calls = _synthetic(space)
    assert len(space.free()) == 10 and len(scale) == 10
    study = run_study(objective, space, n_trials=300, seed=seed)
    rows = trial_rows(study, space)
    assert len(rows) == len(calls) == 300 and [r["number"] for r in rows] == list(range(300))
    chosen = choose_trial(rows, kl_max=0.2, rule="mean")  # a synthetic (refusal, kl) has no per-prompt KL
    assert chosen["within_kl_max"] and chosen["number"] in pareto_front(rows)
    errors = {k: abs(chosen[k] - target[k]) / s for k, s in scale.items()}
    assert max(errors.values()) <= 0.2, errors  # every parameter within 20 % of its search range
    # the search, not luck, found it: far better than the best of the random start-up draws
    assert chosen["refusal_score"] < 0.2 * min(r["refusal_score"] for r in rows[:10])


def test_optimiser_is_deterministic_and_a_continued_study_does_not_replay_its_draws():
    space = SearchSpace.for_model(6, index_range=(0.0, 1.0))
    runs = []
    for _ in range(2):
        objective = _synthetic(space)[3]
        runs.append(trial_rows(run_study(objective, space, n_trials=15, seed=3, n_startup_trials=5), space))
    assert runs[0] == [dict(r, seconds=runs[0][i]["seconds"], objective_seconds=runs[0][i]["objective_seconds"])
                       for i, r in enumerate(runs[1])]  # same parameters and values (wall times differ)
    # continued in the same storage: only the missing trials run, the first ones stay as they were
    storage = optuna.storages.InMemoryStorage()
    objective = _synthetic(space)[3]
    first = trial_rows(run_study(objective, space, n_trials=4, seed=3, n_startup_trials=5, storage=storage), space)
    both = trial_rows(run_study(objective, space, n_trials=7, seed=3, n_startup_trials=5, storage=storage), space)
    assert len(both) == 7 and both[:4] == first
    again = trial_rows(run_study(objective, space, n_trials=7, seed=3, storage=storage), space)
    assert again == both  # nothing missing: nothing runs
    params = [tuple(r[k] for k in ("attn_peak", "mlp_position")) for r in both]
    assert len(set(params)) == 7  # the continued random draws are new ones (seed depends on the trials done)
    assert sampler_seed(3, 0) != sampler_seed(3, 4) and sampler_seed(3, 4) == sampler_seed(3, 4)


# -- the rules, on planted rows ------------------------------------------------------------------------------

def _rows(*pts):
    return [{"number": i, "refusal_score": s, "kl": k} for i, (s, k) in enumerate(pts)]


def test_pareto_front_and_the_mean_choice_rule():
    rows = _rows((1.0, 0.05), (-2.0, 0.30), (0.5, 0.10), (0.7, 0.20), (0.5, 0.10), (-1.0, 0.20))
    assert pareto_front(rows) == {0, 1, 2, 4, 5}  # 3 is beaten by 5; the twins 2 and 4 both stay
    c = choose_trial(rows, kl_max=0.2, rule="mean")
    assert c["number"] == 5 and c["within_kl_max"]  # lowest refusal with KL <= 0.2 (the boundary counts)
    assert math.isnan(c["kl_upper"])  # rows without per-prompt statistics: no bound
    assert choose_trial(rows, kl_max=0.15, rule="mean")["number"] == 2  # tie on both with 4: the earlier trial
    assert choose_trial(_rows((0.5, 0.2), (0.5, 0.1)), kl_max=1, rule="mean")["number"] == 1  # tie: lower KL
    none = choose_trial(rows, kl_max=0.01, rule="mean")
    assert none["number"] == 0 and none["within_kl_max"] is False  # none within: the lowest KL, flagged
    assert "within_kl_max" not in rows[0]  # a copy
    for kl_max in (0.01, 0.1, 0.15, 0.2, 0.3, 1.0):
        assert choose_trial(rows, kl_max, rule="mean")["number"] in pareto_front(rows)
    with pytest.raises(WorkbenchError, match="no completed trials"):
        choose_trial([], 0.2)
    with pytest.raises(WorkbenchError, match="unknown KL rule 'max'; valid rules: upper, mean"):
        choose_trial(rows, 0.2, rule="max")


# t(0.95, 15) = 1.753050355692572: with n = 16 prompts the 0.95 bound is mean + 1.753050 x sd / 4
T95_15 = 1.753050355692572


def _sd_for_bound(mean, bound, n=16, t=T95_15):
    """The per-prompt KL standard deviation that puts the upper bound of ``mean`` (n prompts) at ``bound``."""
    return (bound - mean) * math.sqrt(n) / t


def test_kl_upper_bound_is_the_one_sided_student_t_bound():
    from scipy import stats

    assert stats.t.ppf(0.95, 15) == pytest.approx(T95_15, rel=1e-12)
    assert kl_upper_bound(0.1, 0.04, 16) == pytest.approx(0.1 + T95_15 * 0.01, rel=1e-12)
    assert kl_upper_bound(0.1, 0.04, 16, confidence=0.5) == pytest.approx(0.1)  # the median of t: the mean
    assert kl_upper_bound(0.1, 0.04, 16, 0.99) > kl_upper_bound(0.1, 0.04, 16) > kl_upper_bound(0.1, 0.04, 64)
    assert kl_upper_bound("0.1", "0.04", "16") == kl_upper_bound(0.1, 0.04, 16)  # a CSV row's strings
    for sd, n in ((0.04, 1), (math.nan, 16), (None, 16), ("", ""), (0.04, 0)):
        assert math.isnan(kl_upper_bound(0.1, sd, n))  # unknown: NaN, never a KeyError or a number
    for bad in (0.4, 1.0, 1.5):
        with pytest.raises(WorkbenchError, match=r"confidence level must be in \[0.5, 1\)"):
            kl_upper_bound(0.1, 0.04, 16, bad)


def test_upper_rule_on_planted_rows_on_both_sides_of_the_bound():
    """Trial 1 has the lowest refusal score and a mean KL (0.15) well under kl_max, but a spread that puts its
    upper bound 1e-6 over kl_max: the upper rule passes it by, the mean rule takes it. Trial 2's bound is 1e-6
    under kl_max: the upper rule takes it, although trial 1 beats it on both refusal score and mean KL."""
    rows = [{"number": 0, "refusal_score": 0.0, "kl": 0.02, "kl_sd": 0.01, "kl_n": 16},
            {"number": 1, "refusal_score": -3.0, "kl": 0.15, "kl_sd": _sd_for_bound(0.15, 0.2 + 1e-6), "kl_n": 16},
            {"number": 2, "refusal_score": -2.0, "kl": 0.16, "kl_sd": _sd_for_bound(0.16, 0.2 - 1e-6), "kl_n": 16},
            {"number": 3, "refusal_score": -4.0, "kl": 0.25, "kl_sd": 0.01, "kl_n": 16}]
    assert row_kl_upper(rows[1]) == pytest.approx(0.2 + 1e-6, abs=1e-12)
    assert row_kl_upper(rows[2]) == pytest.approx(0.2 - 1e-6, abs=1e-12)
    up = choose_trial(rows, kl_max=0.2)  # the default rule is "upper"
    assert up["number"] == 2 and up["within_kl_max"] and up["kl_upper"] == pytest.approx(0.2 - 1e-6, abs=1e-12)
    assert up["number"] not in pareto_front(rows)  # dominated by trial 1: the upper rule can leave the front
    mean = choose_trial(rows, kl_max=0.2, rule="mean")
    assert mean["number"] == 1 and mean["kl_upper"] > 0.2  # the old rule: its bound is over kl_max
    # the same rows as a CSV gives them back (strings) choose the same
    as_csv = [{k: ("" if v is None else str(v)) if k != "number" else v for k, v in r.items()} for r in rows]
    assert choose_trial(as_csv, kl_max=0.2)["number"] == 2
    # a higher confidence widens every bound: at 0.99 trial 2 fails too, trial 0 is left
    assert choose_trial(rows, kl_max=0.2, confidence=0.99)["number"] == 0
    # with a looser kl_max trial 1 passes the bound again, and its lower refusal score wins
    assert choose_trial(rows, kl_max=0.2 + 2e-6)["number"] == 1


def test_upper_rule_fallback_when_no_bound_passes():
    rows = [{"number": 0, "refusal_score": 0.0, "kl": 0.10, "kl_sd": 0.4, "kl_n": 16},  # bound 0.275
            {"number": 1, "refusal_score": -1.0, "kl": 0.15, "kl_sd": 0.2, "kl_n": 16},  # bound 0.238: lowest
            {"number": 2, "refusal_score": -2.0, "kl": 0.30, "kl_sd": 0.0, "kl_n": 16}]  # bound 0.300
    c = choose_trial(rows, kl_max=0.2)
    assert c["number"] == 1 and c["within_kl_max"] is False  # the lowest bound, not the lowest mean (trial 0)
    assert choose_trial(rows, kl_max=0.05, rule="mean")["number"] == 0  # the mean rule's fallback: lowest mean


def test_upper_rule_with_trials_of_an_older_study():
    """Rows without kl_sd / kl_n (a study resumed from before they were recorded: trial_rows gives NaN and 0)
    are not eligible under the upper rule, whatever their mean; only the mean rule reads them. A study with no
    statistics at all is refused with a one-line error naming the way out."""
    old = [{"number": 0, "refusal_score": -5.0, "kl": 0.01, "kl_sd": math.nan, "kl_n": 0},
           {"number": 1, "refusal_score": -1.0, "kl": 0.05}]  # a row without the keys at all
    new = [{"number": 2, "refusal_score": -2.0, "kl": 0.10, "kl_sd": 0.05, "kl_n": 16},
           {"number": 3, "refusal_score": -3.0, "kl": 0.30, "kl_sd": 0.05, "kl_n": 16}]
    c = choose_trial(old + new, kl_max=0.2)
    assert c["number"] == 2 and c["within_kl_max"]
    assert choose_trial(old + new, kl_max=0.2, rule="mean")["number"] == 0
    assert choose_trial(old + new[1:], kl_max=0.2)["number"] == 3  # fallback among the bounded trials only
    with pytest.raises(WorkbenchError, match=r"none of the 2 trials records per-prompt KL statistics .*"
                                             r"--kl-rule mean"):
        choose_trial(old, kl_max=0.2)


def test_trial_score_of_per_prompt_values():
    s = TrialScore.of(torch.tensor([1.0, -2.0, 4.0]), torch.tensor([0.1, 0.3, 0.2, 0.6]))
    assert s.refusal_score == pytest.approx(1.0) and s.kl == pytest.approx(0.3) and s.kl_n == 4
    assert s.kl_sd == pytest.approx(statistics.stdev([0.1, 0.3, 0.2, 0.6]))  # ddof 1
    one = TrialScore.of([0.5], [0.2])
    assert one.kl_n == 1 and math.isnan(one.kl_sd)
    with pytest.raises(WorkbenchError, match="at least one"):
        TrialScore.of([], [0.1])


def test_run_study_records_the_per_prompt_statistics_and_reads_old_trials():
    """An objective returning a TrialScore records kl_sd / kl_n as trial user attributes; trials of the same
    study run by an objective that returned (refusal, kl) (the code before) read back as NaN / 0, and the upper
    rule chooses among the new trials only."""
    space = SearchSpace.for_model(4, index_range=None)
    storage = optuna.storages.InMemoryStorage()
    run_study(lambda c: (-c.profile.attn.peak, 0.01), space, n_trials=3, seed=0, storage=storage)  # old: no stats
    rows = trial_rows(run_study(lambda c: TrialScore(-c.profile.attn.peak, 0.1, 0.05, 16), space, n_trials=5, seed=0,
                                storage=storage), space)
    assert [(r["kl_n"], math.isnan(r["kl_sd"])) for r in rows] == [(0, True)] * 3 + [(16, False)] * 2
    assert [r["kl_sd"] for r in rows[3:]] == [0.05, 0.05]
    c = choose_trial(rows, kl_max=0.2)
    assert c["number"] in (3, 4) and c["kl_upper"] == pytest.approx(0.1 + T95_15 * 0.05 / 4)


def test_cost_to_trial_counts_every_call_that_started_before_it():
    rows = [{"number": i, "seconds": 1.0, "model_evaluations": 2} for i in range(6)]
    calls = [{"trials_before": 0, "setup_seconds": 10.0, "setup_evaluations": 3},
             {"trials_before": 4, "setup_seconds": 20.0, "setup_evaluations": 5}]
    assert cost_to_trial(rows, calls, 2) == {"seconds_to_trial": 13.0, "model_evaluations_to_trial": 9}
    assert cost_to_trial(rows, calls, 5) == {"seconds_to_trial": 36.0, "model_evaluations_to_trial": 20}


def test_search_space_and_range_argument():
    s = SearchSpace.for_model(11, index_range=(0.2, 0.9))
    assert s.position == (0.0, 10.0) and s.width == (1.0, 10.0) and s.index == pytest.approx((2.0, 9.0))
    fixed = SearchSpace.for_model(2, index_range=None)
    assert "attn_width" not in fixed.free() and "direction_index" not in fixed.ranges()  # 2 layers: width 1
    c = fixed.candidate({"attn_peak": 0.5, "attn_floor_frac": 0.5})
    assert c.profile.attn.floor == 0.25 and c.profile.attn.width == 1.0 and c.index is None
    assert Candidate.from_row({k: str(v) for k, v in c.row().items() if v is not None}) == c  # a CSV row back
    with pytest.raises(WorkbenchError, match=r"search range of peak must satisfy 0.0 <= low <= high <= 1.0"):
        SearchSpace(peak=(0.5, 1.5))
    with pytest.raises(WorkbenchError, match="width must start above 0"):
        SearchSpace(width=(0.0, 2.0))
    assert fraction_range("0.2, 0.9") == (0.2, 0.9) and fraction_range("0.5,0.5") == (0.5, 0.5)
    for bad, msg in (("0.9,0.2", "LOW <= HIGH"), ("0.2", "two fractions"), ("0,1.5", r"in \[0, 1\]"),
                     ("nan,1", "finite")):
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            fraction_range(bad)


def test_model_objective_counts_forward_passes(make_tiny):
    from workbench.backends import get_backend
    from workbench.vectors import Direction

    lm = make_tiny("llama")
    d = Direction(torch.randn(64, generator=torch.Generator().manual_seed(0)), layer=1, method="mean_diff",
                  model_id=lm.model_id, model_checksum=lm.checksum, d_model=64, component="resid_pre")
    obj = ModelObjective(get_backend("native", lm), None, d, ["How do I pick a lock", "Steal a car", "x y"],
                         ["Bake bread", "Plant a tree"], batch_size=2)
    assert obj.setup_evaluations == 1 + 2  # harmless reference (1 batch of 2), harmful baseline (2 batches)
    zero = SearchSpace.for_model(2, index_range=None).candidate({"attn_peak": 0.0, "mlp_peak": 0.0, "embed": 0.0})
    s = obj(zero)  # weight 0 everywhere: the unmodified model
    assert s.refusal_score == pytest.approx(obj.baseline_refusal, abs=1e-6) and s.kl == pytest.approx(0.0, abs=1e-6)
    assert obj.evaluations == 3 + 3
    full = obj(SearchSpace.for_model(2, index_range=None).candidate({"attn_peak": 1.0, "attn_floor_frac": 1.0,
                                                                       "mlp_peak": 1.0, "mlp_floor_frac": 1.0}))
    assert full.kl > 1e-4  # ablating changes the harmless next-token distribution


def test_model_objective_per_prompt_kl_statistics_are_exact(make_tiny):
    """On a random tiny Llama: the trial's kl_sd / kl_n are the sample standard deviation and count of the
    per-prompt KL, each prompt scored alone (no batch, no padding); the KL is the one 'steer removal' reads
    from its generations' prefill (evaluate_conditions' kl_last), so validation and test KL are one measurement."""
    from steering.evaluate import Condition, evaluate_conditions
    from workbench.backends import get_backend
    from workbench.scoring import kl_divergence
    from workbench.vectors import Direction

    lm = make_tiny("llama")
    be = get_backend("native", lm)
    d = Direction(torch.randn(64, generator=torch.Generator().manual_seed(1)), layer=1, method="mean_diff",
                  model_id=lm.model_id, model_checksum=lm.checksum, d_model=64, component="resid_pre")
    harmless = ["Bake bread", "Plant a tree in the garden", "Write a poem about the sea", "x"]
    obj = ModelObjective(be, None, d, ["Steal a car"], harmless, batch_size=3)
    cand = SearchSpace.for_model(lm.n_layers, index_range=None).candidate(
        {"attn_peak": 0.9, "attn_floor_frac": 0.5, "mlp_peak": 0.7, "embed": 0.3})
    s = obj(cand)
    ivs = obj.ablation(cand).interventions(lm.n_layers)
    alone = [float(kl_divergence(be, [p], interventions=ivs)[0]) for p in harmless]
    assert s.kl_n == 4 and min(alone) > 1e-6 and statistics.stdev(alone) > 1e-4
    assert s.kl == pytest.approx(statistics.fmean(alone), rel=1e-4, abs=1e-7)
    assert s.kl_sd == pytest.approx(statistics.stdev(alone), rel=1e-4, abs=1e-7)
    ev = evaluate_conditions(be, None, [Condition("kernel", ivs)], harmful=["Steal a car"], harmless=harmless,
                             max_new_tokens=2, n_boot=10, progress=False)
    kl_last = [r["kl_last"] for r in ev.per_prompt if r["condition"] == "kernel" and r["set"] == "harmless"]
    assert kl_last == pytest.approx(alone, rel=1e-3, abs=1e-6)


# -- the command on a tiny model ------------------------------------------------------------------------------

def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def cli(empty_cache, monkeypatch):
    """``workbench steer optimize`` in process on a tiny 4-layer Llama; records the hash of every prompt it formats.

    The direction index ranges over layers 1.02 .. 3 (``--index-range 0.34,1``): layer 0's direction at the last
    prompt token is zero (the same template token's embedding for every prompt)."""
    import workbench.loading
    from workbench.chat import ChatFormat
    from workbench.io import sha256_text
    from workbench.loading import from_memory
    from workbench.tiny import build_tiny

    lm = from_memory(*build_tiny("llama", n_layers=4), model_id="tiny-llama-4")
    monkeypatch.setattr(workbench.loading, "load_model", lambda name=None, **kw: lm)
    seen: set[str] = set()
    render = ChatFormat.render

    def recording(self, tokenizer, instruction):
        seen.add(sha256_text(instruction))
        return render(self, tokenizer, instruction)

    monkeypatch.setattr(ChatFormat, "render", recording)

    def run(*args: str) -> int:
        from workbench.cli import main

        return main(["steer", "optimize", "--model", "tiny", "--limit", "4", "--n-val", "3", "--startup-trials", "2",
                     "--confirm", "2", "--max-new-tokens", "3", "--index-range", "0.34,1", *args])

    return {"lm": lm, "seen": seen, "run": run}


def test_cli_optimize_writes_the_study_and_resumes_it(cli, tmp_path, capsys):
    from workbench.backends import get_backend
    from workbench.io import sha256_text
    from workbench.prompts import resolve_prompts
    from workbench.scoring import kl_divergence, refusal_scores

    lm, out = cli["lm"], tmp_path / "opt"
    assert cli["run"]("--n-trials", "3", "--out", str(out)) == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"trials.csv", "pareto.csv", "optimize.json", "chosen_ablation.safetensors", "pareto.png", "study.db",
            "directions.safetensors", "confirm.csv", "confirm_per_prompt.csv", "config.json", "model.json"} <= names
    rows = _csv(out / "trials.csv")
    assert [int(r["number"]) for r in rows] == [0, 1, 2]
    summary = json.loads((out / "optimize.json").read_text())
    chosen = summary["chosen"]
    assert summary["kl_max"] == 0.2 and summary["n_trials"] == 3 and "lowest mean refusal score" in summary["rule"]
    assert summary["kl_rule"] == "upper" and summary["kl_confidence"] == 0.95 and "upper confidence bound" in summary["rule"]
    assert summary["trials_without_kl_statistics"] == 0
    assert all(r["kl_n"] == "3" for r in rows)  # 3 harmless validation prompts per trial
    for r in rows:  # trials.csv carries the bound of every trial, as the rule computes it
        assert float(r["kl_upper"]) == pytest.approx(kl_upper_bound(float(r["kl"]), float(r["kl_sd"]), 3))
    assert chosen["kl_upper"] == pytest.approx(float(rows[chosen["number"]]["kl_upper"]))
    assert choose_trial([{**r, "number": int(r["number"])} for r in rows], 0.2)["number"] == chosen["number"]
    assert [r["number"] for r in _csv(out / "pareto.csv")] == [str(n) for n in summary["pareto_trials"]]
    assert [r["chosen"] for r in rows].count("True") == 1 and rows[chosen["number"]]["chosen"] == "True"
    # model evaluations: KL reference + baseline (one batch each: 3 prompts), then 2 per trial
    assert summary["model_evaluations"] == 2 + 3 * 2 and all(r["model_evaluations"] == "2" for r in rows)
    assert summary["model_evaluations_to_trial"] == 2 + 2 * (chosen["number"] + 1)
    assert summary["seconds_to_trial"] > 0
    # the artefact is the chosen trial: its own scores, recomputed here, are the trial's
    ka = load_kernel_ablation(out / "chosen_ablation.safetensors")
    ka.direction.check_compatible(lm)
    assert read_kernel_meta(out / "chosen_ablation.safetensors")["trial"] == chosen["number"]
    assert ka.direction.meta["direction_index"] == pytest.approx(chosen["direction_index"])
    assert Candidate.from_row(rows[chosen["number"]]).profile == ka.profile
    be = get_backend("native", lm)
    val_h, val_b = resolve_prompts("harmful:val").texts[:3], resolve_prompts("harmless:val").texts[:3]
    ivs = ka.interventions(lm.n_layers)
    assert float(refusal_scores(be, val_h, interventions=ivs).mean()) == pytest.approx(chosen["refusal_score"], abs=1e-5)
    kl = kl_divergence(be, val_b, interventions=ivs)
    assert float(kl.mean()) == pytest.approx(chosen["kl"], abs=1e-5)
    assert float(kl.std()) == pytest.approx(chosen["kl_sd"], rel=1e-4, abs=1e-7)  # torch's std: ddof 1
    assert read_kernel_meta(out / "chosen_ablation.safetensors")["kl_rule"] == "upper"
    confirm = _csv(out / "confirm.csv")
    assert [r["condition"] for r in confirm] == ["unmodified", "optimised ablation"]

    # resume: the same study continues to 5 trials; the first 3 are kept as they were
    assert cli["run"]("--n-trials", "5", "--resume", "--out", str(out)) == 0, capsys.readouterr().err
    rows2 = _csv(out / "trials.csv")
    assert [int(r["number"]) for r in rows2] == [0, 1, 2, 3, 4]
    keep = ("refusal_score", "kl", "attn_peak", "mlp_width", "direction_index")
    assert [[r[k] for k in keep] for r in rows2[:3]] == [[r[k] for k in keep] for r in rows]
    s2 = json.loads((out / "optimize.json").read_text())
    assert s2["n_trials_this_call"] == 2 and len(s2["invocations"]) == 2
    assert s2["model_evaluations"] == 8 + 2 + 2 * 2
    assert not list(tmp_path.glob(".opt.*"))  # no staging folder left

    # the test splits were never formatted (hence never tokenised or run); the validation prompts were
    test_hashes = {sha256_text(t) for t in resolve_prompts("harmful:test").texts + resolve_prompts("harmless:test").texts}
    assert not cli["seen"] & test_hashes
    assert {sha256_text(t) for t in val_h + val_b} <= cli["seen"]


def test_cli_optimize_resume_and_argument_errors(cli, tmp_path, capsys):
    out = tmp_path / "opt"
    assert cli["run"]("--n-trials", "2", "--confirm", "0", "--out", str(out)) == 0
    before = (out / "trials.csv").read_text()
    capsys.readouterr()
    # a resume with other settings is refused before any work; the study is left as it was
    assert cli["run"]("--n-trials", "4", "--confirm", "0", "--resume", "--n-val", "4", "--out", str(out)) == 2
    assert "--resume: --n-val 4 differs from the study's 3" in capsys.readouterr().err
    assert (out / "trials.csv").read_text() == before
    # without --resume an existing study is not overwritten
    assert cli["run"]("--n-trials", "4", "--out", str(out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli["run"]("--resume", "--out", str(tmp_path / "nothing")) == 2
    assert "--resume needs a finished 'steer optimize' run" in capsys.readouterr().err
    assert cli["run"]("--index-range", "0,1", "--out", str(tmp_path / "t")) == 2
    assert "direction of layer(s) [0] is zero" in capsys.readouterr().err
    assert cli["run"]("--positive", "harmful:test", "--out", str(tmp_path / "t")) == 2
    assert "never sees a test split" in capsys.readouterr().err
    assert cli["run"]("--n-val", "1", "--out", str(tmp_path / "t")) == 2  # no spread from one prompt
    assert "--kl-rule upper needs --n-val >= 2" in capsys.readouterr().err
    for args, msg in ((["--n-trials", "0"], "argument --n-trials: expected an integer >= 1"),
                      (["--index-range", "0.9,0.1"], "argument --index-range: expected LOW <= HIGH"),
                      (["--kl-max", "nan"], "argument --kl-max: expected a finite number"),
                      (["--kl-confidence", "1"], "argument --kl-confidence: expected a number in [0.5, 1)"),
                      (["--kl-rule", "max"], "argument --kl-rule: invalid choice: 'max'"),
                      (["--direction", "a", "--directions", "b"], "not allowed with argument")):
        with pytest.raises(SystemExit) as e:
            cli["run"](*args, "--out", str(tmp_path / "x"))
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "t").exists()


def test_cli_optimize_resumes_a_study_from_before_the_kl_statistics(cli, tmp_path, capsys, monkeypatch):
    """A study whose trials lack kl_sd / kl_n (run here by the objective as it was: ``(refusal, kl)``): the upper
    rule refuses it with one line and leaves nothing behind; the mean rule chooses from it; resumed, the new
    trials record the statistics and the upper rule chooses among them, saying how many trials it passed by."""
    import steering.optimize as opt

    real = opt.ModelObjective.__call__
    monkeypatch.setattr(opt.ModelObjective, "__call__", lambda self, c: (real(self, c).refusal_score, real(self, c).kl))
    out = tmp_path / "old"
    assert cli["run"]("--n-trials", "2", "--confirm", "0", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "none of the 2 trials records per-prompt KL statistics" in err.strip().splitlines()[-1]  # after the bars
    assert not out.exists()
    assert cli["run"]("--n-trials", "2", "--confirm", "0", "--kl-rule", "mean", "--out", str(out)) == 0
    assert json.loads((out / "optimize.json").read_text())["trials_without_kl_statistics"] == 2
    monkeypatch.setattr(opt.ModelObjective, "__call__", real)
    capsys.readouterr()
    assert cli["run"]("--n-trials", "4", "--confirm", "0", "--resume", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "2 trial(s) of this study predate per-prompt KL statistics" in printed
    s = json.loads((out / "optimize.json").read_text())
    assert s["kl_rule"] == "upper" and s["trials_without_kl_statistics"] == 2 and s["chosen"]["number"] in (2, 3)
    rows = _csv(out / "trials.csv")
    assert [r["kl_n"] for r in rows] == ["0", "0", "3", "3"] and [r["kl_upper"] for r in rows[:2]] == ["nan", "nan"]


def test_cli_optimize_with_a_fixed_direction(cli, tmp_path, capsys):
    """--direction FILE: the direction is fixed (no index searched) and is the one the artefact carries."""
    from workbench.vectors import Direction, save_directions

    lm = cli["lm"]
    d = Direction(torch.randn(lm.d_model, generator=torch.Generator().manual_seed(5)), layer=2, method="mean_diff",
                  model_id=lm.model_id, model_checksum=lm.checksum, d_model=lm.d_model, component="resid_pre")
    f = save_directions(tmp_path / "dirs" / "d.safetensors", [d])
    out = tmp_path / "fixed"
    assert cli["run"]("--direction", str(f), "--n-trials", "2", "--confirm", "0", "--out", str(out)) == 0, \
        capsys.readouterr().err
    rows = _csv(out / "trials.csv")
    assert len(rows) == 2 and all(r["direction_index"] == "" for r in rows)
    summary = json.loads((out / "optimize.json").read_text())
    assert summary["space"]["index"] is None and summary["chosen"]["direction_index"] is None
    ka = load_kernel_ablation(out / "chosen_ablation.safetensors")
    assert torch.equal(ka.direction.vector, d.vector) and ka.direction.layer == 2


def test_module_doctests():
    import doctest

    import steering.optimize

    res = doctest.testmod(steering.optimize, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 4 and res.failed == 0


@pytest.mark.parametrize("field,bad", [("peak", (0.2, 1.01)), ("floor_frac", (0.0, 1.5)), ("embed", (-0.1, 0.5)),
                                       ("floor_frac", (0.6, 0.4)), ("width", (0.0, 3.0))])
def test_search_space_ranges_outside_their_bounds_are_refused(field, bad):
    """peak, floor fraction and embedding weight are fractions in [0, 1] (low <= high); width starts above 0."""
    with pytest.raises(WorkbenchError, match=field):
        SearchSpace(**{field: bad})
    SearchSpace(**{field: (0.5, 1.0)})  # inside the bounds: accepted


def test_pareto_front_drops_trials_beaten_in_one_objective_and_tied_in_the_other():
    rows = [{"number": 0, "refusal_score": 1.0, "kl": 0.2}, {"number": 1, "refusal_score": 1.0, "kl": 0.3},
            {"number": 2, "refusal_score": 0.5, "kl": 0.3}, {"number": 3, "refusal_score": 2.0, "kl": 0.1}]
    # 1 ties 0 on refusal and has more KL; 2 ties 1 on KL with a lower refusal score: 1 is dominated twice
    assert pareto_front(rows) == {0, 2, 3}
