"""``workbench probe`` and ``workbench overlap``, and the probes stage of the main job.

Each measurement is two steps, so that a worker can measure and the driver write: :func:`probe_outcome` /
:func:`overlap_outcome` (capture and fit or measure: a small :class:`ProbeOutcome` / :class:`OverlapOutcome`) and
:func:`write_probe_run` / :func:`write_overlap_run` (the run folder's files). With ``--model`` given more than
once, or ``--executor ray``, each model is one executor task (:mod:`probes.across`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from probes.overlap import (DEFAULT_ETAS, PROTOCOL_CHOICES, PROTOCOLS, STUDY_SLICE, ProtocolOverlap, protocol_names,
                            protocol_overlap)
from probes.sweep import ProbeSweep, SweepResult
from workbench.capture import Activations, capture
from workbench.errors import WorkbenchError
from workbench.prompts import BUILTIN_NAMES, PromptSet, builtin, resolve_prompts, split_prompts
from workbench.argtypes import (check_context, finite_float, finite_float_list, input_paths, nonnegative_int,
                                positive_int)
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
    if ":" in spec and spec.split(":")[0] in BUILTIN_NAMES:
        raise WorkbenchError("give the set name without a split (train and test splits are used automatically)")
    ps = resolve_prompts(spec)
    sp = split_prompts(ps)
    return sp["train"], sp["test"]


@dataclass
class ProbeOutcome:
    """What the probe sweep of one model measured, without the model: small and picklable, so a worker can
    compute it (:func:`probe_outcome`) and the driver alone write it (:func:`write_probe_run`).

    ``rows``: per-layer held-out metrics; ``directions``: the logistic and mean-difference direction of every
    layer (``2 * layers * d_model`` floats); ``cosines``: ``[layers, layers]`` cosines of the mean-difference
    directions; ``timing``: capture and fit seconds; ``model``: ``lm.describe()`` (id, checksum, shape).

    Example::

        >>> out = probe_outcome(lm, fmt, probe_splits("harmful", "harmless"), n_boot=0)  # doctest: +SKIP
        >>> [r["layer"] for r in out.rows], out.cosines.shape                           # doctest: +SKIP
        ([0, 1], (2, 2))
    """

    rows: list[dict[str, Any]]
    directions: list[Direction]
    cosines: np.ndarray
    layer_ids: list[int]
    timing: dict[str, Any]
    model: dict[str, Any]


def probe_splits(positive: str, negative: str) -> dict[str, PromptSet]:
    """The four prompt sets of a probe sweep, keyed ``pos:train``, ``pos:test``, ``neg:train``, ``neg:test``
    (:func:`_splits`: a builtin's fixed splits, a file split 60/20/20)."""
    out: dict[str, PromptSet] = {}
    for label, spec in (("pos", positive), ("neg", negative)):
        out[f"{label}:train"], out[f"{label}:test"] = _splits(spec)
    return out


def probe_outcome(lm: Any, fmt: Any, splits: dict[str, PromptSet], *, layers: Any = "all", position: str = "last",
                  backend: str = "native", n_boot: int = 1000, limit: int | None = None, seed: int = 0,
                  acts: dict[str, Activations] | None = None) -> ProbeOutcome:
    """Capture ``splits`` (:func:`probe_splits`), fit on the train sets, evaluate on the test sets. ``acts`` may
    hold precomputed captures under the same keys (the main job passes its shared capture)."""
    sets: dict[str, tuple[Activations, Any]] = {}
    t_cap = 0.0
    for key in ("pos:train", "pos:test", "neg:train", "neg:test"):
        ps = splits[key]
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
    meta = sets["pos:train"][0].meta
    dirs = []
    for pr in res.probes:
        for method, vec in (("logistic", pr.logistic_direction), ("mean_diff", pr.mean_diff)):
            dirs.append(Direction(torch.tensor(vec, dtype=torch.float32), layer=pr.layer, method=method,
                                  model_id=lm.model_id, model_checksum=lm.checksum, d_model=lm.d_model,
                                  position=position, prompt_set_hashes={"positive": sets["pos:train"][1].hash,
                                                                        "negative": sets["neg:train"][1].hash},
                                  template_hash=meta["template_hash"], meta={"source": "probe_sweep"}))
    timing = {"capture_seconds": round(t_cap, 2), "fit_seconds": round(sw.fit_seconds_, 2),
              "fit_over_capture": round(sw.fit_seconds_ / max(t_cap, 1e-9), 3),
              "n_prompts": sum(a.n_prompts for a, _ in sets.values()), "n_layers": len(layer_ids)}
    return ProbeOutcome(res.rows, dirs, sw.direction_cosines("mean_diff"), layer_ids, timing, lm.describe())


def probe_summary(out: ProbeOutcome) -> dict[str, Any]:
    """The best layer by held-out logistic AUROC (the lower layer on ties), with the timing."""
    rows = out.rows
    best = SweepResult(rows).best_layer("logistic_auroc")
    br = next(r for r in rows if r["layer"] == best)
    return {"best_layer": best, "best_logistic_auroc": br["logistic_auroc"],
            "best_logistic_auroc_ci": [br.get("logistic_auroc_lo"), br.get("logistic_auroc_hi")],
            "best_mean_diff_auroc": max(r["mean_diff_auroc"] for r in rows), **out.timing}


def write_probe_run(run: RunFolder, out: ProbeOutcome, positive: str, negative: str,
                    position: str = "last") -> dict[str, Any]:
    """Write a probe sweep's files into ``run``: ``probe_layers.csv`` / ``.json``, ``probe_directions.safetensors``,
    ``probe_timing.json``, ``probe_summary.json`` and three plots."""
    from probes import plots  # matplotlib: imported when a run draws, not when the CLI starts

    rows, layer_ids = out.rows, out.layer_ids
    run.write_csv("probe_layers.csv", rows)
    run.write_json("probe_layers.json", rows)
    save_directions(run.path / "probe_directions.safetensors", out.directions)
    title = f"{out.model['model_id']}: {positive} vs {negative} ({position} token)"
    run.save_figure("probe_auroc_vs_layer.png", plots.probe_curves(rows, title))
    run.save_figure("probe_cosine_logistic_vs_mean_diff.png",
                    plots.cosine_curve(rows, "cosine(logistic direction, mean-difference direction)"))
    run.save_figure("probe_direction_cosines.png",
                    plots.heatmap(out.cosines, "cosine of mean-difference directions across layers", "layer", "layer",
                                  layer_ids, layer_ids, vmin=-1, vmax=1, cmap="RdBu_r"))
    run.write_json("probe_timing.json", out.timing)
    summary = probe_summary(out)
    run.write_json("probe_summary.json", summary)
    return {"rows": rows, "summary": summary, "directions": out.directions}


def run_probe_sweep(lm: Any, fmt: Any, run: RunFolder, positive: str, negative: str, *, layers: Any = "all",
                    position: str = "last", backend: str = "native", n_boot: int = 1000, limit: int | None = None,
                    seed: int = 0, acts: dict[str, Activations] | None = None) -> dict[str, Any]:
    """Fit on the train splits, evaluate on the test splits, write the run's files (:func:`probe_outcome`, then
    :func:`write_probe_run`). ``acts`` may hold precomputed captures keyed ``pos:train``, ``pos:test``,
    ``neg:train``, ``neg:test`` (the main job passes its shared capture)."""
    out = probe_outcome(lm, fmt, probe_splits(positive, negative), layers=layers, position=position,
                        backend=backend, n_boot=n_boot, limit=limit, seed=seed, acts=acts)
    return write_probe_run(run, out, positive, negative, position)


def default_overlap_sets() -> dict[str, list[str]]:
    """U (utility task prompts) and two disjoint halves H1, H2 of the harmful set (seeded): the sets of the
    "workbench" protocol (see :func:`protocol_overlap_sets` for both protocols' sets)."""
    harmful = builtin("harmful")
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(harmful))
    half = len(harmful) // 2
    util = builtin("utility").texts[:half]
    return {"U": util, "H1": [harmful.texts[i] for i in perm[:half]], "H2": [harmful.texts[i] for i in perm[half:2 * half]]}


def protocol_overlap_sets(protocols: Sequence[str] = tuple(PROTOCOLS), n: int | None = None
                          ) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """The prompt sets of experiment 4's protocols (each set once: they are captured once) and each
    protocol's roles ``{role: set name}``.

    Both protocols share H1 = one seeded half of the built-in harmful set ("harmful"). The workbench protocol:
    H2 = the other half ("harmful_half2"), U = arithmetic tasks ("utility"). The study protocol: H2 =
    "harmful_styled", U = "useful_requests" (their first ``n`` prompts: the files interleave the categories,
    so any prefix is balanced). Every role gets the same ``n`` prompts, by default the most that every
    chosen protocol's sets allow.

    >>> sets, roles = protocol_overlap_sets(n=10)
    >>> sorted(sets)
    ['harmful', 'harmful_half2', 'harmful_styled', 'useful_requests', 'utility']
    >>> roles["study"], {len(v) for v in sets.values()}
    ({'U': 'useful_requests', 'H1': 'harmful', 'H2': 'harmful_styled'}, {10})
    """
    chosen = [p for p in PROTOCOLS if p in protocols]
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not chosen:
        raise WorkbenchError(f"unknown protocols {unknown or list(protocols)}; choose from {', '.join(PROTOCOLS)}")
    harmful = builtin("harmful")
    perm = np.random.default_rng(0).permutation(len(harmful))
    half = len(harmful) // 2
    styled, useful = builtin("harmful_styled"), builtin("useful_requests")
    cap = {"workbench": half, "study": min(half, len(styled), len(useful))}
    n_max = min(cap[p] for p in chosen)
    n = n_max if n is None else int(n)
    if not 2 <= n <= n_max:
        raise WorkbenchError(f"prompts per set must be between 2 and {n_max} for protocols {chosen}, got {n}")
    sets: dict[str, list[str]] = {"harmful": [harmful.texts[i] for i in perm[:n]]}
    roles: dict[str, dict[str, str]] = {}
    for p in chosen:
        if p == "study":
            sets["useful_requests"], sets["harmful_styled"] = useful.texts[:n], styled.texts[:n]
            roles[p] = {"U": "useful_requests", "H1": "harmful", "H2": "harmful_styled"}
        else:
            sets["utility"] = builtin("utility").texts[:n]
            sets["harmful_half2"] = [harmful.texts[i] for i in perm[half:half + n]]
            roles[p] = {"U": "utility", "H1": "harmful", "H2": "harmful_half2"}
    return sets, roles


@dataclass
class OverlapOutcome:
    """What experiment 4 measured on one model, without the model: small and picklable, so a worker can
    compute it (:func:`overlap_outcome`) and the driver alone write it (:func:`write_overlap_run`).

    ``result``: the per-layer rows and the subsample draws (:class:`probes.overlap.ProtocolOverlap`,
    ``protocols x pairs x etas x layers x n_boot`` floats); ``n_prompts``: prompts captured per set;
    ``model``: ``lm.describe()``.

    Example::

        >>> out = overlap_outcome(lm, fmt, *protocol_overlap_sets(n=6), n_boot=0)  # doctest: +SKIP
        >>> out.n_prompts["harmful"], out.result.n_layers                          # doctest: +SKIP
        (6, 2)
    """

    result: ProtocolOverlap
    n_prompts: dict[str, int]
    model: dict[str, Any]


def overlap_outcome(lm: Any, fmt: Any, sets: dict[str, Any], protocols: dict[str, dict[str, str]], *,
                    position: str = "last", backend: str = "native", etas: Any = DEFAULT_ETAS, n_boot: int = 30,
                    seed: int = 0) -> OverlapOutcome:
    """Capture every set a protocol names (once, however many protocols use it) and measure the overlap under
    each protocol. ``sets[name]``: a list of prompts or precomputed :class:`Activations`."""
    X: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(s for roles in protocols.values() for s in roles.values()):
        if name not in sets:
            raise WorkbenchError(f"a protocol names the set '{name}', which was not given ({list(sets)})")
        item = sets[name]
        a = item if isinstance(item, Activations) else capture(lm, item, layers="all", positions=[position], fmt=fmt,
                                                                 backend=backend)
        X[name] = stack_layers(a, position)
    res = protocol_overlap(X, protocols, etas=list(etas), n_boot=n_boot, seed=seed, progress=True)
    return OverlapOutcome(res, {k: int(v.shape[0]) for k, v in X.items()}, lm.describe())


def overlap_layer_rows(res: ProtocolOverlap, protocols: Sequence[str], eta: float) -> list[dict[str, Any]]:
    """Per layer at ``eta``, the protocols side by side: ``layer, depth, in_slice`` and per ``protocol:pair``
    the MSO, its interval (``:lo``, ``:hi``) and the random baseline (``:baseline``)."""
    wide = []
    for j in range(res.n_layers):
        row: dict[str, Any] = {"layer": j, "depth": round(j / max(res.n_layers - 1, 1), 4),
                               "in_slice": j in res.slice_layers}
        for p in protocols:
            for pair, rows in res.table(p, eta).items():
                r = rows[j]
                row[f"{p}:{pair}"] = r["mso"]
                if "mso_lo" in r:
                    row[f"{p}:{pair}:lo"], row[f"{p}:{pair}:hi"] = r["mso_lo"], r["mso_hi"]
                row[f"{p}:{pair}:baseline"] = r["baseline"]
        wide.append(row)
    return wide


def write_overlap_run(run: RunFolder, out: OverlapOutcome, protocols: dict[str, dict[str, str]], *,
                      etas: Any = DEFAULT_ETAS, n_boot: int = 30, plot_eta: float = 0.5, position: str = "last",
                      ceiling: str | None = "H1~H2") -> dict[str, Any]:
    """Write experiment 4's files into ``run`` (listed in :func:`run_overlap`)."""
    from probes import plots

    etas = list(etas)
    res, model_id = out.result, out.model["model_id"]
    run.write_csv("overlap.csv", res.rows)
    L = res.n_layers
    run.write_csv("overlap_layers.csv", overlap_layer_rows(res, list(protocols), plot_eta))
    averages_rows = []
    for p in protocols:
        for eta in etas:
            for pair in res.table(p, eta):
                for which in ("slice", "all"):
                    a = res.average(p, pair, eta, which)
                    ci = a["ci"] or [None, None]
                    averages_rows.append({"protocol": p, "centered": PROTOCOLS[p].centered, "eta": eta, "pair": pair,
                                          "layers": which, "n_layers": a["n_layers"], "mean_mso": a["mean_mso"],
                                          "mso_lo": ci[0], "mso_hi": ci[1], "mean_baseline": a["mean_baseline"]})
    run.write_csv("overlap_averages.csv", averages_rows)
    summary: dict[str, Any] = {
        "eta": plot_eta, "n_layers": L, "d": res.d, "n_boot": n_boot, "position": position,
        "slice": {"bounds": list(STUDY_SLICE), "layers": res.slice_layers,
                  "rule": "layers l (0-based) with 0.65 <= l / (n_layers - 1) <= 0.90; docs/study.md: 'The original "
                          "averaged layers 65-90 % of depth'"},
        "protocols": {}}
    tables, avgs, labels = {}, {}, {}
    for p, roles in protocols.items():
        proto = PROTOCOLS[p]
        tag = "centred" if proto.centered else "uncentred"
        table = res.table(p, plot_eta)
        tables[p] = table
        avgs[p] = {pair: {w: res.average(p, pair, plot_eta, w) for w in ("slice", "all")} for pair in table}
        labels[p] = f"{tag}, " + ", ".join(f"{r}={s}" for r, s in roles.items())
        ex = {w: res.exp4(p, plot_eta, w) for w in ("slice", "all")}
        summary["protocols"][p] = {
            "description": proto.description, "centered": proto.centered, "headline": proto.headline,
            "sets": dict(roles), "n_prompts": {r: out.n_prompts[s] for r, s in roles.items()},
            "pairs": avgs[p], "exp4": ex if ex["slice"] is not None else None}
        ceil = ceiling if ceiling in table else None
        run.save_figure(f"overlap_vs_layer_{p}_{tag}.png",
                        plots.overlap_vs_layer(table, plot_eta, proto.centered, f"{model_id} [{p}]", ceil))
        for pair in table:
            M = np.zeros((len(etas), L))
            for r in res.rows:
                if r["protocol"] == p and r["pair"] == pair:
                    M[etas.index(r["eta"]), r["layer"]] = r["mso"]
            run.save_figure(f"overlap_heatmap_{pair.replace('~', '_vs_')}_{p}_{tag}.png",
                            plots.heatmap(M, f"MSO {pair} ({p} protocol, {tag})", "layer", "η", list(range(L)), etas,
                                          vmin=0, vmax=1))
    run.save_figure("overlap_protocols.png",
                    plots.overlap_protocols(tables, avgs, res.slice_layers, plot_eta, model_id, labels))
    run.write_json("overlap_summary.json", summary)
    return {"rows": res.rows, "summary": summary, "averages": averages_rows}


def run_overlap(lm: Any, fmt: Any, run: RunFolder, sets: dict[str, Any], *, position: str = "last",
                backend: str = "native", etas: Any = DEFAULT_ETAS, n_boot: int = 30, plot_eta: float = 0.5,
                seed: int = 0, ceiling: str | None = "H1~H2",
                protocols: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Experiment 4 under each protocol, side by side, from one capture of every set.

    ``sets[name]`` is a list of prompts (captured here, once) or precomputed :class:`Activations`.
    ``protocols = {protocol: {role: set name}}`` (see :func:`protocol_overlap_sets`); ``None``: both protocols
    on the given sets as they are (role = set name), so they differ only in centring and layer average.
    Writes ``overlap.csv`` (every protocol, layer, η, pair), ``overlap_layers.csv`` (per layer at ``plot_eta``,
    the protocols side by side), ``overlap_averages.csv`` (all-layer and depth-slice means with subsampling CIs,
    every η), ``overlap_summary.json`` (per protocol at ``plot_eta``: averages, the experiment-4 statistic
    U~H vs H1~H2 on the slice and on all layers, each with its verdict under ``verdict``:
    :func:`workbench.verdict_rules.exp4_activation_overlap`), ``overlap_protocols.png`` and per-protocol plots.
    """
    etas = list(etas)
    if not any(abs(plot_eta - e) < 1e-9 for e in etas):
        raise WorkbenchError(f"plot_eta {plot_eta} is not in the eta grid {etas}")
    if protocols is None:
        protocols = {p: {k: k for k in sets} for p in PROTOCOLS}
    out = overlap_outcome(lm, fmt, sets, protocols, position=position, backend=backend, etas=etas, n_boot=n_boot,
                          seed=seed)
    return write_overlap_run(run, out, protocols, etas=etas, n_boot=n_boot, plot_eta=plot_eta, position=position,
                             ceiling=ceiling)


def _print_overlap(summary: dict[str, Any], prefix: str = "") -> None:
    def ci(x: Any) -> str:
        return f" [{x[0]:.3f}, {x[1]:.3f}]" if x else ""

    sl = summary["slice"]["layers"]
    for p, s in summary["protocols"].items():
        tag = "centred" if s["centered"] else "uncentred"
        print(f"{prefix}[{p} protocol: {tag}; " + ", ".join(f"{r}={n}" for r, n in s["sets"].items())
              + f"; slice = layers {sl[0]}-{sl[-1]}]")
        for pair, a in s["pairs"].items():
            print(f"{prefix}  {pair:>8}: slice mean MSO {a['slice']['mean_mso']:.3f}{ci(a['slice']['ci'])}, "
                  f"all layers {a['all']['mean_mso']:.3f}{ci(a['all']['ci'])} "
                  f"(random baseline {a['all']['mean_baseline']:.3f})")
        e = (s.get("exp4") or {}).get("slice")
        if e:
            ratio = f", ratio {e['ratio']:.2f}{ci(e['ratio_ci'])}" if e["ratio"] is not None else ""
            print(f"{prefix}  exp 4 on the slice: U~H {e['u_h']:.3f}{ci(e['u_h_ci'])} vs H1~H2 "
                  f"{e['h1_h2']:.3f}{ci(e['h1_h2_ci'])}: difference {e['diff']:+.3f}{ci(e['diff_ci'])}{ratio}")
            v = e.get("verdict")
            if v:
                print(f"{prefix}  exp 4 verdict ({v['claim']}): {v['verdict']} "
                      f"(|D| <= {v['margin']} needed; D {v['direction'] or '-'} the margin band)")


# -- CLI ------------------------------------------------------------------------------------------

def cmd_probe(args: argparse.Namespace) -> int:
    from probes import across
    from workbench.cli import format_from_args, load_from_args
    from workbench.executors import executor_from_args
    from workbench.zoo import DEFAULT_MODEL

    seed_everything(args.seed)
    # everything that needs no model first: the models, prompt sets and their splits, the position, the output
    # folder, the executor (a HOST:PORT must answer)
    sources = across.model_sources(args.model, DEFAULT_MODEL)
    splits = probe_splits(args.positive, args.negative)
    _check_position(args.position)
    inputs = input_paths(sources, args.positive, args.negative)
    check_out(args.out, overwrite=args.overwrite, inputs=inputs)
    executor = executor_from_args(args)
    if len(sources) > 1 or not executor.in_process:  # one executor task per model (probes/across.py)
        work = across.ProbeWork(splits, layers=args.layers, position=args.position, n_boot=args.n_boot)
        done = across.run_across(args, sources, work, executor, inputs, "probe",
                                 across.probe_writer(args.positive, args.negative, args.position))
        for label, out in done:
            _print_probe(out, label if len(done) > 1 else None)
        return 0
    args.model = sources[0]
    lm = load_from_args(args)
    fmt = format_from_args(args, lm)
    parse_layers(args.layers, lm.n_layers)
    check_context(lm, fmt, [ps.texts for ps in splits.values()])
    run = RunFolder(args.out, config=vars(args) | {"command": "probe"}, overwrite=args.overwrite, inputs=inputs)
    run.record_model(lm)
    out = run_probe_sweep(lm, fmt, run, args.positive, args.negative, layers=args.layers, position=args.position,
                          backend=args.backend, n_boot=args.n_boot, seed=args.seed)
    _print_probe(out)
    return 0


def _print_probe(out: dict[str, Any], title: str | None = None) -> None:
    if title:
        print(f"== {title}")
    print(f"{'layer':>5} {'logistic AUROC [95% CI]':>26} {'mean-diff AUROC':>16} {'acc':>6} {'cos':>6}")
    for r in out["rows"]:
        ci = f"[{r.get('logistic_auroc_lo', float('nan')):.3f},{r.get('logistic_auroc_hi', float('nan')):.3f}]"
        print(f"{r['layer']:>5} {r['logistic_auroc']:>8.3f} {ci:>17} {r['mean_diff_auroc']:>16.3f} "
              f"{r['logistic_accuracy']:>6.3f} {r['cos_logistic_mean_diff']:>6.2f}")
    s = out["summary"]
    print(f"best layer {s['best_layer']}: logistic AUROC {s['best_logistic_auroc']:.3f}; "
          f"capture {s['capture_seconds']} s, fitting all layers {s['fit_seconds']} s")


def cmd_overlap(args: argparse.Namespace) -> int:
    from probes import across
    from workbench.cli import format_from_args, load_from_args
    from workbench.executors import executor_from_args
    from workbench.zoo import DEFAULT_MODEL

    seed_everything(args.seed)
    sources = across.model_sources(args.model, DEFAULT_MODEL)
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
        protocols = {p: {k: k for k in sets} for p in protocol_names(args.protocol)}
        if args.n_per_set is not None:
            raise WorkbenchError("--n-per-set sizes the built-in protocol sets; with --sets, give the files you want")
    else:
        sets, protocols = protocol_overlap_sets(protocol_names(args.protocol), n=args.n_per_set)
    etas = list(args.etas) if args.etas else list(DEFAULT_ETAS)
    bad = [e for e in etas if not 0 < e <= 1]
    if bad:
        raise WorkbenchError(f"--etas must be in (0, 1], got {bad}")
    if args.plot_eta not in etas:
        raise WorkbenchError(f"--plot-eta {args.plot_eta} is not in the eta grid {etas}")
    small = {k: len(v) for k, v in sets.items() if len(v) < 3}
    if args.n_boot and small:  # intervals subsample half of each set without replacement (probes/overlap.py)
        raise WorkbenchError(f"--n-boot {args.n_boot}: subsampling intervals need at least 3 prompts per set, got "
                             f"{small}; give more prompts or --n-boot 0")
    _check_position(args.position)
    inputs = input_paths(sources, specs)
    check_out(args.out, overwrite=args.overwrite, inputs=inputs)
    executor = executor_from_args(args)  # a HOST:PORT must answer before any model loads
    if len(sources) > 1 or not executor.in_process:  # one executor task per model (probes/across.py)
        work = across.OverlapWork(sets, protocols, tuple(etas), position=args.position, n_boot=args.n_boot)
        done = across.run_across(args, sources, work, executor, inputs, "overlap",
                                 across.overlap_writer(protocols, etas=etas, n_boot=args.n_boot,
                                                       plot_eta=args.plot_eta, position=args.position,
                                                       ceiling=args.ceiling))
        for label, out in done:
            _print_overlap(out["summary"], prefix=f"{label} " if len(done) > 1 else "")
        return 0
    args.model = sources[0]
    lm = load_from_args(args)
    fmt = format_from_args(args, lm)
    check_context(lm, fmt, list(sets.values()))
    run = RunFolder(args.out, config=vars(args) | {"command": "overlap"}, overwrite=args.overwrite, inputs=inputs)
    run.record_model(lm)
    out = run_overlap(lm, fmt, run, sets, position=args.position, backend=args.backend, etas=etas,
                      n_boot=args.n_boot, plot_eta=args.plot_eta, seed=args.seed, ceiling=args.ceiling,
                      protocols=protocols)
    _print_overlap(out["summary"])
    return 0


def register(sub: Any) -> None:
    from workbench.cli import add_model_args
    from workbench.executors import add_executor_args

    p = sub.add_parser("probe", help="per-layer linear probe sweep (logistic + mean-difference); --model repeatable")
    add_model_args(p, repeat=True)
    p.add_argument("--positive", default="harmful", help="builtin name or file (label 1)")
    p.add_argument("--negative", default="harmless", help="builtin name or file (label 0)")
    p.add_argument("--layers", default="all")
    p.add_argument("--position", default="last", help="last, mean, or an index like -2")
    p.add_argument("--n-boot", type=nonnegative_int, default=1000)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    add_executor_args(p)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("overlap", help="activation-subspace overlap per layer (study experiment 4); --model repeatable")
    add_model_args(p, repeat=True)
    p.add_argument("--sets", nargs="*",
                   help="name=file_or_builtin ... (default: each protocol's own sets, see --protocol); with --sets "
                        "every protocol reads the given sets and they differ only in centring and layer average")
    p.add_argument("--protocol", choices=PROTOCOL_CHOICES, default="both",
                   help="study: uncentred bases, 65-90%% depth-slice average, U=useful_requests, H1=harmful, "
                        "H2=harmful_styled; workbench: centred bases, all-layer average, U=utility, H1/H2 = harmful "
                        "halves; both (default): side by side from one capture")
    p.add_argument("--n-per-set", type=positive_int, default=None,
                   help="prompts per role (U, H1, H2) for the built-in protocol sets (default: the most all allow)")
    p.add_argument("--position", default="last")
    p.add_argument("--etas", default="", type=finite_float_list,
                   help="comma list of energy fractions (default 0.01,0.1..0.9,0.99)")
    p.add_argument("--plot-eta", type=finite_float, default=0.5)
    p.add_argument("--ceiling", default="H1~H2", help="pair drawn as the noise ceiling")
    p.add_argument("--n-boot", type=nonnegative_int, default=30)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    add_executor_args(p)
    p.set_defaults(func=cmd_overlap)


def main_stage(ctx: Any) -> None:
    """Probe sweep and overlap on the main job's shared capture (only the U sets and harmful_styled are new)."""
    core = ctx.results["core_acts"]
    sub = RunFolder(ctx.run.path / "probes", config={"stage": "probes"}, overwrite=True)
    acts = {"pos:train": core["harmful:train"], "pos:test": core["harmful:test"],
            "neg:train": core["harmless:train"], "neg:test": core["harmless:test"]}
    out = run_probe_sweep(ctx.lm, ctx.fmt, sub, "harmful", "harmless", backend=ctx.args.backend,
                          n_boot=200 if ctx.quick else 1000, seed=ctx.args.seed, acts=acts)
    _print_probe(out)
    ctx.results["probes"] = out
    # Experiment 4 under both protocols from one capture of each set, n prompts per role:
    # H1 = first half of the harmful train split (already captured, shared by both protocols);
    # workbench: U = utility tasks, H2 = the other half; study: U = useful_requests, H2 = harmful_styled (new)
    h = core["harmful:train"]
    n = min(h.n_prompts // 2, len(builtin("useful_requests")), len(builtin("harmful_styled")))
    sets: dict[str, Any] = {"harmful": h.select(slice(0, n)), "harmful_half2": h.select(slice(n, 2 * n)),
                            "utility": builtin("utility").texts[:n],
                            "useful_requests": builtin("useful_requests").texts[:n],
                            "harmful_styled": builtin("harmful_styled").texts[:n]}
    protocols = {"study": {"U": "useful_requests", "H1": "harmful", "H2": "harmful_styled"},
                 "workbench": {"U": "utility", "H1": "harmful", "H2": "harmful_half2"}}
    sources = {"harmful": f"harmful:train[:{n}]", "harmful_half2": f"harmful:train[{n}:{2 * n}]",
               "utility": f"utility[:{n}]", "useful_requests": f"useful_requests[:{n}]",
               "harmful_styled": f"harmful_styled[:{n}]"}
    ov = RunFolder(ctx.run.path / "overlap", config={"stage": "overlap", "sets": sources, "protocols": protocols,
                                                     "slice": list(STUDY_SLICE)}, overwrite=True)
    res = run_overlap(ctx.lm, ctx.fmt, ov, sets, backend=ctx.args.backend, n_boot=5 if ctx.quick else 30,
                      seed=ctx.args.seed, protocols=protocols)
    _print_overlap(res["summary"], prefix="overlap ")
    ctx.results["overlap"] = res


MAIN_STAGE = (10, main_stage)
