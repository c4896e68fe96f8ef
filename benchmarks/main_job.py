"""The main job's stages, old path vs new path, in one process on one model (default: the default model).

Old path (the first release): float32 forward passes, generation in batches of 8, exhaustive direction
selection. New path: ``--dtype auto`` (bfloat16 on a CPU with AVX512-BF16/AMX), generation batches sized for
the machine, gradient-screened selection. Each stage runs the same work both ways on the same prompts:

- ``capture``: the core capture (resid_pre + resid_post, every layer, post-instruction tokens) of ``--n``
  harmful and ``--n`` harmless prompts, without the on-disk cache;
- ``selection``: the main job's candidate grid (every 2nd layer below 80 % depth x pos-1, pos-2) on its
  validation prompts (24 + 24);
- ``evaluation``: ``--conditions`` steering conditions (unmodified, ablation of the selected direction, ...)
  on ``--n`` harmful and ``--n`` harmless prompts, ``--max-new-tokens`` tokens each.

Sizes are smaller than the full main job by default so that the old path finishes; ratios are what this
measures (the full new main job's own stage times are in its run folder, ``stage_times.json``).

    python benchmarks/main_job.py --threads 2            # -> benchmarks/results/main_job.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n", type=int, default=32, help="prompts per set for capture and evaluation")
    ap.add_argument("--conditions", type=int, default=2, help="evaluation conditions (2 = unmodified + ablation)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--skip-selection", action="store_true", help="(exhaustive selection takes minutes)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "main_job.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from steering.cli import _texts
    from steering.directions import mean_diff_from_activations
    from steering.evaluate import Condition, evaluate_conditions
    from steering.interventions import ablation, addition
    from steering.selection import select_direction
    from workbench.backends import get_backend
    from workbench.capture import capture
    from workbench.chat import ChatFormat
    from workbench.loading import load_model

    res: dict[str, Any] = {"model": args.model, "threads": torch.get_num_threads(), "n": args.n,
                           "conditions": args.conditions, "max_new_tokens": args.max_new_tokens, "stages": {}}
    paths = {"old": {"dtype": "float32", "batch_size": 8, "screen": False},
             "new": {"dtype": "auto", "batch_size": None, "screen": True}}
    harmful_tr, harmless_tr = _texts("harmful:train", args.n), _texts("harmless:train", args.n)
    harmful_te, harmless_te = _texts("harmful:test", args.n), _texts("harmless:test", args.n)
    val_h, val_b = _texts("harmful:val", 24), _texts("harmless:val", 24)
    for name, cfg in paths.items():
        t_load, lm = _timed(lambda: load_model(args.model, dtype=cfg["dtype"]))
        fmt = ChatFormat(system_prompt=lm.default_system_prompt)
        be = get_backend("native", lm)
        st = res["stages"]
        st.setdefault("load", {})[name] = round(t_load, 2)
        t_cap, acts = _timed(lambda: {k: capture(lm, v, layers="all", components=("resid_pre", "resid_post"),
                                                 positions=["post_instruction"], fmt=fmt, cache=False,
                                                 progress=False)
                                      for k, v in (("h", harmful_tr), ("b", harmless_tr))})
        st.setdefault("capture", {})[name] = round(t_cap, 2)
        dirs = mean_diff_from_activations(lm, acts["h"], acts["b"], [], [])
        n_post = max(-int(d.position[3:]) for d in dirs if d.position.startswith("pos-"))
        positions = [f"pos-{k}" for k in range(1, min(n_post, 2) + 1)]
        cands = [d for d in dirs if d.layer in range(0, int(0.8 * lm.n_layers), 2) and d.position in positions]
        if args.skip_selection:
            best = next(d for d in cands if d.layer == min(int(0.6 * lm.n_layers), max(c.layer for c in cands)))
        else:
            kw = {"screen": cfg["screen"]}
            t_sel, sel = _timed(lambda: select_direction(be, fmt, cands, harmful_val=val_h, harmless_val=val_b,
                                                         progress=False, **kw))
            best = sel.best
            st.setdefault("selection", {})[name] = round(t_sel, 2)
            res.setdefault("selected", {})[name] = [best.layer, best.position]
        conds = [Condition("ablation", ablation(best, lm.n_layers)), Condition("addition", addition(best, 1.0))]
        conds = conds[: max(0, args.conditions - 1)]
        t_ev, ev = _timed(lambda: evaluate_conditions(be, fmt, conds, harmful=harmful_te, harmless=harmless_te,
                                                      max_new_tokens=args.max_new_tokens,
                                                      batch_size=cfg["batch_size"], n_boot=200, progress=False))
        st.setdefault("evaluation", {})[name] = round(t_ev, 2)
        res.setdefault("refusal_rates", {})[name] = {r["condition"]: r["harmful_refusal_rate"] for r in ev.summary}
        print(f"[{name}] {lm.dtype}: load {t_load:.1f} s, capture {t_cap:.1f} s, "
              f"selection {st.get('selection', {}).get(name, float('nan')):.1f} s, evaluation {t_ev:.1f} s",
              flush=True)
        del lm, be
    for stage, v in res["stages"].items():
        v["ratio_old_over_new"] = round(v["old"] / v["new"], 2) if v.get("new") else None
    tot = {k: sum(v[k] for v in res["stages"].values()) for k in ("old", "new")}
    res["total"] = {**{k: round(x, 2) for k, x in tot.items()}, "ratio_old_over_new": round(tot["old"] / tot["new"], 2)}
    print(f"{'stage':12} {'old s':>9} {'new s':>9} {'old/new':>8}")
    for stage, v in res["stages"].items():
        print(f"{stage:12} {v['old']:9.1f} {v['new']:9.1f} {v['ratio_old_over_new']:8.2f}")
    print(f"{'total':12} {tot['old']:9.1f} {tot['new']:9.1f} {res['total']['ratio_old_over_new']:8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
