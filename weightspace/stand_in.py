"""A second stand-in for the alignment update: Exp 3 again with Delta_S made another way.

The chain stands in a safety fine-tune Delta_S for the alignment update Delta_A (no base model of the zoo model
is available offline). A reviewer's first question is whether Exp 3's verdict is a property of that one
fine-tune. ``workbench weightspace stand-in`` answers it on a finished chain folder: it trains a second safety
update from the aligned model on the **same** safety prompt pool with another method (default: LoRA, rank 8,
merged back), runs the chain's overlap phase with it as ``safety`` beside the chain's own useful / harmful /
contaminated fine-tunes (and the chain's full fine-tune as ``safety-full``), and applies the same Exp 3 rule
(:func:`weightspace.chain_report._exp3_verdict`, fixed before the run). It also scores both stand-ins on the
chain's evaluation sets (harm: 100 prompts, utility: the code tasks), so the report can show that the second
stand-in is a safety update at all (it must raise refusal over the aligned model) and what it costs.

Output (one run folder): ``ft-safety/`` (the fine-tune), ``overlap/`` (the chain's overlap files),
``stand_in.json`` (the verdict, the chain's verdict for the full fine-tune, the two stand-ins' agreement
MSO(safety~safety-full) over its random baseline, scores with intervals), ``evals/`` (per-item rows).

Example::

    workbench weightspace stand-in --chain runs/study-default --out runs/study-default-lora-safety
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError

FULL_LABEL = "safety-full"
__all__ = ["run_stand_in", "chain_config", "add_arguments", "cmd_stand_in", "FULL_LABEL"]


def chain_config(chain: str | Path) -> Any:
    """The :class:`weightspace.chain.ChainConfig` a chain folder was made with (``chain_config.json``)."""
    from weightspace.chain import ChainConfig, _read

    path = Path(chain) / "chain_config.json"
    if not path.is_file():
        raise WorkbenchError(f"{chain} is not a chain folder (no chain_config.json); give the --out of "
                             f"'workbench weightspace chain'")
    raw = _read(path).get("config", {})
    names = {f.name for f in dataclasses.fields(ChainConfig)}
    return ChainConfig.from_dict({k: v for k, v in raw.items() if k in names})  # settings of older chains ignored


def _scores(lm: Any, fmt: Any, cfg: Any, what: str) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    from workbench.backends import get_backend

    from weightspace.evaluation import EvalConfig, EvalSets, score_model

    ev = EvalConfig(n_harmful=cfg.n_harmful, n_tasks=cfg.n_tasks, max_new_tokens=cfg.max_new_tokens,
                    task_tokens=cfg.task_tokens, batch_size=cfg.eval_batch_size, utility_task=cfg.utility_task,
                    seed=cfg.seed)
    return score_model(get_backend("native", lm), EvalSets.default(ev), fmt, ev,
                       utility=what in ("both", "utility"), harm=what in ("both", "harm"))


def run_stand_in(chain: str | Path, out: Path, *, method: str = "lora", lora_rank: int | None = None,
                 lr: float | None = None, evaluate: str = "both", progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune the second stand-in into ``out/ft-safety``, run the overlap phase into ``out/overlap`` and
    return the summary (also written by the caller). ``out`` must be an open run folder's path."""
    from workbench.loading import load_model
    from workbench.runs import seed_everything

    from weightspace.chain import FT_RECIPES, _format, _jsonable, _run_finetune
    from weightspace.chain_report import _exp3_verdict
    from weightspace.deltas import DeltaSpec
    from weightspace.checkpoints import open_checkpoint
    from weightspace.overlap import OverlapConfig, save_overlap, update_overlap
    from weightspace.plan import match_checkpoints
    from weightspace.projection import unique_checkpoints
    from workbench.runs import RunFolder
    from workbench.zoo import DEFAULT_MODEL

    chain = Path(chain)
    base = chain_config(chain)
    missing = [r for r in FT_RECIPES if not (chain / f"ft-{r}" / "model.safetensors").is_file()
               and not any((chain / f"ft-{r}").glob("*.safetensors"))]
    if missing:
        raise WorkbenchError(f"the chain folder {chain} has no finished fine-tune(s) {', '.join(missing)}; "
                             f"run or resume the chain first")
    if evaluate not in ("both", "harm", "utility", "none"):
        raise WorkbenchError(f"evaluate must be both, harm, utility or none, got {evaluate!r}")
    cfg = dataclasses.replace(base, method=method, lr=lr, lora_rank=lora_rank or base.lora_rank,
                              progress=progress, executor="local")
    cfg.validate()
    if cfg.method == base.method and cfg.lr == base.lr and cfg.lora_rank == base.lora_rank:
        raise WorkbenchError(f"the stand-in would repeat the chain's own safety fine-tune (method {base.method}, "
                             f"lr {base.lr}); choose another --method, --lr or --lora-rank")
    model = cfg.model or DEFAULT_MODEL
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    lm = load_model(model, dtype=cfg.dtype, device=cfg.device, attn_implementation=cfg.attn)
    fmt = _format(cfg, lm)
    times["load_model"] = round(time.perf_counter() - t0, 2)
    log(f"[stand-in] {cfg.method} safety fine-tune of {lm.model_id} on the chain's safety pool")
    t0 = time.perf_counter()
    ft = _run_finetune(cfg, "safety", lm, fmt, out, log)
    times["finetune"] = round(time.perf_counter() - t0, 2)
    scores: dict[str, Any] = {}
    if evaluate != "none":
        from workbench.io import write_csv

        for label, path in (("safety", out / "ft-safety"), (FULL_LABEL, chain / "ft-safety")):
            t0 = time.perf_counter()
            del lm
            lm = load_model(str(path), dtype=cfg.dtype, device=cfg.device, attn_implementation=cfg.attn)
            log(f"[stand-in] scoring {label} ({evaluate}) ...")
            metrics, rows = _scores(lm, fmt, cfg, evaluate)
            for name, items in rows.items():
                write_csv(out / "evals" / label / f"{name}.csv", items)
            scores[label] = metrics
            times[f"score_{label}"] = round(time.perf_counter() - t0, 2)
    del lm
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    aligned = open_checkpoint(model, label="aligned")
    cks = {"safety": open_checkpoint(out / "ft-safety", label="safety"),
           **{r: open_checkpoint(chain / f"ft-{r}", label=r) for r in FT_RECIPES if r != "safety"},
           FULL_LABEL: open_checkpoint(chain / "ft-safety", label=FULL_LABEL)}
    specs = [DeltaSpec(lab, ck, aligned) for lab, ck in cks.items()]
    plan = match_checkpoints(unique_checkpoints(("aligned", aligned), *cks.items()))
    ocfg = OverlapConfig(etas=tuple(cfg.etas), method=cfg.svd, seed=cfg.seed, keep_angles=False,
                         embedding_orientation=cfg.embedding_orientation)
    with RunFolder(out / "overlap", config={"command": "weightspace stand-in (overlap)", "chain": str(chain),
                                            "method": cfg.method}, overwrite=True) as run:
        res = update_overlap(specs, plan, ocfg, progress=progress)
        save_overlap(run, res, plan, ocfg, cfg.plot_eta,
                     extra={"updates": [s.describe() for s in specs], "directions": None,
                            "reference_note": f"safety = the {cfg.method} stand-in; {FULL_LABEL} = the chain's own "
                                              f"{base.method} safety fine-tune"})
    times["overlap"] = round(time.perf_counter() - t0, 2)
    exp3 = _exp3_verdict(cfg, out)
    chain_exp3 = _exp3_verdict(base, chain)
    agree = _agreement(out / "overlap" / "overlap_tensors.csv", cfg.plot_eta)
    return _jsonable({"chain": str(chain), "method": cfg.method, "lr": ft["hyperparameters"]["lr"],
                      "lora_rank": cfg.lora_rank if cfg.method == "lora" else None,
                      "chain_method": base.method, "finetune": {k: ft.get(k) for k in
                                                                ("steps", "initial_loss", "final_loss", "n_examples",
                                                                 "data_hash", "seconds")},
                      "safety_pool_hash": ft.get("recipe_info", {}).get("safety", {}).get("pool_hash"),
                      "eta": cfg.plot_eta, "exp3": exp3, "chain_exp3": chain_exp3, "agreement": agree,
                      "scores": scores, "aligned_scores": _aligned_scores(chain), "seconds": times})


def _agreement(path: Path, eta: float) -> dict[str, Any]:
    """MSO(safety~safety-full) per tensor at ``eta``, summarised with the separability rule (ratio to the
    random baseline, bootstrap CI over tensors)."""
    import csv

    from weightspace.verdicts import separability

    mso, base = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["pair"] == f"safety~{FULL_LABEL}" and abs(float(r["eta"]) - eta) < 1e-12:
                mso.append(float(r["mso"]))
                base.append(float(r["baseline"]))
    if not mso:
        return {"verdict": "inconclusive", "note": "no tensor carries both stand-ins"}
    return separability(mso, base)


def _aligned_scores(chain: Path) -> dict[str, Any] | None:
    from weightspace.chain import _read

    try:
        return _read(chain / "chain_report.json")["sweep"]["baselines"].get("aligned")
    except (OSError, KeyError, ValueError, TypeError):
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chain", required=True, help="a finished chain folder (workbench weightspace chain --out)")
    p.add_argument("--out", required=True, help="run folder for the stand-in, its overlap and stand_in.json")
    p.add_argument("--method", choices=("lora", "full"), default="lora", help="how the second stand-in is trained")
    p.add_argument("--lora-rank", type=int, default=None, help="default: the chain's (8)")
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 LoRA, 5e-5 full")
    p.add_argument("--evaluate", choices=("both", "harm", "utility", "none"), default="both",
                   help="score both stand-ins on the chain's evaluation sets")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = pick for this machine)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing stand-in run folder")
    p.add_argument("--no-progress", action="store_true")


def cmd_stand_in(args: argparse.Namespace) -> int:
    """``workbench weightspace stand-in``: the second stand-in, its Exp 3 verdict and scores."""
    import torch

    from workbench.runs import RunFolder
    from weightspace.chain import pick_threads

    if args.lora_rank is not None and args.lora_rank < 1:
        raise WorkbenchError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    if args.lr is not None and not args.lr > 0:
        raise WorkbenchError(f"--lr must be > 0, got {args.lr}")
    chain_config(args.chain)  # a clear error before the run folder exists
    threads, _ = pick_threads(args.threads)
    torch.set_num_threads(threads)
    with RunFolder(args.out, config={"command": "weightspace stand-in", "chain": args.chain, "method": args.method,
                                     "lora_rank": args.lora_rank, "lr": args.lr, "evaluate": args.evaluate},
                   overwrite=args.overwrite, inputs=[args.chain]) as run:
        res = run_stand_in(args.chain, run.path, method=args.method, lora_rank=args.lora_rank, lr=args.lr,
                           evaluate=args.evaluate, progress=not args.no_progress)
        run.write_json("stand_in.json", res)
    e, c = res["exp3"] or {}, res["chain_exp3"] or {}
    print(f"Exp 3 with the {res['method']} stand-in: {e.get('verdict')} (value {e.get('value')}, CI {e.get('ci')}); "
          f"with the chain's {res['chain_method']} fine-tune: {c.get('verdict')} (value {c.get('value')})")
    a = res["agreement"]
    print(f"stand-ins agree (MSO safety~{FULL_LABEL} / baseline): {a.get('value')} CI {a.get('ci')} -> {a.get('verdict')}")
    return 0
