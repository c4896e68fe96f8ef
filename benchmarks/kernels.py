"""Float32 linear layers on this CPU: the default BLAS (MKL) against oneDNN (``workbench.kernels.OneDNNLinear``),
in one process, at the shapes of the default model (d_model 896, MLP 4864, vocabulary 151936) and the batch
sizes a decoding step (1-84 rows) and a prefill (1000-4000 tokens) use; plus one whole decoding step and one
prefill of the default model with the default kernels against the battery's (oneDNN linear + sdpa attention).

    .venv/bin/python benchmarks/kernels.py [--threads 2] [--no-model]

Reports milliseconds, the ratio default / oneDNN and the largest difference of the outputs. Writes
``benchmarks/results/kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.kernels import KernelsHeld, OneDNNLinear, onednn_linear_available  # noqa: E402


def _time(f, repeats: int) -> float:
    for _ in range(2):
        f()
    t = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - t) / repeats * 1e3


def linears(repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for out_f, in_f in ((4864, 896), (896, 4864), (151936, 896)):
        w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
        for b in (1, 20, 84, 1000, 4000):
            if out_f == 151936 and b > 84:
                continue  # the unembedding runs on the last position only
            x = torch.randn(b, in_f, generator=g)
            with torch.no_grad():
                ref = torch.nn.functional.linear(x, w)
                base = _time(lambda: torch.nn.functional.linear(x, w), repeats)
                with OneDNNLinear() as mode:
                    fast = _time(lambda: torch.nn.functional.linear(x, w), repeats)
                    diff = float((torch.nn.functional.linear(x, w) - ref).abs().max())
            rows.append({"weight": [out_f, in_f], "rows": b, "default_ms": round(base, 3), "onednn_ms": round(fast, 3),
                         "ratio": round(base / fast, 2), "max_abs_difference": diff, "routed": mode.routed > 0})
            print(rows[-1], flush=True)
    return rows


def model_steps(model_name: str) -> dict:
    from workbench.arch import new_cache
    from workbench.loading import load_model

    lm = load_model(model_name)
    model = lm.model
    g = torch.Generator().manual_seed(0)
    out = {}
    for b, width in ((84, 100), (20, 250)):
        ids = torch.randint(100, 5000, (b, width), generator=g)
        mask = torch.ones(b, width, dtype=torch.long)
        mask[: b // 4, : width // 3] = 0
        res = {}
        for name, held in (("default", nullcontext()), ("battery", KernelsHeld(nullcontext(), model, "sdpa", "onednn"))):
            cache = new_cache(model)
            with held, torch.no_grad():
                t = time.perf_counter()
                o = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, cache=cache)
                prefill = time.perf_counter() - t
                m, steps, logits = mask, [], [o.logits[:, -1]]
                for _ in range(6):
                    m = torch.cat([m, torch.ones(b, 1, dtype=torch.long)], 1)
                    t = time.perf_counter()
                    o = model(input_ids=logits[-1].argmax(-1, keepdim=True), attention_mask=m, use_cache=True,
                              logits_to_keep=1, cache=cache)
                    steps.append(time.perf_counter() - t)
                    logits.append(o.logits[:, -1])
            res[name] = (prefill, sum(steps[1:]) / len(steps[1:]), torch.stack(logits))
        (pa, sa, la), (pb, sb, lb) = res["default"], res["battery"]
        out[f"{b}x{width}"] = {"prefill_s": [round(pa, 2), round(pb, 2)], "prefill_ratio": round(pa / pb, 2),
                               "step_s": [round(sa, 3), round(sb, 3)], "step_ratio": round(sa / sb, 2),
                               "max_abs_logit_difference": float((la - lb).abs().max()),
                               "same_greedy_tokens": bool((la.argmax(-1) == lb.argmax(-1)).all())}
        print(b, width, out[f"{b}x{width}"], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--no-model", action="store_true", help="the linear layers only")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = {"threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "onednn_available": onednn_linear_available(), "linear": linears(a.repeats)}
    if not a.no_model:
        res["model"] = a.model
        res["model_steps"] = model_steps(a.model)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
