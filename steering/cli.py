"""``workbench steer extract | select | sweep | generate | orthogonalize | optimize`` (``battery``, ``removal`` and
``decline`` register from their own modules) and the steering stage of the
main job (extract -> select -> evaluate ablation / addition against random controls)."""

from __future__ import annotations

import argparse
import math
from typing import Any, Sequence

from workbench.argtypes import (check_context, check_layer, finite_float, finite_float_list, input_paths,
                                nonnegative_float, nonnegative_int, one_line_errors, open_fraction, position_list,
                                positive_int)
from workbench.backends import get_backend
from workbench.errors import WorkbenchError
from workbench.executors import ModelSpec, add_executor_args, executor_from_args
from workbench.prompts import builtin_split, resolve_prompts
from workbench.runs import RunFolder, check_out, seed_everything
from workbench.sites import parse_layers
from workbench.vectors import Direction, load_directions, pick, save_directions

from steering.directions import mean_diff_directions, mean_diff_from_activations, pca_directions, random_like
from steering.evaluate import Condition, evaluate_conditions
from steering.interventions import ablation, addition
from steering.optimize import DEFAULT_KL_CONFIDENCE, DEFAULT_KL_RULE, KL_RULES
from steering.optimize_stage import STAGE, kernel_acceptance, kernel_conditions, optimize_stage
from steering.optimize_stage import add_main_args  # noqa: F401  (the plugin's main-job option: --optimize-trials)
from steering.selection import calibrate_strength, select_direction, selection_heatmaps
from steering.sweep import ablation_conditions, addition_conditions, run_sweep, tradeoff_plot


def kl_confidence(s: str) -> float:
    """A confidence level in [0.5, 1) (``--kl-confidence``)."""
    v = finite_float(s)
    if not 0.5 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0.5, 1), got {s!r}")
    return v


def _texts(spec: str, limit: int | None) -> list[str]:
    t = resolve_prompts(spec).texts
    return t[:limit] if limit else t


def _setup(args: argparse.Namespace, inputs: Sequence[str]) -> tuple[Any, Any]:
    """Check the output folder, then load the model (call after every check that needs no model)."""
    from workbench.cli import format_from_args, load_from_args

    seed_everything(args.seed)
    check_out(args.out, overwrite=args.overwrite, inputs=inputs)
    lm = load_from_args(args)
    fmt = format_from_args(args, lm)
    return lm, fmt


def _open_run(args: argparse.Namespace, command: str, lm: Any, inputs: Sequence[str]) -> RunFolder:
    """The run folder, made only after every check passed."""
    run = RunFolder(args.out, config=vars(args) | {"command": f"steer {command}"}, overwrite=args.overwrite,
                    inputs=inputs)
    run.record_model(lm)
    return run


def _read_direction(args: argparse.Namespace) -> Direction:
    """The direction of ``--direction`` (``--direction-layer`` / method picked), read before any model."""
    if not args.direction:
        raise WorkbenchError(f"--mode {getattr(args, 'mode', '')} needs --direction FILE (a directions .safetensors "
                             f"file from 'steer extract' / 'steer select' / 'probe')")
    dirs = load_directions(args.direction)
    d = pick(dirs, layer=getattr(args, "direction_layer", None), method=getattr(args, "direction_method", None))
    d.unit  # noqa: B018 - a zero vector is refused here, before any work
    return d


def table_print(summary: list[dict[str, Any]]) -> None:
    print(f"{'condition':28} {'harmful refusal':>16} {'harmless refusal':>17} {'KL':>7} {'ppl':>7}")
    for r in summary:
        print(f"{r['condition']:28} {r['harmful_refusal_rate']:>9.2f} [{r['harmful_refusal_rate_lo']:.2f},"
              f"{r['harmful_refusal_rate_hi']:.2f}] {r['harmless_refusal_rate']:>9.2f} [{r['harmless_refusal_rate_lo']:.2f},"
              f"{r['harmless_refusal_rate_hi']:.2f}] {r['kl_harmless']:>7.3f} {r['perplexity']:>7.2f}")


def cmd_extract(args: argparse.Namespace) -> int:
    pos, neg = _texts(args.positive, args.limit), _texts(args.negative, args.limit)
    inputs = input_paths(args.model, args.positive, args.negative)
    lm, fmt = _setup(args, inputs)
    parse_layers(args.layers, lm.n_layers)
    check_context(lm, fmt, [pos, neg])
    run = _open_run(args, "extract", lm, inputs)
    fn = mean_diff_directions if args.method == "mean_diff" else pca_directions
    dirs = fn(lm, pos, neg, fmt=fmt, layers=args.layers, positions=args.positions.split(","), backend=args.backend)
    save_directions(run.path / "directions.safetensors", dirs)
    run.write_csv("directions.csv", [{"layer": d.layer, "position": d.position, "method": d.method, "norm": d.norm}
                                     for d in dirs])
    if args.gguf:
        from steering.gguf_export import export_control_vector

        by_layer: dict[int, Direction] = {}
        for d in dirs:  # "last" and "pos-1" are the same token: one vector per layer
            if d.position in ("last", "pos-1"):
                by_layer.setdefault(d.layer, d)
        last = list(by_layer.values())
        # llama.cpp steers block outputs 1.. only: resid_pre of layer l is block l-1's output
        export_control_vector([d for d in last if d.layer - (d.component == "resid_pre") >= 1],
                              run.path / "control_vector.gguf",
                              model_hint=lm.model.config.model_type)
    print(f"{len(dirs)} directions -> {run.final / 'directions.safetensors'}")
    return 0


def run_selection(lm: Any, fmt: Any, run: RunFolder, candidates: list[Direction], harmful_val: list[str],
                  harmless_val: list[str], *, backend: str, kl_max: float, max_layer_frac: float,
                  screen: bool = True, top_k: int = 5, executor: Any = None, model: Any = None,
                  confirm_groups: int = 1, kl_screen: bool = True, kl_margin: float = 2.0) -> Direction:
    """Select among ``candidates`` (gradient-screened unless ``screen`` is False: then every candidate is
    scored exactly and the estimate-vs-exact rank correlation is recorded) and write the selection files.
    ``executor`` / ``model``: where the exact scores run (:func:`steering.selection.select_direction`)."""
    be = get_backend(backend, lm)
    res = select_direction(be, fmt, candidates, harmful_val=harmful_val, harmless_val=harmless_val, kl_max=kl_max,
                           max_layer_frac=max_layer_frac, screen=screen, top_k=top_k, executor=executor,
                           model=model, confirm_groups=confirm_groups, kl_screen=kl_screen, kl_margin=kl_margin)
    run.write_csv("selection.csv", res.rows)
    run.write_json("selection.json", {"baseline": res.baseline, "rows": res.rows,
                                      "selected": res.best.record(), "screening": res.screening})
    sc = res.screening
    extra = (f"; estimate-vs-exact Spearman {sc['spearman_ablation']:.3f} over the grid"
             if sc.get("spearman_ablation") is not None else "")
    if sc.get("spearman_kl") is not None:
        extra += f" (KL estimate {sc['spearman_kl']:.3f})"
    if sc.get("kl_screen"):
        k = sc["kl_screen"]
        extra += (f"; KL screen: {k['checks']} exact KLs by bisection, {k['boundary_rank']} candidates below the "
                  f"KL boundary, {k['likely']} ordered first")
    print(f"{sc['mode']} selection: {sc['n_exact_ablation']} of {sc['n_nonzero']} candidates scored exactly "
          f"(gradient estimate {sc['estimate_seconds'] or 0:.1f} s, exact scoring {sc['exact_seconds']:.1f} s){extra}")
    run.save_figure("selection.png", selection_heatmaps(res.rows, f"{lm.model_id}: direction selection"))
    save_directions(run.path / "selected_direction.safetensors", [res.best])
    b = res.best
    print(f"selected layer {b.layer} position {b.position} (norm {b.norm:.2f}); baseline refusal score on harmful "
          f"{res.baseline['harmful_refusal_score']:.2f}")
    return b


def _candidates(dirs: Sequence[Direction], layers: Any, positions: Sequence[str] | None, n_layers: int) -> list[Direction]:
    ls = set(parse_layers(layers, n_layers))
    return [d for d in dirs if d.layer in ls and (not positions or d.position in positions)]


def cmd_select(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.kl_margin) and args.kl_margin >= 1.0):
        raise WorkbenchError(f"--kl-margin must be a finite number >= 1, got {args.kl_margin}")
    positions = [p.strip() for p in args.positions.split(",") if p.strip()] if args.positions else None
    dirs = load_directions(args.directions) if args.directions else None
    if dirs is not None and positions:
        have = sorted({d.position for d in dirs})
        missing = [p for p in positions if p not in have]
        if missing:
            raise WorkbenchError(f"--positions {','.join(missing)} not in {args.directions}; its positions: "
                                 f"{', '.join(have)}")
    train = (_texts("harmful:train", args.limit), _texts("harmless:train", args.limit)) if dirs is None else ([], [])
    val_h, val_b = _texts("harmful:val", args.n_val), _texts("harmless:val", args.n_val)
    inputs = input_paths(args.model, args.directions)
    executor = executor_from_args(args)  # validated (a HOST:PORT must answer) before the model loads
    lm, fmt = _setup(args, inputs)
    ls = parse_layers(args.layers, lm.n_layers)
    if dirs is not None:
        for d in dirs:
            d.check_compatible(lm, force=args.force)
        if not _candidates(dirs, ls, positions, lm.n_layers):
            have = ", ".join(sorted({f"{d.position}@{d.layer}" for d in dirs}))
            raise WorkbenchError(f"no direction in {args.directions} matches --layers {args.layers} and --positions "
                                 f"{args.positions or '(any)'}; available position@layer: {have}")
    check_context(lm, fmt, [*train, val_h, val_b])
    run = _open_run(args, "select", lm, inputs)
    if dirs is None:
        dirs = mean_diff_directions(lm, *train, fmt=fmt, backend=args.backend)
    cands = _candidates(dirs, ls, positions, lm.n_layers)
    run_selection(lm, fmt, run, cands, val_h, val_b,
                  backend=args.backend, kl_max=args.kl_max, max_layer_frac=args.max_layer_frac,
                  screen=not args.exhaustive, top_k=args.top_k, executor=executor,
                  model=ModelSpec.from_args(args, lm), confirm_groups=args.confirm_groups,
                  kl_screen=not args.no_kl_screen, kl_margin=args.kl_margin)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    dirs = load_directions(args.direction)
    have = {d.position for d in dirs}
    if args.position and args.position not in have:
        raise WorkbenchError(f"--position {args.position} is not in {args.direction}; its positions: "
                             f"{', '.join(sorted(have))}")
    position = args.position or next((p for p in ("pos-1", "last") if p in have), dirs[0].position)
    if args.mode == "addition" and not args.alphas:
        raise WorkbenchError("--alphas is empty; give a comma list of strengths like 0.5,1,2")
    tasks = None
    if args.n_tasks:
        ut = builtin_split("utility", "test")
        tasks = (ut.texts[: args.n_tasks], [p.answer for p in ut.prompts[: args.n_tasks]])
    harmful, harmless = _texts("harmful:test", args.n), _texts("harmless:test", args.n)
    inputs = input_paths(args.model, args.direction)
    lm, fmt = _setup(args, inputs)
    layers = parse_layers(args.layers, lm.n_layers)
    by_layer = {}
    for layer in layers:
        d = pick([x for x in dirs if x.position == position], layer=layer)
        d.check_compatible(lm, force=args.force)
        by_layer[layer] = d
    check_context(lm, fmt, [harmful, harmless, tasks[0] if tasks else []], args.max_new_tokens)
    run = _open_run(args, "sweep", lm, inputs)
    if args.mode == "addition":
        conds = addition_conditions(by_layer, list(args.alphas), seed=args.seed)
    else:
        conds = ablation_conditions(by_layer, lm.n_layers, seed=args.seed)
    ev = run_sweep(get_backend(args.backend, lm), fmt, conds, harmful=harmful,
                   harmless=harmless, tasks=tasks, max_new_tokens=args.max_new_tokens,
                   seed=args.seed)
    run.write_csv("sweep.csv", ev.summary)
    run.write_json("sweep.json", ev.summary)
    run.write_csv("per_prompt.csv", ev.per_prompt)
    run.save_figure("tradeoff_kl.png", tradeoff_plot(ev.summary, args.mode, f"{lm.model_id}: {args.mode} sweep"))
    if tasks:
        run.save_figure("tradeoff_accuracy.png", tradeoff_plot(ev.summary, args.mode, f"{lm.model_id}: {args.mode} sweep",
                                                               x="task_accuracy"))
    table_print(ev.summary)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = args.prompt or _texts(args.prompts, args.n)
    if args.layer is not None and args.mode != "addition":
        raise WorkbenchError(f"--layer applies to --mode addition only (got --mode {args.mode})")
    d = _read_direction(args) if args.mode != "none" else None
    inputs = input_paths(args.model, None if args.prompt else args.prompts, args.direction if d else None)
    lm, fmt = _setup(args, inputs)
    layer = check_layer(args.layer, lm.n_layers, "--layer") if args.layer is not None else None
    if d is not None:
        d.check_compatible(lm, force=args.force)
        if args.mode == "addition" and layer is None:
            check_layer(d.layer, lm.n_layers, "the direction's layer")
    check_context(lm, fmt, [prompts], args.max_new_tokens)
    run = _open_run(args, "generate", lm, inputs)
    conds = [Condition("unmodified")]
    if d is not None:
        if args.mode == "addition":
            ivs = addition(d, args.alpha, layers=[layer] if layer is not None else None,
                           apply_to=args.apply_to)
        else:
            ivs = ablation(d, lm.n_layers)
        conds.append(Condition(f"{args.mode}", ivs, {"layer": d.layer, "alpha": args.alpha}))
    ev = evaluate_conditions(get_backend(args.backend, lm), fmt, conds, harmful=prompts, harmless=prompts,
                             max_new_tokens=args.max_new_tokens, seed=args.seed)
    rows = [r for r in ev.per_prompt if r["set"] == "harmful"]  # both sets are the same prompts here
    run.write_csv("generations.csv", rows)
    for r in rows:
        print(f"[{r['condition']}] {r['prompt'][:60]!r}\n    -> {r['completion'][:200]!r} (refusal={r['refusal_phrase']})")
    return 0


def cmd_orthogonalize(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from steering.orthogonalize import write_orthogonalized
    from workbench.chat import encode
    from workbench.loading import from_memory

    d = _read_direction(args)
    prompts = _texts("harmful:val", 4)
    inputs = input_paths(args.model, args.direction)
    lm, fmt = _setup(args, inputs)
    d.check_compatible(lm, force=args.force)
    check_context(lm, fmt, [prompts])
    run = _open_run(args, "orthogonalize", lm, inputs)
    path = write_orthogonalized(lm, d.unit, run.path / "model", overwrite=True)
    b = encode(lm.tokenizer, prompts, fmt)
    ref = get_backend("native", lm).run(b, interventions=ablation(d, lm.n_layers)).logits
    m2 = AutoModelForCausalLM.from_pretrained(str(path), dtype=lm.dtype, attn_implementation="eager")
    out = get_backend("native", from_memory(m2, lm.tokenizer)).run(b).logits
    diff = float((out - ref)[b.attention_mask.bool()].abs().max())
    run.write_json("check.json", {"max_abs_logit_diff_vs_runtime_ablation": diff, "prompts": prompts})
    print(f"orthogonalised checkpoint -> {path}; max |logit diff| vs runtime ablation = {diff:.2e}")
    del torch
    return 0


# -- steer optimize -------------------------------------------------------------------------------------

# Settings a resumed study must share with the run it continues (the study's own signature is checked too).
OPTIMIZE_RESUME_KEYS = ("model", "dtype", "raw", "system_prompt", "direction", "direction_layer", "directions",
                        "position", "positive", "negative", "limit", "n_val", "index_range", "seed", "startup_trials")


def _optimize_resume_source(args: argparse.Namespace) -> Any:
    """With ``--resume``: the finished ``steer optimize`` run in ``--out`` whose study continues (checked before
    any work); else None."""
    import json
    from pathlib import Path

    from workbench.runs import read_marker

    if not args.resume:
        return None
    out = Path(args.out)
    m = read_marker(out)
    if m is None or not m.get("complete") or m.get("command") != "steer optimize" or not (out / "study.db").is_file():
        raise WorkbenchError(f"--resume needs a finished 'steer optimize' run with its study.db in --out {out}; "
                             f"start a new study without --resume")
    old = json.loads((out / "config.json").read_text(encoding="utf-8"))
    for k in OPTIMIZE_RESUME_KEYS:
        new = json.loads(json.dumps(getattr(args, k, None)))
        if old.get(k) != new:
            raise WorkbenchError(f"--resume: --{k.replace('_', '-')} {new} differs from the study's {old.get(k)} "
                                 f"({out / 'config.json'}); resume with the same settings or choose a new --out")
    return out


def _optimize_position(dirs: Sequence[Direction], want: str | None, source: str) -> list[Direction]:
    have = sorted({d.position for d in dirs})
    pos = want or next((p for p in ("pos-1", "last") if p in have), None)
    if pos is None or pos not in have:
        raise WorkbenchError(f"--position {want or '(default pos-1 / last)'} is not in {source}; its positions: "
                             f"{', '.join(have)}")
    return sorted((d for d in dirs if d.position == pos), key=lambda d: d.layer)


def _optimize_index_layers(per_layer: Sequence[Direction], index: Any, index_range: Any) -> None:
    """Every layer the direction index can reach has a non-zero direction (residual input of layer 0 at a
    template token is the same embedding for every prompt: a zero mean difference)."""
    import math

    need = set(range(math.floor(index[0]), math.ceil(index[1]) + 1))
    by_layer = {d.layer: d for d in per_layer}
    missing = sorted(need - set(by_layer))
    if missing:
        raise WorkbenchError(f"--index-range {index_range[0]:g},{index_range[1]:g} spans layers {min(need)}..{max(need)} "
                             f"but the directions lack layer(s) {missing[:8]}")
    top = max(d.norm for d in by_layer.values())
    zero = sorted(i for i in need if by_layer[i].norm <= 1e-6 * max(top, 1.0))
    if zero:
        raise WorkbenchError(f"the direction of layer(s) {zero[:8]} is zero (both prompt sets give the same activations "
                             f"there); raise the LOW end of --index-range {index_range[0]:g},{index_range[1]:g}")


def cmd_optimize(args: argparse.Namespace) -> int:
    """Search a kernel ablation (:mod:`steering.optimize`) on validation prompts; write the study and its choice.

    The Optuna study lives in ``study.db`` (SQLite) inside the run folder. Like every run, the folder is staged (a
    hidden sibling moved into place when the command completes), so the study is written in the staging folder
    and moves with it; ``--resume`` copies the finished run's study.db (and its directions) into the new staging
    folder and continues the study there. A resumed call that fails or is interrupted therefore leaves the
    previous run and its study exactly as they were; only that call's trials are lost (run a long search in
    chunks: ``--resume --n-trials N`` with a growing N). The storage is closed before the folder moves.
    """
    import shutil
    import time

    from steering import optimize as opt
    from steering.kernel import KernelAblation, save_kernel_ablation
    from workbench.cli import format_from_args, load_from_args
    from workbench.io import sha256_json

    if args.position is not None and not (args.position in ("last", "mean") or (
            args.position.startswith("pos-") and args.position[4:].isdigit() and int(args.position[4:]) >= 1)):
        raise WorkbenchError(f"--position {args.position!r}: use last, mean or pos-K (K >= 1)")
    if args.kl_rule == "upper" and args.n_val < 2:
        raise WorkbenchError(f"--kl-rule upper needs --n-val >= 2 (a spread of the per-prompt KL), got {args.n_val}; "
                             f"use more validation prompts or --kl-rule mean")
    for flag, spec in (("--positive", args.positive), ("--negative", args.negative)):
        if str(spec).strip().endswith(":test"):
            raise WorkbenchError(f"{flag} {spec}: the optimisation never sees a test split; use a train split (the "
                                 f"default) or your own prompts")
    src = _optimize_resume_source(args)
    fixed: Direction | None = None
    per_layer: list[Direction] | None = None
    if src is not None:  # the study's own directions, saved by its first call
        saved = load_directions(src / "directions.safetensors")
        fixed, per_layer = (saved[0], None) if args.direction else (None, saved)
    elif args.direction:
        fixed = pick(load_directions(args.direction), layer=args.direction_layer)
        fixed.unit  # noqa: B018 - a zero vector is refused here, before any work
    elif args.directions:
        per_layer = _optimize_position(load_directions(args.directions), args.position, args.directions)
    need_train = fixed is None and per_layer is None
    train = (_texts(args.positive, args.limit), _texts(args.negative, args.limit)) if need_train else ([], [])
    val_h, val_b = _texts("harmful:val", args.n_val), _texts("harmless:val", args.n_val)
    inputs = input_paths(args.model, args.direction, args.directions,
                         *([args.positive, args.negative] if need_train else []))
    seed_everything(args.seed)
    check_out(args.out, overwrite=args.overwrite or src is not None, inputs=inputs)
    lm = load_from_args(args)
    fmt = format_from_args(args, lm)
    if src is not None:
        import json

        old = json.loads((src / "model.json").read_text(encoding="utf-8")).get("checksum")
        if old != lm.checksum:
            raise WorkbenchError(f"--resume: the model's checksum {lm.checksum[:12]} differs from the study's "
                                 f"{str(old)[:12]} ({src / 'model.json'}); resume on the same model")
    space = opt.SearchSpace.for_model(lm.n_layers, index_range=None if fixed is not None else args.index_range)
    if fixed is not None:
        fixed.check_compatible(lm, force=args.force)
    elif per_layer is not None:
        for d in per_layer:
            d.check_compatible(lm, force=args.force)
    if space.index is not None and per_layer is not None:
        _optimize_index_layers(per_layer, space.index, args.index_range)
    check_context(lm, fmt, [val_h, val_b, *train], args.max_new_tokens if args.confirm else None)
    run = RunFolder(args.out, config=vars(args) | {"command": "steer optimize"},
                    overwrite=args.overwrite or src is not None, inputs=inputs)
    run.record_model(lm)
    t_setup = time.perf_counter()
    if src is not None:
        shutil.copy2(src / "study.db", run.path / "study.db")  # continued in the staging copy: a failed call keeps src
    if need_train:
        positions = ["post_instruction"] if (args.position or "pos-1").startswith("pos-") else [args.position]
        dirs = mean_diff_directions(lm, *train, fmt=fmt, positions=positions, backend=args.backend)
        per_layer = _optimize_position(dirs, args.position or "pos-1", "the extracted directions")
        if space.index is not None:
            _optimize_index_layers(per_layer, space.index, args.index_range)
    save_directions(run.path / "directions.safetensors", [fixed] if fixed is not None else per_layer or [])
    extraction_s = time.perf_counter() - t_setup
    objective = opt.ModelObjective(get_backend(args.backend, lm), fmt, fixed if fixed is not None else per_layer or [],
                                   val_h, val_b, batch_size=args.batch_size)
    setup_s = time.perf_counter() - t_setup
    signature = {"model_checksum": lm.checksum, "dtype": str(lm.dtype), "template": fmt.template_hash(lm.tokenizer),
                 "harmful_val": sha256_json(val_h)[:16], "harmless_val": sha256_json(val_b)[:16],
                 "directions": sha256_json([d.vector.tolist() for d in ([fixed] if fixed is not None else per_layer or [])])[:16],
                 "space": space.record(), "seed": args.seed}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(run.path / 'study.db').resolve()}")
    try:
        study = optuna.create_study(study_name=opt.STUDY_NAME, storage=storage, directions=["minimize", "minimize"],
                                    load_if_exists=True)
        before = len(opt.trial_rows(study, space))
        if before == 0 and not study.user_attrs.get("signature"):
            study.set_user_attr("signature", signature)
        elif study.user_attrs.get("signature") != signature:
            old_sig = study.user_attrs.get("signature") or {}
            diff = [k for k in signature if old_sig.get(k) != signature[k]]
            raise WorkbenchError(f"--resume: the study in {src} was made with other {', '.join(diff)}; resume with "
                                 f"the same model, prompts and directions, or choose a new --out")
        t0 = time.perf_counter()
        study = opt.run_study(objective, space, n_trials=args.n_trials, seed=args.seed, storage=storage,
                              n_startup_trials=args.startup_trials, progress="optimize")
        rows = opt.trial_rows(study, space)
        invocation = {"trials_before": before, "trials_after": len(rows), "setup_seconds": setup_s,
                      "extraction_seconds": extraction_s if need_train else 0.0,
                      "trial_seconds": time.perf_counter() - t0, "setup_evaluations": objective.setup_evaluations,
                      "trial_evaluations": objective.evaluations - objective.setup_evaluations}
        invocations = [*study.user_attrs.get("invocations", []), invocation]
        study.set_user_attr("invocations", invocations)
    finally:
        storage.remove_session()
        storage.engine.dispose()
    front = opt.pareto_front(rows)
    chosen = opt.choose_trial(rows, args.kl_max, rule=args.kl_rule, confidence=args.kl_confidence)
    for r in rows:
        r["kl_upper"] = opt.row_kl_upper(r, args.kl_confidence)
        r["pareto"], r["chosen"] = r["number"] in front, r["number"] == chosen["number"]
    unbounded = sum(r["kl_n"] < 2 for r in rows)  # trials of an older study: no per-prompt KL statistics
    cand = opt.Candidate.from_row(chosen)
    ka = KernelAblation(cand.profile, objective.direction(cand))
    cost = opt.cost_to_trial(rows, invocations, chosen["number"])
    run.write_csv("trials.csv", rows)
    run.write_csv("pareto.csv", [r for r in rows if r["pareto"]])
    summary = {"chosen": chosen, "rule": opt.choice_rule(args.kl_rule, args.kl_confidence), "kl_rule": args.kl_rule,
               "kl_confidence": args.kl_confidence, "kl_max": args.kl_max,
               "trials_without_kl_statistics": unbounded, "n_trials": len(rows),
               "n_trials_this_call": len(rows) - before, "pareto_trials": sorted(front),
               "baseline_harmful_refusal_score": objective.baseline_refusal, "n_val": [len(val_h), len(val_b)],
               "model_evaluations": sum(i["setup_evaluations"] + i["trial_evaluations"] for i in invocations),
               "model_evaluations_unit": "batched forward passes of the search (KL reference, baseline, trials); "
                                         "direction extraction and confirmation generations not included",
               **cost, "invocations": invocations, "space": space.record(), "signature": signature,
               "layer_weights": ka.profile.layer_weights(lm.n_layers), "profile": ka.profile.record()}
    save_kernel_ablation(run.path / "chosen_ablation.safetensors", ka,
                         meta={"trial": chosen["number"], "refusal_score": chosen["refusal_score"], "kl": chosen["kl"],
                               "kl_upper": chosen["kl_upper"], "kl_rule": args.kl_rule, "kl_max": args.kl_max,
                               "within_kl_max": chosen["within_kl_max"],
                               "model_id": lm.model_id, "n_layers": lm.n_layers})
    run.save_figure("pareto.png", opt.pareto_plot(rows, chosen, args.kl_max, lm.n_layers, ka.profile,
                                                  objective.baseline_refusal, f"{lm.model_id}: steer optimize"))
    if args.confirm:  # generation-based check of the chosen trial (validation prompts only)
        ev = evaluate_conditions(get_backend(args.backend, lm), fmt,
                                 [Condition("optimised ablation", ka.interventions(lm.n_layers),
                                            {"trial": chosen["number"]})],
                                 harmful=val_h[:args.confirm], harmless=val_b[:args.confirm],
                                 max_new_tokens=args.max_new_tokens, seed=args.seed)
        run.write_csv("confirm.csv", ev.summary)
        run.write_csv("confirm_per_prompt.csv", ev.per_prompt)
        summary["confirm"] = ev.summary
    run.write_json("optimize.json", summary)
    print(f"{len(rows)} trials ({len(rows) - before} this call, {summary['model_evaluations']} model evaluations in "
          f"all); Pareto front: {len(front)} trials")
    if unbounded and args.kl_rule == "upper":
        print(f"note: {unbounded} trial(s) of this study predate per-prompt KL statistics and were not eligible "
              f"under --kl-rule upper (--kl-rule mean reads them)")
    stat = "KL upper bound" if args.kl_rule == "upper" else "mean KL"
    print(f"chosen trial {chosen['number']}: refusal score {chosen['refusal_score']:.3f} (unmodified "
          f"{objective.baseline_refusal:.3f}), mean KL {chosen['kl']:.4f}, {args.kl_confidence:g} upper bound "
          f"{chosen['kl_upper']:.4f}" + ("" if chosen["within_kl_max"] else
                                         f" (no trial's {stat} within --kl-max {args.kl_max:g}: the lowest)"))
    if args.confirm:
        table_print(ev.summary)
    return 0


def register(sub: Any) -> None:
    from workbench.cli import add_model_args

    st = sub.add_parser("steer", help="steering: extract | select | sweep | generate | orthogonalize | optimize | battery | "
                                             "removal | decline")
    ss = st.add_subparsers(dest="steer_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_model_args(p)
        p.add_argument("--out", required=True)
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--force", action="store_true", help="apply a direction computed on another model")

    p = ss.add_parser("extract", help="difference-in-means / PCA directions per layer and position")
    common(p)
    p.add_argument("--positive", default="harmful:train")
    p.add_argument("--negative", default="harmless:train")
    p.add_argument("--method", choices=["mean_diff", "pca"], default="mean_diff")
    p.add_argument("--layers", default="all")
    p.add_argument("--positions", default="post_instruction", type=position_list,
                   help="post_instruction, last, mean, or indices")
    p.add_argument("--limit", type=positive_int, default=None, help="use at most N prompts per set")
    p.add_argument("--gguf", action="store_true", help="also export a llama.cpp control vector")
    p.set_defaults(func=cmd_extract)

    p = ss.add_parser("select", help="select the refusal direction on validation prompts (Arditi et al.)")
    common(p)
    p.add_argument("--directions", default=None, help="candidates file (default: extract mean_diff now)")
    p.add_argument("--layers", default="all")
    p.add_argument("--positions", default="", help="restrict candidate positions, e.g. pos-1,pos-2")
    p.add_argument("--limit", type=positive_int, default=None)
    p.add_argument("--n-val", type=positive_int, default=32)
    p.add_argument("--kl-max", type=nonnegative_float, default=0.1)
    p.add_argument("--max-layer-frac", type=open_fraction, default=0.8)
    p.add_argument("--exhaustive", action="store_true",
                   help="score every candidate exactly (default: gradient screening, exact scores for the --top-k "
                        "best estimates); also records the estimate-vs-exact rank correlation")
    p.add_argument("--top-k", type=positive_int, default=5,
                   help="candidates scored exactly per group in the screened selection (default 5)")
    p.add_argument("--confirm-groups", type=nonnegative_int, default=1,
                   help="groups of --top-k scored after the first group with a candidate that passes the filters "
                        "(the estimate ranks near-ties imperfectly; default 1, 0 = stop at that group)")
    p.add_argument("--no-kl-screen", action="store_true",
                   help="screened selection: order by the ablation estimate alone (default: candidates likely to "
                        "pass --kl-max first, from second-order KL estimates and a bisection on exact KLs)")
    p.add_argument("--kl-margin", type=float, default=2.0,
                   help="KL screen: this many times as many lowest-KL-estimate candidates as lie below the bisected "
                        "KL boundary are ordered first (default 2, >= 1)")
    add_executor_args(p)
    p.set_defaults(func=cmd_select)

    p = ss.add_parser("sweep", help="layer x strength addition sweep, or per-layer ablation sweep, with random controls")
    common(p)
    p.add_argument("--direction", required=True, help="directions file (one per layer, e.g. from extract)")
    p.add_argument("--position", default=None)
    p.add_argument("--mode", choices=["addition", "ablation"], default="addition")
    p.add_argument("--layers", default="all")
    p.add_argument("--alphas", default="0.5,1,2", type=finite_float_list, help="comma list of strengths")
    p.add_argument("--n", type=positive_int, default=32, help="test prompts per set")
    p.add_argument("--n-tasks", type=nonnegative_int, default=0, help="utility tasks for accuracy (0 = skip)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.set_defaults(func=cmd_sweep)

    p = ss.add_parser("generate", help="generate with and without an intervention, side by side")
    common(p)
    p.add_argument("--direction", default=None)
    p.add_argument("--direction-layer", type=int, default=None)
    p.add_argument("--mode", choices=["addition", "ablation", "none"], default="ablation")
    p.add_argument("--alpha", type=finite_float, default=1.0)
    p.add_argument("--layer", type=int, default=None, help="apply the addition at this layer")
    p.add_argument("--apply-to", default="all", choices=("all", "prompt", "generated", "last", "post_instruction"),
                   help="all, prompt, generated, last, post_instruction")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", default="harmful:test")
    p.add_argument("--n", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.set_defaults(func=cmd_generate)

    p = ss.add_parser("orthogonalize", help="write a checkpoint with the direction removed from the weights")
    common(p)
    p.add_argument("--direction", required=True)
    p.add_argument("--direction-layer", type=int, default=None)
    p.set_defaults(func=cmd_orthogonalize)

    from workbench.argtypes import fraction_range

    p = ss.add_parser("optimize", help="optimise a per-layer ablation kernel (attention / MLP) and the direction "
                                       "index: refusal vs KL on validation prompts, Optuna TPE")
    common(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--directions", default=None,
                     help="per-layer directions file (e.g. from 'steer extract'); default: mean-diff of --positive vs "
                          "--negative now; the search interpolates between adjacent layers")
    src.add_argument("--direction", default=None, help="one fixed direction instead (no direction index is searched)")
    p.add_argument("--direction-layer", type=int, default=None, help="pick this layer's direction from --direction")
    p.add_argument("--position", default=None, help="reading position of the per-layer directions (default pos-1, "
                                                    "i.e. the last prompt token; or last, mean, pos-K)")
    p.add_argument("--positive", default="harmful:train", help="prompts for the directions (never a test split)")
    p.add_argument("--negative", default="harmless:train")
    p.add_argument("--limit", type=positive_int, default=None, help="use at most N prompts per set for the directions")
    p.add_argument("--n-val", type=positive_int, default=32, help="validation prompts per set the trials score")
    p.add_argument("--n-trials", type=positive_int, default=100,
                   help="trials the study should have in all (with --resume, only the missing ones run)")
    p.add_argument("--startup-trials", type=positive_int, default=10, help="random trials before TPE takes over")
    p.add_argument("--kl-max", type=nonnegative_float, default=0.2,
                   help="the chosen trial: lowest refusal score with KL <= this, as --kl-rule reads KL (default 0.2)")
    p.add_argument("--kl-rule", choices=KL_RULES, default=DEFAULT_KL_RULE,
                   help="upper (default): the one-sided upper confidence bound of the mean KL over the harmless "
                        "validation prompts, mean + t x sd / sqrt(n), must be <= --kl-max (a margin for the prompts "
                        "the search never saw); trials of a study run before per-prompt KL was recorded are not eligible. "
                        "mean: the mean KL itself must be (the rule before). Only the choice: a resumed study may "
                        "change it")
    p.add_argument("--kl-confidence", type=kl_confidence, default=DEFAULT_KL_CONFIDENCE,
                   help="one-sided confidence level of --kl-rule upper, in [0.5, 1) (default 0.95)")
    p.add_argument("--index-range", type=fraction_range, default=(0.2, 0.9),
                   help="direction index range as fractions of depth LOW,HIGH (default 0.2,0.9)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--confirm", type=nonnegative_int, default=8,
                   help="generate for this many validation prompts per set with the chosen ablation (0 = skip)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens per confirmation generation")
    p.add_argument("--resume", action="store_true",
                   help="continue the study of the finished optimize run in --out (same settings; its study.db)")
    p.set_defaults(func=cmd_optimize)

    from steering.battery import add_battery_parser  # harm + utility batteries (the app's "score this setting")

    add_battery_parser(ss, common)
    from steering.removal import add_removal_parser  # optimised vs single-direction ablation on test prompts

    add_removal_parser(ss, common)
    from steering.decline import add_decline_parser  # harm vs decline direction, ablated alone and together

    add_decline_parser(ss, common)
    one_line_errors(st)


def main_job_directions(ctx: Any) -> list[Direction]:
    """The main job's difference-in-means directions (every layer, every post-instruction position): from its
    shared capture when the core stage left one (``ctx.results["core_acts"]``), else captured here (32 prompts
    per set with ``--quick``)."""
    core = ctx.results.get("core_acts")
    if core is not None:  # the main job's shared capture: resid_pre at every post-instruction token
        return mean_diff_from_activations(ctx.lm, core["harmful:train"], core["harmless:train"], [], [])
    n_train = 32 if ctx.quick else None
    return mean_diff_directions(ctx.lm, _texts("harmful:train", n_train), _texts("harmless:train", n_train),
                                fmt=ctx.fmt, backend=ctx.args.backend)


def main_stage(ctx: Any) -> None:
    """Extract -> select -> evaluate (ablation and addition of the selected direction, random controls)."""
    lm, fmt, args = ctx.lm, ctx.fmt, ctx.args
    run = RunFolder(ctx.run.path / "steering", config={"stage": "steering"}, overwrite=True)
    q = ctx.quick
    dirs = main_job_directions(ctx)
    save_directions(run.path / "directions.safetensors", dirs)
    n_post = max(int(d.position[3:]) * -1 for d in dirs if d.position.startswith("pos-"))
    positions = [f"pos-{k}" for k in range(1, min(n_post, 1 if q else 2) + 1)]
    step = 4 if q else 2
    layers = list(range(0, int(0.8 * lm.n_layers), step))
    cands = [d for d in dirs if d.layer in layers and d.position in positions]
    best = run_selection(lm, fmt, run, cands, _texts("harmful:val", 8 if q else 24), _texts("harmless:val", 8 if q else 24),
                         backend=args.backend, kl_max=0.1, max_layer_frac=0.8, screen=True, top_k=5,
                         # the reduced grid (20 candidates on the default model) is too small for the KL screen's
                         # fixed cost (a forward and 4 backward passes + ~log2(n) exact KLs) to pay off: replayed
                         # on the exhaustive rows it scores more than the ablation order does, for the same choice
                         kl_screen=False)
    rnd = random_like(best, seed=args.seed)
    save_directions(run.path / "random_control.safetensors", [rnd])
    # addition strength chosen on validation prompts only (the test split stays untouched)
    alpha, cal = calibrate_strength(get_backend(args.backend, lm), fmt, best, _texts("harmless:val", 8 if q else 24))
    run.write_csv("strength_calibration.csv", cal)
    print(f"addition strength chosen on harmless:val: alpha = {alpha:g}")
    conds = [Condition("ablation", ablation(best, lm.n_layers), {"layer": best.layer}),
             Condition("addition", addition(best, alpha), {"layer": best.layer, "alpha": alpha}),
             Condition("random ablation", ablation(rnd, lm.n_layers), {"layer": best.layer, "control": True}),
             Condition("random addition", addition(rnd, alpha), {"layer": best.layer, "alpha": alpha, "control": True})]
    conds += kernel_conditions(ctx.results.get("optimize"), lm.n_layers, args.seed)  # --optimize-trials N > 0 only
    n = 8 if q else None
    ev = evaluate_conditions(get_backend(args.backend, lm), fmt, conds, harmful=_texts("harmful:test", n),
                             harmless=_texts("harmless:test", n), max_new_tokens=16 if q else 32,
                             n_boot=200 if q else 1000, seed=args.seed)
    run.write_csv("evaluation.csv", ev.summary)
    run.write_json("evaluation.json", ev.summary)
    run.write_csv("per_prompt.csv", ev.per_prompt)
    table_print(ev.summary)
    base = ev.summary[0]
    by = {r["condition"]: r for r in ev.summary}
    acc = {
        "ablation_refusal_drop_pp": 100 * (base["harmful_refusal_rate"] - by["ablation"]["harmful_refusal_rate"]),
        "addition_induced_refusal": by["addition"]["harmless_refusal_rate"],
        "random_ablation_refusal_change_pp": 100 * (by["random ablation"]["harmful_refusal_rate"] - base["harmful_refusal_rate"]),
        "random_addition_refusal_change_pp": 100 * (by["random addition"]["harmless_refusal_rate"] - base["harmless_refusal_rate"]),
        "ablation_kl": by["ablation"]["kl_harmless"],
        "selected_layer": best.layer, "selected_position": best.position, "addition_alpha": alpha,
        **kernel_acceptance(by),
    }
    run.write_json("acceptance.json", acc)
    print("acceptance numbers:", {k: round(v, 3) if isinstance(v, float) else v for k, v in acc.items()})
    ctx.results["steering"] = {"summary": ev.summary, "direction": best, "acceptance": acc}


MAIN_STAGE = (20, main_stage)
# before the steering stage, which evaluates its choice; off (not run, not listed) unless --optimize-trials N > 0
MAIN_STAGES = [(15, STAGE, optimize_stage)]
