"""Timings the test suite used to assert (wall-clock assertions fail at random on shared machines; they live here).

    .venv/bin/python benchmarks/suite_timings.py [--threads 1] [--repeats 5]

* ``build_tiny``: building each tiny in-code model (was ``tests/test_tiny.py::test_build_is_fast``, budget 0.1 s);
* the probe sweep the app's "Probes" tab runs (``probes.cli.run_probe_sweep`` on a tiny Llama, 8 prompts per
  split, 50 bootstrap resamples; was ``tests/test_app_ui.py::test_probe_sweep_from_the_app``, budget 120 s
  including one steered generation).

Prints one JSON object (min / median seconds, and whether the old budget is met) and writes
benchmarks/results/suite_timings.json. Nothing fails on a slow machine: the numbers are for reading.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved  # noqa: E402

BUDGETS = {"build_tiny": 0.1, "app_probe_sweep": 120.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "suite_timings.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from workbench.tiny import TINY_ARCHS, build_tiny, tiny_tokenizer

    tiny_tokenizer()  # the tokenizer is trained once per process: warm it, as the old test did
    seeds = iter(range(10**6))
    build = interleaved({arch: (lambda a=arch: build_tiny(a, seed=next(seeds))) for arch in TINY_ARCHS},
                        repeats=args.repeats, warmup=1)
    out = {"threads": torch.get_num_threads(), "build_tiny": {
        a: {**v, "budget_s": BUDGETS["build_tiny"], "within_budget": v["min_s"] < BUDGETS["build_tiny"]}
        for a, v in build.items()}}

    import probes.cli
    from workbench.chat import ChatFormat
    from workbench.loading import from_memory
    from workbench.runs import RunFolder

    lm = from_memory(*build_tiny("llama"), model_id="tiny-llama")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["WORKBENCH_CACHE"] = str(Path(tmp) / "cache")
        k = iter(range(10**6))

        def sweep() -> None:
            run = RunFolder(Path(tmp) / f"sweep{next(k)}", config={"benchmark": True})
            probes.cli.run_probe_sweep(lm, ChatFormat(), run, "harmful", "harmless", n_boot=50, limit=8, seed=0)

        res = interleaved({"app_probe_sweep": sweep}, repeats=max(1, args.repeats // 2), warmup=1)["app_probe_sweep"]
    out["app_probe_sweep"] = {**res, "budget_s": BUDGETS["app_probe_sweep"],
                              "within_budget": res["median_s"] < BUDGETS["app_probe_sweep"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
