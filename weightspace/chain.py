"""``workbench weightspace chain``: the whole study chain (experiments 1-3) from one command, on a CPU or a GPU.

    workbench weightspace chain --model smollm2-135m-instruct --out runs/ws-chain-smollm2
    workbench weightspace chain --model smollm2-135m-instruct --out runs/ws-chain-smollm2 --resume
    workbench weightspace chain --model smollm2-135m-instruct --out runs/ws-chain-smollm2 --device cuda

Phases, each in its own sub-folder of ``--out``:

1. ``ft-safety``, ``ft-useful``, ``ft-harmful``, ``ft-contaminated``: fine-tunes of the aligned model
   ``W_A`` (the zoo model) through :func:`weightspace.recipes.build_recipe` and
   :func:`weightspace.finetune.finetune`, all under one chat format (the zoo's recommended system prompt
   unless ``--system-prompt`` says otherwise; recorded). The harmful prompts of ``safety``, ``harmful``, the
   harmful share of ``contaminated``, the refusal direction and the sweep's harm evaluation come from disjoint
   pools (:mod:`weightspace.pools`; each pool's name, size and hash is recorded in ``chain_config.json``, in
   ``chain_report.json`` under ``pools`` and in each phase's resume key). ``contaminated`` reuses the harmful
   run's refusal direction and generates its own replies on the ``contaminated`` pool; its *real* harmful share
   is reported. The useful recipe (and the contaminated recipe's useful part) trains on what the sweep
   measures (``--useful-source auto``): with the code utility task, the codetasks TRAIN split (prompt ->
   reference solution; the sweep scores the test split); with ``--utility-task arithmetic``, arithmetic tasks.
   ``--useful-source self`` self-distils instead: the same TRAIN prompts -> the aligned model's own greedy
   replies that pass their unit tests (:func:`weightspace.recipes.self_code_examples`). On the default model
   the reference-solution recipe *lowered* the pass rate from 0.75 to 0.22 in a chain run, which leaves
   experiment 1 no utility to preserve; the self-distilled recipe lowered it too (0.28, same fine-tuning
   settings), so the fine-tuning itself (full, lr 5e-5) does the damage, and the full-FT safety fine-tune made
   the model refuse every code task (docs/study_default_model_full_ft.md). With ``--lora`` (rank 8, lr 2e-4)
   the useful fine-tune keeps the pass rate (0.72) and the safety one too (0.78): docs/study_default_model.md.
2. ``overlap`` (experiment 3): MSO among ``Delta_S`` (the safety update, standing in for ``Delta_A``: no
   base model of the zoo models is available offline), ``Delta_useful``, ``Delta_harmful`` and
   ``Delta_contaminated`` over the eta grid, per tensor / layer / module type, heatmaps and baselines
   (:func:`weightspace.overlap.update_overlap`).
3. ``sweep`` (experiments 1 and 2): reference ``Delta_S``; rho grid x TopK / RandomK / Random; parallel
   projections of the useful (utility) and harmful (harmfulness) updates, orthogonal filtering of the
   contaminated update (both); trade-off plots; every per-prompt output (:func:`weightspace.sweep.run_sweep`).
4. ``chain_report.json`` and ``chain_summary.md``: timings of every phase, the real harmful share, the key
   tables, the paths of all plots, and the findings as measured against the study's claims
   (:mod:`weightspace.chain_report`; the verdict rules: :mod:`weightspace.verdicts`).

``--device`` (default ``cpu``; ``cuda``, ``cuda:N``, ``mps``; refused before any work where it is missing) is
where the aligned model is loaded once, the recipes are built (refusal direction, ablated generations), the
fine-tunes train and the sweep scores its models. The overlap phase and the sweep's projections are SVDs of
checkpoint files on the CPU whatever the device. The device is recorded (``chain_config.json``,
``chain_report.json``, each invocation in ``chain_invocations.jsonl``) but is in no phase's resume key: a chain
started on the CPU may resume on a GPU and the other way round. ``--executor ray`` with a CUDA device gives
each Ray worker ``--ray-gpus-per-worker`` GPUs (default 1; a worker without GPUs sees none), and each worker loads
the model on the GPU Ray reserved for it (:func:`workbench.executors.worker_device`); a cluster with fewer GPUs
than one worker needs is refused when the workers start.

``--executor`` (``local``, the default, or ``ray``; :mod:`workbench.executors`) runs each fine-tune as a task
(:mod:`weightspace.chain_finetunes`: ``safety``, ``useful`` and ``harmful`` at once, then ``contaminated``, which
reuses the harmful run's refusal direction) and scores the sweep's models as tasks; the overlap phase, the
markers and the report stay on the driver. Locally everything runs in this process in phase order, as it always
did; on Ray each worker loads the aligned model itself and writes its fine-tune's folder into the chain folder (on
a cluster: storage shared by every node), and the files equal a local run's for the same seed and the same torch
thread count per process (one per worker's CPU share). The executor is in no resume key either: a chain killed
on Ray resumes locally or on Ray, skipping the finished fine-tunes.

A phase is finished when its folder holds its result (a fine-tune's ``report.json``; the overlap and sweep
``chain_phase.json`` marker, written last). Without ``--resume`` an existing non-empty ``--out`` is refused
unless ``--overwrite``; with ``--resume`` finished phases whose settings (and inputs) are unchanged are
skipped and everything else is (re)run. Every phase is seeded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError

# The report, the findings and the summary live in weightspace.chain_report (the verdict rules in
# weightspace.verdicts); re-exported here for callers of the old names (chain._paired, chain.findings, ...).
from weightspace.chain_report import (FT_RECIPES, REFERENCE_LABEL, _at, _f, _module_rows, _paired,  # noqa: F401
                                      _per_prompt, _read, _rows, _se, build_report, findings, render_summary)

__all__ = ["ChainConfig", "PHASES", "FT_RECIPES", "run_chain", "add_arguments", "config_from_args", "cmd_chain"]

PHASES = tuple(f"finetune-{r}" for r in FT_RECIPES) + ("overlap", "sweep")
MARKER = "chain_phase.json"
DEFAULT_ETAS = (0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)  # = weightspace.overlap.DEFAULT_ETAS
DEFAULT_RHOS = (0.01, 0.25, 0.5, 0.75, 0.99)  # = weightspace.sweep.DEFAULT_RHOS
DEFAULT_KINDS = ("topk", "randomk", "random")
EMBEDDING_ORIENTATIONS = ("stored", "transposed")  # = weightspace.spectral.EMBEDDING_ORIENTATIONS
WRITE_DTYPES = ("stored", "float32")  # = weightspace.projection.WRITE_DTYPES
# the prompt pools each fine-tune draws from (weightspace.pools), recorded in its resume key
USEFUL_SOURCE_CHOICES = ("auto", "code", "self", "arithmetic")  # auto = the sweep's utility_task
RECIPE_POOLS = {"safety": ("safety",), "useful": (), "harmful": ("harmful", "direction", "direction_harmless"),
                "contaminated": ("contaminated",)}


def folder_of(phase: str) -> str:
    """Sub-folder of a phase.

    Example::

        >>> folder_of("finetune-useful"), folder_of("sweep")
        ('ft-useful', 'sweep')
    """
    return "ft-" + phase.split("-", 1)[1] if phase.startswith("finetune-") else phase


@dataclass
class ChainConfig:
    """Every setting of a chain run (defaults sized for SmolLM2-135M on 2 CPU cores in under an hour)."""

    model: str | None = None  # zoo key, HF folder (default: the zoo's default model)
    system_prompt: str | None = None  # None / "default": the zoo's recommended one; "none": no system prompt
    raw: bool = False
    dtype: str = "float32"
    attn: str = "eager"  # attention kernel of the loaded model used for generation and scoring
    seed: int = 0
    threads: int = 0  # torch threads; 0 = auto (see pick_threads)
    # fine-tuning
    n: int = 64  # examples per recipe (harmful: prompts generated; contaminated: total); <= the pool sizes
    harmful_share: float = 0.2  # contaminated: nominal share (the real one is reported)
    method: str = "full"
    lr: float | None = None
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    lora_rank: int = 8
    answer_style: str | None = None  # arithmetic useful replies only ("number" when None)
    # the useful recipe's data (useful and contaminated): "auto" = what the sweep measures (utility_task): code
    # -> the codetasks TRAIN split (the sweep scores the test split), arithmetic -> generated arithmetic tasks;
    # "self": the TRAIN prompts -> the aligned model's own replies that pass their unit tests (self-distilled)
    useful_source: str = "auto"
    gen_tokens: int = 48  # harmful replies
    gen_batch_size: int = 8
    direction_n: int = 64
    # overlap (experiment 3)
    etas: tuple[float, ...] = DEFAULT_ETAS
    plot_eta: float = 0.5
    keep_angles: bool = True
    # sweep (experiments 1 and 2)
    rhos: tuple[float, ...] = DEFAULT_RHOS
    kinds: tuple[str, ...] = DEFAULT_KINDS
    n_harmful: int | None = None  # None = the whole harm-evaluation pool (weightspace.pools: 100 prompts)
    max_new_tokens: int = 32
    n_tasks: int | None = None  # None = the whole code-task split (codetasks test: 32 tasks)
    task_tokens: int = 160  # utility replies (code); ~16 suffice for --utility-task arithmetic
    utility_task: str = "code"  # code: unit-test pass rate of function-writing tasks; arithmetic: exact match
    eval_batch_size: int = 8
    svd: str = "exact"
    embedding_orientation: str = "stored"  # overlap and sweep: the embedding's left space as stored (the study's)
    write_dtype: str = "stored"  # sweep: projected tensors rounded to their stored dtype, or kept in float32
    progress: bool = True
    # where the fine-tunes run and the sweep's models are scored (workbench.executors, weightspace.chain_finetunes);
    # not part of any phase's resume key: a chain started locally resumes on Ray and the other way round
    executor: str = "local"
    ray_address: str | None = None
    workers: int | None = None
    ray_gpus_per_worker: float | None = None  # None: 1 with a CUDA device, else none
    # where the model is loaded, the recipes are built, the fine-tunes train and the sweep scores (cpu, cuda,
    # cuda:N, mps); not part of any phase's resume key either: a chain started on the CPU resumes on a GPU
    device: str = "cpu"

    def validate(self) -> None:
        from weightspace.spectral import KINDS, check_fraction, check_grid
        from workbench.loading import parse_device

        parse_device(self.device)  # an unknown device, or CUDA / MPS where there is none: refused before any work
        self.etas = tuple(check_grid(list(self.etas), "eta"))
        self.rhos = tuple(check_grid(list(self.rhos), "rho"))
        if self.plot_eta not in self.etas:
            raise WorkbenchError(f"--plot-eta {self.plot_eta} is not in the eta grid {list(self.etas)}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise WorkbenchError(f"kinds must be a non-empty subset of {', '.join(KINDS)}, got {list(self.kinds)}")
        if self.method not in ("full", "lora"):
            raise WorkbenchError(f"method must be 'full' or 'lora', got {self.method!r}")
        if not 0.0 < self.harmful_share < 1.0:
            raise WorkbenchError(f"harmful_share must be in (0, 1), got {self.harmful_share}")
        check_fraction(self.plot_eta, "plot_eta")
        for k in ("n", "epochs", "batch_size", "grad_accum", "gen_tokens", "gen_batch_size", "direction_n",
                  "n_harmful", "max_new_tokens", "n_tasks", "task_tokens", "eval_batch_size", "lora_rank"):
            if k in ("n_harmful", "n_tasks") and getattr(self, k) is None:
                continue  # None = the whole evaluation set
            if int(getattr(self, k)) < 1:
                raise WorkbenchError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.utility_task not in ("code", "arithmetic"):
            raise WorkbenchError(f"utility_task must be 'code' or 'arithmetic', got {self.utility_task!r}")
        if self.useful_source not in USEFUL_SOURCE_CHOICES:
            raise WorkbenchError(f"useful_source must be 'auto', 'code', 'self' or 'arithmetic', got "
                                 f"{self.useful_source!r}")
        if self.answer_style is not None and self.useful_data_source != "arithmetic":
            raise WorkbenchError(f"answer_style {self.answer_style!r} applies to the arithmetic useful recipe only "
                                 f"(the useful recipe trains on {self.useful_data_source}: give useful_source "
                                 f"'arithmetic' or drop answer_style)")
        if self.svd not in ("exact", "randomized"):
            raise WorkbenchError(f"svd must be 'exact' or 'randomized', got {self.svd!r}")
        if int(self.threads) < 0:
            raise WorkbenchError(f"threads must be >= 0, got {self.threads}")
        if self.attn not in ("eager", "sdpa"):
            raise WorkbenchError(f"attn must be 'eager' or 'sdpa', got {self.attn!r}")
        if self.embedding_orientation not in EMBEDDING_ORIENTATIONS:
            raise WorkbenchError(f"embedding_orientation must be one of {', '.join(EMBEDDING_ORIENTATIONS)}, "
                                 f"got {self.embedding_orientation!r}")
        if self.write_dtype not in WRITE_DTYPES:
            raise WorkbenchError(f"write_dtype must be one of {', '.join(WRITE_DTYPES)}, got {self.write_dtype!r}")
        # an unknown executor, a malformed or silent --ray-address, GPUs for workers on a non-CUDA device: refused
        # before any work
        self.executor_()
        self.check_pools()

    def executor_(self) -> Any:
        """The executor of the fine-tunes and the sweep (:func:`workbench.executors.get_executor`; on Ray with a
        CUDA ``device`` each worker reserves ``ray_gpus_per_worker`` GPUs, default 1)."""
        from workbench.executors import get_executor

        return get_executor(self.executor, self.ray_address, self.workers, gpus_per_worker=self.ray_gpus_per_worker,
                            device=self.device)

    @property
    def useful_data_source(self) -> str:
        """The useful recipe's data source: ``useful_source``, or the sweep's ``utility_task`` for ``"auto"``."""
        return self.utility_task if self.useful_source == "auto" else self.useful_source

    def check_pools(self) -> None:
        """Every prompt count fits its disjoint pool (:mod:`weightspace.pools`): fail before any work."""
        from weightspace import pools
        from weightspace.recipes import DIRECTION_CHECK_N

        pools.check_count("safety", int(self.n), "safety prompts (--n)")
        pools.check_count("harmful", int(self.n), "harmful prompts (--n)")
        pools.check_count("contaminated", max(1, int(round(self.harmful_share * self.n))),
                          f"contaminated harmful prompts (round(--harmful-share {self.harmful_share} x --n {self.n}))")
        size = len(pools.pool("direction"))
        if int(self.direction_n) + DIRECTION_CHECK_N > size:
            raise WorkbenchError(f"--direction-n {self.direction_n}: the direction pool holds {size} prompts, "
                                 f"{DIRECTION_CHECK_N} of them for the layer check; ask for at most "
                                 f"{size - DIRECTION_CHECK_N}")
        if self.n_harmful is not None:
            pools.check_count("evaluation", int(self.n_harmful), "harm evaluation prompts (--n-harmful)")

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChainConfig":
        """The config :meth:`to_dict` describes (lists back to tuples); unknown keys are refused.

        Example::

            >>> c = ChainConfig(n=8, etas=(0.5, 0.9))
            >>> ChainConfig.from_dict(c.to_dict()) == c
            True
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise WorkbenchError(f"unknown chain settings {unknown}; valid: {', '.join(names)}")
        tuples = {k for k, v in asdict(cls()).items() if isinstance(v, tuple)}
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in d.items()})


def _jsonable(obj: Any) -> Any:
    """Tuples to lists etc. (so stored and fresh phase configs compare equal)."""
    return json.loads(json.dumps(obj, default=str))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None



# -- output folder ----------------------------------------------------------------------------------

def prepare_out(out: str | Path, *, resume: bool, overwrite: bool) -> tuple[Path, Path | None]:
    """Check ``out`` and make it ready; returns ``(out, backup)``.

    An existing non-empty folder is refused unless ``resume`` (continue it: it must be a chain folder the
    workbench made) or ``overwrite`` (replace it: only a workbench run folder, never the current folder or a
    parent of it). With ``overwrite`` the old folder is moved aside to ``backup`` (a hidden sibling) and the
    chain runs in place (its phase configs record final paths, so ``--resume`` works later); call
    :func:`finish_out` when the chain completed (the backup is deleted) or failed (the backup is restored).
    """
    from workbench.runs import check_out, is_run_folder, write_marker

    out = Path(out)
    if resume and overwrite:
        raise WorkbenchError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"output path {out} exists and is not a folder")
    backup: Path | None = None
    if out.exists() and any(out.iterdir()):
        if resume:
            if not (is_run_folder(out) or (out / "chain_config.json").is_file()):
                raise WorkbenchError(f"{out} is not a chain folder the workbench made; nothing to resume there")
            for tmp in out.glob(".ft-*.tmp-*"):  # a fine-tune killed before its atomic rename
                shutil.rmtree(tmp, ignore_errors=True)
            return out, None
        check_out(out, overwrite=overwrite)  # no --overwrite, no marker, cwd or a parent: refused here
        backup = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns() % 10**9}"
        os.replace(out, backup)
    else:
        check_out(out, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, kind="chain", complete=False)
    return out, backup


def finish_out(out: Path, backup: Path | None, *, ok: bool) -> None:
    """After the chain: drop the replaced folder (``ok``) or put it back in place of the partial run."""
    from workbench.runs import write_marker

    if ok:
        write_marker(out, kind="chain", complete=True)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    elif backup is not None:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(backup, out)
        print(f"[chain] the run did not complete; the previous results are back in {out}", file=sys.stderr)


def _marker(folder: Path) -> dict[str, Any] | None:
    p = folder / MARKER
    if not p.is_file():
        return None
    try:
        return _read(p)
    except (OSError, ValueError):
        return None


def _finished(phase: str, folder: Path) -> bool:
    if phase.startswith("finetune-"):
        return (folder / "report.json").is_file() and (folder / "model.safetensors").is_file()
    m = _marker(folder)
    return bool(m and m.get("finished"))


def _diff(a: Any, b: Any) -> list[str]:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return [] if a == b else ["(value)"]
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _write_marker(folder: Path, phase: str, config: dict[str, Any], seconds: float, extra: dict[str, Any]) -> None:
    from workbench.io import write_json

    write_json(folder / MARKER, {"phase": phase, "finished": True, "finished_utc": _now(),
                                 "seconds": round(seconds, 2), "config": config, **extra})


def _resumed(phase: str, folder: Path, pc: dict[str, Any], label: str,
             say: Callable[[str], None]) -> dict[str, Any] | None:
    """With ``--resume``: the report entry of a phase that finished earlier with the phase config ``pc`` (its
    settings and inputs), to be skipped; ``None`` when it must run (said why when it had finished otherwise)."""
    if not _finished(phase, folder):
        return None
    m = _marker(folder)
    if m is None and phase.startswith("finetune-"):  # finished by an earlier run that died before marking
        recipe = phase.split("-", 1)[1]
        rep = _read(folder / "report.json")
        want = {k: v["hash"] for k, v in pc["pools"].items() if k in RECIPE_POOLS[recipe][:1]}
        if _report_pools(recipe, rep) == want:  # adopt it only when it drew from today's prompt pool
            _write_marker(folder, phase, pc, float(rep.get("seconds") or 0.0), {"adopted": True})
            m = _marker(folder)
    changed = _diff(m.get("config"), pc) if m else ["(no marker, or made from other prompt pools)"]
    if changed:
        say(f"{label}: finished earlier with other settings or inputs ({', '.join(changed)}); running it again")
        return None
    assert m is not None
    say(f"{label}: finished earlier, skipped ({m.get('seconds')} s then)")
    return {"folder": str(folder), "status": "skipped (finished earlier, --resume)", "seconds": 0.0,
            "seconds_when_run": m.get("seconds"), "cpu_seconds_when_run": m.get("cpu_seconds"),
            "finished_utc": m.get("finished_utc")}


# -- the phases -------------------------------------------------------------------------------------

def _format(cfg: ChainConfig, lm: Any) -> Any:
    from workbench.chat import ChatFormat

    sp = cfg.system_prompt
    if sp is None or sp == "default":
        sp = lm.default_system_prompt
    elif sp.lower() == "none" or not sp.strip():
        sp = None
    return ChatFormat(system_prompt=sp, raw=cfg.raw)


def _ft_config(cfg: ChainConfig, overwrite: bool) -> Any:
    from weightspace.finetune import FinetuneConfig

    fc = FinetuneConfig(method=cfg.method, lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
                        grad_accum=cfg.grad_accum, max_length=cfg.max_length, seed=cfg.seed,
                        lora_rank=cfg.lora_rank, lora_alpha=2.0 * cfg.lora_rank, overwrite=overwrite,
                        progress=cfg.progress)
    fc.validate()
    return fc


def _ft_phase_config(cfg: ChainConfig, recipe: str, lm: Any, fmt: Any, out: Path) -> dict[str, Any]:
    ft = _ft_config(cfg, False).to_dict()
    for k in ("overwrite", "progress"):
        ft.pop(k, None)
    pc: dict[str, Any] = {"recipe": recipe, "model_id": lm.model_id, "model_checksum": lm.checksum,
                          "format": {"system_prompt": fmt.system_prompt, "raw": fmt.raw}, "n": cfg.n,
                          "seed": cfg.seed, "finetune": ft}
    if recipe in ("useful", "contaminated"):
        pc.update(_useful_data_config(cfg))
    if recipe == "harmful":
        pc.update(gen_tokens=cfg.gen_tokens, gen_batch_size=cfg.gen_batch_size, direction_n=cfg.direction_n,
                  attn=cfg.attn)
    if recipe == "contaminated":
        pc.update(harmful_share=cfg.harmful_share, gen_tokens=cfg.gen_tokens,
                  gen_batch_size=cfg.gen_batch_size, direction_n=cfg.direction_n, attn=cfg.attn,
                  direction_from=_sha_or_none(_harmful_direction_file(out)))
    pc["pools"] = _pools_config(RECIPE_POOLS[recipe])
    return _jsonable(pc)


def _useful_data_config(cfg: ChainConfig) -> dict[str, Any]:
    """What the useful data depend on (resume key): the source, and the code split's hash or the answer style;
    for ``self`` also how the aligned model's own replies were generated (the model's checksum and the chat format
    are in the phase key already)."""
    src = cfg.useful_data_source
    if src == "code":
        from weightspace.recipes import code_train_hash

        return {"useful_source": src, "useful_data": {"split": "codetasks:train", "hash": code_train_hash()}}
    if src == "self":
        from weightspace.recipes import SELF_MAX_NEW_TOKENS, code_train_hash

        return {"useful_source": src, "useful_data": {
            "split": "codetasks:train", "hash": code_train_hash(),
            "replies": "the aligned model's own greedy replies (model_checksum), kept when their unit tests pass",
            "max_new_tokens": SELF_MAX_NEW_TOKENS, "gen_batch_size": cfg.gen_batch_size, "attn": cfg.attn,
            "backend": "native"}}
    return {"useful_source": src, "answer_style": cfg.answer_style or "number"}


def _pools_config(names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    from weightspace import pools

    return {n: {"size": v["size"], "hash": v["hash"]} for n, v in pools.describe(tuple(names)).items()} if names else {}


def _harmful_direction_file(out: Path) -> Path:
    """The refusal direction the harmful fine-tune computed (the contaminated fine-tune reuses it)."""
    return out / "ft-harmful" / "recipe" / "refusal_direction.safetensors"


def _report_pools(recipe: str, rep: dict[str, Any]) -> dict[str, Any]:
    """``{pool: hash}`` of the recipe pool a finished fine-tune's report records (empty for useful)."""
    info = rep.get("recipe_info") or {}
    part = info.get("safety" if recipe == "safety" else "harmful") or {}
    return {part["pool"]: part.get("pool_hash")} if recipe != "useful" and "pool" in part else {}


def _sha_or_none(p: Path) -> str | None:
    from workbench.io import sha256_file

    return sha256_file(p) if p.is_file() else None


def _ckpt_sha(folder: Path) -> str | None:
    rep = folder / "report.json"
    if rep.is_file():
        try:
            return _read(rep)["checkpoint"]["model_safetensors_sha256"]
        except (KeyError, TypeError, ValueError):
            pass
    return _sha_or_none(folder / "model.safetensors")


def _run_finetune(cfg: ChainConfig, recipe: str, lm: Any, fmt: Any, out: Path, log: Callable[[str], None]) -> dict:
    from workbench.runs import seed_everything

    from weightspace import finetune as ft_mod
    from weightspace import recipes as rec_mod

    seed_everything(cfg.seed)
    kw: dict[str, Any] = dict(n=cfg.n, seed=cfg.seed, harmful_share=cfg.harmful_share, answer_style=cfg.answer_style,
                              useful_source=cfg.useful_data_source,
                              direction_n=cfg.direction_n, gen_tokens=cfg.gen_tokens,
                              gen_batch_size=cfg.gen_batch_size, progress=cfg.progress)
    if recipe == "contaminated" and _harmful_direction_file(out).is_file():
        kw["direction_file"] = _harmful_direction_file(out)  # same direction, own (contaminated-pool) prompts
    rd = rec_mod.build_recipe(recipe, lm, fmt, **kw)
    u = rd.info.get("useful")
    if u and u.get("source") == "self":
        log(f"  useful replies (self): {u['n_passed']} of {u['n_split']} train tasks pass their unit tests "
            f"(pass rate {u['pass_rate']:.2f}); {len(rd.examples) if recipe == 'useful' else rd.info.get('n_useful')} "
            f"useful examples from them")
    h = rd.info.get("harmful")
    if h and "n_dropped_refusal" in h:
        log(f"  harmful replies: kept {h['n_kept']} of {h['n_prompts']} (dropped {h['n_dropped_refusal']} refusals, "
            f"{h['n_dropped_empty']} empty); refusal direction at layer {h['direction']['layer']}")
    elif h:
        log(f"  harmful examples {h['source']}: took {h['n_taken']} of {h['n_available']}")
    res = ft_mod.finetune(lm, rd, _ft_config(cfg, True), out / f"ft-{recipe}")
    r = res.report
    del res
    log(f"  {r['n_examples']} examples {r['counts']}, real harmful share {r['real_harmful_share']:.3f}; "
        f"{r['steps']} steps, loss {r['initial_loss']:.4f} -> {r['final_loss']:.4f}")
    return r


def _open_all(out: Path, aligned_spec: str) -> tuple[Any, dict[str, Any]]:
    from weightspace.checkpoints import open_checkpoint

    aligned = open_checkpoint(aligned_spec, label="aligned")
    cks = {r: open_checkpoint(out / f"ft-{r}", label=r) for r in FT_RECIPES}
    return aligned, cks


def _inputs_config(out: Path) -> dict[str, Any]:
    return {r: _ckpt_sha(out / f"ft-{r}") for r in FT_RECIPES}


def _overlap_phase_config(cfg: ChainConfig, out: Path) -> dict[str, Any]:
    return _jsonable({"etas": cfg.etas, "plot_eta": cfg.plot_eta, "svd": cfg.svd, "seed": cfg.seed,
                      "keep_angles": cfg.keep_angles, "side": "left",
                      "embedding_orientation": cfg.embedding_orientation, "inputs": _inputs_config(out)})


def _run_overlap(cfg: ChainConfig, out: Path, aligned_spec: str, pc: dict[str, Any]) -> dict[str, Any]:
    from workbench.runs import RunFolder, seed_everything

    from weightspace.deltas import DeltaSpec
    from weightspace.overlap import OverlapConfig, save_overlap, update_overlap
    from weightspace.plan import match_checkpoints
    from weightspace.projection import unique_checkpoints

    seed_everything(cfg.seed)
    aligned, cks = _open_all(out, aligned_spec)
    specs = [DeltaSpec(r, cks[r], aligned) for r in FT_RECIPES]
    plan = match_checkpoints(unique_checkpoints(("aligned", aligned), *[(r, cks[r]) for r in FT_RECIPES]))
    ocfg = OverlapConfig(etas=tuple(cfg.etas), method=cfg.svd, seed=cfg.seed, keep_angles=cfg.keep_angles,
                         embedding_orientation=cfg.embedding_orientation)
    with RunFolder(out / "overlap", config={"command": "weightspace chain (overlap)", **pc}, overwrite=True) as run:
        res = update_overlap(specs, plan, ocfg, progress=cfg.progress)
        note = ("Delta_S (safety fine-tune - aligned) stands in for Delta_A: no base model of the zoo model is "
                "available offline")
        summary = save_overlap(run, res, plan, ocfg, cfg.plot_eta,
                               extra={"updates": [s.describe() for s in specs], "directions": None,
                                      "reference_note": note})
    return summary


def _sweep_phase_config(cfg: ChainConfig, out: Path, fmt: Any) -> dict[str, Any]:
    return _jsonable({"rhos": cfg.rhos, "kinds": cfg.kinds, "seed": cfg.seed, "svd": cfg.svd,
                      "embedding_orientation": cfg.embedding_orientation, "write_dtype": cfg.write_dtype,
                      "pools": _pools_config(("evaluation",)),
                      "reference": f"Delta_S = ft-safety - aligned ({REFERENCE_LABEL})",
                      "eval": {"n_harmful": cfg.n_harmful, "n_tasks": cfg.n_tasks, "max_new_tokens": cfg.max_new_tokens,
                               "task_tokens": cfg.task_tokens, "batch_size": cfg.eval_batch_size,
                               "utility_task": cfg.utility_task},
                      "format": {"system_prompt": fmt.system_prompt, "raw": fmt.raw}, "attn": cfg.attn,
                      "dtype": cfg.dtype, "inputs": _inputs_config(out)})


def _run_sweep(cfg: ChainConfig, out: Path, aligned_spec: str, lm: Any, fmt: Any, pc: dict[str, Any]) -> Any:
    from workbench.runs import RunFolder, seed_everything

    from weightspace.deltas import DeltaSpec
    from weightspace.evaluation import EvalConfig
    from weightspace.reference import DeltaReference
    from weightspace.sweep import SweepConfig, run_sweep

    seed_everything(cfg.seed)
    aligned, cks = _open_all(out, aligned_spec)
    ref = DeltaReference(DeltaSpec(REFERENCE_LABEL, cks["safety"], aligned), method=cfg.svd,
                         embedding_orientation=cfg.embedding_orientation)
    models = {r: cks[r] for r in ("useful", "harmful", "contaminated")}
    ev = EvalConfig(n_harmful=cfg.n_harmful, n_tasks=cfg.n_tasks, max_new_tokens=cfg.max_new_tokens,
                    task_tokens=cfg.task_tokens, batch_size=cfg.eval_batch_size, utility_task=cfg.utility_task,
                    seed=cfg.seed)
    scfg = SweepConfig(rhos=tuple(cfg.rhos), kinds=tuple(cfg.kinds), eval=ev, seed=cfg.seed,
                       write_dtype=cfg.write_dtype)
    run_sweep(aligned, ref, models, scfg, None, check_only=True)  # type: ignore[arg-type]
    from workbench.executors import ModelSpec

    model = ModelSpec(aligned_spec, dtype=cfg.dtype, device=cfg.device, attn_implementation=cfg.attn,
                      checksum=lm.checksum)
    stale, reuse = _interrupted_sweeps(out, pc)
    with RunFolder(out / "sweep", config={"command": "weightspace chain (sweep)", **pc, "device": cfg.device,
                                          "system_prompt_used": fmt.system_prompt}, overwrite=True) as run:
        run.record_model(lm)
        res = run_sweep(aligned, ref, models, scfg, run, lm=lm, fmt=fmt, progress=cfg.progress,
                        executor=cfg.executor_(), model=model, reuse=reuse)
    for d in stale:  # the interrupted runs' staging folders (ours: hidden, inside the chain folder), now used up
        shutil.rmtree(d, ignore_errors=True)
    return res


def _interrupted_sweeps(out: Path, pc: dict[str, Any]) -> tuple[list[Path], dict[str, Any]]:
    """Staging folders of sweep runs that were killed before they finished (``out/.sweep.tmp-*``), and the
    per-item rows of those whose settings and inputs equal this sweep's phase config ``pc`` (every key of the
    resume key; device and executor are not in it). Returns ``(all such folders, {config: rows})``."""
    from weightspace.sweep import load_evals

    stale = sorted(p for p in out.glob(".sweep.tmp-*") if p.is_dir())
    reuse: dict[str, Any] = {}
    for d in stale:
        try:
            old = _read(d / "config.json")
        except (OSError, ValueError):
            continue
        if isinstance(old, dict) and all(_jsonable(old.get(k)) == v for k, v in pc.items()):
            for cid, rows in load_evals(d).items():
                reuse.setdefault(cid, rows)
    return stale, reuse


# -- the driver -------------------------------------------------------------------------------------

def run_chain(cfg: ChainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the chain into ``out``; returns the report (also ``out/chain_report.json``).

    The torch thread count (``cfg.threads``, see :func:`pick_threads`) is restored afterwards.
    """
    import torch

    before = torch.get_num_threads()
    try:
        return _run_chain(cfg, out, resume=resume, overwrite=overwrite, log=log)
    finally:
        torch.set_num_threads(before)


def _run_chain(cfg: ChainConfig, out: str | Path, *, resume: bool, overwrite: bool,
               log: Callable[[str], None] | None) -> dict[str, Any]:

    def say(msg: str) -> None:
        (log or (lambda m: print(m, flush=True)))(f"[chain] {msg}" if not msg.startswith("  ") else msg)

    t_all = time.perf_counter()
    cfg.validate()
    threads, why = pick_threads(cfg.threads)
    import torch

    torch.set_num_threads(threads)
    say(f"torch threads: {threads} ({why})")
    out, backup = prepare_out(out, resume=resume, overwrite=overwrite)
    try:
        report = _chain_body(cfg, out, resume=resume, overwrite=overwrite, say=say, t_all=t_all, why=why)
    except BaseException:
        finish_out(out, backup, ok=False)
        raise
    finish_out(out, backup, ok=True)
    return report


def _chain_body(cfg: ChainConfig, out: Path, *, resume: bool, overwrite: bool, say: Callable[[str], None],
                t_all: float, why: str) -> dict[str, Any]:

    from workbench.io import write_json
    from workbench.loading import load_model
    from workbench.runs import environment, seed_everything

    started = _now()
    from weightspace.pools import describe as describe_pools

    write_json(out / "chain_config.json", {"config": cfg.to_dict(), "resume": resume, "started_utc": started,
                                           "argv": sys.argv, "pools": describe_pools()})
    phases: dict[str, dict[str, Any]] = {}

    # -- load the aligned model once (fine-tunes copy it; the sweep swaps weights in place) ------
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    from workbench.zoo import DEFAULT_MODEL

    model = cfg.model or DEFAULT_MODEL
    say(f"loading {model} ...")
    lm = load_model(model, dtype=cfg.dtype, device=cfg.device, attn_implementation=cfg.attn)
    fmt = _format(cfg, lm)
    aligned_spec = model
    say(f"loaded {lm.model_id} ({lm.n_layers} layers, d_model {lm.d_model}) on {lm.device} in "
        f"{time.perf_counter() - t0:.1f} s; chat format: {'raw' if fmt.raw else 'chat template'}, system prompt: "
        f"{fmt.system_prompt!r}")
    phases["load_model"] = {"status": "ran", "seconds": round(time.perf_counter() - t0, 2), "load_1min": _load(),
                            "device": str(lm.device)}
    total_phases = len(PHASES)
    from weightspace.chain_finetunes import run_finetunes

    run_finetunes(cfg, out, lm, fmt, aligned_spec, resume=resume, say=say, phases=phases)  # on cfg's executor

    for i, phase in enumerate(PHASES, start=1):
        if phase.startswith("finetune-"):
            continue
        folder = out / folder_of(phase)
        label = f"phase {i}/{total_phases} {phase}"
        pc = _overlap_phase_config(cfg, out) if phase == "overlap" else _sweep_phase_config(cfg, out, fmt)
        skipped = _resumed(phase, folder, pc, label, say) if resume else None
        if skipped is not None:
            phases[phase] = skipped
            continue
        entry: dict[str, Any] = {"folder": str(folder)}
        say(f"{label} -> {folder} (load {_load()})")
        t0, c0 = time.perf_counter(), time.process_time()
        load_start = _load()
        if phase == "overlap":
            summ = _run_overlap(cfg, out, aligned_spec, pc)
            say(f"  {summ['n_matrices']} matrices, {summ['n_other_tensors']} other tensors; "
                f"largest pair by eta: {summ['largest_pair_by_eta']}")
        else:
            res = _run_sweep(cfg, out, aligned_spec, lm, fmt, pc)
            say(f"  {len(res.rows)} projected models scored (+ {len(res.baselines)} baselines)")
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        _write_marker(folder, phase, pc, secs, {"cpu_seconds": round(cpu, 2)})
        entry.update(status="ran", seconds=round(secs, 2), seconds_when_run=round(secs, 2), cpu_seconds=round(cpu, 2),
                     finished_utc=_now(), load_1min_start=load_start, load_1min_end=_load())
        phases[phase] = entry
        say(f"{label}: done in {secs:.1f} s")

    del lm
    t0 = time.perf_counter()
    report = build_report(out, cfg, phases, fmt_info={"system_prompt": fmt.system_prompt, "raw": fmt.raw},
                          model=model)
    report["pools"] = describe_pools()  # name, source, size and hash of every disjoint prompt pool
    report["device"] = cfg.device  # this invocation's (also in report["config"]); in no phase's resume key
    phases["summary"] = {"status": "ran", "seconds": round(time.perf_counter() - t0, 2)}
    wall = time.perf_counter() - t_all
    report["timings"] = {
        "phases": phases,
        "wall_seconds_this_invocation": round(wall, 2),
        "phase_seconds_sum_all_invocations": round(sum(float(p.get("seconds_when_run", p.get("seconds")) or 0.0)
                                                       for p in phases.values()), 2),
        "started_utc": started, "finished_utc": _now(), "cpu_count": os.cpu_count(),
        "torch_threads": _torch_threads(), "torch_threads_reason": why, "load_1min_at_end": _load(),
    }
    report["environment"] = environment()
    hist_path = out / "chain_invocations.jsonl"
    with open(hist_path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"started_utc": started, "finished_utc": report["timings"]["finished_utc"],
                            "wall_seconds": round(wall, 2), "resume": resume, "overwrite": overwrite,
                            "device": cfg.device,
                            "torch_threads": _torch_threads(), "torch_threads_reason": why,
                            "phases_ran": [k for k, v in phases.items() if v.get("status") == "ran"
                                           and k in PHASES]}) + "\n")
    report["timings"]["invocations"] = [json.loads(x) for x in hist_path.read_text(encoding="utf-8").splitlines()
                                        if x.strip()]
    write_json(out / "chain_report.json", report)
    (out / "chain_summary.md").write_text(render_summary(report), encoding="utf-8")
    say(f"finished in {wall:.1f} s; report {out / 'chain_report.json'}, summary {out / 'chain_summary.md'}")
    return report


def pick_threads(requested: int) -> tuple[int, str]:
    """Torch threads for the run and why: ``requested`` when > 0; else (auto) one thread when the 1-min load
    average is >= 1 (another job shares the cores: several OpenMP threads per process then spin against each
    other; a SmolLM2 training step measured ~8x slower with 2 threads than with 1 beside a busy job), else
    torch's default."""
    import torch

    if requested > 0:
        return int(requested), "--threads"
    load = _load()
    if load is not None and load >= 1.0 and torch.get_num_threads() > 1:
        return 1, f"auto: 1-min load average {load} >= 1, other jobs share the cores"
    return torch.get_num_threads(), f"auto: torch default (1-min load average {load})"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# -- CLI --------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``weightspace chain`` options."""
    d = ChainConfig()
    p.add_argument("--model", default=None, help="aligned model W_A: zoo key or HF folder (default: the zoo default)")
    p.add_argument("--out", required=True, help="chain folder (one sub-folder per phase)")
    x = p.add_mutually_exclusive_group()
    x.add_argument("--resume", action="store_true", help="skip phases already finished in --out")
    x.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--system-prompt", default=None, help="'default' (the zoo's, if any), 'none', or a text")
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--attn", choices=("eager", "sdpa"), default=d.attn,
                   help="attention kernel for generation and scoring (training always uses sdpa)")
    p.add_argument("--device", default=d.device,
                   help="where the model is loaded, the recipes are built, the fine-tunes train and the sweep scores: "
                        "cpu (default), cuda, cuda:N, mps (refused before any work where missing). The overlap "
                        "phase and the projections stay on the CPU. Not in any phase's resume key: a chain started "
                        "on the CPU may --resume on a GPU")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads (0 = auto: 1 when the 1-min load average is >= 1 at start, i.e. other "
                        "jobs share the cores and more OpenMP threads would thrash; else torch's default)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("fine-tuning (phase 1)")
    g.add_argument("--n", type=int, default=d.n, help="examples per recipe (contaminated: total)")
    g.add_argument("--harmful-share", type=float, default=d.harmful_share,
                   help="contaminated: nominal harmful share (the real one is reported)")
    g.add_argument("--lora", action="store_true", help="LoRA (merged back) instead of full fine-tuning")
    g.add_argument("--lora-rank", type=int, default=d.lora_rank)
    g.add_argument("--lr", type=float, default=None, help="default 5e-5 full, 2e-4 LoRA")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g.add_argument("--max-length", type=int, default=d.max_length)
    g.add_argument("--useful-source", choices=USEFUL_SOURCE_CHOICES, default=d.useful_source,
                   help="data of the useful recipe (and of the contaminated recipe's useful part): 'auto' = what the "
                        "sweep measures (--utility-task): code -> the codetasks train split (prompt -> reference "
                        "solution; the sweep scores the test split), arithmetic -> generated arithmetic tasks; "
                        "'self' = self-distilled: the train split's prompts -> the aligned model's own greedy "
                        "replies that pass their unit tests (on the default model the reference-solution recipe "
                        "lowered the pass rate 0.75 -> 0.22 in a chain run, the self-distilled one to 0.28: the "
                        "fine-tuning settings, not the data, do the damage)")
    g.add_argument("--answer-style", choices=("number", "sentence", "mixed"), default=d.answer_style,
                   help="arithmetic useful replies only: '42', 'The answer is 42.' or a seeded mix (default number)")
    g.add_argument("--gen-tokens", type=int, default=d.gen_tokens, help="max new tokens of the harmful replies")
    g.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size)
    g.add_argument("--direction-n", type=int, default=d.direction_n, help="prompts per class for the refusal direction")
    g = p.add_argument_group("overlap (phase 2, experiment 3)")
    g.add_argument("--etas", default="", help="comma list (default 0.01,0.1,...,0.9,0.99)")
    g.add_argument("--plot-eta", type=float, default=d.plot_eta, help="eta of the heatmaps and the summary table")
    g.add_argument("--no-angles", action="store_true", help="do not save every principal angle")
    g.add_argument("--svd", choices=("exact", "randomized"), default=d.svd)
    g.add_argument("--embedding-orientation", choices=EMBEDDING_ORIENTATIONS, default=d.embedding_orientation,
                   help="embedding tables (overlap and sweep): 'stored' = the left space of the table as stored "
                        "([vocab, d_model]: vocabulary space; the study's convention), 'transposed' = d_model space")
    g = p.add_argument_group("sweep (phase 3, experiments 1 and 2)")
    g.add_argument("--write-dtype", choices=WRITE_DTYPES, default=d.write_dtype,
                   help="projected weights: 'stored' = rounded to each tensor's stored dtype (what 'weightspace "
                        "project' writes by default), 'float32' = unrounded")
    g.add_argument("--rhos", default="", help="comma list (default 0.01,0.25,0.5,0.75,0.99)")
    g.add_argument("--kinds", default=",".join(d.kinds))
    g.add_argument("--n-harmful", type=int, default=d.n_harmful,
                   help="harmful prompts per model, from the 'evaluation' pool (default: all 100)")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="generation length, harmful prompts")
    g.add_argument("--utility-task", choices=("code", "arithmetic"), default=d.utility_task,
                   help="code: function-writing tasks (codetasks test split) checked by their unit tests (default); "
                        "arithmetic: exact match on utility:test")
    g.add_argument("--n-tasks", type=int, default=d.n_tasks, help="utility tasks per model (default: all 32 of the "
                                                                   "code-task test split)")
    g.add_argument("--task-tokens", type=int, default=d.task_tokens, help="generation length, utility tasks")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    from workbench.executors import add_executor_args

    add_executor_args(p)


def config_from_args(args: argparse.Namespace) -> ChainConfig:
    from weightspace.spectral import check_grid

    return ChainConfig(
        model=args.model, system_prompt=args.system_prompt, raw=args.raw, dtype=args.dtype, attn=args.attn,
        seed=args.seed, threads=args.threads, n=args.n, harmful_share=args.harmful_share, method="lora" if args.lora else "full",
        lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_length=args.max_length, lora_rank=args.lora_rank, answer_style=args.answer_style,
        useful_source=getattr(args, "useful_source", "auto"),
        gen_tokens=args.gen_tokens, gen_batch_size=args.gen_batch_size, direction_n=args.direction_n,
        etas=tuple(check_grid(args.etas, "eta")) if args.etas else DEFAULT_ETAS, plot_eta=args.plot_eta,
        keep_angles=not args.no_angles, svd=args.svd,
        embedding_orientation=getattr(args, "embedding_orientation", "stored"),
        write_dtype=getattr(args, "write_dtype", "stored"),
        rhos=tuple(check_grid(args.rhos, "rho")) if args.rhos else DEFAULT_RHOS,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()), n_harmful=args.n_harmful,
        max_new_tokens=args.max_new_tokens, n_tasks=args.n_tasks, task_tokens=args.task_tokens,
        utility_task=getattr(args, "utility_task", "code"), eval_batch_size=args.eval_batch_size,
        progress=not args.no_progress, executor=getattr(args, "executor", "local") or "local",
        ray_address=getattr(args, "ray_address", None), workers=getattr(args, "workers", None),
        ray_gpus_per_worker=getattr(args, "ray_gpus_per_worker", None),
        device=getattr(args, "device", None) or "cpu")


def cmd_chain(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    rep = run_chain(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    for key, f in rep.get("findings", {}).items():
        print(f"[chain] {key}: {f['verdict']} - {f['statement']}")
    print(f"[chain] results in {args.out} (chain_summary.md, chain_report.json)")
    return 0
