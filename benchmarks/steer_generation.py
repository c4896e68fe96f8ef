"""Steered greedy generation (addition at one layer, batch 8, 64 new tokens) per backend vs plain
``model.generate`` in the same process; optionally steering-vectors / repeng if importable.

    .venv/bin/python benchmarks/steer_generation.py [--model smollm2-135m-instruct] [--repeats 3]

Writes benchmarks/results/steer_generation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, ratios  # noqa: E402

from workbench.backends import get_backend  # noqa: E402
from workbench.chat import ChatFormat, encode  # noqa: E402
from workbench.interventions import Addition  # noqa: E402
from workbench.loading import load_model  # noqa: E402
from workbench.prompts import builtin_split  # noqa: E402
from workbench.sites import Site  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--backends", default="native,transformer_lens,nnsight")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "steer_generation.json"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    tok = lm.tokenizer
    prompts = builtin_split("harmless", "test").texts[: args.batch]
    batch = encode(tok, prompts, ChatFormat())
    layer = args.layer if args.layer is not None else lm.n_layers // 2
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    v = v / v.norm() * 4.0
    n = args.new_tokens
    # min_new_tokens = max so every variant does exactly n decoding steps
    gen_kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                  temperature=None, top_p=None, top_k=None)

    def plain() -> object:
        with torch.no_grad():
            return lm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **gen_kw)

    ivs = [Addition(Site(layer, "resid_pre"), v, 1.0)]
    fns = {"plain_generate": plain}
    for name in args.backends.split(","):
        be = get_backend(name, lm)
        eos = be.eos_ids
        be.eos_ids = lambda: []  # type: ignore[method-assign]  # no early stop: same number of steps as plain
        be.generate(batch, max_new_tokens=2, interventions=ivs)
        fns[name] = (lambda b=be: b.generate(batch, max_new_tokens=n, interventions=ivs))
        del eos
    try:  # steering-vectors, if installed beside our pins
        from steering_vectors import SteeringVector

        sv = SteeringVector({layer: v}, layer_type="decoder_block")

        def sv_gen() -> object:
            with sv.apply(lm.model, min_token_index=0):
                return plain()

        fns["steering_vectors"] = sv_gen
    except ImportError:
        pass
    res = ratios(interleaved(fns, repeats=args.repeats), "plain_generate")
    out = {"model": args.model, "batch": args.batch, "new_tokens": n, "layer": layer, "threads": torch.get_num_threads(),
           "results": res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{'variant':20} {'min s':>8} {'ratio(min)':>11} {'ratio(median)':>14}")
    for k, r in res.items():
        print(f"{k:20} {r['min_s']:>8.3f} {r['ratio_min']:>11.3f} {r['ratio_median']:>14.3f}")


if __name__ == "__main__":
    main()
