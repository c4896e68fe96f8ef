"""Peak memory of the weight-space overlap analysis vs loading the checkpoints whole.

Three checkpoints of the default model (``qwen2.5-coder-0.5b-instruct``, float32, ~2.5 GB each): the
aligned model is its zoo cache folder; two synthetic fine-tunes are the aligned model plus small seeded
low-rank perturbations of every matrix (sharing a rank-2 component, so their overlap is not trivial),
written tensor by tensor into a temporary folder.

Each phase runs in its own subprocess and reports its own peak resident set size (``VmHWM`` from
``/proc/self/status``), so phases cannot contaminate each other:

* ``floor``   - the interpreter with torch, safetensors and the weightspace package imported (no work);
* ``whole``   - the three checkpoints' state dicts held in memory (what a tool that loads whole models holds);
* ``overlap`` - ``workbench weightspace overlap`` (the full driver: streaming deltas, SVDs, MSO, angles,
  cosines, CSV/JSON/PNG outputs) on the two updates ``ft1 - aligned`` and ``ft2 - aligned``.

The overlap runs on a few eta values and, by default, on 3 of the 24 layers *plus* the embedding and the
output head. Peak memory is set by the largest tensors (embedding and head: 151936 x 896 each), which are
always included, so the subset keeps the ratio honest while saving time; ``--layers all`` runs everything.

    python benchmarks/weightspace.py                     # writes benchmarks/results/weightspace.json
    python benchmarks/weightspace.py --layers all --etas 0.5,0.9,0.99
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 0.4
HERE = Path(__file__).resolve().parent
# This file is named like the package it measures: keep its folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _vm(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmHWM = peak resident set size)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _emit(result: dict) -> None:
    result["peak_rss_bytes"] = _vm("VmHWM")
    print("RESULT " + json.dumps(result), flush=True)


# -- phases (run in child processes) ----------------------------------------------------------------------

def phase_floor(a: argparse.Namespace) -> None:
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import weightspace.cli  # noqa: F401
    import weightspace.overlap  # noqa: F401

    _emit({"phase": "floor", "seconds": 0.0})


def phase_make(a: argparse.Namespace) -> None:
    import torch

    from weightspace.synthetic import write_perturbed

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    for name, seed in (("ft1", 1), ("ft2", 2)):
        write_perturbed(a.aligned, Path(a.workdir) / name, rank=a.rank, scale=a.scale, seed=seed,
                        common_rank=2, common_seed=777, overwrite=True, progress=False)
    _emit({"phase": "make", "seconds": time.perf_counter() - t0})


def phase_whole(a: argparse.Namespace) -> None:
    """Hold the three state dicts in memory, as a tool that loads whole models does.

    safetensors returns tensors backed by a lazily read memory map (untouched pages are not resident), so
    each tensor is copied into ordinary memory, one at a time, to count what a loaded model really holds.
    """
    from safetensors import safe_open

    from weightspace.checkpoints import open_checkpoint

    t0 = time.perf_counter()
    held = []
    for src in (a.aligned, str(Path(a.workdir) / "ft1"), str(Path(a.workdir) / "ft2")):
        sd = {}
        ck = open_checkpoint(src)
        for k in ck.names:  # one open per tensor: no file pages stay mapped (they would inflate this phase)
            with safe_open(str(ck.meta(k).file), framework="pt") as f:
                sd[k] = f.get_tensor(k).clone()
        held.append(sd)
    n = sum(t.numel() * t.element_size() for sd in held for t in sd.values())
    _emit({"phase": "whole", "seconds": time.perf_counter() - t0, "bytes_held": n})


def phase_overlap(a: argparse.Namespace) -> None:
    import torch

    from weightspace.cli import register

    torch.set_num_threads(a.threads)
    ap = argparse.ArgumentParser(prog="workbench")
    register(ap.add_subparsers(dest="command", required=True))
    argv = ["weightspace", "overlap", "--aligned", a.aligned, "--model", f"ft1={Path(a.workdir) / 'ft1'}",
            "--model", f"ft2={Path(a.workdir) / 'ft2'}", "--etas", a.etas, "--plot-eta", a.etas.split(",")[0],
            "--layers", a.layers, "--nonlayer", "--out", str(Path(a.workdir) / "run"), "--overwrite",
            "--no-progress"]
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    args.func(args)
    seconds = time.perf_counter() - t0
    summary = json.loads((Path(a.workdir) / "run" / "summary.json").read_text())
    _emit({"phase": "overlap", "seconds": seconds, "argv": argv, "n_matrices": summary["n_matrices"],
           "n_other_tensors": summary["n_other_tensors"], "mso": summary["mso"],
           "flattened_cosine": summary["flattened_cosine"]})


PHASES = {"floor": phase_floor, "make": phase_make, "whole": phase_whole, "overlap": phase_overlap}


# -- driver -----------------------------------------------------------------------------------------------

def _run_phase(name: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--aligned", a.aligned,
           "--workdir", a.workdir, "--etas", a.etas, "--layers", a.layers, "--threads", str(a.threads),
           "--rank", str(a.rank), "--scale", str(a.scale)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"phase {name} failed with exit code {proc.returncode}")
    line = next(ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    res["wall_seconds"] = wall
    print(f"  {name:8} peak RSS {res['peak_rss_bytes'] / 2**30:6.2f} GiB   {res['seconds']:7.1f} s", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="zoo key of the aligned model")
    ap.add_argument("--aligned", default=None, help="(internal) aligned checkpoint folder")
    ap.add_argument("--workdir", default=None, help="folder for the synthetic checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--etas", default="0.5,0.9,0.99")
    ap.add_argument("--layers", default="0,11,23", help="layer subset of the overlap ('all' for every layer)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rank", type=int, default=4, help="rank of each synthetic perturbation")
    ap.add_argument("--scale", type=float, default=0.01, help="||perturbation||_F / ||W||_F")
    ap.add_argument("--out", default=str(HERE / "results" / "weightspace.json"))
    ap.add_argument("--phase", choices=sorted(PHASES), default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.phase:
        PHASES[a.phase](a)
        return 0

    from workbench.loading import ensure_zoo_cache

    a.aligned = str(ensure_zoo_cache(a.model))
    own = a.workdir is None
    a.workdir = a.workdir or tempfile.mkdtemp(prefix="ws-bench-")
    print(f"weight-space memory benchmark: {a.model} ({a.aligned}), work dir {a.workdir}")
    try:
        phases = {name: _run_phase(name, a) for name in ("floor", "make", "whole", "overlap")}
    finally:
        if own and not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
    whole, ov, floor = (phases[k]["peak_rss_bytes"] for k in ("whole", "overlap", "floor"))
    ratio = ov / whole
    ratio_above_floor = (ov - floor) / (whole - floor)
    ckpt_bytes = sum(p.stat().st_size for p in Path(a.aligned).glob("*.safetensors"))
    result = {
        "benchmark": "weightspace overlap peak memory vs loading three checkpoints whole",
        "model": a.model, "checkpoint_bytes_each": ckpt_bytes, "n_checkpoints": 3,
        "settings": {"etas": a.etas, "layers": a.layers, "nonlayer_tensors": True, "threads": a.threads,
                     "synthetic_rank": a.rank, "synthetic_common_rank": 2, "synthetic_scale": a.scale},
        "phases": phases,
        "peak_rss_gib": {k: round(v["peak_rss_bytes"] / 2**30, 3) for k, v in phases.items()},
        "ratio_overlap_to_whole": round(ratio, 4),
        "ratio_above_interpreter_floor": round(ratio_above_floor, 4),
        "goal": GOAL, "meets_goal": ratio <= GOAL,
        "overlap_seconds": round(phases["overlap"]["seconds"], 1),
        "whole_load_seconds": round(phases["whole"]["seconds"], 1),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    from workbench.io import write_json

    write_json(a.out, result)
    print(f"peak RSS: overlap {ov / 2**30:.2f} GiB vs whole {whole / 2**30:.2f} GiB -> ratio {ratio:.3f} "
          f"(goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'}); above the {floor / 2**30:.2f} GiB "
          f"interpreter floor: {ratio_above_floor:.3f}. Overlap took {phases['overlap']['seconds']:.0f} s. -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
