"""The main job: capture the built-in harmful / harmless sets on a model and summarise every layer.

Later stages (probe sweep, overlap, steering, ...) are added by the plugin packages through
``MAIN_STAGE`` / ``MAIN_STAGES``; each receives the :class:`MainContext` and writes into its own sub-folder. A
stage function with an ``enabled(args)`` attribute that returns False (an optional stage left off, e.g.
``--optimize-trials 0``) is neither run nor listed in ``stage_times.json``.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from workbench.capture import Activations, capture
from workbench.chat import ChatFormat
from workbench.prompts import builtin_split
from workbench.errors import WorkbenchError
from workbench.kernels import OneDNNLinear
from workbench.runs import RunFolder, check_out, is_run_folder, seed_everything


@dataclass
class MainContext:
    """What every stage of the main job shares."""

    args: argparse.Namespace
    lm: Any
    fmt: ChatFormat
    run: RunFolder
    quick: bool
    results: dict[str, Any] = field(default_factory=dict)

    def limit(self, n: int, quick_n: int) -> int:
        return quick_n if self.quick else n


def mean_difference_readout(pos_train: torch.Tensor, neg_train: torch.Tensor, pos_test: torch.Tensor,
                            neg_test: torch.Tensor) -> float:
    """Held-out accuracy of the simplest linear readout: project on the train mean difference and
    threshold at the midpoint of the projected train means."""
    d = pos_train.mean(0) - neg_train.mean(0)
    mid = ((pos_train.mean(0) + neg_train.mean(0)) / 2) @ d
    correct = ((pos_test @ d) > mid).sum() + ((neg_test @ d) <= mid).sum()
    return float(correct) / (len(pos_test) + len(neg_test))


def layer_summary(acts: dict[str, Activations], n_layers: int) -> list[dict[str, Any]]:
    rows = []
    for layer in range(n_layers):
        hp, hn = acts["harmful:train"].layer(layer), acts["harmless:train"].layer(layer)
        tp, tn = acts["harmful:test"].layer(layer), acts["harmless:test"].layer(layer)
        rows.append({
            "layer": layer,
            "norm_harmful": round(float(torch.cat([hp, tp]).norm(dim=-1).mean()), 3),
            "norm_harmless": round(float(torch.cat([hn, tn]).norm(dim=-1).mean()), 3),
            "heldout_acc_mean_diff": round(mean_difference_readout(hp, hn, tp, tn), 4),
        })
    return rows


def core_stage(ctx: MainContext) -> None:
    lm, run = ctx.lm, ctx.run
    acts: dict[str, Activations] = {}
    for name in ("harmful", "harmless"):
        for split in ("train", "test"):
            ps = builtin_split(name, split)
            texts = ps.texts[: ctx.limit(len(ps), 24)]
            # one capture serves every stage: residual input and output, every post-instruction token
            acts[f"{name}:{split}"] = capture(lm, texts, layers="all", components=("resid_pre", "resid_post"),
                                              positions=["post_instruction"], fmt=ctx.fmt, backend=ctx.args.backend)
    ctx.results["core_acts"] = acts
    rows = layer_summary(acts, lm.n_layers)
    run.write_csv("layers.csv", rows)
    run.write_json("layers.json", rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    L = [r["layer"] for r in rows]
    ax[0].plot(L, [r["norm_harmful"] for r in rows], label="harmful")
    ax[0].plot(L, [r["norm_harmless"] for r in rows], label="harmless")
    ax[0].set(xlabel="layer", ylabel="mean ‖resid_post‖ (last token)", title="residual norm")
    ax[0].legend()
    ax[1].plot(L, [r["heldout_acc_mean_diff"] for r in rows], marker="o")
    ax[1].set(xlabel="layer", ylabel="held-out accuracy", title="mean-difference readout", ylim=(0.4, 1.02))
    fig.suptitle(f"{lm.model_id}: harmful vs harmless")
    run.save_figure("layers.png", fig)
    print(f"\nPer-layer summary ({lm.model_id}, last prompt token, held-out test split):")
    print(f"{'layer':>5} {'‖h‖ harmful':>12} {'‖h‖ harmless':>13} {'readout acc':>12}")
    for r in rows:
        print(f"{r['layer']:>5} {r['norm_harmful']:>12.2f} {r['norm_harmless']:>13.2f} {r['heldout_acc_mean_diff']:>12.3f}")
    best = max(rows, key=lambda r: r["heldout_acc_mean_diff"])
    print(f"best layer {best['layer']}: held-out accuracy {best['heldout_acc_mean_diff']:.3f}")


def run_main(args: argparse.Namespace, stages: list[tuple[int, str, Callable[[MainContext], Any]]]) -> int:
    from workbench.cli import load_from_args

    seed_everything(args.seed)
    out = Path(args.out)
    check_out(out, overwrite=True)  # an existing run is kept as OUT.previous; anything else is refused
    prev = out.with_name(out.name + ".previous")
    if prev.exists() and any(prev.iterdir()) and not is_run_folder(prev):
        raise WorkbenchError(f"{prev} exists and is not a workbench run folder; move it away (the main job keeps "
                             f"the previous results there)")
    t0 = time.perf_counter()
    lm = load_from_args(args)
    t_load = time.perf_counter() - t0
    sp = args.system_prompt
    if sp is None or sp == "default":
        sp = lm.default_system_prompt
    fmt = ChatFormat(system_prompt=sp, raw=args.raw)
    # written to a staging folder and moved into place when every stage finished; the previous run
    # (if any) is then kept as OUT.previous
    run = RunFolder(out, config=vars(args) | {"command": "main"}, keep_previous=True)
    run.record_model(lm)
    ctx = MainContext(args, lm, fmt, run, args.quick)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    print(f"[workbench] main job on {lm.model_id} ({lm.dtype}) -> {run.final} (staged in {run.path})")
    times: list[dict[str, Any]] = [{"stage": "load_model", "seconds": round(t_load, 2), "status": "ran"}]

    # float32 linear layers on oneDNN for the whole job (workbench/kernels.py: ~2x on CPUs where PyTorch's BLAS is
    # slow; same replies, numbers to float rounding); --linear default keeps PyTorch's BLAS
    mode = OneDNNLinear() if getattr(args, "linear", "onednn") == "onednn" else None

    def timed(name: str, fn: Callable[[MainContext], Any]) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(ctx)
        times.append({"stage": name, "seconds": round(time.perf_counter() - t0, 2),
                      "cpu_seconds": round(time.process_time() - c0, 2), "status": "ran"})
        run.write_json("stage_times.json", {"stages": times, "dtype": str(lm.dtype).replace("torch.", ""),
                                            "linear": "onednn" if mode is not None and mode.routed else "default",
                                            "torch_threads": torch.get_num_threads(),
                                            "total_seconds": round(sum(t["seconds"] for t in times), 2)})

    with mode if mode is not None else nullcontext():
        timed("core", core_stage)
        for _, name, fn in stages:
            short = name.split(".")[0]
            if not getattr(fn, "enabled", lambda a: True)(args):  # an optional stage left off: not run, not listed
                continue
            if short in skip:
                print(f"[workbench] skipping stage {short}")
                times.append({"stage": short, "seconds": 0.0, "status": "skipped"})
                continue
            print(f"\n[workbench] stage: {short}")
            timed(short, fn)
    print("\n[workbench] stage times: " + ", ".join(f"{t['stage']} {t['seconds']:.0f} s" for t in times))
    final = run.commit()
    print(f"\n[workbench] results in {final}")
    return 0

