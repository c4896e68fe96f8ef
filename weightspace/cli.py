"""``workbench weightspace overlap|project|sweep|chain`` (and the hook that adds ``workbench finetune``).

    workbench weightspace overlap --aligned qwen2.5-coder-0.5b-instruct \\
        --model useful=runs/ft-useful --model harmful=runs/ft-harmful --base runs/base --out runs/ws-overlap
    workbench weightspace project --aligned A --finetuned runs/ft-harmful --reference-base runs/base \\
        --mode orthogonal --rho 0.25 --kind topk --out runs/ws-proj        # checkpoint in runs/ws-proj/model
    workbench weightspace sweep --aligned A --reference-model runs/ft-safety \\
        --useful runs/ft-useful --harmful runs/ft-harmful --contaminated runs/ft-cont --out runs/ws-sweep

Checkpoints are zoo keys, Hugging Face folders, .safetensors files or safetensors index files. Updates
are ``model - aligned`` unless given explicitly (``--delta label=NEW,OLD``). References (project, sweep):
``--reference-base B`` (``Delta_A = aligned - B``), ``--reference-model S`` (``Delta = S - aligned``, e.g.
a safety-tuned model), ``--reference-delta NEW,OLD`` or ``--directions FILE`` (activation-space directions).

The plugin exposes :func:`register` (entry point ``weightspace = "weightspace.cli"`` in the
``workbench.plugins`` group).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from workbench.argtypes import (finite_float, finite_float_list, input_paths, one_line_errors, positive_int,
                                seed_int)
from workbench.errors import WorkbenchError
from workbench.executors import add_executor_args

__all__ = ["register", "register_finetune_hook", "FINETUNE_CLI_MODULE"]

# Hook for the fine-tune helper: this module must expose ``register(subparsers)`` adding ``workbench finetune``.
FINETUNE_CLI_MODULE = "weightspace.finetune_cli"


# -- shared argument groups -----------------------------------------------------------------------

def _add_selection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tensor selection")
    g.add_argument("--layers", default="all", help="'all', '5', '0,3,-1', '4-10' (layered tensors)")
    g.add_argument("--modules", default="all",
                   help="comma list of module types: q,k,v,qkv,o,gate,up,gate_up,down,embed,pos_embed,lm_head,norm,other")
    g.add_argument("--nonlayer", action=argparse.BooleanOptionalAction, default=None,
                   help="include embeddings / head / final norm (default: yes with --layers all, no otherwise)")


def _add_svd(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("subspaces")
    g.add_argument("--side", choices=("left", "right"), default="left",
                   help="left = output space (default), right = input space")
    g.add_argument("--svd", choices=("exact", "randomized"), default="exact", help="SVD method (randomized: seeded)")
    g.add_argument("--svd-dtype", choices=("auto", "float64", "float32"), default="auto",
                   help="auto: float64, float32 for matrices above 16.8M elements")


EMBEDDING_ORIENTATIONS = ("stored", "transposed")  # = weightspace.spectral.EMBEDDING_ORIENTATIONS
WRITE_DTYPES = ("stored", "float32")  # = weightspace.projection.WRITE_DTYPES


def _add_embedding_orientation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embedding-orientation", choices=EMBEDDING_ORIENTATIONS, default=None,
                   help="embedding tables: 'stored' = the left space of the table as stored ([vocab, d_model]: "
                        "vocabulary space; the study's convention, the default for weight updates), 'transposed' = "
                        "d_model space (the default for --directions, which live in d_model). Given, it applies to both")


def _orientations(args: argparse.Namespace) -> tuple[str, str]:
    """``(updates, directions)`` embedding orientations: the flag if given, else each one's default."""
    eo = getattr(args, "embedding_orientation", None)
    return eo or "stored", eo or "transposed"


def _add_reference(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("reference subspace (one of)")
    x = g.add_mutually_exclusive_group(required=required)
    x.add_argument("--reference-base", metavar="BASE", help="Delta_A = aligned - BASE (base / pretrained model)")
    x.add_argument("--reference-model", metavar="MODEL", help="Delta = MODEL - aligned (e.g. a safety-tuned model)")
    x.add_argument("--reference-delta", metavar="NEW,OLD", help="Delta = NEW - OLD")
    x.add_argument("--directions", metavar="FILE", help="activation-space directions (saved-vector .safetensors)")
    g.add_argument("--direction-layer", type=int, default=None, help="only the directions of this layer")
    g.add_argument("--direction-method", default=None, help="only the directions of this method")
    g.add_argument("--residual-only", action="store_true",
                   help="directions act only on modules that write to (left) / read from (right) the residual stream")
    g.add_argument("--force", action="store_true",
                   help="use directions computed on another model than --aligned (same width only)")


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty run folder")
    p.add_argument("--no-progress", action="store_true")


# -- building blocks ------------------------------------------------------------------------------

CHECKPOINT_KINDS = ("a zoo key, a Hugging Face folder with a valid config.json and safetensors weights, a .safetensors "
                    "file or a .safetensors.index.json file")


def _open(spec: str, label: str, cache: dict[str, Any]) -> Any:
    """Open a checkpoint; every way it can be unreadable is a one-line :class:`WorkbenchError`."""
    import json

    from weightspace.checkpoints import open_checkpoint

    if spec not in cache:
        try:
            ck = open_checkpoint(spec, label=label)
        except WorkbenchError:
            raise
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"checkpoint '{spec}' ({label}): its config.json is not valid JSON ({e.msg} at line "
                                 f"{e.lineno}); expected {CHECKPOINT_KINDS}") from None
        except (ValueError, OSError) as e:  # UnicodeDecodeError, unreadable files
            raise WorkbenchError(f"checkpoint '{spec}' ({label}) could not be read ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); expected {CHECKPOINT_KINDS}") from None
        if not isinstance(ck.config, dict):
            raise WorkbenchError(f"checkpoint '{spec}' ({label}): its config.json is not a JSON object; expected "
                                 f"{CHECKPOINT_KINDS}")
        cache[spec] = ck
    return cache[spec]


def _inputs(args: argparse.Namespace) -> list[str]:
    """Every local path this command reads (checkpoints, directions): never used as the output folder."""
    names = ("aligned", "base", "model", "delta", "finetuned", "useful", "harmful", "contaminated", "reference_base",
             "reference_model", "reference_delta", "directions")
    return input_paths(*[getattr(args, n, None) for n in names])


def _check_out(args: argparse.Namespace) -> list[str]:
    from workbench.runs import check_out

    inputs = _inputs(args)
    check_out(args.out, overwrite=args.overwrite, inputs=inputs)
    return inputs


def _check_directions(args: argparse.Namespace, aligned: Any, plan: Any, reference: Any, tensors: list[Any]) -> None:
    """The direction rules of :mod:`workbench.vectors` against the aligned checkpoint, before any work:
    same width always, same model checksum unless ``--force``; and the directions must cover a selected tensor."""
    from workbench.loading import model_identity
    from workbench.vectors import ModelIdentity, load_directions

    from weightspace.projection import validate_reference

    dirs = [d for d in load_directions(args.directions)
            if (args.direction_layer is None or d.layer == args.direction_layer)
            and (args.direction_method is None or d.method == args.direction_method)]
    model_id, checksum = model_identity(aligned.source)
    d_model = plan.d_model or aligned.d_model or reference.d_model
    n_layers = plan.n_layers or max(d.layer + 1 for d in dirs)
    for d in dirs:
        d.check_compatible(ModelIdentity(model_id, checksum, d_model, n_layers), force=args.force)
    validate_reference(reference, plan, tensors)


def _check_finite(plan: Any, block_elements: int = 1 << 22) -> None:
    """Read every floating tensor of every checkpoint once, block by block, and refuse nan / inf before any
    output exists (the analysis would otherwise stop half-way)."""
    import torch

    for ck in plan.checkpoints.values():
        for name in ck.names:
            meta = ck.meta(name)
            if meta.dtype not in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"):
                continue
            if len(meta.shape) == 0 or meta.shape[0] == 0:
                blocks = [ck.read(name)]
            else:
                step = max(1, block_elements // max(1, meta.numel // meta.shape[0]))
                blocks = (ck.read_rows(name, a, min(meta.shape[0], a + step)) for a in range(0, meta.shape[0], step))
            for b in blocks:
                if not bool(torch.isfinite(b.float() if b.dtype not in (torch.float32, torch.float64) else b).all()):
                    raise WorkbenchError(f"checkpoint '{ck.label}' ({ck.source}): tensor {name} holds non-finite "
                                         f"values (nan or inf); every weight must be a finite number")


def _labelled(items: list[str] | None, flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise WorkbenchError(f"{flag} items must look like label=PATH, got {item!r}")
        label, path = item.split("=", 1)
        if not label.strip() or not path.strip():
            raise WorkbenchError(f"{flag} items must look like label=PATH, got {item!r}")
        out.append((label.strip(), path.strip()))
    return out


def _pair(spec: str, flag: str) -> tuple[str, str]:
    parts = [s.strip() for s in spec.split(",")]
    if len(parts) != 2 or not all(parts):
        raise WorkbenchError(f"{flag} must look like NEW,OLD, got {spec!r}")
    return parts[0], parts[1]


def _reference(args: argparse.Namespace, aligned: Any, cache: dict[str, Any]) -> Any:
    from weightspace.deltas import DeltaSpec
    from weightspace.reference import DeltaReference, DirectionReference

    eo_updates, eo_directions = _orientations(args)
    if args.directions:
        return DirectionReference.from_file(args.directions, layer=args.direction_layer, method=args.direction_method,
                                            side=args.side, residual_only=args.residual_only,
                                            embedding_orientation=eo_directions)
    if args.reference_base:
        spec = DeltaSpec("alignment", aligned, _open(args.reference_base, "base", cache))
    elif args.reference_model:
        spec = DeltaSpec("reference", _open(args.reference_model, "reference", cache), aligned)
    else:
        new, old = _pair(args.reference_delta, "--reference-delta")
        spec = DeltaSpec("reference", _open(new, "reference_new", cache), _open(old, "reference_old", cache))
    return DeltaReference(spec, side=args.side, svd_dtype=args.svd_dtype, method=args.svd,
                          embedding_orientation=eo_updates)


def _selection(args: argparse.Namespace, plan: Any) -> Any:
    from weightspace.plan import Selection

    return Selection.parse(args.layers, args.modules, n_layers=plan.n_layers, nonlayer=args.nonlayer)


# -- commands -------------------------------------------------------------------------------------

def cmd_overlap(args: argparse.Namespace) -> int:
    from workbench.runs import RunFolder, seed_everything

    from weightspace.deltas import DeltaSpec
    from weightspace.overlap import OverlapConfig, save_overlap, update_overlap
    from weightspace.plan import match_checkpoints
    from weightspace.projection import unique_checkpoints
    from weightspace.reference import DirectionReference
    from weightspace.spectral import check_grid

    seed_everything(args.seed)
    etas = check_grid(args.etas, "eta") if args.etas else None
    inputs = _check_out(args)
    cache: dict[str, Any] = {}
    aligned = _open(args.aligned, "aligned", cache)
    specs = []
    if args.base:
        specs.append(DeltaSpec("alignment", aligned, _open(args.base, "base", cache)))
    for label, path in _labelled(args.model, "--model"):
        specs.append(DeltaSpec(label, _open(path, label, cache), aligned))
    for item in args.delta or []:
        if "=" not in item:
            raise WorkbenchError(f"--delta items must look like label=NEW,OLD, got {item!r}")
        label, rest = item.split("=", 1)
        new, old = _pair(rest, "--delta")
        specs.append(DeltaSpec(label.strip(), _open(new, f"{label}_new", cache), _open(old, f"{label}_old", cache)))
    directions = None
    eo_updates, eo_directions = _orientations(args)
    if args.directions:
        directions = DirectionReference.from_file(args.directions, layer=args.direction_layer,
                                                  method=args.direction_method, side=args.side,
                                                  residual_only=args.residual_only,
                                                  embedding_orientation=eo_directions)
    cks = unique_checkpoints(("aligned", aligned), *[(s.new.label, s.new) for s in specs],
                             *[(s.old.label, s.old) for s in specs])
    plan = match_checkpoints(cks)
    kw = {"etas": tuple(etas)} if etas else {}
    cfg = OverlapConfig(side=args.side, method=args.svd, svd_dtype=args.svd_dtype, selection=_selection(args, plan),
                        seed=args.seed, keep_angles=not args.no_angles, embedding_orientation=eo_updates, **kw)
    if args.plot_eta not in cfg.etas:
        raise WorkbenchError(f"--plot-eta {args.plot_eta} is not in the eta grid {list(cfg.etas)}")
    if len(specs) + (directions is not None) < 2:
        raise WorkbenchError("give at least two updates (--base, --model, --delta) or one update and --directions")
    labels = [s.label for s in specs] + ([directions.label] if directions is not None else [])
    if len(set(labels)) != len(labels):
        raise WorkbenchError(f"update labels must be distinct, got {labels}")
    if directions is not None:
        _check_directions(args, aligned, plan, directions, plan.select(cfg.selection))
    _check_finite(plan)
    run = RunFolder(args.out, config=vars(args) | {
        "command": "weightspace overlap", "embedding_orientation": eo_updates,
        "directions_embedding_orientation": eo_directions if directions is not None else None},
        overwrite=args.overwrite, inputs=inputs)
    res = update_overlap(specs, plan, cfg, directions=directions, progress=not args.no_progress)
    summary = save_overlap(run, res, plan, cfg, args.plot_eta, extra={"updates": [s.describe() for s in specs],
                                                                     "directions": directions.describe() if directions else None})
    _print_overlap(summary)
    print(f"results in {run.final}")
    return 0


def _print_overlap(summary: dict[str, Any]) -> None:
    print(f"{'pair':>28} {'eta':>5} {'MSO pooled':>11} {'baseline':>9} {'x base':>7} {'MSO mean':>9}")
    for pair, per in summary["mso"].items():
        for eta, v in per.items():
            print(f"{pair:>28} {float(eta):>5.2f} {v['mso_pooled']:>11.4f} {v['baseline_pooled']:>9.4f} "
                  f"{v['over_baseline']:>7.2f} {v['mso_mean']:>9.4f}")
    for pair, c in summary["flattened_cosine"].items():
        print(f"flattened cosine {pair}: {c:.4f}")


def cmd_project(args: argparse.Namespace) -> int:
    from workbench.runs import seed_everything

    from weightspace.plan import match_checkpoints
    from weightspace.projection import ProjectionConfig, project_checkpoint, unique_checkpoints

    seed_everything(args.seed)
    _check_out(args)
    cache: dict[str, Any] = {}
    aligned = _open(args.aligned, "aligned", cache)
    finetuned = _open(args.finetuned, "finetuned", cache)
    reference = _reference(args, aligned, cache)
    plan = match_checkpoints(unique_checkpoints(("aligned", aligned), ("finetuned", finetuned),
                                                *reference.checkpoints().items()))
    cfg = ProjectionConfig(mode=args.mode, rho=args.rho, kind=args.kind, operator=args.operator,
                           safelora_threshold=args.safelora_threshold, selection=_selection(args, plan),
                           unselected=args.unselected, seed=args.seed, write_dtype=args.write_dtype)
    if args.directions:
        _check_directions(args, aligned, plan, reference, plan.select(cfg.selection))
    _check_finite(plan)
    res = project_checkpoint(aligned, finetuned, reference, cfg, args.out, overwrite=args.overwrite,
                             progress=not args.no_progress,
                             run_config=vars(args) | {"embedding_orientation": reference.embedding_orientation})
    s = res.energy.summary()
    if s:
        print(f"energy kept E_k = {s['energy_kept']:.4f} (random expectation {s['energy_random']:.4f}, "
              f"ratio {s['over_random']:.2f}) over {s['n_tensors']} projected tensors")
    c = res.report.get("cosine_update_reference")
    if c:
        print(f"flattened cosine(update, reference) over the projected tensors: {c['cosine']:.4f}")
    print(f"projected checkpoint ({args.mode}) in {res.model_path}; report in {res.path / 'report.json'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from workbench.chat import ChatFormat
    from workbench.argtypes import check_context
    from workbench.executors import ModelSpec, executor_from_args
    from workbench.loading import load_model
    from workbench.runs import RunFolder, seed_everything

    from weightspace.evaluation import EvalConfig, EvalSets
    from weightspace.plan import match_checkpoints
    from weightspace.projection import unique_checkpoints
    from weightspace.spectral import check_grid
    from weightspace.sweep import DEFAULT_RHOS, SweepConfig, run_sweep

    seed_everything(args.seed)
    inputs = _check_out(args)
    cache: dict[str, Any] = {}
    aligned = _open(args.aligned, "aligned", cache)
    models = {role: _open(getattr(args, role), role, cache) for role in ("useful", "harmful", "contaminated")
              if getattr(args, role)}
    if not models:
        raise WorkbenchError("give at least one of --useful, --harmful, --contaminated")
    reference = _reference(args, aligned, cache)
    plan = match_checkpoints(unique_checkpoints(("aligned", aligned), *models.items(), *reference.checkpoints().items()))
    ev = EvalConfig(n_harmful=args.n_harmful, n_tasks=args.n_tasks, max_new_tokens=args.max_new_tokens,
                    task_tokens=args.task_tokens, batch_size=args.batch_size, utility_task=args.utility_task,
                    code_split=args.code_split, seed=args.seed)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    cfg = SweepConfig(rhos=tuple(check_grid(args.rhos, "rho")) if args.rhos else DEFAULT_RHOS, kinds=kinds,
                      selection=_selection(args, plan), unselected=args.unselected, eval=ev, seed=args.seed,
                      score_all=args.score_all)
    run_sweep(aligned, reference, models, cfg, None, check_only=True)  # type: ignore[arg-type]
    if args.directions:
        _check_directions(args, aligned, plan, reference, plan.select(cfg.selection))
    _check_finite(plan)
    executor = executor_from_args(args)  # validated (a HOST:PORT must answer) before the model loads
    lm = load_model(args.aligned, dtype=args.dtype, device=args.device)
    sp = args.system_prompt
    if sp is None or sp == "default":
        sp = lm.default_system_prompt
    elif sp.lower() == "none" or not sp.strip():
        sp = None
    fmt = ChatFormat(system_prompt=sp, raw=args.raw)
    sets = EvalSets.default(ev)
    check_context(lm, fmt, [sets.harmful], args.max_new_tokens)
    check_context(lm, fmt, [sets.task_prompts], args.task_tokens, flag="--task-tokens")
    run = RunFolder(args.out, config=vars(args) | {"command": "weightspace sweep", "system_prompt_used": sp},
                    overwrite=args.overwrite, inputs=inputs)
    run.record_model(lm)
    res = run_sweep(aligned, reference, models, cfg, run, lm=lm, fmt=fmt, progress=not args.no_progress,
                    executor=executor, model=ModelSpec(args.aligned, dtype=args.dtype, device=args.device,
                                                       checksum=lm.checksum))
    _print_sweep(res)
    print(f"results in {run.final}")
    return 0


def _print_sweep(res: Any) -> None:
    for name, m in res.baselines.items():
        print(f"{name:>28}: " + ", ".join(f"{k}={v:.3f} [{m.get(k + '_lo', float('nan')):.3f}, "
                                          f"{m.get(k + '_hi', float('nan')):.3f}]"
                                          for k, v in m.items() if not k.endswith(("_lo", "_hi"))))
    print(f"{'config':>36} {'E_k':>6} {'E_rand':>6} {'utility':>8} {'comply':>7} {'logit':>7}")
    for r in res.rows:
        def f(key: str) -> str:
            v = r.get(key)
            return f"{v:.3f}" if isinstance(v, float) else "-"
        print(f"{r['config']:>36} {f('energy_kept'):>6} {f('energy_random'):>6} {f('utility_accuracy'):>8} "
              f"{f('harm_compliance_phrase'):>7} {f('harm_refusal_logit_mean'):>7}")
    print("scorers: utility = unit_tests pass rate (code tasks) or exact_match (--utility-task arithmetic); "
          "comply = 1 - refusal rate by refusal_phrase; logit = mean refusal_logit; 95% bootstrap intervals in "
          "results.csv, TopK vs controls paired per item in paired.csv")


def cmd_chain(args: argparse.Namespace) -> int:
    from weightspace.chain import cmd_chain as run

    return run(args)


# -- registration ---------------------------------------------------------------------------------

def register(subparsers: Any) -> None:
    """Add ``weightspace`` (overlap | project | sweep) and, through the hook, ``finetune``."""
    p = subparsers.add_parser("weightspace", help="weight-space analysis: update overlap, projection, sweeps",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ws = p.add_subparsers(dest="ws_command", required=True)

    o = ws.add_parser("overlap", help="experiment 3: MSO among updates over the eta grid (per tensor/layer/module)")
    o.add_argument("--aligned", required=True, help="aligned checkpoint W_A (zoo key, folder, file)")
    o.add_argument("--base", default=None, help="base model W_0: adds the update 'alignment' = aligned - base")
    o.add_argument("--model", action="append", metavar="LABEL=PATH", help="update LABEL = PATH - aligned (repeat)")
    o.add_argument("--delta", action="append", metavar="LABEL=NEW,OLD", help="update LABEL = NEW - OLD (repeat)")
    o.add_argument("--directions", default=None, help="also compare with the span of these activation directions")
    o.add_argument("--direction-layer", type=int, default=None)
    o.add_argument("--direction-method", default=None)
    o.add_argument("--residual-only", action="store_true")
    o.add_argument("--force", action="store_true",
                   help="use directions computed on another model than --aligned (same width only)")
    o.add_argument("--etas", default="", type=finite_float_list, help="comma list (default 0.01,0.1,...,0.9,0.99)")
    o.add_argument("--plot-eta", type=finite_float, default=0.5, help="eta of the heatmaps")
    o.add_argument("--no-angles", action="store_true", help="do not save every principal angle")
    _add_embedding_orientation(o)
    _add_svd(o)
    _add_selection(o)
    _add_out(o)
    o.set_defaults(func=cmd_overlap)

    pr = ws.add_parser("project", help="write W_A + P D (parallel), W_A + (I-P) D (orthogonal) or W_A - P D")
    pr.add_argument("--aligned", required=True)
    pr.add_argument("--finetuned", required=True, help="fine-tuned checkpoint: D = finetuned - aligned")
    _add_reference(pr)
    pr.add_argument("--mode", choices=("parallel", "orthogonal", "opposite"), default="parallel")
    pr.add_argument("--rho", type=finite_float, default=0.25, help="rank fraction in (0, 1]")
    pr.add_argument("--kind", choices=("topk", "randomk", "random"), default="topk")
    pr.add_argument("--operator", choices=("projector", "safelora"), default="projector",
                    help="safelora: V V^T / ||V||_F with V the reference update")
    pr.add_argument("--safelora-threshold", type=finite_float, default=None,
                    help="SafeLoRA selection: project a tensor only if cos(D, P D) < threshold")
    pr.add_argument("--unselected", choices=("finetuned", "aligned"), default="finetuned",
                    help="weights of tensors outside the selection / reference")
    pr.add_argument("--write-dtype", choices=WRITE_DTYPES, default="stored",
                    help="dtype of the written tensors: 'stored' = each tensor's stored dtype (default), 'float32' = "
                         "unrounded (the energy kept of the written weights then equals the unrounded value)")
    _add_embedding_orientation(pr)
    _add_svd(pr)
    _add_selection(pr)
    _add_out(pr)
    pr.set_defaults(func=cmd_project)

    sw = ws.add_parser("sweep", help="experiments 1 and 2: rho grid x TopK/RandomK/Random, each model scored")
    sw.add_argument("--aligned", required=True)
    _add_reference(sw)
    sw.add_argument("--useful", default=None, help="useful fine-tune (experiment 1: utility)")
    sw.add_argument("--harmful", default=None, help="harmful fine-tune (experiment 1: harmfulness)")
    sw.add_argument("--contaminated", default=None, help="contaminated fine-tune (experiment 2: both)")
    sw.add_argument("--rhos", default="", type=finite_float_list, help="comma list (default 0.01,0.25,0.5,0.75,0.99)")
    sw.add_argument("--kinds", default="topk,randomk,random")
    sw.add_argument("--unselected", choices=("finetuned", "aligned"), default="finetuned")
    sw.add_argument("--score-all", action="store_true", help="score utility and harmfulness for every model")
    g = sw.add_argument_group("evaluation (per model)")
    g.add_argument("--n-harmful", type=positive_int, default=None,
                   help="harmful prompts of the 'evaluation' pool (weightspace.pools; default: all 100)")
    g.add_argument("--utility-task", choices=("code", "arithmetic"), default="code",
                   help="code: function-writing tasks checked by their unit tests (default); arithmetic: exact match "
                        "on utility:test")
    g.add_argument("--code-split", choices=("train", "val", "test"), default="test",
                   help="code-task split (default test: 32 tasks)")
    g.add_argument("--n-tasks", type=positive_int, default=None, help="utility tasks (default: the whole split)")
    g.add_argument("--max-new-tokens", type=positive_int, default=48, help="generation length for harmful prompts")
    g.add_argument("--task-tokens", type=positive_int, default=160,
                   help="generation length for utility tasks (160 for code; ~16 is enough for arithmetic)")
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.add_argument("--system-prompt", default=None, help="'default' (zoo's, if any), 'none', or a text")
    g.add_argument("--raw", action="store_true", help="no chat template")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--device", default="cpu")
    _add_svd(sw)
    _add_selection(sw)
    _add_out(sw)
    add_executor_args(sw)
    sw.set_defaults(func=cmd_sweep)

    from weightspace.chain import __doc__ as chain_doc, add_arguments as add_chain_arguments

    ch = ws.add_parser("chain", help="the whole study chain: fine-tunes, overlap (exp 3), sweep (exp 1+2), summary",
                       description=chain_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_chain_arguments(ch)
    ch.set_defaults(func=cmd_chain)

    import importlib

    # commands that live in a module of their own: (name, module, help); each module has add_arguments and the
    # command function named here, and its docstring is the command's description
    for name, module, func, help_ in (
            ("controls", "weightspace.controls", "cmd_controls",
             "positive/negative controls: planted distinct and entangled updates through the chain's overlap phase "
             "and verdicts"),
            ("stand-in", "weightspace.stand_in", "cmd_stand_in",
             "Exp 3 with a second stand-in for the alignment update (LoRA safety fine-tune) on a finished chain"),
            ("sensitivity", "weightspace.sensitivity", "cmd_sensitivity",
             "Exp 3 per eta / module type / layer / aggregation and Exp 2 per rho, from a finished chain (no model)"),
            ("study-report", "weightspace.study_report", "cmd_report",
             "the study report (markdown + JSON) from a chain, Exp 4 runs and the controls")):
        mod = importlib.import_module(module)
        sp = ws.add_parser(name, help=help_, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(func=getattr(mod, func))

    register_finetune_hook(subparsers)
    one_line_errors(p)


def register_finetune_hook(subparsers: Any) -> None:
    """HOOK for the fine-tune helper: add ``workbench finetune`` from :data:`FINETUNE_CLI_MODULE` if present.

    That module must expose ``register(subparsers)``. When it is missing nothing is added; when it fails to
    import (e.g. a missing optional dependency) a note goes to stderr and the weight-space commands stay.
    """
    import importlib
    import importlib.util

    if "finetune" in getattr(subparsers, "choices", {}):  # already added (e.g. by its own entry point)
        return
    if importlib.util.find_spec(FINETUNE_CLI_MODULE) is None:
        return
    try:
        mod = importlib.import_module(FINETUNE_CLI_MODULE)
    except ImportError as e:
        print(f"[workbench] 'finetune' unavailable: {e}", file=sys.stderr)
        return
    reg = getattr(mod, "register", None)
    if reg is not None:
        reg(subparsers)
