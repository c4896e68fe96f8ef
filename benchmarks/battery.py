"""Time of the app's "score this setting" (harm + utility batteries) on the default model: the app's path
(every setting in one batched decoding, the fast kernels of ``workbench.kernels``) against, in the same process
(interleaved repeats), the same path with the default kernels (eager attention, the default BLAS:
``--modes joint,default_kernels``, the default) and/or one setting after another (``one_by_one``).

``--preset app`` (default): what the app scores for its default request (columns unmodified and A = addition
x1 of the direction at its layer, "compare" off, plus the random control of A that the trade-off plot always
gets: three settings, built with the app's own ``apps.ui.column_specs``). ``--preset four``: the heavier case
measured in earlier rounds (unmodified, an ablation column, an addition column x``--alpha``, the random control
of the ablation).

    .venv/bin/python benchmarks/battery.py [--preset app] [--direction FILE] [--repeats 1] [--modes ...]

The direction is the main job's selected direction when ``--direction`` names its file
(``runs/main/steering/selected_direction.safetensors``), else a difference in means at ``--layer`` (default
16, the main job's choice on the default model) from 32 + 32 training prompts, as the app does without a run.
Prints the seconds of each path, their ratios to the app's path, and whether they give the same numbers (every
rate equal, the largest difference of a mean, and how many replies differ: float rounding may flip a greedy
choice). Writes ``benchmarks/results/battery_<preset>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from typing import Any
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from steering.battery import BatteryConfig, make_setting, run_battery  # noqa: E402
from steering.directions import random_like  # noqa: E402
from workbench.backends import get_backend  # noqa: E402
from workbench.chat import ChatFormat  # noqa: E402
from workbench.loading import load_model  # noqa: E402

KEYS = ("refusal_rate", "harm_rate", "refusal_logit", "pass_rate", "answer_nll", "kl")


def _direction(args: argparse.Namespace, lm: object):
    if args.direction:
        from workbench.vectors import load_directions

        return load_directions(args.direction)[0]
    from steering.directions import mean_diff_directions
    from workbench.prompts import builtin_split

    h = builtin_split("harmful", "train").texts[:32]
    b = builtin_split("harmless", "train").texts[:32]
    dirs = mean_diff_directions(lm, h, b, layers=[args.layer])
    return [d for d in dirs if d.position == "pos-1"][0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--direction", default=None)
    ap.add_argument("--layer", type=int, default=16)
    ap.add_argument("--preset", choices=["app", "four"], default="app",
                    help="app: the app's default request (3 settings); four: the earlier 4-setting case")
    ap.add_argument("--alpha", type=float, default=3.0, help="strength of the addition column (--preset four)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", default="joint,default_kernels",
                    help="which paths to time (comma-separated): joint (the app's), one_by_one, default_kernels")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="default benchmarks/results/battery_<preset>.json")
    args = ap.parse_args(argv)
    out = args.out or str(Path(__file__).parent / "results" / f"battery_{args.preset}.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    lm = load_model(args.model)
    load_s = time.perf_counter() - t
    be = get_backend("native", lm)
    d = _direction(args, lm)
    n = be.n_layers
    if args.preset == "app":
        from apps.ui import column_specs

        specs = column_specs(d, n, "addition", 1.0, "", False, "addition", -1.0, "", "random control", 0)
        specs.append(specs[1].with_random_direction(1, "random control"))
        settings = [make_setting(sp.label, sp.kind, sp.direction, n, strength=sp.strength, layers=sp.layers,
                                 info={"control": sp.label == "random control"}) for sp in specs]
    else:
        settings = [make_setting("unmodified", "none", None, be.n_layers),
                    make_setting("A: ablation", "ablation", d, be.n_layers),
                    make_setting("B: addition", "addition", d, be.n_layers, strength=args.alpha),
                    make_setting("random control of A", "ablation", random_like(d, seed=1), be.n_layers,
                                 info={"control": True})]
    cfg = BatteryConfig()
    # joint: the app's path (settings in one batch, the fast kernels); one_by_one: one setting after another;
    # default_kernels: the app's path with eager attention and the default BLAS for the linear layers
    configs = {"joint": (cfg, True), "one_by_one": (cfg, False),
               "default_kernels": (replace(cfg, attention="eager", linear="default"), True)}
    modes = [m for m in configs if m in args.modes.split(",")]
    if "joint" not in modes:
        ap.error("--modes must include joint (the app's path)")
    times: dict[str, list[float]] = {m: [] for m in modes}
    results = {}
    for _ in range(args.repeats):
        for mode in modes:
            c, joint = configs[mode]
            t = time.perf_counter()
            results[mode] = run_battery(be, ChatFormat(), settings, c, joint=joint)
            times[mode].append(time.perf_counter() - t)
            print(f"{mode}: {times[mode][-1]:.1f} s; phases {results[mode].phases}", flush=True)
    compare: dict[str, dict[str, Any]] = {}
    for mode in modes[1:]:
        diffs = {a["setting"]: {k: abs(a[k] - b[k]) for k in KEYS}
                 for a, b in zip(results["joint"].summary, results[mode].summary)}
        compare[mode] = {
            "seconds": [round(x, 1) for x in times[mode]], "phases": results[mode].phases,
            "ratio_over_joint": round(min(times[mode]) / min(times["joint"]), 2),
            "max_abs_summary_difference": max(max(v.values()) for v in diffs.values()),
            "rates_equal": all(a[k] == b[k] for a, b in zip(results["joint"].summary, results[mode].summary)
                               for k in ("refusal_rate", "harm_rate", "pass_rate")),
            "replies_that_differ": sum(1 for x, y in zip(results["joint"].items, results[mode].items)
                                       if x.get("reply") != y.get("reply")),
            "kernels": sorted({(r["attention"], r["linear"]) for r in results[mode].summary}),
        }
    ja = results["joint"].items
    res = {
        "model": args.model, "preset": args.preset, "threads": torch.get_num_threads(), "n_layers": n,
        "load_seconds": round(load_s, 1), "config": asdict(cfg),
        "settings": [s.name for s in settings], "direction": {"layer": d.layer, "position": d.position},
        "seconds_joint": [round(x, 1) for x in times["joint"]],
        "phases_joint": results["joint"].phases,
        "kernels_joint": sorted({(r["attention"], r["linear"]) for r in results["joint"].summary}),
        "compared": compare, "replies": len(ja),
        "summary_joint": [{k: r[k] for k in ("setting",) + KEYS + ("seconds",)} for r in results["joint"].summary],
    }
    print(json.dumps({k: v for k, v in res.items() if k != "summary_joint"}, indent=1))
    for r in res["summary_joint"]:
        print(r)
    Path(out).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
