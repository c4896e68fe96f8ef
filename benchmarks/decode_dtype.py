"""Prefill and decode cost of the workbench's generation path, float32 vs bfloat16, at the batch sizes the main
job uses, in one process (interleaved repeats, so machine noise hits both dtypes alike).

    .venv/bin/python benchmarks/decode_dtype.py [--model qwen2.5-coder-0.5b-instruct] [--batches 8,68] [--repeats 2]

For each dtype and batch size ``B`` (the first ``B`` prompts of ``harmless:test``, the chat template applied):
``prefill`` = :func:`workbench.generation.generate_texts` with one new token (the prompt forward plus one
unembedding), ``decode_step`` = (time for ``1 + S`` new tokens - prefill) / ``S`` with ``S = --steps``
(every row is forced to run all steps: no row stops early because greedy decoding is timed with the same
prompts in both dtypes, and a row that ends early only pads). Also reports the main job's evaluation cost
model: one condition = generation of ``B`` prompts with ``--tokens`` new tokens.

Writes ``benchmarks/results/decode_dtype.json``; the ratios (bfloat16 / float32) are what to read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved  # noqa: E402

from workbench.backends import get_backend  # noqa: E402
from workbench.chat import ChatFormat  # noqa: E402
from workbench.generation import generate_texts  # noqa: E402
from workbench.loading import cpu_has_bf16, load_model  # noqa: E402
from workbench.prompts import builtin_split  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--batches", default="8,68")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per evaluation generation (cost model)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_dtype.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(x) for x in args.batches.split(",")]
    prompts = builtin_split("harmless", "test").texts
    models = {dt: load_model(args.model, dtype=dt) for dt in ("float32", "bfloat16")}
    fmt = ChatFormat(system_prompt=models["float32"].default_system_prompt)
    res: dict = {"model": args.model, "threads": torch.get_num_threads(), "cpu_has_bf16": cpu_has_bf16(),
                 "steps": args.steps, "repeats": args.repeats, "rows": []}
    for lm in models.values():  # warm up each model's kernels once (not timed)
        generate_texts(get_backend("native", lm), prompts[:2], fmt, max_new_tokens=2, progress=False)
    for B in batches:
        ps = prompts[:B]
        fns = {}
        for dt, lm in models.items():
            be = get_backend("native", lm)
            for n in (1, 1 + args.steps):
                fns[f"{dt}:{n}"] = (lambda be=be, n=n: generate_texts(be, ps, fmt, max_new_tokens=n, batch_size=B,
                                                                      progress=False))
        t = interleaved(fns, repeats=args.repeats, warmup=0)
        row = {"batch": B}
        for dt in models:
            pre = t[f"{dt}:1"]["min_s"]
            step = (t[f"{dt}:{1 + args.steps}"]["min_s"] - pre) / args.steps
            row[dt] = {"prefill_s": round(pre, 3), "decode_step_s": round(step, 4),
                       "condition_s": round(pre + (args.tokens - 1) * step, 2)}
        row["ratio_bf16_over_fp32"] = {k: round(row["bfloat16"][k] / row["float32"][k], 3)
                                       for k in ("prefill_s", "decode_step_s", "condition_s")}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
