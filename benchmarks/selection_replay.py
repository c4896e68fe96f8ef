"""Replay the screened selection on the exact scores an exhaustive run recorded: how many exact passes each
ordering spends and whether it reaches the exhaustive choice, for other KL limits than the one measured.

``benchmarks/selection.py`` records, for every candidate of a grid, the exact ablation score, KL and steering
score and the screen's estimates (ablation, steering, and since the KL screen, the KL estimate). This script runs
the real :func:`steering.selection.select_direction` with the model replaced by those records (the gradient
screen and the exact scorers are stubbed to return them; no model is loaded), so the group, confirmation,
bisection and fallback logic is the shipped code's. For each ``--kl-max`` it prints, with and without the KL
screen, the chosen candidate, whether it is the exhaustive choice at that limit (the lowest exact ablation score
among the candidates that pass KL <= kl_max and induce refusal) and the exact passes spent (an ablation score, a
KL and a steering score are one pass each; a KL above the limit skips the steering pass), beside the
exhaustive path's ``3 n``.

    .venv/bin/python benchmarks/selection_replay.py "smollm2-135m-instruct [full grid]" --kl-max 0.05,0.1,0.2,0.5

A replay assumes the exact scores do not depend on what else was scored (true: each candidate is scored on the
same prompts) and is no timing: passes on different candidates cost about the same, the screen's own pass
is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import steering.selection as selection  # noqa: E402
from steering.screening import ScreeningEstimates  # noqa: E402
from workbench.vectors import Direction  # noqa: E402


class _Recorded:
    """Stands in for a backend: ``n_layers`` only, for the layer filter, which the replay switches off (the
    records hold only candidates below the grid's depth limit)."""

    n_layers = 10 ** 6


def replay(rec: dict[str, Any], kl_max: float, *, kl_screen: bool, top_k: int = 5, confirm_groups: int = 1,
           kl_margin: float = 2.0) -> dict[str, Any]:
    rows = rec["rows"]
    base_b = (rec.get("baseline") or {}).get("harmless_refusal_score")
    if base_b is None:  # older records: the induced-refusal threshold bracketed by the rows' filter reasons
        fails = [r["steering_score"] for r in rows if "no induced refusal" in (r.get("filtered") or "")]
        oks = [r["steering_score"] for r in rows if r.get("filtered") is not None and math.isfinite(r["steering_score"])
               and "no induced refusal" not in r["filtered"]]
        base_b = max(fails) if fails else min(oks) - 1e-6
    nz = [i for i, r in enumerate(rows) if math.isfinite(r["ablation_score"])]
    d = 8
    cands = []
    for i, r in enumerate(rows):
        v = torch.zeros(d) if i not in nz else torch.ones(d)
        cands.append(Direction(v, layer=r["layer"], method="recorded", model_id="recorded", model_checksum="", d_model=d,
                               position=r["position"]))
    index = {id(c): i for i, c in enumerate(cands)}
    passes = {"ablation": 0, "kl": 0, "steering": 0}

    def est_of(key: str) -> torch.Tensor:
        return torch.tensor([float(r[key]) if r.get(key) is not None else math.nan for r in rows])

    def screen(*a: Any, kl_samples: int = 0, **kw: Any) -> ScreeningEstimates:
        abl = est_of("ablation_score_est")
        add = est_of("steering_score_est") - base_b
        kl = est_of("kl_est") if kl_samples else None
        return ScreeningEstimates(abl, add, torch.zeros(1), torch.full((1,), base_b), torch.zeros(1, 1), 1.0, 0.0, kl)

    def abl(backend: Any, fmt: Any, c: Direction, *a: Any, **kw: Any) -> float:
        passes["ablation"] += 1
        return rows[index[id(c)]]["ablation_score"]

    def kl(backend: Any, fmt: Any, c: Direction, *a: Any, **kw: Any) -> float:
        passes["kl"] += 1
        return rows[index[id(c)]]["kl"]

    def filt(backend: Any, fmt: Any, c: Direction, *a: Any, kl_max: float | None = None,
             known_kl: float | None = None, **kw: Any) -> tuple[float, float]:
        k = known_kl if known_kl is not None else kl(backend, fmt, c)
        if kl_max is not None and k > kl_max:
            return k, math.nan
        passes["steering"] += 1
        return k, rows[index[id(c)]]["steering_score"]

    with mock.patch.object(selection, "screen_candidates", screen), \
            mock.patch.object(selection, "exact_ablation_score", abl), mock.patch.object(selection, "exact_kl", kl), \
            mock.patch.object(selection, "exact_filter_scores", filt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = selection.select_direction(_Recorded(), None, cands, harmful_val=["-"],
                                         harmless_val=["-"], kl_max=kl_max, max_layer_frac=1.0, progress=False,
                                         screen=True, top_k=top_k, confirm_groups=confirm_groups,
                                         kl_screen=kl_screen, kl_margin=kl_margin)
    ok = [i for i in nz if rows[i]["kl"] <= kl_max and rows[i]["steering_score"] > base_b]
    want = min(ok, key=lambda i: rows[i]["ablation_score"]) if ok else None
    got = index[id(res.best)]
    return {"kl_max": kl_max, "kl_screen": kl_screen, "n": len(nz), "n_pass": len(ok), "chosen": got,
            "chosen_cell": f"{rows[got]['layer']} {rows[got]['position']}", "exhaustive_choice": want,
            "same": got == want, "passes": sum(passes.values()), "exhaustive_passes": 3 * len(nz)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("key", help="an entry of the results file, e.g. 'smollm2-135m-instruct [full grid]'")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "selection.json"))
    ap.add_argument("--kl-max", default="0.05,0.1,0.2")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--confirm-groups", type=int, default=1)
    ap.add_argument("--kl-margin", type=float, default=2.0)
    args = ap.parse_args()
    rec = json.loads(Path(args.results).read_text())[args.key]
    if not any(r.get("kl_est") is not None for r in rec["rows"]):
        sys.exit(f"{args.key}: its rows carry no KL estimates (recorded before the KL screen existed)")
    print(f"{args.key}: replay of the screened selection on the recorded exact scores")
    for km in (float(x) for x in args.kl_max.split(",")):
        for ks in (False, True):
            r = replay(rec, km, kl_screen=ks, top_k=args.top_k, confirm_groups=args.confirm_groups,
                       kl_margin=args.kl_margin)
            print(f"  kl_max {km:<5g} KL screen {'on ' if ks else 'off'}: {r['n_pass']:3d}/{r['n']} pass; chosen "
                  f"{r['chosen_cell']:<9s} same as exhaustive: {str(r['same']):5s} exact passes {r['passes']:4d} "
                  f"of {r['exhaustive_passes']}")


if __name__ == "__main__":
    main()
