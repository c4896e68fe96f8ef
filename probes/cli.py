"""``workbench probe`` and ``workbench overlap``, and the probes stage of the main job."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from probes.overlap import DEFAULT_ETAS, activation_overlap
from probes.sweep import ProbeSweep
from workbench.capture import Activations, capture
from workbench.errors import WorkbenchError
from workbench.prompts import PromptSet, builtin, resolve_prompts, split_prompts
from workbench.argtypes import check_context, finite_float, finite_float_list, input_paths, nonnegative_int
from workbench.runs import RunFolder, check_out, seed_everything
from workbench.sites import parse_layers
from workbench.vectors import Direction, save_directions


def stack_layers(acts: Activations, position: str = "last") -> torch.Tensor:
    """``[n, layers, d]`` for the resid_post sites of a capture."""
    idx = [i for i, s in enumerate(acts.sites) if s.component == "resid_post"]
    key = f"pos{int(position)}" if str(position).lstrip("-").isdigit() else position  # "-2" is captured as "pos-2"
    return acts.get(key)[:, idx]


def _check_position(position: str) -> str:
    """One reading position for probes / overlap: last, mean, or a token index like -2."""
    position = position.strip()
    if position in ("last", "mean") or position.lstrip("-").isdigit():
        return position
    raise WorkbenchError(f"--position {position!r} is not valid here; use last, mean, or a token index like -2")


def _splits(spec: str) -> tuple[PromptSet, PromptSet]:
    """Train and test sets: a builtin name uses its fixed splits; a file is split 60/20/20 (seeded)."""
    if ":" in spec and spec.split(":")[0] in ("harmful", "harmless", "utility"):
        raise WorkbenchError("give the set name without a split (train and test splits are used automatically)")
    ps = resolve_prompts(spec)
    sp = split_prompts(ps)
    return sp["train"], sp["test"]


def run_probe_sweep(lm: Any, fmt: Any, run: RunFolder, positive: str, negative: str, *, layers: Any = "all",
                    position: str = "last", backend: str = "native", n_boot: int = 1000, limit: int | None = None,
                    seed: int = 0, acts: dict[str, Activations] | None = None) -> dict[str, Any]:
    """Fit on the train splits, evaluate on the test splits. ``acts`` may hold precomputed captures keyed
    ``pos:train``, ``pos:test``, ``neg:train``, ``neg:test`` (the main job passes its shared capture)."""
    from probes import plots  # matplotlib: imported when a run draws, not when the CLI starts

    sets: dict[str, tuple[Activations, Any]] = {}
    t_cap = 0.0
    for label, spec in (("pos", positive), ("neg", negative)):
        tr, te = _splits(spec)
        for split, ps in (("train", tr), ("test", te)):
            key = f"{label}:{split}"
            if acts is not None and key in acts:
                a = acts[key]
            else:
                texts = ps.texts[:limit] if limit else ps.texts
                a = capture(lm, texts, layers=layers, positions=[position], fmt=fmt, backend=backend)
            t_cap += float(a.meta["seconds"])  # the capture's own time, also when read back from the cache
            sets[key] = (a, ps)
    layer_ids = [s.layer for s in sets["pos:train"][0].sites if s.component == "resid_post"]
    X = {k: stack_layers(a, position) for k, (a, _) in sets.items()}
    sw = ProbeSweep(n_boot=n_boot, seed=seed, layers=layer_ids).fit(X["pos:train"], X["neg:train"])
    res = sw.evaluate(X["pos:test"], X["neg:test"])
    rows = res.rows
    run.write_csv("probe_layers.csv", rows)
    run.write_json("probe_layers.json", rows)
    meta = sets["pos:train"][0].meta
    dirs = []
    for pr in res.probes:
        for method, vec in (("logistic", pr.logistic_direction), ("mean_diff", pr.mean_diff)):
            dirs.append(Direction(torch.tensor(vec, dtype=torch.float32), layer=pr.layer, method=method,
                                  model_id=lm.model_id, model_checksum=lm.checksum, d_model=lm.d_model,
                                  position=position, prompt_set_hashes={"positive": sets["pos:train"][1].hash,
                                                                        "negative": sets["neg:train"][1].hash},
                                  template_hash=meta["template_hash"], meta={"source": "probe_sweep"}))
    save_directions(run.path / "probe_directions.safetensors", dirs)
    title = f"{lm.model_id}: {positive} vs {negative} ({position} token)"
    run.save_figure("probe_auroc_vs_layer.png", plots.probe_curves(rows, title))
    run.save_figure("probe_cosine_logistic_vs_mean_diff.png",
                    plots.cosine_curve(rows, "cosine(logistic direction, mean-difference direction)"))
    C = sw.direction_cosines("mean_diff")
    run.save_figure("probe_direction_cosines.png",
                    plots.heatmap(C, "cosine of mean-difference directions across layers", "layer", "layer",
                                  layer_ids, layer_ids, vmin=-1, vmax=1, cmap="RdBu_r"))
    timing = {"capture_seconds": round(t_cap, 2), "fit_seconds": round(sw.fit_seconds_, 2),
              "fit_over_capture": round(sw.fit_seconds_ / max(t_cap, 1e-9), 3),
              "n_prompts": sum(a.n_prompts for a, _ in sets.values()), "n_layers": len(layer_ids)}
    run.write_json("probe_timing.json", timing)
    best = res.best_layer("logistic_auroc")
    br = next(r for r in rows if r["layer"] == best)
    summary = {"best_layer": best, "best_logistic_auroc": br["logistic_auroc"],
               "best_logistic_auroc_ci": [br.get("logistic_auroc_lo"), br.get("logistic_auroc_hi")],
               "best_mean_diff_auroc": max(r["mean_diff_auroc"] for r in rows), **timing}
    run.write_json("probe_summary.json", summary)
    return {"rows": rows, "summary": summary, "directions": dirs}


def default_overlap_sets() -> dict[str, list[str]]:
    """U (utility task prompts) and two disjoint halves H1, H2 of the harmful set (seeded)."""
    harmful = builtin("harmful")
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(harmful))
    half = len(harmful) // 2
    util = builtin("utility").texts[:half]
    return {"U": util, "H1": [harmful.texts[i] for i in perm[:half]], "H2": [harmful.texts[i] for i in perm[half:2 * half]]}


def run_overlap(lm: Any, fmt: Any, run: RunFolder, sets: dict[str, Any], *, position: str = "last",
                backend: str = "native", etas: Any = DEFAULT_ETAS, n_boot: int = 30, plot_eta: float = 0.5,
                seed: int = 0, ceiling: str | None = "H1~H2") -> dict[str, Any]:
    """``sets[name]`` is a list of prompts (captured here) or precomputed :class:`Activations`."""
    from probes import plots

    X = {}
    for name, item in sets.items():
        a = item if isinstance(item, Activations) else capture(lm, item, layers="all", positions=[position], fmt=fmt,
                                                                 backend=backend)
        X[name] = stack_layers(a, position)
    res = activation_overlap(X, etas=etas, n_boot=n_boot, seed=seed, progress=True)
    run.write_csv("overlap.csv", res.rows)
    L = X[next(iter(X))].shape[1]
    for centered in (True, False):
        tag = "centred" if centered else "uncentred"
        table = res.table(plot_eta, centered)
        ceil = ceiling if ceiling in table else None
        run.save_figure(f"overlap_vs_layer_{tag}.png",
                        plots.overlap_vs_layer(table, plot_eta, centered, lm.model_id, ceil))
        for pair in sorted({r["pair"] for r in res.rows}):
            M = np.zeros((len(etas), L))
            for r in res.rows:
                if r["pair"] == pair and r["centered"] == centered:
                    M[list(etas).index(r["eta"]), r["layer"]] = r["mso"]
            run.save_figure(f"overlap_heatmap_{pair.replace('~', '_vs_')}_{tag}.png",
                            plots.heatmap(M, f"MSO {pair} ({tag})", "layer", "η", list(range(L)), list(etas),
                                          vmin=0, vmax=1))
    # summary at plot_eta, centred: mean over layers of each pair
    summ = {}
    for pair, rows in res.table(plot_eta, True).items():
        summ[pair] = {"mean_mso": float(np.mean([r["mso"] for r in rows])),
                      "mean_baseline": float(np.mean([r["baseline"] for r in rows]))}
    run.write_json("overlap_summary.json", {"eta": plot_eta, "centered": True, "pairs": summ})
    return {"rows": res.rows, "summary": summ}


# -- CLI ------------------------------------------------------------------------------------------

def cmd_probe(args: argparse.Namespace) -> int:
    from workbench.cli import format_from_args, load_from_args

    seed_everything(args.seed)
    # everything that needs no model first: prompt sets and their splits, the position, the output folder
    splits = [*_splits(args.positive), *_splits(args.negative)]
    _check_position(args.position)
    inputs = input_paths(args.model, args.positive, args.negative)
    check_out(args.out, overwrite=args.overwrite, inputs=inputs)
    lm = load_from_args(args)
    fmt = format_from_args(args, lm)
    parse_layers(args.layers, lm.n_layers)
    check_context(lm, fmt, [ps.texts for ps in splits])
    run = RunFolder(args.out, config=vars(args) | {"command": "probe"}, overwrite=args.overwrite, inputs=inputs)
    run.record_model(lm)
    out = run_probe_sweep(lm, fmt, run, args.positive, args.negative, layers=args.layers, position=args.position,
                          backend=args.backend, n_boot=args.n_boot, seed=args.seed)
    _print_probe(out)
    return 0


def _print_probe(out: dict[str, Any]) -> None:
    print(f"{'layer':>5} {'logistic AUROC [95% CI]':>26} {'mean-diff AUROC':>16} {'acc':>6} {'cos':>6}")
    for r in out["rows"]:
        ci = f"[{r.get('logistic_auroc_lo', float('nan')):.3f},{r.get('logistic_auroc_hi', float('nan')):.3f}]"
        print(f"{r['layer']:>5} {r['logistic_auroc']:>8.3f} {ci:>17} {r['mean_diff_auroc']:>16.3f} "
              f"{r['logistic_accuracy']:>6.3f} {r['cos_logistic_mean_diff']:>6.2f}")
    s = out["summary"]
    print(f"best layer {s['best_layer']}: logistic AUROC {s['best_logistic_auroc']:.3f}; "
          f"capture {s['capture_seconds']} s, fitting all layers {s['fit_seconds']} s")


def cmd_overlap(args: argparse.Namespace) -> int:
    from workbench.cli import format_from_args, load_from_args

    seed_everything(args.seed)
    specs = []
    if args.sets:
        sets = {}
        for item in args.sets:
            if "=" not in item or not item.split("=", 1)[0].strip():
                raise WorkbenchError(f"--sets items must look like name=file_or_builtin, got '{item}'")
            name, spec = item.split("=", 1)
            if name in sets:
                raise WorkbenchError(f"--sets names the set '{name}' twice")
            sets[name] = resolve_prompts(spec).texts
            specs.append(spec)
            if len(sets[name]) < 2:
                raise WorkbenchError(f"set '{name}' ({spec}) has {len(sets[name])} prompt; need at least 2")
        if len(sets) < 2:
            raise WorkbenchError(f"--sets needs at least two sets to compare, got {list(sets)}")
    else:
        sets = default_overlap_sets()
    etas = list(args.etas) if args.etas else list(DEFAULT_ETAS)
    bad = [e for e in etas if not 0 < e <= 1]
    if bad:
        raise WorkbenchError(f"--etas must be in (0, 1], got {bad}")
    if args.plot_eta not in etas:
        raise WorkbenchError(f"--plot-eta {args.plot_eta} is not in the eta grid {etas}")
    _check_position(args.position)
    inputs = input_paths(args.model, specs)
    check_out(args.out, overwrite=args.overwrite, inputs=inputs)
    lm = load_from_args(args)
    fmt = format_from_args(args, lm)
    check_context(lm, fmt, list(sets.values()))
    run = RunFolder(args.out, config=vars(args) | {"command": "overlap"}, overwrite=args.overwrite, inputs=inputs)
    run.record_model(lm)
    out = run_overlap(lm, fmt, run, sets, position=args.position, backend=args.backend, etas=etas,
                      n_boot=args.n_boot, plot_eta=args.plot_eta, seed=args.seed, ceiling=args.ceiling)
    for pair, s in out["summary"].items():
        print(f"{pair:>12}: mean MSO over layers {s['mean_mso']:.3f} (random baseline {s['mean_baseline']:.3f})")
    return 0


def register(sub: Any) -> None:
    from workbench.cli import add_model_args

    p = sub.add_parser("probe", help="per-layer linear probe sweep (logistic + mean-difference)")
    add_model_args(p)
    p.add_argument("--positive", default="harmful", help="builtin name or file (label 1)")
    p.add_argument("--negative", default="harmless", help="builtin name or file (label 0)")
    p.add_argument("--layers", default="all")
    p.add_argument("--position", default="last", help="last, mean, or an index like -2")
    p.add_argument("--n-boot", type=nonnegative_int, default=1000)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("overlap", help="activation-subspace overlap per layer (study experiment 4)")
    add_model_args(p)
    p.add_argument("--sets", nargs="*", help="name=file_or_builtin ... (default: U=utility, H1/H2 = harmful halves)")
    p.add_argument("--position", default="last")
    p.add_argument("--etas", default="", type=finite_float_list,
                   help="comma list of energy fractions (default 0.01,0.1..0.9,0.99)")
    p.add_argument("--plot-eta", type=finite_float, default=0.5)
    p.add_argument("--ceiling", default="H1~H2", help="pair drawn as the noise ceiling")
    p.add_argument("--n-boot", type=nonnegative_int, default=30)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_overlap)


def main_stage(ctx: Any) -> None:
    """Probe sweep and overlap on the main job's shared capture (only the utility prompts are new)."""
    core = ctx.results["core_acts"]
    sub = RunFolder(ctx.run.path / "probes", config={"stage": "probes"}, overwrite=True)
    acts = {"pos:train": core["harmful:train"], "pos:test": core["harmful:test"],
            "neg:train": core["harmless:train"], "neg:test": core["harmless:test"]}
    out = run_probe_sweep(ctx.lm, ctx.fmt, sub, "harmful", "harmless", backend=ctx.args.backend,
                          n_boot=200 if ctx.quick else 1000, seed=ctx.args.seed, acts=acts)
    _print_probe(out)
    ctx.results["probes"] = out
    # U = utility tasks, H1 / H2 = two disjoint halves of the harmful train split (same size)
    h = core["harmful:train"]
    half = h.n_prompts // 2
    sets: dict[str, Any] = {"U": builtin("utility").texts[:half], "H1": h.select(slice(0, half)),
                            "H2": h.select(slice(half, 2 * half))}
    ov = RunFolder(ctx.run.path / "overlap", config={"stage": "overlap", "sets": {"U": f"utility[:{half}]",
                   "H1": f"harmful:train[:{half}]", "H2": f"harmful:train[{half}:{2 * half}]"}}, overwrite=True)
    res = run_overlap(ctx.lm, ctx.fmt, ov, sets, backend=ctx.args.backend, n_boot=5 if ctx.quick else 30,
                      seed=ctx.args.seed)
    for pair, s in res["summary"].items():
        print(f"overlap {pair:>6}: mean MSO over layers {s['mean_mso']:.3f} (random baseline {s['mean_baseline']:.3f})")
    ctx.results["overlap"] = res


MAIN_STAGE = (10, main_stage)
