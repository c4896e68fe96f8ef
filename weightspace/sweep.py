"""Experiments 1 and 2: project updates over the rho grid x {TopK, RandomK, Random} and score each model.

* Experiment 1 (parallel projection): ``W_A + P_k Delta_j`` for ``j`` in {useful, harmful}; utility of the
  projected useful model, harmfulness of the projected harmful model, and the energy kept ``E_k``.
* Experiment 2 (orthogonal filtering): ``W_A + (I - P_k) Delta_contaminated``; utility *and* harmfulness,
  drawn as a trade-off curve against the random controls.

The aligned model is loaded once; each projected model's tensors are built from the streamed checkpoint
tensors and written into it in memory (rounded to the stored dtype first, so the scores are those of the
checkpoint ``weightspace project`` would write). The reference SVD of every tensor is computed once for
the whole grid. The aligned model and every unprojected fine-tune are scored too (reference lines).
Every per-item output is saved under ``evals/<config>/`` (``utility.csv``: one row per task, ``harmful.csv``: one
row per prompt); every metric in ``results.csv`` / ``baselines.csv`` has a 95 % bootstrap interval over the items
(``<metric>_lo``, ``<metric>_hi``; :mod:`weightspace.metrics`), and ``paired.csv`` compares TopK with each
control kind at every rho, paired over the same items (bootstrap interval of the mean per-item difference
TopK - control, verdict higher / lower / no difference). ``E_k`` is the energy of the update written
(after rounding to the stored dtype; the unrounded value is in ``energy_kept_unrounded``, a difference above
1 % is a warning in ``results.json`` and on stderr); per-tensor energies go to ``energy_tensors.csv`` (for
the bootstrap intervals of :mod:`weightspace.verdicts`).

Example::

    >>> SweepConfig(rhos=(0.25, 0.5), kinds=("topk", "random")).experiments({"useful"})
    [('exp1', 'useful', 'parallel', ('utility',))]
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import WorkbenchError
from workbench.runs import RunFolder

from weightspace.checkpoints import Checkpoint
from weightspace.deltas import load_f32, to_stored
from weightspace.evaluation import EvalConfig, EvalSets, InMemoryModel, score_model, scorer_notes
from weightspace.grouping import EnergyTable
from weightspace.metrics import ITEM_METRICS, item_values, paired_difference
from weightspace.plan import Selection, match_checkpoints
from weightspace.projection import (WRITE_DTYPES, ProjectionConfig, projected_tensors, rounding_check,
                                    unique_checkpoints, validate_reference)
from weightspace.reference import Reference
from weightspace.spectral import KINDS, check_grid

__all__ = ["DEFAULT_RHOS", "ROLES", "SweepConfig", "SweepResult", "run_sweep", "paired_topk_vs_controls"]

DEFAULT_RHOS = (0.01, 0.25, 0.5, 0.75, 0.99)
ROLES = ("useful", "harmful", "contaminated")


@dataclass(frozen=True)
class SweepConfig:
    """The grid, the tensors it touches, the evaluation sizes and the seed."""

    rhos: tuple[float, ...] = DEFAULT_RHOS
    kinds: tuple[str, ...] = KINDS
    selection: Selection | None = None
    unselected: str = "finetuned"
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    score_all: bool = False
    write_dtype: str = "stored"  # projected tensors rounded to each tensor's stored dtype, or kept float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "rhos", tuple(check_grid(list(self.rhos), "rho")))
        if self.write_dtype not in WRITE_DTYPES:
            raise WorkbenchError(f"write_dtype must be one of {', '.join(WRITE_DTYPES)}, got {self.write_dtype!r}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise WorkbenchError(f"kinds must be a non-empty subset of {', '.join(KINDS)}, got {list(self.kinds)}")

    def experiments(self, roles: set[str]) -> list[tuple[str, str, str, tuple[str, ...]]]:
        """``(experiment, model role, mode, scores)`` for the fine-tuned models given."""
        both = ("utility", "harm")
        out = []
        if "useful" in roles:
            out.append(("exp1", "useful", "parallel", both if self.score_all else ("utility",)))
        if "harmful" in roles:
            out.append(("exp1", "harmful", "parallel", both if self.score_all else ("harm",)))
        if "contaminated" in roles:
            out.append(("exp2", "contaminated", "orthogonal", both))
        return out

    def describe(self) -> dict[str, Any]:
        return {"rhos": list(self.rhos), "kinds": list(self.kinds), "unselected": self.unselected, "seed": self.seed,
                "selection": self.selection.describe() if self.selection else "all", "score_all": self.score_all,
                "write_dtype": self.write_dtype, "eval": self.eval.describe()}


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    baselines: dict[str, dict[str, float]]
    seconds: float
    paired: list[dict[str, Any]] = field(default_factory=list)


def _progress(items: list, enabled: bool, desc: str, unit: str) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit)


def _save_eval(run: RunFolder, cid: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    for name, rs in rows.items():
        run.write_csv(f"evals/{cid}/{name}.csv", rs)


def paired_topk_vs_controls(points: list[dict[str, Any]], items: dict[str, dict[str, list[dict[str, Any]]]], *,
                            n_boot: int, seed: int) -> list[dict[str, Any]]:
    """TopK vs every other kind at the same (experiment, model, rho), per metric, paired over the same items.

    ``points``: the sweep rows (``config``, ``experiment``, ``model``, ``rho``, ``kind``); ``items``: per config,
    the per-item rows by set (as :func:`weightspace.evaluation.score_model` returns them). ``mean_diff`` and the
    interval are TopK - control on the metric as named (e.g. a higher ``harm_refusal_logit_mean`` = more refusal).
    """
    out: list[dict[str, Any]] = []
    by_key = {(p["experiment"], p["model"], p["rho"], p["kind"]): p for p in points}
    for (exp, model, rho, kind), top in by_key.items():
        if kind != "topk":
            continue
        for other in [k for (e, m, r, k) in by_key if (e, m, r) == (exp, model, rho) and k != "topk"]:
            ctrl = by_key[(exp, model, rho, other)]
            a, b = items.get(top["config"], {}), items.get(ctrl["config"], {})
            for metric, (name, _, _) in ITEM_METRICS.items():
                if not a.get(name) or not b.get(name):
                    continue
                ka = [r.get("id", r.get("prompt")) for r in a[name]]
                kb = [r.get("id", r.get("prompt")) for r in b[name]]
                if ka != kb:
                    raise WorkbenchError(f"{top['config']} and {ctrl['config']} were not scored on the same items")
                va, vb = item_values(a[name], metric), item_values(b[name], metric)
                res = paired_difference(va, vb, n_boot=n_boot, seed=seed)
                ci = res.get("ci") or [None, None]
                out.append({"experiment": exp, "model": model, "rho": rho, "kind_a": "topk", "kind_b": other,
                            "config_a": top["config"], "config_b": ctrl["config"], "metric": metric,
                            "mean_a": sum(va) / len(va), "mean_b": sum(vb) / len(vb),
                            "mean_diff": res.get("mean_diff"), "ci_lo": ci[0], "ci_hi": ci[1], "se": res.get("se"),
                            "n": res.get("n"), "verdict": res["verdict"]})
    return out


def run_sweep(aligned: Checkpoint, reference: Reference, models: dict[str, Checkpoint], cfg: SweepConfig,
              run: RunFolder, *, lm: Any = None, fmt: Any = None, sets: EvalSets | None = None,
              progress: bool = True, check_only: bool = False) -> SweepResult:
    """Run experiments 1/2 for the models given (roles ``useful``, ``harmful``, ``contaminated``).

    ``lm`` is the aligned model loaded once (loaded from ``aligned.folder`` when omitted). With
    ``check_only`` the function returns after validating everything (no model is loaded).
    """
    t0 = time.perf_counter()
    unknown = [r for r in models if r not in ROLES]
    if unknown or not models:
        raise WorkbenchError(f"give at least one of the models {', '.join(ROLES)}; unknown roles: {unknown}")
    cks = unique_checkpoints(("aligned", aligned), *models.items(), *reference.checkpoints().items())
    plan = match_checkpoints(cks)
    tensors = plan.tensors
    validate_reference(reference, plan, plan.select(cfg.selection))
    for kind in cfg.kinds:
        reference.check_kind(kind)
    exps = cfg.experiments(set(models))
    sets = sets or EvalSets.default(cfg.eval)
    if check_only:
        return SweepResult([], {}, 0.0)
    if lm is None:
        from workbench.loading import load_model

        lm = load_model(str(aligned.folder))
    from workbench.backends import get_backend

    backend = get_backend("native", lm)
    state = InMemoryModel(lm, tensors)

    def load_state(ck: Checkpoint) -> None:
        for info in tensors:
            state.set(info.name, to_stored(load_f32(ck, info), info, aligned.dtype(info.name)))

    # Reference state (one SVD per tensor) for every tensor a projection will touch.
    todo = [t for t in plan.select(cfg.selection) if reference.covers(t)]
    prepared = {t.name: reference.prepare(t, kinds=cfg.kinds, max_rho=max(cfg.rhos))
                for t in _progress(todo, progress, "reference SVDs", "tensor")}
    baselines: dict[str, dict[str, float]] = {}
    base_rows = []
    todo_base = [("aligned", aligned, ("utility", "harm"))]
    todo_base += [(f"{role} (full update)", models[role], scores) for _, role, _, scores in exps]
    items: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, ck, scores in todo_base:
        load_state(ck)
        metrics, prompt_rows = score_model(backend, sets, fmt, cfg.eval, utility="utility" in scores,
                                           harm="harm" in scores)
        cid = "baseline-" + name.split(" ")[0]
        items[cid] = prompt_rows
        _save_eval(run, cid, prompt_rows)
        baselines[name] = metrics
        base_rows.append({"config": cid, "model": name, **metrics})
    run.write_csv("baselines.csv", base_rows)

    grid = [(e, role, mode, scores, rho, kind) for e, role, mode, scores in exps
            for rho in (cfg.rhos if reference.uses_rho else (None,)) for kind in cfg.kinds]
    rows: list[dict[str, Any]] = []
    energy_rows: list[dict[str, Any]] = []
    tensor_rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for exp, role, mode, scores, rho, kind in _progress(grid, progress, "sweep", "model"):
        pcfg = ProjectionConfig(mode=mode, rho=rho, kind=kind, selection=cfg.selection, unselected=cfg.unselected,
                                seed=cfg.seed, write_dtype=cfg.write_dtype)
        energy, energy_u = EnergyTable(), EnergyTable()
        cid = f"{exp}-{role}-{kind}" + (f"-rho{rho:g}" if rho is not None else "")
        for info, w, rec in projected_tensors(plan, tensors, aligned, models[role], reference, pcfg, prepared=prepared):
            state.set(info.name, to_stored(w, info, aligned.dtype(info.name) if cfg.write_dtype == "stored"
                                           else w.dtype))  # w: float32
            if rec.selected:
                energy.add(info.role, kept=rec.kept, total=rec.total, expected=rec.energy_random)
                energy_u.add(info.role, kept=rec.kept_unrounded, total=rec.total, expected=rec.energy_random)
                tensor_rows.append({"config": cid, "experiment": exp, "model": role, "mode": mode, "rho": rho,
                                    "kind": kind, "tensor": info.name, "layer": info.role.layer_key,
                                    "module": info.module, "kept": rec.kept, "kept_unrounded": rec.kept_unrounded,
                                    "total": rec.total, "k": rec.k, "d": rec.d})
        metrics, prompt_rows = score_model(backend, sets, fmt, cfg.eval, utility="utility" in scores,
                                           harm="harm" in scores)
        _save_eval(run, cid, prompt_rows)
        items[cid] = prompt_rows
        summ = energy.summary()
        ek_u = energy_u.summary().get("energy_kept")
        warn = rounding_check(summ.get("energy_kept"), ek_u, where=f"{cid}: ")
        if warn:
            warnings.append(warn)
            print(f"[weightspace sweep] warning: {warn}", file=sys.stderr)
        rows.append({"config": cid, "experiment": exp, "model": role, "mode": mode, "rho": rho, "kind": kind,
                     "energy_kept": summ.get("energy_kept"), "energy_random": summ.get("energy_random"),
                     "energy_over_random": summ.get("over_random"), "energy_kept_unrounded": ek_u, **metrics})
        energy_rows += [{"config": cid, **r} for r in energy.all_rows() if r["level"] != "tensor"]
    paired = paired_topk_vs_controls(rows, items, n_boot=cfg.eval.n_boot, seed=cfg.eval.seed)
    run.write_csv("results.csv", rows)
    run.write_csv("paired.csv", paired)
    run.write_csv("energy.csv", energy_rows)
    run.write_csv("energy_tensors.csv", tensor_rows)
    run.write_json("results.json", {"rows": rows, "baselines": baselines,
                                    "scorers": scorer_notes(sets.utility_task), "paired": paired,
                                    "intervals": "95% percentile bootstrap over the items (columns <metric>_lo, "
                                                 f"<metric>_hi; {cfg.eval.n_boot} resamples, seed {cfg.eval.seed}); "
                                                 "paired: TopK - control per item, resampled together; verdict "
                                                 "higher / lower when the interval excludes 0, else no difference",
                                    "warnings": warnings,
                                    "config": cfg.describe(), "reference": reference.describe(),
                                    "eval_sets": sets.describe(),
                                    "plan": {"n_tensors": len(tensors), "skipped": plan.skipped, "notes": plan.notes},
                                    "seconds": round(time.perf_counter() - t0, 2)})
    _plots(run, rows, baselines, reference.uses_rho, sets.utility_task)
    load_state(aligned)  # leave the caller's model as it came
    return SweepResult(rows, baselines, time.perf_counter() - t0, paired)


def _plots(run: RunFolder, rows: list[dict[str, Any]], baselines: dict[str, dict[str, float]], uses_rho: bool,
           utility_task: str = "code") -> None:
    from weightspace import plots

    ulabel = "utility (unit-test pass rate)" if utility_task == "code" else "utility (exact match)"

    exp1 = [r for r in rows if r["experiment"] == "exp1"]
    if exp1 and uses_rho:
        roles = list(dict.fromkeys(r["model"] for r in exp1))
        panels = []
        for role in roles:
            if "utility_accuracy" in next(r for r in exp1 if r["model"] == role):
                panels.append((role, "utility_accuracy", ulabel))
            if "harm_compliance_phrase" in next(r for r in exp1 if r["model"] == role):
                panels.append((role, "harm_compliance_phrase", "harmfulness: compliance (refusal_phrase)"))
                panels.append((role, "harm_refusal_logit_mean", "refusal logit score (refusal_logit)"))
        for role in roles:
            panels.append((role, "energy_kept", "energy kept E_k"))
        refs = {k: v for k, v in baselines.items()}
        run.save_figure("exp1_parallel.png", plots.sweep_curves(exp1, refs, panels,
                                                                "Experiment 1: W_A + P Δ (parallel projection)"))
    exp2 = [r for r in rows if r["experiment"] == "exp2"]
    if exp2:
        refs = {"aligned": baselines.get("aligned", {}),
                "contaminated (full update)": baselines.get("contaminated (full update)", {})}
        run.save_figure("exp2_tradeoff_phrase.png", plots.tradeoff(
            exp2, refs, "utility_accuracy", "harm_compliance_phrase", ulabel,
            "harmfulness: compliance rate (refusal_phrase)", "Experiment 2: W_A + (I − P) Δ_contaminated"))
        run.save_figure("exp2_tradeoff_logit.png", plots.tradeoff(
            exp2, refs, "utility_accuracy", "harm_refusal_logit_mean", ulabel,
            "refusal logit score (refusal_logit; lower = more harmful)",
            "Experiment 2: W_A + (I − P) Δ_contaminated"))
