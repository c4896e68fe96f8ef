"""Scaling out and scaling up: a projection sweep on ``local`` vs ``ray``, and overlap and sweep memory at two model
sizes.

Part ``sweep`` (wall time, local vs Ray). The aligned model is SmolLM2-135M-Instruct from the zoo cache (offline);
its four "fine-tunes" (safety = the reference, useful, harmful, contaminated) are synthetic: the aligned weights
plus seeded low-rank perturbations of every matrix (:func:`weightspace.synthetic.write_perturbed`; no training).
The same ``workbench weightspace sweep`` runs twice, each in a fresh process: ``--executor local`` with
``--threads`` torch threads (default: every core), then ``--executor ray --workers W`` on a local Ray started by
the run (each worker 1 CPU, 1 thread; Ray start-up, each worker's model load and its reference SVDs are inside the
measured wall time). Reported: both wall times and their ratio, that the two runs wrote the same rows (max
absolute difference of every number in results.csv), the tasks (models scored) and the time per task on a worker,
and what the same run would take in principle with more workers: ``fixed + init + ceil(tasks / W) x per_task``,
where ``fixed`` is the Ray run's wall time outside the workers (driver load, writing, plots) and ``init`` a
worker's start-up. On this project's 2-core machine the two workers share the cores the local run used alone, so
the measured speed-up there is at most ~1; the per-worker projection is what a cluster with more cores would give.

Part ``memory`` (peak RSS of ``weightspace overlap`` vs model size). Three synthetic checkpoints per size
(aligned = seeded random bf16 weights in Qwen2.5 shapes; ft1, ft2 = aligned + seeded low-rank perturbations that
share a rank-2 component), written as sharded safetensors with an index (``--shard-mb``), then ``workbench
weightspace overlap --model ft1=... --model ft2=...`` on every tensor (``--layers all``). Sizes: ``0.5b`` (24 layers,
d 896, MLP 4864, vocab 151936: 494M parameters, largest tensor the 151936 x 896 embedding) and ``1.5b`` (28
layers, d 1536, MLP 8960: 1.54B parameters, embedding 151936 x 1536). The overlap runs as the child of a small
measuring process that reports ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, so the two sizes (and the
floor: ``workbench weightspace overlap --help``, the same imports without work, measured the same way) cannot
contaminate each other. If the overlap streams one tensor at a
time, peak RSS minus the floor is a small multiple of the largest tensor (as float32) and grows with it (x1.7
here), not with the model (x3.1).

The same part measures ``weightspace sweep``'s memory beyond the model it scores, on the same checkpoints
(``--memory-commands``; reference update ``ft1 - aligned``, fine-tune ``ft2``): a child process (this script,
``--phase sweep-prep``) computes the reference bases of every tensor exactly as the sweep does
(:func:`weightspace.sweep.sweep_bases`: one SVD per tensor, written to a cache folder inside the work folder,
deleted afterwards) and then builds each grid point's projected model with the sweep's own
:func:`weightspace.sweep.project_task` (``--sweep-rhos`` x ``--sweep-kinds``, parallel mode), each tensor rounded
to its stored dtype and dropped instead of written into a loaded model: no model is loaded and nothing is scored.
Its floor is the same script with ``--floor`` (the same imports, no work). With the bases on disk the peak
above the floor follows the largest tensor (the embedding's SVD and projection); ``--sweep-bases disk,memory``
also measures the bases kept in memory for the whole sweep (the design before issue #13), which adds every
tensor's basis (about 1.4x the float32 model here) and grows with the model.

    python benchmarks/scale.py                      # both parts; writes benchmarks/results/scale.json
    python benchmarks/scale.py --part memory        # one part
    python benchmarks/scale.py --smoke              # tiny sizes, about a minute; results in a temp folder
    python benchmarks/scale.py --part memory --sizes small-a,small-b --sweep-bases disk,memory --out /tmp/s.json
                                                    # small sizes (a minute): the model grows, the largest tensor not

Run it on a quiet machine: the sweep part takes two sweeps (about 16 models each, a few minutes per run at the
default evaluation sizes), the memory part writes 3 x 0.92 GiB (0.5b), then 3 x 2.9 GiB (1.5b) of checkpoints
(each size removed after it is measured) and runs exact SVDs of every matrix (tens of minutes for 1.5b;
``--layers 0,13,27`` for a quick look: the embedding, the largest tensor, is always included); the sweep
measurement adds one exact SVD per matrix, one projection pass per grid point, and a bases folder of about 2.5 GiB
(0.5b) / 8.1 GiB (1.5b) while it runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # benchmarks/weightspace.py shadows the package
sys.path.insert(0, str(HERE.parent))  # this checkout's code, here and in the children (_env), whatever is installed

# name -> (layers, d_model, mlp, vocab, heads, kv_heads); Qwen2.5 shapes (tied embeddings, q/k/v biases)
SHAPES = {
    "0.5b": (24, 896, 4864, 151936, 14, 2),
    "1.5b": (28, 1536, 8960, 151936, 12, 2),
    "tiny-a": (2, 64, 128, 512, 4, 2),
    "tiny-b": (6, 96, 192, 512, 4, 2),
    # the same largest tensor (the 8192 x 256 embedding), 4x the layers: a quick look at what grows with the model
    "small-a": (4, 256, 768, 8192, 4, 2),
    "small-b": (16, 256, 768, 8192, 4, 2),
}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "workbench.cli", *args]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
    return os.environ | {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                         "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": path}


def _run(cmd: list[str], what: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{what} failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return wall


# -- synthetic sharded checkpoints ---------------------------------------------------------------------------

def tensor_shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Name -> stored shape of every tensor of a Qwen2-like model of ``size`` (see :data:`SHAPES`)."""
    n_layers, d, mlp, vocab, heads, kv = SHAPES[size]
    kvd = kv * (d // heads)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,),
                    p + "self_attn.k_proj.weight": (kvd, d), p + "self_attn.k_proj.bias": (kvd,),
                    p + "self_attn.v_proj.weight": (kvd, d), p + "self_attn.v_proj.bias": (kvd,),
                    p + "self_attn.o_proj.weight": (d, d), p + "mlp.gate_proj.weight": (mlp, d),
                    p + "mlp.up_proj.weight": (mlp, d), p + "mlp.down_proj.weight": (d, mlp),
                    p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    out["model.norm.weight"] = (d,)
    return out


def write_sharded(size: str, out: Path, *, seed: int | None, shard_bytes: int, rank: int = 4,
                  scale: float = 0.01) -> int:
    """Write the aligned model (``seed`` None) or a perturbed one (aligned + rank-``rank`` update seeded by
    ``seed`` + a shared rank-2 one) as bf16 shards with an index; returns the bytes written. One tensor in memory
    at a time."""
    import torch

    from weightspace.spectral import tensor_seed
    from weightspace.synthetic import low_rank
    from weightspace.writer import TensorEntry, stream_safetensors

    shapes = tensor_shapes(size)
    n_layers, d, mlp, vocab, heads, kv = SHAPES[size]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": d, "intermediate_size": mlp,
        "num_hidden_layers": n_layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16"}))

    def produce(name: str) -> torch.Tensor:
        shape = shapes[name]
        g = torch.Generator().manual_seed(tensor_seed(0, name))
        w = torch.randn(shape, generator=g).mul_(0.02) if len(shape) == 2 else torch.ones(shape)
        if seed is not None and len(shape) == 2:
            delta = low_rank(*shape, rank, tensor_seed(seed, name)) + low_rank(*shape, 2, tensor_seed(777, name))
            w += delta.mul_(scale * float(torch.linalg.matrix_norm(w)) / float(torch.linalg.matrix_norm(delta)))
            del delta
        return w.to(torch.bfloat16)

    entries = [TensorEntry(n, torch.bfloat16, s) for n, s in shapes.items()]
    shards: list[list[TensorEntry]] = [[]]
    for e in entries:
        if shards[-1] and sum(x.nbytes for x in shards[-1]) + e.nbytes > shard_bytes:
            shards.append([])
        shards[-1].append(e)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        stream_safetensors(out / fname, shard, produce, metadata={"format": "pt"})
        weight_map.update({e.name: fname for e in shard})
    total = sum(e.nbytes for e in entries)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return total


# -- measuring a child's peak RSS ------------------------------------------------------------------------------

def phase_measure(cmd: list[str]) -> None:
    """Run ``cmd`` as this process's only child; print its peak RSS (ru_maxrss of the waited-for children)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(proc.returncode)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    print("RESULT " + json.dumps({"peak_rss_bytes": peak, "seconds": wall}), flush=True)


def measured(cmd: list[str], what: str) -> dict:
    """Peak RSS and wall time of ``cmd``, measured by a fresh intermediate process."""
    me = [sys.executable, str(Path(__file__).resolve()), "--phase", "measure", "--", *cmd]
    proc = subprocess.run(me, capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{what} failed with exit code {proc.returncode}")
    line = next(ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def phase_sweep_prep(argv: list[str]) -> None:
    """The child measured for the sweep: the reference bases and every grid point's projection, no scoring."""
    ap = argparse.ArgumentParser(prog="scale.py --phase sweep-prep")
    ap.add_argument("--floor", action="store_true", help="the imports only (the floor)")
    ap.add_argument("--aligned")
    ap.add_argument("--reference", help="the reference update is REFERENCE - ALIGNED")
    ap.add_argument("--finetuned")
    ap.add_argument("--rhos", default="0.5")
    ap.add_argument("--kinds", default="topk,randomk,random")
    ap.add_argument("--bases", choices=("disk", "memory"), default="disk")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", help="the bases folder goes here (removed afterwards)")
    ap.add_argument("--report", help="JSON with the timings and the bases' size")
    a = ap.parse_args(argv)
    import torch

    from weightspace.basis_cache import FOLDER_PREFIX
    from weightspace.checkpoints import open_checkpoint
    from weightspace.deltas import DeltaSpec
    from weightspace.plan import match_checkpoints
    from weightspace.projection import unique_checkpoints
    from weightspace.reference import DeltaReference
    from weightspace.sweep import SweepConfig, SweepTask, project_task, sweep_bases

    if a.floor:
        return
    torch.set_num_threads(max(1, a.threads))
    aligned = open_checkpoint(a.aligned, label="aligned")
    ft = open_checkpoint(a.finetuned, label="finetuned")
    reference = DeltaReference(DeltaSpec("reference", open_checkpoint(a.reference, label="reference"), aligned))
    cfg = SweepConfig(rhos=tuple(float(r) for r in a.rhos.split(",")), kinds=tuple(a.kinds.split(",")))
    plan = match_checkpoints(unique_checkpoints(("aligned", aligned), ("finetuned", ft),
                                                *reference.checkpoints().items()))
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=a.work))
    try:
        t0 = time.perf_counter()
        bases = sweep_bases(folder, reference, plan, cfg)
        bases.fill()
        fill_s, disk = time.perf_counter() - t0, bases.disk_bytes()
        if a.bases == "memory":  # every tensor's basis held for the whole sweep (before issue #13)
            bases = {n: bases[n] for n in bases.infos}
        points = []
        for rho in cfg.rhos:
            for kind in cfg.kinds:
                t1 = time.perf_counter()
                task = SweepTask(f"exp1-finetuned-{kind}-rho{rho:g}", "finetuned", ("utility",), experiment="exp1",
                                 mode="parallel", rho=rho, kind=kind)
                res = project_task(task, cfg, plan, aligned, ft, reference, bases, lambda info, w: None)
                points.append({"config": task.config, "seconds": round(time.perf_counter() - t1, 2),
                               "energy_kept": res.energy.get("energy_kept")})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if a.report:
        Path(a.report).write_text(json.dumps({"fill_seconds": round(fill_s, 2), "bases_disk_bytes": disk,
                                              "n_tensors": len(plan.tensors), "n_bases": len(bases),
                                              "points": points}))


def _sweep_prep_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--phase", "sweep-prep", *args]


# -- part: memory --------------------------------------------------------------------------------------------

def part_memory(a: argparse.Namespace, work: Path) -> dict:
    sizes = a.sizes.split(",") if a.sizes else ["tiny-a", "tiny-b"] if a.smoke else ["0.5b", "1.5b"]
    bad = [s for s in sizes if s not in SHAPES]
    if bad or len(sizes) < 1:
        raise SystemExit(f"--sizes: unknown {bad}; valid: {', '.join(SHAPES)}")
    commands = a.memory_commands.split(",")
    if not commands or not set(commands) <= {"overlap", "sweep"}:
        raise SystemExit(f"--memory-commands must name overlap and / or sweep, got {a.memory_commands!r}")
    modes = a.sweep_bases.split(",")
    if not modes or not set(modes) <= {"disk", "memory"}:
        raise SystemExit(f"--sweep-bases must name disk and / or memory, got {a.sweep_bases!r}")
    shard = (64 << 10) if a.smoke or all(z.startswith("tiny") for z in sizes) else (a.shard_mb << 20)
    floor = measured(_cli("weightspace", "overlap", "--help"), "interpreter floor")  # the same entry point, no work
    print(f"memory: interpreter floor {floor['peak_rss_bytes'] / 2**20:.0f} MiB")
    sweep_floor = measured(_sweep_prep_cmd("--floor"), "sweep floor") if "sweep" in commands else None
    if sweep_floor:
        print(f"memory: sweep-prep floor {sweep_floor['peak_rss_bytes'] / 2**20:.0f} MiB")
    rows = []
    sweep_rows = []
    for size in sizes:
        d = work / f"mem-{size}"
        t0 = time.perf_counter()
        nbytes = write_sharded(size, d / "aligned", seed=None, shard_bytes=shard)
        for k, seed in (("ft1", 1), ("ft2", 2)):
            write_sharded(size, d / k, seed=seed, shard_bytes=shard)
        make_s = time.perf_counter() - t0
        shapes = tensor_shapes(size)
        largest = max(shapes, key=lambda n: math.prod(shapes[n]))
        n_params = sum(math.prod(s) for s in shapes.values())
        n_shards = len(list((d / "aligned").glob("*.safetensors")))
        largest_f32 = 4 * math.prod(shapes[largest])
        for mode in (modes if "sweep" in commands else []):
            report = d / f"sweep-{mode}.json"
            cmd = _sweep_prep_cmd("--threads", str(a.threads), "--aligned", str(d / "aligned"), "--reference",
                                  str(d / "ft1"), "--finetuned", str(d / "ft2"), "--rhos", a.sweep_rhos, "--kinds",
                                  a.sweep_kinds, "--bases", mode, "--work", str(d), "--report", str(report))
            m = measured(cmd, f"sweep preparation {size} ({mode})")
            info = json.loads(report.read_text())
            above = m["peak_rss_bytes"] - sweep_floor["peak_rss_bytes"]
            sweep_rows.append({"size": size, "bases": mode, "n_params": n_params, "checkpoint_bytes": nbytes,
                               "largest_tensor": largest, "largest_bytes_float32": largest_f32,
                               "peak_rss_bytes": m["peak_rss_bytes"], "peak_above_floor_bytes": above,
                               "peak_above_floor_over_largest_f32": round(above / largest_f32, 3),
                               "peak_above_floor_over_model_f32": round(above / (4 * n_params), 3),
                               "seconds": round(m["seconds"], 1), **info, "argv": cmd[2:]})
            print(f"  {size:7} sweep preparation, bases {mode:6}: peak RSS {m['peak_rss_bytes'] / 2**30:.2f} GiB "
                  f"({above / 2**30:.2f} above the floor = {above / largest_f32:.2f} x the largest tensor as f32); "
                  f"bases {info['bases_disk_bytes'] / 2**30:.2f} GiB on disk in {info['fill_seconds']:.0f} s, "
                  f"{len(info['points'])} grid points in {sum(p['seconds'] for p in info['points']):.0f} s",
                  flush=True)
        if "overlap" not in commands:
            if not a.keep:
                shutil.rmtree(d, ignore_errors=True)
            continue
        cmd = _cli("--threads", str(a.threads), "weightspace", "overlap", "--aligned", str(d / "aligned"),
                   "--model", f"ft1={d / 'ft1'}", "--model", f"ft2={d / 'ft2'}", "--etas", a.etas,
                   "--plot-eta", a.etas.split(",")[0], "--layers", a.layers, "--nonlayer", "--out", str(d / "run"),
                   "--no-progress")
        m = measured(cmd, f"overlap {size}")
        row = {"size": size, "n_params": n_params, "checkpoint_bytes": nbytes, "n_checkpoints": 3,
               "shards_per_checkpoint": n_shards, "largest_tensor": largest, "largest_shape": list(shapes[largest]),
               "largest_bytes_float32": largest_f32, "peak_rss_bytes": m["peak_rss_bytes"],
               "peak_above_floor_bytes": m["peak_rss_bytes"] - floor["peak_rss_bytes"],
               "overlap_seconds": round(m["seconds"], 1), "make_seconds": round(make_s, 1), "argv": cmd[3:]}
        row["peak_above_floor_over_largest_f32"] = round(row["peak_above_floor_bytes"] / row["largest_bytes_float32"], 3)
        row["peak_over_model_bytes"] = round(row["peak_rss_bytes"] / nbytes, 3)
        rows.append(row)
        print(f"  {size:7} {n_params / 1e6:8.1f} M params, {nbytes / 2**30:6.2f} GiB per checkpoint ({n_shards} shards); "
              f"largest {largest} {tuple(shapes[largest])} = {row['largest_bytes_float32'] / 2**30:.2f} GiB as f32; "
              f"overlap peak RSS {m['peak_rss_bytes'] / 2**30:.2f} GiB ({row['peak_above_floor_bytes'] / 2**30:.2f} "
              f"above the floor) in {m['seconds']:.0f} s", flush=True)
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    out = {"floor_peak_rss_bytes": floor["peak_rss_bytes"], "sizes": rows,
           "growth": _growth("overlap", rows),
           "settings": {"etas": a.etas, "layers": a.layers, "threads": a.threads, "shard_bytes": shard,
                        "dtype": "bfloat16", "synthetic_rank": 4, "synthetic_common_rank": 2, "scale": 0.01}}
    if sweep_floor:
        out["sweep"] = {"floor_peak_rss_bytes": sweep_floor["peak_rss_bytes"], "sizes": sweep_rows,
                        "growth": {m: _growth(f"sweep preparation, bases {m}", [r for r in sweep_rows
                                                                                 if r["bases"] == m])
                                   for m in modes},
                        "settings": {"rhos": a.sweep_rhos, "kinds": a.sweep_kinds, "mode": "parallel",
                                     "reference": "ft1 - aligned", "finetuned": "ft2", "threads": a.threads}}
    return out


def _growth(what: str, rows: list[dict]) -> dict | None:
    """From the first size to the last: model, largest tensor and peak RSS above the floor, as ratios."""
    if len(rows) < 2:
        return None
    a0, a1 = rows[0], rows[-1]
    growth = {"model": a1["n_params"] / a0["n_params"],
              "largest_tensor": a1["largest_bytes_float32"] / a0["largest_bytes_float32"],
              "peak_above_floor": a1["peak_above_floor_bytes"] / max(1, a0["peak_above_floor_bytes"])}
    print(f"  {what}: growth {a0['size']} -> {a1['size']}: model x{growth['model']:.2f}, largest tensor "
          f"x{growth['largest_tensor']:.2f}, peak RSS above the floor x{growth['peak_above_floor']:.2f}")
    return {k: round(v, 3) for k, v in growth.items()}


# -- part: sweep ---------------------------------------------------------------------------------------------

def _numbers(path: Path) -> list[list[float | str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        vals: list[float | str] = []
        for v in r.values():
            try:
                vals.append(float(v))
            except (TypeError, ValueError):
                vals.append(v)
        out.append(vals)
    return out


def _max_diff(a: Path, b: Path) -> float | None:
    """Max absolute difference of every number in two CSVs with the same rows (None: not the same rows)."""
    ra, rb = _numbers(a), _numbers(b)
    if len(ra) != len(rb):
        return None
    worst = 0.0
    for x, y in zip(ra, rb):
        if len(x) != len(y):
            return None
        for u, v in zip(x, y):
            if isinstance(u, float) and isinstance(v, float):
                if not (math.isnan(u) and math.isnan(v)):
                    worst = max(worst, abs(u - v))
            elif u != v:
                return None
    return worst


def part_sweep(a: argparse.Namespace, work: Path) -> dict:
    from weightspace.synthetic import write_perturbed

    if a.smoke:
        from workbench.tiny import build_tiny

        aligned = work / "tiny-aligned"
        model, tok = build_tiny("llama", n_layers=2)
        model.save_pretrained(str(aligned))
        tok.save_pretrained(str(aligned))
        model_name = "tiny-llama (in code)"
    else:
        from workbench.loading import ensure_zoo_cache

        aligned = ensure_zoo_cache(a.model)
        model_name = a.model
    t0 = time.perf_counter()
    fts = {}
    for k, (name, seed) in enumerate((("safety", 1), ("useful", 2), ("harmful", 3), ("contaminated", 4))):
        fts[name] = write_perturbed(aligned, work / f"ft-{name}", rank=4, scale=0.01, seed=seed, common_rank=2,
                                    common_seed=777, overwrite=True)
    print(f"sweep: {model_name}, synthetic fine-tunes written in {time.perf_counter() - t0:.0f} s")
    ev = (["--n-harmful", "2", "--n-tasks", "2", "--max-new-tokens", "4", "--task-tokens", "8"] if a.smoke else
          ["--n-harmful", str(a.n_harmful), "--n-tasks", str(a.n_tasks), "--max-new-tokens", str(a.max_new_tokens),
           "--task-tokens", str(a.task_tokens)])
    rhos = "0.5" if a.smoke else a.rhos
    common = ["weightspace", "sweep", "--aligned", str(aligned), "--reference-model", str(fts["safety"]),
              "--useful", str(fts["useful"]), "--harmful", str(fts["harmful"]), "--contaminated",
              str(fts["contaminated"]), "--rhos", rhos, "--kinds", a.kinds, *ev, "--no-progress"]
    runs = {}
    for label, extra, threads in (("local", [], a.threads), ("ray", ["--executor", "ray", "--workers", str(a.workers)], 1)):
        out = work / f"sweep-{label}"
        shutil.rmtree(out, ignore_errors=True)
        wall = _run(_cli("--threads", str(threads), *common, "--out", str(out), *extra), f"sweep ({label})")
        res = json.loads((out / "results.json").read_text())
        runs[label] = {"wall_seconds": round(wall, 2), "torch_threads_driver": threads, "out": str(out),
                       "executor": res["executor"]}
        print(f"  {label:5} wall {wall:7.1f} s", flush=True)
    same = {f: _max_diff(work / "sweep-local" / f, work / "sweep-ray" / f) for f in ("results.csv", "baselines.csv")}
    stats = runs["ray"]["executor"]["worker_stats"]
    tasks = sum(s["tasks"] for s in stats)
    per_task = sum(s["task_seconds"] for s in stats) / max(1, tasks)
    init = max(s["init_seconds"] for s in stats)
    busiest = max(s["init_seconds"] + s["task_seconds"] for s in stats)
    fixed = max(0.0, runs["ray"]["wall_seconds"] - busiest)
    local_stats = runs["local"]["executor"]["worker_stats"][0]
    local_per_task = local_stats["task_seconds"] / max(1, local_stats["tasks"])

    def ideal(w: int) -> float:
        return fixed + init + math.ceil(tasks / w) * per_task

    proj = [{"workers": w, "ideal_wall_seconds": round(ideal(w), 1), "speedup_vs_1_worker": round(ideal(1) / ideal(w), 2)}
            for w in (1, 2, 4, 8, 16, 32) if w <= max(1, tasks) or w == 1]
    print(f"  same rows: max |diff| {same}; {tasks} tasks x {per_task:.1f} s per task on a 1-thread worker "
          f"(local, {a.threads} threads: {local_per_task:.1f} s) = {tasks * per_task:.0f} s of scoring; worker start "
          f"{init:.1f} s; fixed driver time {fixed:.1f} s")
    print("  in principle (fixed + init + ceil(tasks / W) x per task): " +
          ", ".join(f"W={p['workers']}: {p['ideal_wall_seconds']:.0f} s (x{p['speedup_vs_1_worker']})" for p in proj))
    return {"model": model_name, "grid": {"rhos": rhos, "kinds": a.kinds}, "eval": ev, "runs": runs,
            "speedup_measured_local_over_ray": round(runs["local"]["wall_seconds"] / runs["ray"]["wall_seconds"], 3),
            "same_rows_max_abs_diff": same, "tasks": tasks, "seconds_per_task_ray_worker": round(per_task, 2),
            "seconds_per_task_local": round(local_per_task, 2), "worker_init_seconds": round(init, 2),
            "fixed_seconds": round(fixed, 2), "projection": proj,
            "note": "projection = fixed + init + ceil(tasks / W) x per-task time of a 1-CPU worker; assumes W free "
                    "cores (on the 2-core machine the measured Ray run shares the cores the local run used alone)"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["--phase", "measure"]:
        phase_measure(argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0
    if argv[:2] == ["--phase", "sweep-prep"]:
        phase_sweep_prep(argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "sweep", "memory"), default="all")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a tiny Llama, tiny Qwen2 shapes): a minute")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="zoo key of the sweep's aligned model")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the local sweep and of the overlap (default: every core)")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers of the sweep (1 CPU each)")
    ap.add_argument("--rhos", default="0.25,0.75")
    ap.add_argument("--kinds", default="topk,random")
    ap.add_argument("--n-harmful", type=int, default=16)
    ap.add_argument("--n-tasks", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--task-tokens", type=int, default=96)
    ap.add_argument("--etas", default="0.5,0.9,0.99")
    ap.add_argument("--layers", default="all", help="overlap layers (the embedding, the largest tensor, is always in)")
    ap.add_argument("--shard-mb", type=int, default=1024, help="safetensors shard size of the synthetic checkpoints")
    ap.add_argument("--sizes", default=None,
                    help=f"memory part: comma-separated model sizes of {', '.join(SHAPES)} (default 0.5b,1.5b; "
                         f"--smoke: tiny-a,tiny-b)")
    ap.add_argument("--memory-commands", default="overlap,sweep",
                    help="memory part: what is measured, overlap and / or sweep (the sweep's reference bases and "
                         "projections, no scoring)")
    ap.add_argument("--sweep-rhos", default="0.5", help="memory part, sweep: the rho grid projected")
    ap.add_argument("--sweep-kinds", default="topk,randomk,random", help="memory part, sweep: the kinds projected")
    ap.add_argument("--sweep-bases", default="disk",
                    help="memory part, sweep: disk (the sweep as it is) and / or memory (every basis held for the "
                         "whole sweep, the design before issue #13, for comparison)")
    ap.add_argument("--workdir", default=None, help="folder for checkpoints and runs (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/scale.json; --smoke: in "
                                                "the work folder)")
    a = ap.parse_args(argv)
    own = a.workdir is None
    work = Path(a.workdir or tempfile.mkdtemp(prefix="scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else (work / "scale.json" if a.smoke else HERE / "results" / "scale.json")
    result: dict = {"benchmark": "scale: sweep local vs ray; overlap and sweep-preparation peak RSS at two model sizes",
                    "smoke": a.smoke,
                    "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                    "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        if a.part in ("all", "sweep"):
            result["sweep"] = part_sweep(a, work)
        if a.part in ("all", "memory"):
            result["memory"] = part_memory(a, work)
        from workbench.io import write_json

        write_json(out, result)
        print(f"results in {out}")
    finally:
        if own and not a.keep and not a.smoke:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
