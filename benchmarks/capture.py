"""All-layer residual capture per backend vs a plain HF forward with output_hidden_states=True.

    .venv/bin/python benchmarks/capture.py [--model smollm2-135m-instruct] [--batch 16] [--tokens 64] [--repeats 7]

Reports time ratios measured in the same process (interleaved repeats); writes
benchmarks/results/capture.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, ratios  # noqa: E402

from workbench.backends import get_backend  # noqa: E402
from workbench.chat import Batch, position_ids_from_mask  # noqa: E402
from workbench.loading import load_model  # noqa: E402
from workbench.sites import Site  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backends", default="native,transformer_lens,nnsight")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "capture.json"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    g = torch.Generator().manual_seed(0)
    vocab = lm.model.config.vocab_size
    ids = torch.randint(100, min(vocab, 30000), (args.batch, args.tokens), generator=g)
    mask = torch.ones_like(ids)
    mask[: args.batch // 2, : args.tokens // 4] = 0  # left padding on half the rows
    batch = Batch(ids, mask, position_ids_from_mask(mask), mask.sum(-1), 1)
    sites = [Site(i, "resid_post") for i in range(lm.n_layers)]
    model = lm.model

    def hf() -> object:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=batch.position_ids,
                         output_hidden_states=True, use_cache=False).hidden_states

    fns = {"hf_output_hidden_states": hf}
    for name in args.backends.split(","):
        be = get_backend(name, lm)
        be.run(batch, capture=sites[:1], logits=False)  # build wrappers once, outside timing
        fns[name] = (lambda b=be: b.run(batch, capture=sites, logits=False))
    res = ratios(interleaved(fns, repeats=args.repeats), "hf_output_hidden_states")
    out = {"model": args.model, "batch": args.batch, "tokens": args.tokens, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "results": res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{'backend':26} {'min s':>8} {'ratio(min)':>11} {'ratio(median)':>14}")
    for k, v in res.items():
        print(f"{k:26} {v['min_s']:>8.3f} {v['ratio_min']:>11.3f} {v['ratio_median']:>14.3f}")


if __name__ == "__main__":
    main()
