"""``workbench weightspace chain`` end to end on a tiny in-code model saved as a Hugging Face folder.

One full run (all phases, minimal sizes), then: refusal of an existing folder, ``--resume`` skipping every
finished phase (the fine-tune / overlap / sweep functions are patched to fail if called, report mtimes stay),
and ``--resume`` re-running only the phase whose settings changed or whose result is missing.
"""

from __future__ import annotations

import json
import shutil

import pytest

from workbench import cli as core
from workbench.tiny import build_tiny

from weightspace.chain import MARKER, PHASES, finish_out, folder_of, prepare_out

SMALL = ["--n", "10", "--harmful-share", "0.3", "--batch-size", "4", "--lr", "1e-3", "--gen-tokens", "4",
         "--direction-n", "4", "--etas", "0.5,0.9", "--rhos", "0.25,0.75", "--n-harmful", "2", "--n-tasks", "2",
         "--max-new-tokens", "3", "--task-tokens", "2", "--eval-batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    """One full chain run on a tiny llama saved as an HF folder: ``(argv, out, printed stdout)``."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("chain")
    model, tok = build_tiny("llama")
    d = root / "tiny-aligned"
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    out = root / "chain"
    argv = ["weightspace", "chain", "--model", str(d), "--out", str(out), *SMALL]
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        (root / "cache").mkdir()
        mp.setenv("WORKBENCH_CACHE", str(root / "cache"))
        rc = core.main(argv)
    assert rc == 0, buf.getvalue()[-2000:]
    return argv, out, buf.getvalue()


def _copy(chain_run, tmp_path):
    """A private copy of the finished chain folder (mtimes kept), and the argv pointing at it."""
    argv, out, _ = chain_run
    new = tmp_path / "chain"
    shutil.copytree(out, new)
    return [str(new) if a == str(out) else a for a in argv], new


def _mtimes(out):
    files = [out / folder_of(p) / ("report.json" if p.startswith("finetune-") else MARKER) for p in PHASES]
    return {str(f): f.stat().st_mtime_ns for f in files}


def _fail(*a, **k):
    raise AssertionError("a finished phase was run again")


def test_chain_runs_every_phase_reports_and_resumes(chain_run, tmp_path, empty_cache, monkeypatch, capsys):
    printed = chain_run[2]
    argv, out = _copy(chain_run, tmp_path)
    for p in PHASES:
        assert f"{p} -> " in printed and f"{p}: done in" in printed  # progress per phase

    # -- every phase's output ------------------------------------------------------------------
    for r in ("safety", "useful", "harmful", "contaminated"):
        d = out / f"ft-{r}"
        assert (d / "report.json").is_file() and (d / "model.safetensors").is_file() and (d / "loss.png").is_file()
        assert (d / MARKER).is_file()
    assert (out / "ft-harmful" / "recipe" / "harmful_generations.jsonl").is_file()
    # the useful data are what the sweep measures: code tasks of the codetasks TRAIN split (the sweep: test)
    for r in ("useful", "contaminated"):
        info = json.loads((out / f"ft-{r}" / "report.json").read_text())["recipe_info"]
        assert info["useful_source"] == "code" and info["useful"]["split"] == "codetasks:train"
    ov = out / "overlap"
    for f in ("summary.json", "overlap_tensors.csv", "overlap_groups.csv", "mso_vs_eta.png", "pairs_eta0.5.png",
              "heatmap_useful_vs_harmful_eta0.5.png", "heatmap_safety_vs_harmful_eta0.5.png", MARKER):
        assert (ov / f).is_file(), f
    sw = out / "sweep"
    for f in ("results.json", "results.csv", "baselines.csv", "energy.csv", "exp1_parallel.png",
              "exp2_tradeoff_phrase.png", "exp2_tradeoff_logit.png", MARKER):
        assert (sw / f).is_file(), f
    assert (sw / "evals" / "exp2-contaminated-topk-rho0.25" / "harmful.csv").is_file()
    assert (sw / "evals" / "exp1-useful-random-rho0.75" / "utility.csv").is_file()
    summ = json.loads((ov / "summary.json").read_text())
    assert set(summ["labels"]) == {"safety", "useful", "harmful", "contaminated"} and len(summ["pairs"]) == 6

    # -- the report ----------------------------------------------------------------------------
    rep = json.loads((out / "chain_report.json").read_text())
    phases = rep["timings"]["phases"]
    assert set(PHASES) | {"load_model", "summary"} <= set(phases)
    for p in PHASES:
        assert phases[p]["status"] == "ran" and phases[p]["seconds"] >= 0 and phases[p]["seconds_when_run"] >= 0
    assert rep["timings"]["wall_seconds_this_invocation"] > 0
    cont = json.loads((out / "ft-contaminated" / "report.json").read_text())
    share = rep["real_harmful_share"]
    assert share["n_harmful"] == cont["n_harmful"] == cont["counts"]["harmful"] > 0
    assert share["n_total"] == cont["n_total"] == 10
    assert share["value"] == pytest.approx(cont["n_harmful"] / cont["n_total"])
    assert share["nominal"] == 0.3
    # the contaminated share: the harmful run's refusal direction, replies generated on its own prompt pool
    from weightspace.pools import describe as describe_pools, pool_texts

    h_info = cont["recipe_info"]["harmful"]
    assert h_info["direction"]["source"].startswith("file ")
    assert h_info["direction"]["source"].endswith("ft-harmful/recipe/refusal_direction.safetensors")
    assert h_info["pool"] == "contaminated" and h_info["n_prompts"] == 3
    cont_prompts = {r["prompt"] for r in map(json.loads, (out / "ft-contaminated" / "examples.jsonl").read_text()
                                              .splitlines()) if r["kind"] == "harmful"}
    harm_prompts = {json.loads(x)["prompt"] for x in (out / "ft-harmful" / "examples.jsonl").read_text().splitlines()}
    assert cont_prompts <= set(pool_texts("contaminated")) and harm_prompts <= set(pool_texts("harmful"))
    # every pool's name, size and hash in the chain's config and report
    assert json.loads((out / "chain_config.json").read_text())["pools"] == describe_pools() == rep["pools"]
    assert json.loads((out / "ft-safety" / MARKER).read_text())["config"]["pools"]["safety"]["size"] == 70
    assert rep["format"]["system_prompt"] is None and rep["finetunes"]["safety"]["format"]["chat_template"]
    assert {r["pair"] for r in rep["overlap"]["table"]} == set(summ["pairs"])
    assert all(r["eta"] == 0.5 and r["baseline_pooled"] > 0 for r in rep["overlap"]["table"])
    rows = rep["sweep"]["rows"]
    assert len(rows) == 3 * 2 * 3  # (useful, harmful, contaminated) x 2 rhos x 3 kinds
    assert {r["kind"] for r in rows} == {"topk", "randomk", "random"}
    assert all(r["energy_kept"] is not None for r in rows)
    assert set(rep["findings"]) == {"exp1_topk_vs_random", "exp2_no_selective_removal", "exp3_useful_harmful_overlap"}
    assert all(f["verdict"] and f["statement"] for f in rep["findings"].values())
    # experiment 1's per-rho verdicts, recomputed by hand from the per-prompt CSVs of the sweep
    e1 = rep["findings"]["exp1_topk_vs_random"]
    assert [r["rho"] for r in e1["per_rho"]] == [0.25, 0.75]
    for r in e1["per_rho"]:
        rho = f"rho{r['rho']:g}"
        for key, role, name, column, negate in (("utility", "useful", "utility", "correct", False),
                                                ("compliance", "harmful", "harmful", "refusal_phrase", True),
                                                ("harm_logit", "harmful", "harmful", "refusal_logit", True)):
            want = _paired_by_hand(sw / "evals" / f"exp1-{role}-topk-{rho}" / f"{name}.csv",
                                   sw / "evals" / f"exp1-{role}-random-{rho}" / f"{name}.csv", column, negate)
            got = r[{"utility": "utility_paired", "compliance": "compliance_paired", "harm_logit": "logit_paired"}[key]]
            assert r[key] == got["verdict"] == want["verdict"], (key, rho, got, want)
            assert got["mean_diff"] == pytest.approx(want["mean_diff"], abs=1e-9)
            assert got["se"] == pytest.approx(want["se"], abs=1e-9)
            assert got["ci"] == pytest.approx(want["ci"], abs=1e-9)
    for key, name in (("utility", "utility_topk_vs_random"), ("compliance", "compliance_topk_vs_random")):
        verdicts = [r[key] for r in e1["per_rho"]]
        assert e1[name] == {v: verdicts.count(v) for v in ("higher", "no difference", "lower")}
    assert {"exp1_energy_parity", "exp1_rise_together", "exp1_rise_together_continuous", "exp2_no_selective_removal",
            "exp2_no_selective_removal_continuous"} <= set(rep["verdicts"])
    # every sweep point with its 95 % interval; TopK vs each control paired per item (paired.csv)
    assert (sw / "paired.csv").is_file() and rep["sweep"]["paired"]
    for r in rows:
        for m in ("utility_accuracy", "harm_refusal_logit_mean"):
            if r.get(m) is not None:
                assert r[m + "_lo"] - 1e-12 <= r[m] <= r[m + "_hi"] + 1e-12
    assert rep["sweep"]["eval_sets"]["n_harmful"] == 2 and rep["sweep"]["eval_sets"]["utility_scorer"] == "unit_tests"
    gain = _paired_by_hand(sw / "evals" / "baseline-useful" / "utility.csv",
                           sw / "evals" / "baseline-aligned" / "utility.csv", "correct", False)
    assert e1["useful_gain_paired"]["verdict"] == gain["verdict"]
    assert any(p.endswith("exp2_tradeoff_phrase.png") for p in rep["plots"])
    md = (out / "chain_summary.md").read_text()
    for s in ("## Timings", "Real harmful share", "Experiment 3", "Exp 2, W_A + (I − P) Δ_contaminated",
              "Findings against the study's claims", "stands in for"):
        assert s in md, s

    # -- an existing folder is refused without --resume / --overwrite -------------------------------
    assert core.main(argv) == 2
    assert "already exists" in capsys.readouterr().err

    # -- --resume skips every finished phase ------------------------------------------------------
    import weightspace.finetune as ft_mod
    import weightspace.overlap as ov_mod
    import weightspace.sweep as sw_mod

    before = _mtimes(out)
    monkeypatch.setattr(ft_mod, "finetune", _fail)
    monkeypatch.setattr(ov_mod, "update_overlap", _fail)
    monkeypatch.setattr(sw_mod, "run_sweep", _fail)
    assert core.main([*argv, "--resume"]) == 0
    assert _mtimes(out) == before
    rep2 = json.loads((out / "chain_report.json").read_text())
    for p in PHASES:
        st = rep2["timings"]["phases"][p]
        assert st["status"].startswith("skipped") and st["seconds"] == 0.0
        assert st["seconds_when_run"] == pytest.approx(phases[p]["seconds_when_run"], abs=0.01)
    assert rep2["real_harmful_share"] == share  # the summary is rebuilt from the phase folders

    # -- --resume re-runs only what changed: new rho grid -> only the sweep ------------------------
    monkeypatch.undo()
    monkeypatch.setattr(ft_mod, "finetune", _fail)
    monkeypatch.setattr(ov_mod, "update_overlap", _fail)
    argv2 = [a if a != "0.25,0.75" else "0.5" for a in argv]
    assert core.main([*argv2, "--resume"]) == 0
    after = _mtimes(out)
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {str(out / "sweep" / MARKER)}
    rep3 = json.loads((out / "chain_report.json").read_text())
    assert rep3["timings"]["phases"]["sweep"]["status"] == "ran"
    assert {r["rho"] for r in rep3["sweep"]["rows"]} == {0.5}


def test_resume_reruns_an_unfinished_phase_and_overwrite_replaces(chain_run, tmp_path, empty_cache, monkeypatch):
    import weightspace.finetune as ft_mod

    argv, out = _copy(chain_run, tmp_path)
    (out / "overlap" / MARKER).unlink()  # as if the overlap phase had been interrupted
    before = _mtimes_existing(out)
    monkeypatch.setattr(ft_mod, "finetune", _fail)
    assert core.main([*argv, "--resume"]) == 0
    rep = json.loads((out / "chain_report.json").read_text())
    st = {p: rep["timings"]["phases"][p]["status"] for p in PHASES}
    assert st["overlap"] == "ran" and all(st[p].startswith("skipped") for p in PHASES if p != "overlap")
    assert _mtimes_existing(out)[str(out / "sweep" / MARKER)] == before[str(out / "sweep" / MARKER)]
    with pytest.raises(SystemExit):  # exclusive options
        core.main([*argv, "--resume", "--overwrite"])
    before_files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    o, backup = prepare_out(out, resume=False, overwrite=True)  # the old run moves aside, a fresh one starts
    assert o == out and [p.name for p in out.iterdir()] == ["workbench_run.json"]
    assert backup is not None and sorted(str(p.relative_to(backup)) for p in backup.rglob("*")) == before_files
    finish_out(out, backup, ok=False)  # a run that failed: the previous results come back, nothing lost
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before_files and not backup.exists()
    with pytest.raises(Exception, match="already exists"):
        prepare_out(out, resume=False, overwrite=False)
    decoy = out.parent / "decoy"
    decoy.mkdir()
    (decoy / "important.txt").write_text("keep")
    with pytest.raises(Exception, match="not a workbench run folder"):
        prepare_out(decoy, resume=False, overwrite=True)
    with pytest.raises(Exception, match="not a chain folder"):
        prepare_out(decoy, resume=True, overwrite=False)
    assert (decoy / "important.txt").read_text() == "keep"


def _paired_by_hand(path_a, path_b, column, negate):
    """Mean per-prompt difference a - b (sign flipped when ``negate``), its standard error, the 95 % percentile
    bootstrap interval of the mean difference (2000 resamples of the prompts, numpy seed 0) and the verdict:
    higher / lower when the interval excludes 0, else no difference."""
    import csv
    import math

    import numpy as np

    def read(p):
        with open(p, newline="") as f:
            return [1.0 if v == "True" else 0.0 if v == "False" else float(v)
                    for v in (row[column] for row in csv.DictReader(f))]

    a, b = read(path_a), read(path_b)
    assert len(a) == len(b) > 0
    d = [(y - x) if negate else (x - y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else 0.0
    idx = np.random.default_rng(0).integers(0, n, (2000, n))
    boot = np.asarray(d)[idx].mean(axis=1)
    lo, hi = float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))
    verdict = "higher" if lo > 0 else "lower" if hi < 0 else "no difference"
    return {"mean_diff": mean, "se": se, "ci": [lo, hi], "verdict": verdict}


def _mtimes_existing(out):
    return {str(f): f.stat().st_mtime_ns for f in out.rglob(MARKER)}


def test_study_report_from_the_chain_exp4_and_controls(chain_run, tmp_path, capsys):
    """``weightspace study-report``: the chain's verdicts, Exp 4 on the aligned model and the planted controls in one
    markdown + JSON pair with the keys a reviewer (and docs/study_default_model.json) needs."""
    argv, out, _ = chain_run
    model_dir = argv[argv.index("--model") + 1]
    assert core.main(["overlap", "--model", model_dir, "--n-per-set", "5", "--n-boot", "2", "--etas", "0.5",
                      "--out", str(tmp_path / "exp4")]) == 0
    reading = tmp_path / "reading.md"
    reading.write_text("Hand-written reading: nothing holds on a tiny random model.\n")
    prefix = tmp_path / "docs" / "study_tiny"
    rc = core.main(["weightspace", "study-report", "--chain", str(out), "--exp4", f"aligned={tmp_path / 'exp4'}",
                    "--reading", str(reading), "--command", "workbench weightspace chain ...",
                    "--images", str(tmp_path / "docs" / "img"), "--out", str(prefix)])
    assert rc == 0, capsys.readouterr().err
    j = json.loads(prefix.with_suffix(".json").read_text())
    rep = json.loads((out / "chain_report.json").read_text())
    assert j["aligned_utility"] == rep["sweep"]["baselines"]["aligned"]["utility_accuracy"]
    assert j["n_harm_prompts"] == 2 and j["n_utility_tasks"] == 2  # SMALL: --n-harmful 2, --n-tasks 2
    assert (j["controls"]["planted_distinct"], j["controls"]["planted_entangled"]) == ("distinct", "entangled")
    for key in ("exp1_energy_parity", "exp1_rise_together", "exp2_no_selective_removal", "exp3_overlap",
                "exp4_activation_overlap[aligned]"):
        v = j["verdicts"][key]
        assert set(v) == {"claim", "statistic", "value", "ci", "rule", "verdict"}, key
        assert v["verdict"] in ("holds", "does not hold", "inconclusive"), key
    for key, v in rep["verdicts"].items():  # every chain verdict is carried unchanged
        assert j["verdicts"][key]["verdict"] == v["verdict"] and j["verdicts"][key]["value"] == v["value"]
    s = json.loads((tmp_path / "exp4" / "overlap_summary.json").read_text())
    assert j["verdicts"]["exp4_activation_overlap[aligned]"]["value"] == \
        s["protocols"]["study"]["exp4"]["slice"]["verdict"]["value"]
    assert sum(len(v) for v in j["verdict_counts"].values()) == len(j["verdicts"])
    md = prefix.with_suffix(".md").read_text()
    for text in ("## Verdicts", "Hand-written reading", "planted_distinct", "## Experiment 4",
                 "workbench weightspace chain ...", "exp4_activation_overlap[aligned]"):
        assert text in md, text
    assert (tmp_path / "docs" / "img" / "exp4_overlap_protocols.png").is_file()
    assert "](img/exp4_overlap_protocols.png)" in md
    # bad input: a chain folder without its report, a malformed --exp4
    assert core.main(["weightspace", "study-report", "--chain", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no chain_report.json" in capsys.readouterr().err
    assert core.main(["weightspace", "study-report", "--chain", str(out), "--exp4", "nolabel",
                      "--out", str(tmp_path / "x")]) == 2
    assert "LABEL=FOLDER" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_resume_reuses_the_scores_of_an_interrupted_sweep(chain_run, tmp_path, empty_cache, monkeypatch):
    """A sweep killed part-way leaves its staging folder; ``--resume`` scores only the models it had not finished
    (complete per-item files of the same settings), recomputes the rest from those rows, and the results equal an
    uninterrupted run's. A staging folder of other settings is not used."""
    import weightspace.sweep as sw_mod

    argv, out = _copy(chain_run, tmp_path)
    done = json.loads((out / "sweep" / "results.json").read_text())
    staged = out / ".sweep.tmp-999-killed"
    shutil.copytree(out / "sweep", staged)
    shutil.rmtree(out / "sweep")
    evals = sorted(p.name for p in (staged / "evals").iterdir())
    keep = evals[: len(evals) // 2]
    for cid in evals[len(evals) // 2:]:
        shutil.rmtree(staged / "evals" / cid)  # never scored before the kill
    both = next(c for c in keep if (staged / "evals" / c / "utility.csv").exists()
                and (staged / "evals" / c / "harmful.csv").exists())
    (staged / "evals" / both / "harmful.csv").unlink()  # killed between a model's two files: scored again
    other = out / ".sweep.tmp-998-other"  # same layout, other settings: must not be used
    shutil.copytree(staged, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["eval"]["n_harmful"] = 99
    (other / "config.json").write_text(json.dumps(cfg))
    scored = []
    real = sw_mod.score_model
    monkeypatch.setattr(sw_mod, "score_model", lambda *a, **k: scored.append(1) or real(*a, **k))
    assert core.main([*argv, "--resume"]) == 0
    assert len(scored) == len(evals) - len(keep) + 1
    new = json.loads((out / "sweep" / "results.json").read_text())
    assert new["rows"] == done["rows"] and new["baselines"] == done["baselines"] and new["paired"] == done["paired"]
    assert not staged.exists() and not other.exists()  # used up / stale staging folders are removed
    for cid in evals:
        for f in (out / "sweep" / "evals" / cid).glob("*.csv"):
            assert f.read_text() == (chain_run[1] / "sweep" / "evals" / cid / f.name).read_text()


def test_stand_in_reruns_exp3_with_a_lora_safety_update(chain_run, tmp_path, capsys):
    """``weightspace stand-in``: a LoRA safety fine-tune on the chain's safety pool, the chain's overlap phase with it
    as ``safety`` (the chain's full fine-tune as ``safety-full``) and the same Exp 3 rule."""
    import csv

    from weightspace import verdicts as V

    _, out, _ = chain_run
    si = tmp_path / "si"
    rc = core.main(["weightspace", "stand-in", "--chain", str(out), "--out", str(si), "--lora-rank", "2",
                    "--evaluate", "harm", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((si / "stand_in.json").read_text())
    ft = json.loads((si / "ft-safety" / "report.json").read_text())
    chain_ft = json.loads((out / "ft-safety" / "report.json").read_text())
    assert ft["method"] == "lora" and ft["checkpoint"]["lora"] is not None
    assert ft["train_data_hash"] == chain_ft["train_data_hash"]  # the same safety examples, another method
    rows = list(csv.DictReader(open(si / "overlap" / "overlap_tensors.csv", newline="", encoding="utf-8")))
    chain_rows = {(r["tensor"], r["pair"], r["eta"]): r
                  for r in csv.DictReader(open(out / "overlap" / "overlap_tensors.csv", newline="", encoding="utf-8"))}
    # pairs that do not involve the new stand-in are the chain's own numbers (same checkpoints, same bases)
    same = [r for r in rows if r["pair"] in ("useful~harmful", "useful~contaminated", "harmful~contaminated")]
    assert same and all(abs(float(r["mso"]) - float(chain_rows[(r["tensor"], r["pair"], r["eta"])]["mso"])) < 1e-9
                        for r in same)
    # the full fine-tune, relabelled, against the chain's safety rows
    full = [r for r in rows if r["pair"] == "harmful~safety-full"]
    assert full and all(abs(float(r["mso"]) - float(chain_rows[(r["tensor"], "safety~harmful", r["eta"])]["mso"]))
                        < 1e-9 for r in full)
    # a merged rank-2 LoRA update has rank <= 2: every basis of the stand-in has k <= 2
    ks = [int(r["k_a"]) for r in rows if r["pair"].startswith("safety~")]
    assert ks and max(ks) <= 2
    # the verdict is the Exp 3 rule on the stand-in's rows at the chain's plot eta
    eta = res["eta"]
    per = {p: {r["tensor"]: (float(r["mso"]), float(r["baseline"])) for r in rows
               if r["pair"] == p and abs(float(r["eta"]) - eta) < 1e-12} for p in ("useful~harmful", "safety~harmful")}
    names = [n for n in per["useful~harmful"] if n in per["safety~harmful"]]
    want = V.exp3_overlap({"mso": [per["useful~harmful"][n][0] for n in names],
                           "baseline": [per["useful~harmful"][n][1] for n in names]},
                          {"mso": [per["safety~harmful"][n][0] for n in names],
                           "baseline": [per["safety~harmful"][n][1] for n in names]})
    assert res["exp3"]["value"] == pytest.approx(want["value"], abs=1e-12)
    chain_v = json.loads((out / "chain_report.json").read_text())["verdicts"]["exp3_overlap"]
    assert res["chain_exp3"]["value"] == pytest.approx(chain_v["value"], abs=1e-12)
    assert res["agreement"]["verdict"] in ("entangled", "distinct", "inconclusive")
    assert set(res["scores"]) == {"safety", "safety-full"} and "harm_refusal_logit_mean" in res["scores"]["safety"]
    assert (si / "evals" / "safety" / "harmful.csv").is_file()
    # the study report carries the stand-in's verdict under its own key, and its tables
    prefix = tmp_path / "rep"
    assert core.main(["weightspace", "study-report", "--chain", str(out), "--stand-in", str(si), "--controls",
                      str(_controls(tmp_path)), "--out", str(prefix)]) == 0
    j = json.loads(prefix.with_suffix(".json").read_text())
    assert j["verdicts"]["exp3_overlap[lora stand-in]"]["value"] == res["exp3"]["value"]
    assert j["verdicts"]["exp3_overlap"]["value"] == res["chain_exp3"]["value"]
    md = prefix.with_suffix(".md").read_text()
    assert "## A second stand-in" in md and "safety (lora stand-in)" in md
    assert core.main(["weightspace", "study-report", "--chain", str(out), "--stand-in", str(tmp_path), "--controls",
                      str(_controls(tmp_path)), "--out", str(tmp_path / "bad")]) == 2
    assert "no stand_in.json" in capsys.readouterr().err
    # bad input: not a chain folder; a stand-in that repeats the chain's own fine-tune
    assert core.main(["weightspace", "stand-in", "--chain", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a chain folder" in capsys.readouterr().err
    assert core.main(["weightspace", "stand-in", "--chain", str(out), "--out", str(tmp_path / "y"), "--method", "full",
                      "--lr", "1e-3", "--evaluate", "none", "--no-progress"]) == 2
    assert "repeat the chain's own" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_sensitivity_slices_agree_with_the_chain_verdicts(chain_run, tmp_path, capsys):
    """``weightspace sensitivity``: at the chain's own settings every slice reproduces the chain's verdict; the
    per-module differences add up (weighted by tensor counts) to the overall one; a CLI run writes its files."""
    _, out, _ = chain_run
    rep = json.loads((out / "chain_report.json").read_text())
    rc = core.main(["weightspace", "sensitivity", "--chain", str(out), "--out", str(tmp_path / "sens"),
                    "--n-boot", "200"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "sens" / "sensitivity.json").read_text())
    v3 = rep["verdicts"]["exp3_overlap"]
    at = {r["eta"]: r for r in res["exp3_by_eta"]}
    assert set(at) == {0.5, 0.9}  # SMALL: --etas 0.5,0.9
    assert at[0.5]["value"] == pytest.approx(v3["value"], abs=1e-12)
    assert res["exp3_by_aggregation"][0]["value"] == pytest.approx(v3["value"], abs=1e-12)
    mods = res["exp3_by_module"]
    n = sum(m["n_tensors"] for m in mods)
    assert n == v3["n_tensors"]
    assert sum(m["difference"] * m["n_tensors"] for m in mods) / n == pytest.approx(v3["value"], abs=1e-12)
    assert res["exp1_energy_parity_by_rho"] == rep["verdicts"]["exp1_energy_parity"]["per_rho"]
    assert [r["rho"] for r in res["exp2_by_rho"]] == [0.25, 0.75]
    for f in ("exp3_by_eta.csv", "exp3_by_module.csv", "exp3_by_layer.csv", "exp2_by_rho.csv", "sensitivity.png"):
        assert (tmp_path / "sens" / f).is_file(), f
    assert core.main(["weightspace", "sensitivity", "--chain", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a chain folder" in capsys.readouterr().err
    prefix = tmp_path / "docs" / "rep"
    assert core.main(["weightspace", "study-report", "--chain", str(out), "--sensitivity", str(tmp_path / "sens"),
                      "--controls", str(_controls(tmp_path)), "--images", str(tmp_path / "docs" / "img"),
                      "--out", str(prefix)]) == 0
    md = prefix.with_suffix(".md").read_text()
    assert "## Sensitivity" in md and "**Exp 3 at every eta**" in md and "**Exp 2 at each rho**" in md
    assert (tmp_path / "docs" / "img" / "sens_sensitivity.png").is_file()
    assert json.loads(prefix.with_suffix(".json").read_text())["sensitivity"]["exp3_by_eta"] == res["exp3_by_eta"]


def _controls(tmp_path):
    """A controls folder made once per test (the noise-free planted controls are fast)."""
    folder = tmp_path / "controls"
    if not (folder / "controls.json").is_file():
        assert core.main(["weightspace", "controls", "--out", str(folder), "--noise", "0"]) == 0
    return folder
