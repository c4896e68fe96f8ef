"""Experiments 1 and 2: project updates over the rho grid x {TopK, RandomK, Random} and score each model.

* Experiment 1 (parallel projection): ``W_A + P_k Delta_j`` for ``j`` in {useful, harmful}; utility of the
  projected useful model, harmfulness of the projected harmful model, and the energy kept ``E_k``.
* Experiment 2 (orthogonal filtering): ``W_A + (I - P_k) Delta_contaminated``; utility *and* harmfulness,
  drawn as a trade-off curve against the random controls.

The aligned model is loaded once; each projected model's tensors are built from the streamed checkpoint
tensors and written into it in memory (rounded to the stored dtype first, so the scores are those of the
checkpoint ``weightspace project`` would write). The reference SVD of every tensor is computed once for
the whole sweep and kept on disk (:class:`weightspace.basis_cache.BasisCache`, a hidden folder inside the run's
staging folder, deleted at the end), not in memory: each projection reads one tensor's basis at a time, so the
sweep's memory beyond the model scored is about the largest tensor's working set, not the model's size. The
aligned model and every unprojected fine-tune are scored too (reference lines).
Every per-item output is saved under ``evals/<config>/`` (``utility.csv``: one row per task, ``harmful.csv``: one
row per prompt); every metric in ``results.csv`` / ``baselines.csv`` has a 95 % bootstrap interval over the items
(``<metric>_lo``, ``<metric>_hi``; :mod:`weightspace.metrics`), and ``paired.csv`` compares TopK with each
control kind at every rho, paired over the same items (bootstrap interval of the mean per-item difference
TopK - control, verdict higher / lower / no difference). ``E_k`` is the energy of the update written
(after rounding to the stored dtype; the unrounded value is in ``energy_kept_unrounded``, a difference above
1 % is a warning in ``results.json`` and on stderr); per-tensor energies go to ``energy_tensors.csv`` (for
the bootstrap intervals of :mod:`weightspace.verdicts`).

Each model scored is one :class:`SweepTask` of an executor (:mod:`workbench.executors`): ``local`` runs them
in this process in order, on the model the caller loaded, exactly as before; ``ray`` hands them to workers
that each load the aligned model once (:class:`SweepWorker`) and read the bases this process computed (a worker
that cannot see the folder computes each tensor's basis when it needs it). Either way only this process writes
the run folder, and the rows are the same.

Example::

    >>> SweepConfig(rhos=(0.25, 0.5), kinds=("topk", "random")).experiments({"useful"})
    [('exp1', 'useful', 'parallel', ('utility',))]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError
from workbench.runs import RunFolder

from weightspace.basis_cache import FOLDER_PREFIX, BasisCache
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

__all__ = ["DEFAULT_RHOS", "ROLES", "SweepConfig", "SweepResult", "SweepTask", "SweepTaskResult", "SweepWorker",
           "SweepWorkerSpec", "project_task", "sweep_bases", "sweep_tasks", "run_sweep", "paired_topk_vs_controls"]

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


SET_OF_SCORE = {"utility": "utility", "harm": "harmful"}  # task.scores -> the per-item file under evals/<config>/


def load_evals(folder: str | Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The per-item rows an (interrupted) sweep folder holds: ``{config: {set: rows}}`` from ``evals/*/*.csv``
    (values as the CSV strings; :mod:`weightspace.metrics` parses them)."""
    import csv

    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    ev = Path(folder) / "evals"
    if not ev.is_dir():
        return out
    for d in sorted(p for p in ev.iterdir() if p.is_dir()):
        for f in sorted(d.glob("*.csv")):
            with open(f, newline="", encoding="utf-8") as fh:
                out.setdefault(d.name, {})[f.stem] = list(csv.DictReader(fh))
    return out


def reusable(task: "SweepTask", rows: dict[str, list[dict[str, Any]]] | None, sets: EvalSets) -> bool:
    """Whether an interrupted run's rows for ``task`` are complete: every set the task scores, with one row per
    item of the current evaluation sets, in the same order (prompts / task ids compared)."""
    if not rows or set(rows) != {SET_OF_SCORE[s] for s in task.scores}:
        return False
    if "harmful" in rows and [r.get("prompt") for r in rows["harmful"]] != list(sets.harmful):
        return False
    if "utility" in rows and [r.get("id") for r in rows["utility"]] != [t.id for t in sets.tasks]:
        return False
    return True


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


@dataclass(frozen=True)
class SweepTask:
    """One model to score: a baseline (``experiment`` None: a checkpoint as it is) or a grid point (the
    ``role``'s update projected with ``mode`` / ``rho`` / ``kind``). Small and picklable: an executor task."""

    config: str  # the config id: results.csv's ``config`` and the folder under evals/
    role: str  # "aligned" or a model role (useful, harmful, contaminated)
    scores: tuple[str, ...]  # "utility" and / or "harm"
    name: str | None = None  # baselines: the name in baselines.csv / results.json
    experiment: str | None = None
    mode: str | None = None
    rho: float | None = None
    kind: str | None = None
    # per-item rows of this model already scored by an interrupted run of the same sweep (``run_sweep(reuse=)``):
    # the projection (energies) is recomputed, the scoring is not
    reuse: Any = field(default=None, compare=False, repr=False)


@dataclass
class SweepTaskResult:
    """What one scored model sends back to the driver: metrics, per-item rows and (grid points) energies."""

    metrics: dict[str, float]
    items: dict[str, list[dict[str, Any]]]
    energy: dict[str, Any] = field(default_factory=dict)  # EnergyTable.summary() of the written update
    energy_kept_unrounded: float | None = None
    energy_rows: list[dict[str, Any]] = field(default_factory=list)  # layer / module / model levels
    tensor_rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class SweepWorkerSpec:
    """What a worker on another process or machine needs to rebuild the sweep's state: checkpoint paths (the
    :class:`Checkpoint` objects hold paths and headers only), the reference, the configs, the evaluation items,
    how to load the aligned model and the folder of the reference bases (:class:`BasisCache`)."""

    aligned: Checkpoint
    reference: Reference
    models: dict[str, Checkpoint]
    cfg: "SweepConfig"
    sets: EvalSets
    fmt: Any
    model: Any  # workbench.executors.ModelSpec
    bases: str | None = None  # the driver's BasisCache folder (None or absent here: computed when needed)


def sweep_bases(folder: str | Path | None, reference: Reference, plan: Any, cfg: "SweepConfig") -> BasisCache:
    """The reference bases of every tensor a sweep projects (selected and covered), prepared for all its kinds
    and its largest rho, kept in ``folder`` (:class:`BasisCache`)."""
    todo = [t for t in plan.select(cfg.selection) if reference.covers(t)]
    return BasisCache(folder, reference, todo, kinds=cfg.kinds, max_rho=max(cfg.rhos))


class SweepWorker:
    """The aligned model loaded once, its tensors swapped in place for every model scored, and the reference
    bases of every tensor a projection touches, read one tensor at a time from ``bases`` (a :class:`BasisCache`
    folder, filled as the tensors are first used where :func:`run_sweep` has not; None, or a folder this
    machine cannot see: each basis computed when it is needed)."""

    def __init__(self, aligned: Checkpoint, reference: Reference, models: dict[str, Checkpoint], cfg: "SweepConfig",
                 sets: EvalSets, fmt: Any, lm: Any, *, bases: str | Path | None = None) -> None:
        from workbench.backends import get_backend

        self.aligned, self.reference, self.models, self.cfg, self.sets, self.fmt = \
            aligned, reference, models, cfg, sets, fmt
        cks = unique_checkpoints(("aligned", aligned), *models.items(), *reference.checkpoints().items())
        self.plan = match_checkpoints(cks)
        self.tensors = self.plan.tensors
        self.backend = get_backend("native", lm)
        self.state = InMemoryModel(lm, self.tensors)
        self.bases = sweep_bases(bases, reference, self.plan, cfg)

    @classmethod
    def from_spec(cls, spec: SweepWorkerSpec) -> "SweepWorker":
        """Load the model from ``spec.model`` (on a worker) and build the state."""
        return cls(spec.aligned, spec.reference, spec.models, spec.cfg, spec.sets, spec.fmt, spec.model.load(),
                   bases=spec.bases)

    def load_state(self, ck: Checkpoint) -> None:
        for info in self.tensors:
            self.state.set(info.name, to_stored(load_f32(ck, info), info, self.aligned.dtype(info.name)))

    def run(self, task: SweepTask) -> SweepTaskResult:
        """Write the task's model into the loaded one (every tensor of the plan) and score it."""
        cfg = self.cfg
        if task.experiment is None:
            out = SweepTaskResult({}, {})
            self.load_state(self.aligned if task.role == "aligned" else self.models[task.role])
        else:
            out = project_task(task, cfg, self.plan, self.aligned, self.models[task.role], self.reference,
                               self.bases, lambda info, w: self.state.set(info.name, w))
        if task.reuse is not None:  # scored before the interruption: the same items, the same interval draws
            from weightspace.metrics import metrics_with_ci

            out.items = task.reuse
            out.metrics = metrics_with_ci(task.reuse, n_boot=cfg.eval.n_boot, seed=cfg.eval.seed)
        else:
            out.metrics, out.items = score_model(self.backend, self.sets, self.fmt, cfg.eval,
                                                 utility="utility" in task.scores, harm="harm" in task.scores)
        return out


def project_task(task: SweepTask, cfg: SweepConfig, plan: Any, aligned: Checkpoint, finetuned: Checkpoint,
                 reference: Reference, bases: Any, write: Callable[[Any, Any], None]) -> SweepTaskResult:
    """The projected model of a grid point, tensor by tensor: ``write(info, w)`` gets each tensor as the loaded
    model stores it (stored layout, rounded to the stored dtype, or float32 with ``write_dtype="float32"``);
    returns the energies of what was written (no scores yet). ``bases``: :func:`sweep_bases`' cache."""
    pcfg = ProjectionConfig(mode=task.mode, rho=task.rho, kind=task.kind, selection=cfg.selection,
                            unselected=cfg.unselected, seed=cfg.seed, write_dtype=cfg.write_dtype)
    out = SweepTaskResult({}, {})
    energy, energy_u = EnergyTable(), EnergyTable()
    for info, w, rec in projected_tensors(plan, plan.tensors, aligned, finetuned, reference, pcfg, prepared=bases):
        write(info, to_stored(w, info, aligned.dtype(info.name) if cfg.write_dtype == "stored" else w.dtype))
        del w  # w: float32
        if rec.selected:
            energy.add(info.role, kept=rec.kept, total=rec.total, expected=rec.energy_random)
            energy_u.add(info.role, kept=rec.kept_unrounded, total=rec.total, expected=rec.energy_random)
            out.tensor_rows.append({"config": task.config, "experiment": task.experiment, "model": task.role,
                                    "mode": task.mode, "rho": task.rho, "kind": task.kind, "tensor": info.name,
                                    "layer": info.role.layer_key, "module": info.module, "kept": rec.kept,
                                    "kept_unrounded": rec.kept_unrounded, "total": rec.total, "k": rec.k,
                                    "d": rec.d})
    out.energy = energy.summary()
    out.energy_kept_unrounded = energy_u.summary().get("energy_kept")
    out.energy_rows = [{"config": task.config, **r} for r in energy.all_rows() if r["level"] != "tensor"]
    return out


def _run_task(worker: SweepWorker, task: SweepTask) -> SweepTaskResult:
    """The executor's task function (module level, so a Ray worker finds it by name)."""
    return worker.run(task)


def sweep_tasks(cfg: SweepConfig, roles: set[str], uses_rho: bool = True) -> list[SweepTask]:
    """Every model a sweep scores, in the order of the files: the baselines (aligned, then each fine-tune with
    its full update), then the grid (experiment x rho x kind).

    Example::

        >>> [t.config for t in sweep_tasks(SweepConfig(rhos=(0.5,), kinds=("topk",)), {"useful"})]
        ['baseline-aligned', 'baseline-useful', 'exp1-useful-topk-rho0.5']
    """
    exps = cfg.experiments(roles)
    out = [SweepTask("baseline-aligned", "aligned", ("utility", "harm"), name="aligned")]
    for _, role, _, scores in exps:
        name = f"{role} (full update)"
        out.append(SweepTask("baseline-" + name.split(" ")[0], role, scores, name=name))
    for e, role, mode, scores in exps:
        for rho in (cfg.rhos if uses_rho else (None,)):
            for kind in cfg.kinds:
                cid = f"{e}-{role}-{kind}" + (f"-rho{rho:g}" if rho is not None else "")
                out.append(SweepTask(cid, role, scores, experiment=e, mode=mode, rho=rho, kind=kind))
    return out


def run_sweep(aligned: Checkpoint, reference: Reference, models: dict[str, Checkpoint], cfg: SweepConfig,
              run: RunFolder, *, lm: Any = None, fmt: Any = None, sets: EvalSets | None = None,
              progress: bool = True, check_only: bool = False, executor: Any = None,
              model: Any = None, reuse: dict[str, dict[str, list[dict[str, Any]]]] | None = None) -> SweepResult:
    """Run experiments 1/2 for the models given (roles ``useful``, ``harmful``, ``contaminated``).

    ``lm`` is the aligned model loaded once (loaded from ``aligned.folder`` when omitted). With
    ``check_only`` the function returns after validating everything (no model is loaded).

    ``executor`` (:mod:`workbench.executors`; default local): where the models are scored, one task per
    model (:func:`sweep_tasks`). Locally the task runs on ``lm`` in this process, exactly as before; on Ray each
    worker loads the aligned model once from ``model`` (a :class:`workbench.executors.ModelSpec`; default:
    ``aligned``'s folder, checked against ``lm``'s checksum when given). Either way this process computes the
    reference SVDs first, once, into a hidden folder of ``run``'s staging folder (removed before returning;
    :class:`BasisCache`), the workers read them from there, this process alone writes ``run``, and the rows are
    the same.

    ``reuse`` (:func:`load_evals` of an interrupted run of the SAME sweep: the caller checks that its settings
    and inputs are unchanged): models whose per-item rows are complete there (:func:`reusable`) are not scored
    again; their projections are recomputed (energies) and their metrics recomputed from those rows, so the
    results equal an uninterrupted run's.
    """
    from workbench.executors import LocalExecutor, ModelSpec

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
    sets = sets or EvalSets.default(cfg.eval)
    if check_only:
        return SweepResult([], {}, 0.0)
    executor = executor or LocalExecutor()
    built: list[SweepWorker] = []
    folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=run.path)  # removed below, whatever happens
    if executor.in_process:
        if lm is None:
            from workbench.loading import load_model

            lm = load_model(str(aligned.folder))

        def init() -> SweepWorker:
            built.append(SweepWorker(aligned, reference, models, cfg, sets, fmt, lm, bases=folder))
            return built[-1]
    else:
        if model is None:
            model = ModelSpec(str(aligned.folder), checksum=getattr(lm, "checksum", None))
        init = partial(SweepWorker.from_spec,
                       SweepWorkerSpec(aligned, reference, models, cfg, sets, fmt, model, bases=folder))

    tasks = sweep_tasks(cfg, set(models), reference.uses_rho)
    if reuse:
        from dataclasses import replace

        tasks = [replace(t, reuse=reuse[t.config]) if reusable(t, reuse.get(t.config), sets) else t for t in tasks]
        n_re = sum(t.reuse is not None for t in tasks)
        if progress or n_re:
            print(f"[weightspace sweep] reusing the scores of {n_re} of {len(tasks)} models from an interrupted run",
                  file=sys.stderr)

    def save(i: int, res: SweepTaskResult) -> None:  # each model's items as soon as it is scored
        _save_eval(run, tasks[i].config, res.items)

    try:
        sweep_bases(folder, reference, plan, cfg).fill(partial(_progress, enabled=progress, desc="reference SVDs",
                                                               unit="tensor"))
        with executor.pool(init) as pool:
            results = pool.map(_run_task, tasks, progress=progress, desc="sweep", on_result=save)
            worker_stats = pool.stats()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        for w in built:
            w.load_state(aligned)  # leave the caller's model as it came

    baselines: dict[str, dict[str, float]] = {}
    base_rows = []
    items: dict[str, dict[str, list[dict[str, Any]]]] = {}
    rows: list[dict[str, Any]] = []
    energy_rows: list[dict[str, Any]] = []
    tensor_rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for task, res in zip(tasks, results):
        cid, metrics = task.config, res.metrics
        items[cid] = res.items
        if task.experiment is None:
            baselines[task.name] = metrics
            base_rows.append({"config": cid, "model": task.name, **metrics})
            continue
        summ, ek_u = res.energy, res.energy_kept_unrounded
        warn = rounding_check(summ.get("energy_kept"), ek_u, where=f"{cid}: ")
        if warn:
            warnings.append(warn)
            print(f"[weightspace sweep] warning: {warn}", file=sys.stderr)
        rows.append({"config": cid, "experiment": task.experiment, "model": task.role, "mode": task.mode,
                     "rho": task.rho, "kind": task.kind, "energy_kept": summ.get("energy_kept"),
                     "energy_random": summ.get("energy_random"), "energy_over_random": summ.get("over_random"),
                     "energy_kept_unrounded": ek_u, **metrics})
        energy_rows += res.energy_rows
        tensor_rows += res.tensor_rows
    run.write_csv("baselines.csv", base_rows)
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
                                    "executor": {**executor.describe(), "worker_stats": worker_stats},
                                    "seconds": round(time.perf_counter() - t0, 2)})
    _plots(run, rows, baselines, reference.uses_rho, sets.utility_task)
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
