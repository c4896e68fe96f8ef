"""``steer optimize``: time to the chosen trial and the number of model evaluations it took, on one model.

Runs the command itself (in process, into a temporary run folder; no confirmation generations) with the
defaults of ``workbench steer optimize``: mean-difference directions of harmful:train vs harmless:train at the
last prompt token, 32 + 32 validation prompts, the direction index over 0.2 .. 0.9 of depth, KL <= 0.2.

    .venv/bin/python benchmarks/optimize.py --threads 2                                  # the default model
    .venv/bin/python benchmarks/optimize.py --model smollm2-135m-instruct --n-trials 50 --threads 2

"Time to the chosen trial" is the direction extraction, the KL reference and baseline passes, and every trial
up to and including the chosen one (wall time, sampler included: ``seconds_to_trial`` of optimize.json); the
search's model evaluations are batched forward passes (``model_evaluations_to_trial``; a trial is one pass per
batch of harmful prompts plus one per batch of harmless prompts). The whole search is reported beside them.
Results are merged per model into benchmarks/results/optimize.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.cli import main as workbench_main  # noqa: E402
from workbench.zoo import DEFAULT_MODEL  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo key or model folder (default {DEFAULT_MODEL})")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--n-trials", type=int, default=100)
    ap.add_argument("--n-val", type=int, default=32, help="validation prompts per set (the command's default)")
    ap.add_argument("--kl-max", type=float, default=0.2)
    ap.add_argument("--index-range", default="0.2,0.9", help="direction index range, fractions of depth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-run", default=None, help="write the run folder here instead of a temporary one")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "optimize.json"))
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as tmp:
        run = Path(args.keep_run) if args.keep_run else Path(tmp) / "run"
        argv = ["--threads", str(threads), "steer", "optimize", "--model", args.model, "--n-trials", str(args.n_trials),
                "--n-val", str(args.n_val), "--kl-max", str(args.kl_max), "--index-range", args.index_range, "--seed", str(args.seed), "--confirm", "0",
                "--out", str(run)]
        t = time.perf_counter()
        rc = workbench_main(argv)
        total = time.perf_counter() - t
        if rc != 0:
            sys.exit(f"workbench steer optimize failed (exit code {rc})")
        s = json.loads((run / "optimize.json").read_text())
    (call,) = s["invocations"]
    chosen = s["chosen"]
    res = {
        "model": args.model, "threads": threads, "n_trials": s["n_trials"], "n_val": s["n_val"], "kl_max": s["kl_max"],
        "seed": args.seed, "index_range": args.index_range, "chosen_trial": chosen["number"], "chosen_refusal_score": chosen["refusal_score"],
        "chosen_kl": chosen["kl"], "chosen_within_kl_max": chosen["within_kl_max"],
        "baseline_refusal_score": s["baseline_harmful_refusal_score"],
        "seconds_to_chosen_trial": s["seconds_to_trial"], "model_evaluations_to_chosen_trial": s["model_evaluations_to_trial"],
        "extraction_seconds": call["extraction_seconds"], "setup_seconds": call["setup_seconds"],
        "search_seconds": call["setup_seconds"] + call["trial_seconds"], "model_evaluations": s["model_evaluations"],
        "command_seconds": total, "pareto_trials": s["pareto_trials"], "profile": s["profile"],
        "model_evaluations_unit": s["model_evaluations_unit"], "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    allres = json.loads(out.read_text()) if out.exists() else {}
    allres[args.model] = res
    out.write_text(json.dumps(allres, indent=2, allow_nan=True) + "\n")
    print(f"{args.model}: chosen trial {chosen['number']} of {s['n_trials']} (refusal score {chosen['refusal_score']:.3f}"
          f" vs unmodified {s['baseline_harmful_refusal_score']:.3f}, KL {chosen['kl']:.3f})")
    print(f"time to the chosen trial: {s['seconds_to_trial']:.1f} s, {s['model_evaluations_to_trial']} model evaluations "
          f"(whole search: {res['search_seconds']:.1f} s, {s['model_evaluations']} evaluations; command "
          f"{total:.1f} s, {threads} threads)")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
