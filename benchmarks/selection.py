"""Direction selection: exhaustive (every candidate scored exactly) vs gradient-screened (one forward and
backward pass estimates every candidate; exact scores for the top-k estimates), on the main job's validation
prompts (24 + 24; KL <= 0.1) and mean-diff directions from harmful:train vs harmless:train at resid_pre, over
one of two candidate grids:

- ``--grid full`` (default): every layer below 80 % of depth x every post-instruction token — the grid of
  ``workbench steer select`` with its defaults (Arditi et al.'s grid); 95 candidates on the default model,
  120 on smollm2;
- ``--grid main``: the main job's reduced grid (steering/cli.py main_stage, full mode: layers 0, 2, ... below
  80 % of depth x the last two prompt tokens; 18 candidates on the default model, 24 on smollm2).

The screen costs the same whatever the grid; the exhaustive path grows with it.

    .venv/bin/python benchmarks/selection.py --model smollm2-135m-instruct --threads 2
    .venv/bin/python benchmarks/selection.py --model qwen2.5-coder-0.5b-instruct --threads 2
    .venv/bin/python benchmarks/selection.py --model qwen2.5-coder-0.5b-instruct --grid main --threads 2

Prints the time of each path, the ratio (today's exhaustive path / screened; the exhaustive run also computes
the estimates for the rank correlation, and that pass is left out of its time for the ratio), the Spearman
rank correlation estimate-vs-exact over the whole grid and the candidate each path selected. Results are
merged into benchmarks/results/selection.json under "<model>" (main grid, as before) or "<model> [full grid]"
(with ``--no-kl-screen``: "... no KL screen", the screened path before the KL screen existed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from steering.directions import mean_diff_directions  # noqa: E402
from steering.selection import select_direction  # noqa: E402
from workbench.backends import get_backend  # noqa: E402
from workbench.chat import ChatFormat  # noqa: E402
from workbench.loading import load_model  # noqa: E402
from workbench.prompts import resolve_prompts  # noqa: E402


def _texts(spec: str, n: int | None = None) -> list[str]:
    t = resolve_prompts(spec).texts
    return t[:n] if n else t


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    (best,) = [r for r in rows if r["selected"]]
    return {"candidate": best["candidate"], "layer": best["layer"], "position": best["position"],
            "ablation_score": best["ablation_score"], "kl": best["kl"], "steering_score": best["steering_score"],
            "est_rank": best.get("est_rank"), "selected_despite_filters": best["selected_despite_filters"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--confirm-groups", type=int, default=1, help="groups scored after the first passing one")
    ap.add_argument("--no-kl-screen", action="store_true",
                    help="screened path orders by the ablation estimate alone (before the KL screen existed)")
    ap.add_argument("--n-val", type=int, default=24, help="validation prompts per set (main job: 24)")
    ap.add_argument("--kl-max", type=float, default=0.1)
    ap.add_argument("--grid", choices=("full", "main"), default="full",
                    help="full: every layer below 80%% x every post-instruction token (steer select's defaults); "
                         "main: the main job's layers 0, 2, ... x the last two tokens")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "selection.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    fmt = ChatFormat()
    t = time.perf_counter()
    dirs = mean_diff_directions(lm, _texts("harmful:train"), _texts("harmless:train"), fmt=fmt, backend="native")
    t_extract = time.perf_counter() - t
    n_post = max(-int(d.position[3:]) for d in dirs if d.position.startswith("pos-"))
    positions = [f"pos-{k}" for k in range(1, (n_post if args.grid == "full" else min(n_post, 2)) + 1)]
    layers = list(range(0, int(0.8 * lm.n_layers), 1 if args.grid == "full" else 2))
    cands = [d for d in dirs if d.layer in layers and d.position in positions]
    val_h, val_b = _texts("harmful:val", args.n_val), _texts("harmless:val", args.n_val)
    be = get_backend("native", lm)
    kw = dict(harmful_val=val_h, harmless_val=val_b, kl_max=args.kl_max, max_layer_frac=0.8, progress=False)
    print(f"{args.model}: {len(cands)} candidates, {args.grid} grid (layers {layers[0]}..{layers[-1]} step "
          f"{layers[1] - layers[0] if len(layers) > 1 else 1} x {positions}), "
          f"{len(val_h)} + {len(val_b)} validation prompts, {torch.get_num_threads()} threads")

    t = time.perf_counter()
    scr = select_direction(be, fmt, cands, screen=True, top_k=args.top_k, confirm_groups=args.confirm_groups,
                           kl_screen=not args.no_kl_screen, **kw)
    t_scr = time.perf_counter() - t
    print(f"screened:   {t_scr:7.1f} s  ({scr.screening['n_exact_ablation']} exact ablation scores, "
          f"{scr.screening['n_exact_filters']} filter checks, {scr.screening['n_exact_kl_only']} KL-only checks; "
          f"estimate pass {scr.screening['estimate_seconds']:.1f} s)")
    t = time.perf_counter()
    exh = select_direction(be, fmt, cands, screen=False, estimate=True, **kw)
    t_exh_total = time.perf_counter() - t
    t_exh = t_exh_total - exh.screening["estimate_seconds"]
    print(f"exhaustive: {t_exh:7.1f} s  (+ {exh.screening['estimate_seconds']:.1f} s estimate pass for the correlation)")

    ratio = t_exh / t_scr
    s_best, e_best = _summary(scr.rows), _summary(exh.rows)
    exact_order = sorted((r for r in exh.rows if not math.isnan(r["ablation_score"])),
                         key=lambda r: r["ablation_score"])
    passing = [r["candidate"] for r in exact_order if not r["filtered"]]
    res = {
        "model": args.model, "grid": args.grid, "threads": torch.get_num_threads(), "n_candidates": len(cands),
        "layers": layers, "positions": positions, "n_val": [len(val_h), len(val_b)], "top_k": args.top_k,
        "confirm_groups": args.confirm_groups, "kl_screen": not args.no_kl_screen,
        "kl_max": args.kl_max, "extract_seconds": t_extract, "baseline": exh.baseline,
        "screened_seconds": t_scr, "exhaustive_seconds": t_exh, "exhaustive_with_estimate_seconds": t_exh_total,
        "ratio": ratio, "target_ratio": 5.0,
        "spearman_ablation": exh.screening["spearman_ablation"],
        "spearman_steering": exh.screening["spearman_steering"],
        "spearman_kl": exh.screening.get("spearman_kl"),
        "screened": {"selected": s_best, "screening": scr.screening},
        "exhaustive": {"selected": e_best, "screening": exh.screening},
        "same_selection": s_best["candidate"] == e_best["candidate"],
        "exhaustive_choice_est_rank": e_best["est_rank"],
        "screened_choice_rank_among_passing_exact": (passing.index(s_best["candidate"]) + 1
                                                     if s_best["candidate"] in passing else None),
        "rows": [{k: r.get(k) for k in ("candidate", "layer", "position", "ablation_score_est", "ablation_score",
                                         "steering_score_est", "steering_score", "kl", "kl_est", "est_rank", "filtered")}
                 for r in exh.rows],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    allres = json.loads(out.read_text()) if out.exists() else {}
    key = args.model if args.grid == "main" else f"{args.model} [full grid]"
    allres[key + (" no KL screen" if args.no_kl_screen else "")] = res
    out.write_text(json.dumps(allres, indent=2, allow_nan=True) + "\n")
    print(f"ratio exhaustive/screened: {ratio:.2f}x (target >= 5x)")
    print(f"Spearman estimate vs exact over the grid: ablation {res['spearman_ablation']:.3f}, "
          f"steering {res['spearman_steering']:.3f}, KL {res['spearman_kl'] or math.nan:.3f}")
    print(f"selected: screened layer {s_best['layer']} {s_best['position']} (candidate {s_best['candidate']}), "
          f"exhaustive layer {e_best['layer']} {e_best['position']} (candidate {e_best['candidate']}, estimate rank "
          f"{e_best['est_rank']}); same: {res['same_selection']}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
