"""The ``workbench`` command line.

Core commands live here (``models``, ``capture``, ``main``); the probes, steering, weight-space and
app packages add theirs through the ``workbench.plugins`` entry-point group, so this core package
imports none of them. Each plugin module exposes ``register(subparsers)`` and may expose
``MAIN_STAGE = (order, function)`` to add a stage to the main job.

    workbench models
    workbench capture --model smollm2-135m-instruct --prompts harmful --layers all --position last --out runs/cap
    workbench main --out runs/main
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from importlib import metadata
from typing import Any, Callable

from workbench.errors import WorkbenchError


def add_model_args(p: argparse.ArgumentParser, default: str | None = None, repeat: bool = False) -> None:
    """Model options shared by every command that loads a model. ``repeat``: ``--model`` may be given several
    times (``args.model`` is then a list, or ``None`` when not given: the command uses ``default``)."""
    from workbench.argtypes import one_line_errors, seed_int
    from workbench.zoo import DEFAULT_MODEL

    if repeat:
        p.add_argument("--model", action="append", default=None, metavar="MODEL",
                       help=f"zoo key, local HF folder, .gguf file, or hub id (online only); default "
                            f"{default or DEFAULT_MODEL}. Repeat for several models: one executor task each "
                            f"(--executor), one subfolder each in --out")
    else:
        p.add_argument("--model", default=default or DEFAULT_MODEL,
                       help="zoo key, local HF folder, .gguf file, or hub id (online only)")
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"),
                   help="float32 (default), auto (bfloat16 on a CPU with AMX-BF16 or a bf16 GPU, else float32; "
                        "AVX512-BF16 alone measured slower than float32), bfloat16, float16. auto becomes the "
                        "default once benchmarks/dtype_compare.py shows the main job's conclusions unchanged")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps")
    p.add_argument("--device-map", default=None, help="passed to transformers (e.g. 'auto')")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.add_argument("--system-prompt", default=None,
                   help="system prompt for the chat template ('default' = the zoo's recommended one, if any)")
    p.add_argument("--raw", action="store_true", help="no chat template: feed prompts as raw text")
    p.add_argument("--backend", default="native", choices=("native", "transformer_lens", "nnsight"),
                   help="native (default), transformer_lens, nnsight")
    p.add_argument("--seed", type=seed_int, default=0)
    one_line_errors(p)


def load_from_args(args: argparse.Namespace) -> Any:
    from workbench.loading import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                      trust_remote_code=args.trust_remote_code)


def format_from_args(args: argparse.Namespace, lm: Any) -> Any:
    from workbench.chat import ChatFormat

    sp = args.system_prompt
    if sp == "default":
        sp = lm.default_system_prompt
    return ChatFormat(system_prompt=sp, raw=args.raw)


# -- core commands ------------------------------------------------------------------------------

def cmd_models(args: argparse.Namespace) -> int:
    from workbench.loading import zoo_cache_dir, zoo_cached
    from workbench.zoo import DEFAULT_MODEL, ZOO, package_dir

    if getattr(args, "install", None):  # an optional model's packages, checksum verified (workbench.zoo.install)
        from workbench.zoo import install

        install(args.install)
        return 0

    print(f"{'model':32} {'arch':7} {'layers':>6} {'d':>5} {'cache':>10}  license / notes")
    for key, e in ZOO.items():
        installed = all(package_dir(m) is not None for m, _ in e.parts)
        if zoo_cached(key):
            size = sum(f.stat().st_size for f in zoo_cache_dir(key).glob("*.safetensors")) / 1e9
            cache = f"{size:.2f} GB"
        else:
            cache = "not cached" if installed else "not installed"
        star = "*" if key == DEFAULT_MODEL else " "
        print(f"{star}{key:31} {e.arch:7} {e.n_layers:>6} {e.d_model:>5} {cache:>10}  {e.license}; {e.notes}")
        print(f"{'':33}packages: {' '.join(e.packages)}  sha256 {e.sha256[:16]}...")
    print("* default. Also accepted: a local HF folder, a .gguf file, or a hub id when online.")
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from workbench.argtypes import check_context, input_paths
    from workbench.capture import capture
    from workbench.prompts import resolve_prompts
    from workbench.runs import RunFolder, check_out, seed_everything
    from workbench.sites import COMPONENTS, parse_sites

    seed_everything(args.seed)
    # everything that does not need the model, before loading it
    ps = resolve_prompts(args.prompts)
    components = [c.strip() for c in args.components.split(",")]
    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        raise WorkbenchError(f"unknown component(s) {', '.join(map(repr, bad))}. Valid: {', '.join(COMPONENTS)}")
    positions = [p.strip() for p in args.position.split(",")]
    inputs = input_paths(args.model, args.prompts)
    check_out(args.out, overwrite=args.overwrite, inputs=inputs)
    lm = load_from_args(args)
    fmt = format_from_args(args, lm)
    # then what needs it, before the run folder exists
    parse_sites(args.layers, lm.n_layers, components)
    check_context(lm, fmt, [ps.texts])
    run = RunFolder(args.out, config=vars(args) | {"command": "capture"}, overwrite=args.overwrite, inputs=inputs)
    run.record_model(lm)
    acts = capture(lm, ps, layers=args.layers, components=components, positions=positions,
                   fmt=fmt, backend=args.backend, batch_size=args.batch_size, cache=not args.no_cache)
    acts.save(run.path)
    run.write_csv("prompts.csv", [{"index": i, "id": p.id, "text": p.text, "category": p.category}
                                  for i, p in enumerate(ps)])
    print(f"captured {acts.n_prompts} prompts x {len(acts.sites)} sites x {list(acts.data)} -> {run.final}")
    return 0


def cmd_main(args: argparse.Namespace) -> int:
    from workbench.mainjob import run_main

    return run_main(args, plugin_stages())


# -- plugins ------------------------------------------------------------------------------------

def _plugins() -> list[Any]:
    mods = []
    try:
        eps = metadata.entry_points(group="workbench.plugins")
    except TypeError:  # pragma: no cover - very old Pythons
        eps = metadata.entry_points().get("workbench.plugins", [])  # type: ignore[attr-defined]
    for ep in sorted(eps, key=lambda e: e.name):
        try:
            mods.append(ep.load())
        except ImportError as e:  # a plugin whose optional dependency is missing
            print(f"[workbench] plugin '{ep.name}' unavailable: {e}", file=sys.stderr)
    return mods


def plugin_stages() -> list[tuple[int, str, Callable[..., Any]]]:
    """The main job's stages ``(order, name, function)``: each plugin's ``MAIN_STAGE = (order, function)`` (named
    after the plugin) and its ``MAIN_STAGES = [(order, name, function), ...]``, in order."""
    stages = []
    for m in _plugins():
        st = getattr(m, "MAIN_STAGE", None)
        if st is not None:
            order, fn = st
            stages.append((order, m.__name__, fn))
        stages.extend(getattr(m, "MAIN_STAGES", None) or [])
    return sorted(stages, key=lambda s: s[0])


def build_parser() -> argparse.ArgumentParser:
    from workbench.argtypes import one_line_errors, positive_int

    ap = argparse.ArgumentParser(prog="workbench", description="safety-subspace workbench")
    ap.add_argument("--threads", type=positive_int, default=None, dest="global_threads",
                    help="torch CPU threads (default: torch's choice; use 1 when other jobs share the cores)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model zoo, sizes, licenses and cache state")
    p.add_argument("--install", metavar="KEY", default=None,
                   help="install an optional zoo model's packages (e.g. qwen2.5-coder-1.5b-instruct, ~1.1 GB) and "
                        "verify their sha256")
    p.set_defaults(func=cmd_models)

    from workbench.argtypes import position_list, positive_int

    p = sub.add_parser("capture", help="capture activations of a prompt set")
    add_model_args(p)
    p.add_argument("--prompts", required=True,
                   help="builtin name (harmful, harmless, utility, harmful_styled, useful_requests[:split]) or a file")
    p.add_argument("--layers", default="all", help="'all', '5', '0,3,-1', '4-10'")
    p.add_argument("--components", default="resid_post", help="comma list of resid_pre,resid_post,attn_out,mlp_out")
    p.add_argument("--position", default="last", type=position_list,
                   help="comma list: last, post_instruction, mean, all, or indices")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("main", help="the main job on the default model (see README)")
    add_model_args(p)
    p.add_argument("--out", default="runs/main", help="run folder (an existing one is kept as OUT.previous)")
    p.add_argument("--quick", action="store_true", help="fewer prompts (smoke test)")
    p.add_argument("--skip", default="", help="comma list of stage names to skip")
    p.add_argument("--linear", choices=["onednn", "default"], default="onednn",
                   help="float32 linear layers on oneDNN (default; about 2x faster than PyTorch's BLAS on the CPUs "
                        "measured, same replies, numbers to float rounding: benchmarks/kernels.py) or the default BLAS")
    for m in _plugins():  # a plugin's own options of the main job (e.g. steering's --optimize-trials)
        add = getattr(m, "add_main_args", None)
        if add is not None:
            add(p)
    p.set_defaults(func=cmd_main)

    for m in _plugins():
        reg = getattr(m, "register", None)
        if reg is not None:
            reg(sub)
    return one_line_errors(ap)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command as one transaction: the run folders it opened are moved into place when it
    returns 0, and discarded (earlier results kept) when it fails, returns non-zero or is interrupted."""
    from workbench import runs

    before = runs.open_runs()  # runs opened by an embedding program (a notebook) are not this command's
    try:
        rc = int(args.func(args) or 0)
    except BaseException:
        runs.abort_open_runs(exclude=before)
        raise
    if rc != 0:
        runs.abort_open_runs(exclude=before)
        return rc
    for final in runs.commit_open_runs(exclude=before):
        print(f"[workbench] run folder: {final}", file=sys.stderr)
    return rc


def _terminate_as_interrupt() -> Any:
    """SIGTERM raises KeyboardInterrupt (main thread only), so cleanup runs and no staging folder is left."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --threads is global but accepted anywhere on the line (e.g. `bash scripts/main.sh --threads 1`)
    if "--threads" in argv[1:]:
        i = argv.index("--threads", 1)
        argv = ["--threads", *argv[i + 1:i + 2], *argv[:i], *argv[i + 2:]]
    args = ap.parse_args(argv)
    # a command with its own --threads (default 0 = pick for the machine) sees the global value: the move above
    # hands every --threads to the global option, and before it had its own dest the sub-command's default 0
    # overwrote it, so `weightspace chain ... --threads 2` silently ran with the automatic choice
    args.threads = args.global_threads or getattr(args, "threads", None)
    if args.global_threads:
        import torch

        torch.set_num_threads(args.global_threads)
    t0 = time.perf_counter()
    previous = _terminate_as_interrupt()
    try:
        rc = run_command(args)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; unfinished run folders discarded (earlier results kept)", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.command not in ("models",):
        print(f"[workbench] {args.command} finished in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
