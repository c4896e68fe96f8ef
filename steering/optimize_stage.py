"""The main job's fast path to an optimised ablation: ``workbench main --optimize-trials N``.

With N > 0 the main job runs the kernel search of :mod:`steering.optimize` for N trials (the stage
``optimize``, before ``steering``), and the steering stage evaluates the chosen kernel beside the selected
direction: conditions ``optimised ablation`` and ``random optimised ablation`` (the kernel's weights on a random
direction of the same norm) on the same test prompts with the same metrics (``steering/evaluation.csv``), and
their numbers in ``steering/acceptance.json``. N = 0 (the default) leaves the main job as it was: the stage is not
run and not listed in ``stage_times.json``.

The search is ``workbench steer optimize`` in small: per-layer difference-in-means directions from the main
job's shared capture (residual input at the last prompt token, ``pos-1``) interpolated at a searched fractional
index (from 0.2 of the depth, and from layer 1 at least: layer 0's direction there is zero, see
:func:`index_fractions`); the selection's validation prompts (``harmful:val`` / ``harmless:val``, 24 each, 8 with
--quick; never a test prompt); TPE after :func:`startup_trials` random trials; the choice rule of
:func:`steering.optimize.choose_trial` (upper bound of the mean KL <= 0.2). It writes ``<run>/optimize/`` with
the files of a ``steer optimize`` run (``chosen_ablation.safetensors``, ``trials.csv``, ``pareto.csv``,
``optimize.json``, ``pareto.png``, ``directions.safetensors``), so the app offers the chosen kernel as its
optimised ablation. Cost on the default model (2 CPU cores), estimated, not measured in a main job: about 6 s per
trial (7.9 s at 32 + 32 validation prompts in ``docs/removal_default_model/optimize.json``), plus about 75 s per
extra evaluation condition (two; the README's stage table), so 20 trials would add about 4.5 minutes.

>>> index_fractions(24), index_fractions(4), index_fractions(2)
((0.2, 0.9), (0.3333333333333333, 0.9), (1.0, 1.0))
>>> [startup_trials(n) for n in (1, 6, 20, 100)]
[1, 3, 10, 10]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from steering.evaluate import Condition
from steering.kernel import KernelAblation
from workbench.errors import WorkbenchError

STAGE = "optimize"
KL_MAX = 0.2
STARTUP_MAX = 10


def trials(args: argparse.Namespace) -> int:
    """The number of trials the main job's arguments ask for (0: the stage is off)."""
    return int(getattr(args, "optimize_trials", 0) or 0)


def index_fractions(n_layers: int) -> tuple[float, float]:
    """The direction index range as fractions of depth: ``steer optimize``'s default (0.2, 0.9), its low end
    raised to layer 1 (the residual input of layer 0 at a template token is the same embedding for every prompt,
    so its difference in means is zero)."""
    if n_layers < 2:
        raise WorkbenchError(f"the optimised ablation needs a model with at least 2 layers, got {n_layers}")
    lo = max(0.2, 1.0 / (n_layers - 1))
    return lo, max(0.9, lo)


def startup_trials(n_trials: int) -> int:
    """Random trials before TPE takes over: half the trials, at most ``steer optimize``'s default 10."""
    return max(1, min(STARTUP_MAX, n_trials // 2))


def add_main_args(p: argparse.ArgumentParser) -> None:
    """``workbench main --optimize-trials N`` (called by :func:`workbench.cli.build_parser`)."""
    from workbench.argtypes import nonnegative_int

    p.add_argument("--optimize-trials", type=nonnegative_int, default=0,
                   help="fast path: optimise a per-layer ablation kernel with N trials (steer optimize in small) and "
                        "evaluate it beside the selected direction (default 0 = off; estimated ~6 s a trial and ~2.5 "
                        "min of evaluation on the default model)")


def optimize_stage(ctx: Any) -> None:
    """Search the kernel ablation, write ``<run>/optimize/`` and leave the choice in ``ctx.results["optimize"]``."""
    from steering import optimize as opt
    from steering.cli import _optimize_index_layers, _texts, main_job_directions
    from steering.kernel import save_kernel_ablation
    from workbench.backends import get_backend
    from workbench.runs import RunFolder
    from workbench.vectors import save_directions

    args, lm, fmt = ctx.args, ctx.lm, ctx.fmt
    n_trials = trials(args)
    if n_trials < 1:
        return
    q = ctx.quick
    lo, hi = index_fractions(lm.n_layers)
    val_h, val_b = _texts("harmful:val", 8 if q else 24), _texts("harmless:val", 8 if q else 24)
    run = RunFolder(ctx.run.path / STAGE, overwrite=True,
                    config={"stage": STAGE, "command": "main --optimize-trials", "n_trials": n_trials,
                            "startup_trials": startup_trials(n_trials), "kl_max": KL_MAX,
                            "kl_rule": opt.DEFAULT_KL_RULE, "kl_confidence": opt.DEFAULT_KL_CONFIDENCE,
                            "index_range": [lo, hi], "n_val": [len(val_h), len(val_b)], "seed": args.seed})
    run.record_model(lm)
    dirs = main_job_directions(ctx)
    per_layer = sorted((d for d in dirs if d.position == "pos-1"), key=lambda d: d.layer)
    space = opt.SearchSpace.for_model(lm.n_layers, index_range=(lo, hi))
    _optimize_index_layers(per_layer, space.index, (lo, hi))
    save_directions(run.path / "directions.safetensors", per_layer)
    t0 = time.perf_counter()
    objective = opt.ModelObjective(get_backend(args.backend, lm), fmt, per_layer, val_h, val_b)
    setup_s = time.perf_counter() - t0
    study = opt.run_study(objective, space, n_trials=n_trials, seed=args.seed,
                          n_startup_trials=startup_trials(n_trials), progress="optimize")
    rows = opt.trial_rows(study, space)
    front = opt.pareto_front(rows)
    chosen = opt.choose_trial(rows, KL_MAX)
    for r in rows:
        r["kl_upper"] = opt.row_kl_upper(r)
        r["pareto"], r["chosen"] = r["number"] in front, r["number"] == chosen["number"]
    cand = opt.Candidate.from_row(chosen)
    ka = KernelAblation(cand.profile, objective.direction(cand))
    run.write_csv("trials.csv", rows)
    run.write_csv("pareto.csv", [r for r in rows if r["pareto"]])
    run.write_json("optimize.json", {
        "chosen": chosen, "rule": opt.choice_rule(), "kl_rule": opt.DEFAULT_KL_RULE,
        "kl_confidence": opt.DEFAULT_KL_CONFIDENCE, "kl_max": KL_MAX, "n_trials": len(rows),
        "pareto_trials": sorted(front), "baseline_harmful_refusal_score": objective.baseline_refusal,
        "n_val": [len(val_h), len(val_b)], "model_evaluations": objective.evaluations,
        "setup_seconds": setup_s, "trial_seconds": time.perf_counter() - t0 - setup_s, "space": space.record(),
        "layer_weights": ka.profile.layer_weights(lm.n_layers), "profile": ka.profile.record()})
    save_kernel_ablation(run.path / "chosen_ablation.safetensors", ka,
                         meta={"trial": chosen["number"], "refusal_score": chosen["refusal_score"], "kl": chosen["kl"],
                               "kl_upper": chosen["kl_upper"], "kl_rule": opt.DEFAULT_KL_RULE, "kl_max": KL_MAX,
                               "within_kl_max": chosen["within_kl_max"], "model_id": lm.model_id,
                               "n_layers": lm.n_layers})
    run.save_figure("pareto.png", opt.pareto_plot(rows, chosen, KL_MAX, lm.n_layers, ka.profile,
                                                  objective.baseline_refusal, f"{lm.model_id}: main job, {STAGE}"))
    run.commit()
    ctx.results[STAGE] = {"ablation": ka, "chosen": chosen}
    print(f"optimised ablation: {len(rows)} trials, chosen trial {chosen['number']}: refusal score "
          f"{chosen['refusal_score']:.3f} (unmodified {objective.baseline_refusal:.3f}), mean KL {chosen['kl']:.4f}, "
          f"upper bound {chosen['kl_upper']:.4f}" + ("" if chosen["within_kl_max"] else f" (none within {KL_MAX:g})"))


optimize_stage.enabled = lambda args: trials(args) > 0  # type: ignore[attr-defined]  # off: not run, not listed


def kernel_conditions(result: dict[str, Any] | None, n_layers: int, seed: int) -> list[Condition]:
    """The steering stage's extra conditions when the optimize stage ran (none otherwise): the chosen kernel and
    its random control (the same weights on ``random_like(direction, seed + 2)``, as ``steer removal``)."""
    from steering.directions import random_like

    if not result:
        return []
    ka: KernelAblation = result["ablation"]
    rnd = KernelAblation(ka.profile, random_like(ka.direction, seed=seed + 2))
    info = {"layer": ka.direction.layer, "trial": result["chosen"]["number"]}
    return [Condition("optimised ablation", ka.interventions(n_layers), info),
            Condition("random optimised ablation", rnd.interventions(n_layers), {**info, "control": True})]


def kernel_acceptance(by: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The acceptance numbers of the optimised ablation (empty when it was not evaluated), like the ablation's."""
    o, r, base = by.get("optimised ablation"), by.get("random optimised ablation"), by.get("unmodified")
    if not (o and r and base):
        return {}
    h = "harmful_refusal_rate"
    return {"optimised_ablation_refusal_drop_pp": 100 * (base[h] - o[h]), "optimised_ablation_kl": o["kl_harmless"],
            "random_optimised_ablation_refusal_change_pp": 100 * (r[h] - base[h]), "optimised_trial": o.get("info_trial")}


__all__ = ["add_main_args", "optimize_stage", "kernel_conditions", "kernel_acceptance", "index_fractions",
           "startup_trials", "trials", "STAGE", "KL_MAX"]
