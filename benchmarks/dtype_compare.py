"""Do the main job's conclusions move with ``--dtype auto`` (bfloat16 here) instead of float32?

Reads two finished main-job run folders of the same model and prints, side by side: the stage times, the
selected direction, the probe AUROC per layer (|difference| must be <= 0.01 at every layer), and every
condition's refusal rates and KL with the float32 run's bootstrap 95 % interval (the auto run's value must
lie inside it). The verdict rule is fixed here, before any run:

    same selected (layer, position)  AND  max |AUROC diff| <= 0.01  AND
    every refusal rate and KL of the auto run inside the float32 run's 95 % interval

Usage (the two runs are the main job itself, measured on the same machine):

    workbench main --dtype float32 --out runs/main-fp32
    workbench main --out runs/main                       # --dtype auto is the default
    python benchmarks/dtype_compare.py runs/main-fp32 runs/main   # -> benchmarks/results/dtype_compare.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any


def _json(p: Path) -> Any:
    return json.loads(p.read_text(encoding="utf-8"))


def _probe_auroc(run: Path) -> dict[int, float]:
    with open(run / "probes" / "probe_layers.csv", newline="", encoding="utf-8") as f:
        return {int(r["layer"]): float(r["logistic_auroc"]) for r in csv.DictReader(f)}


def compare(ref: Path, new: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"reference": str(ref), "candidate": str(new)}
    for name, run in (("reference", ref), ("candidate", new)):
        st = _json(run / "stage_times.json")
        out[f"{name}_dtype"] = st.get("dtype")
        out[f"{name}_stage_seconds"] = {s["stage"]: s["seconds"] for s in st["stages"]}
        out[f"{name}_total_seconds"] = st.get("total_seconds")
    a, b = _json(ref / "steering" / "acceptance.json"), _json(new / "steering" / "acceptance.json")
    sel_a, sel_b = (a["selected_layer"], a["selected_position"]), (b["selected_layer"], b["selected_position"])
    out["selected"] = {"reference": list(sel_a), "candidate": list(sel_b), "same": sel_a == sel_b}
    pa, pb = _probe_auroc(ref), _probe_auroc(new)
    diffs = {layer: abs(pa[layer] - pb[layer]) for layer in pa if layer in pb}
    out["probe_auroc_max_abs_diff"] = max(diffs.values())
    out["probe_auroc_worst_layer"] = max(diffs, key=diffs.get)
    ea = {r["condition"]: r for r in _json(ref / "steering" / "evaluation.json")}
    eb = {r["condition"]: r for r in _json(new / "steering" / "evaluation.json")}
    rows, inside = [], True
    for cond in ea:
        if cond not in eb:
            continue
        for key in ("harmful_refusal_rate", "harmless_refusal_rate", "kl_harmless"):
            lo, hi, v = ea[cond][f"{key}_lo"], ea[cond][f"{key}_hi"], eb[cond][key]
            ok = lo - 1e-12 <= v <= hi + 1e-12
            inside &= ok
            rows.append({"condition": cond, "metric": key, "float32": ea[cond][key], "float32_lo": lo,
                         "float32_hi": hi, "auto": v, "inside_ci": ok})
    out["metrics"] = rows
    out["all_inside_ci"] = inside
    out["speedup_total"] = (out["reference_total_seconds"] / out["candidate_total_seconds"]
                            if out["candidate_total_seconds"] else None)
    out["verdict"] = ("conclusions unchanged" if out["selected"]["same"] and out["probe_auroc_max_abs_diff"] <= 0.01
                      and inside else "conclusions moved")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", type=Path, help="main-job run folder made with --dtype float32")
    ap.add_argument("candidate", type=Path, help="main-job run folder made with --dtype auto")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dtype_compare.json")
    args = ap.parse_args(argv)
    for run in (args.reference, args.candidate):
        if not (run / "stage_times.json").is_file():
            print(f"error: {run} is not a finished main-job run folder (no stage_times.json)", file=sys.stderr)
            return 2
    res = compare(args.reference, args.candidate)
    print(f"dtype: {res['reference_dtype']} vs {res['candidate_dtype']}")
    for stage, sec in res["reference_stage_seconds"].items():
        new = res["candidate_stage_seconds"].get(stage)
        print(f"  {stage:12} {sec:8.1f} s  vs {new:8.1f} s" if new is not None else f"  {stage:12} {sec:8.1f} s")
    print(f"  {'total':12} {res['reference_total_seconds']:8.1f} s  vs {res['candidate_total_seconds']:8.1f} s "
          f"({res['speedup_total']:.2f}x)")
    print(f"selected: {res['selected']['reference']} vs {res['selected']['candidate']} "
          f"({'same' if res['selected']['same'] else 'DIFFERENT'})")
    print(f"probe AUROC max |diff| {res['probe_auroc_max_abs_diff']:.4f} (layer {res['probe_auroc_worst_layer']})")
    for r in res["metrics"]:
        print(f"  {r['condition']:16} {r['metric']:22} fp32 {r['float32']:.3f} [{r['float32_lo']:.3f}, "
              f"{r['float32_hi']:.3f}]  auto {r['auto']:.3f}  {'ok' if r['inside_ci'] else 'OUTSIDE'}")
    print(f"verdict: {res['verdict']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
