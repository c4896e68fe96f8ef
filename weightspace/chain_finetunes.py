"""The chain's four fine-tunes as executor tasks (:mod:`workbench.executors`), in two waves.

A chain is four independent fine-tunes of the aligned model but for one input: the ``contaminated`` recipe
generates its harmful replies with the refusal direction the ``harmful`` fine-tune computed and saved
(``ft-harmful/recipe/refusal_direction.safetensors``). So the fine-tunes run in two waves (:data:`FT_WAVES`):
``safety``, ``useful`` and ``harmful`` at once, then ``contaminated``, whose resume key holds that file's hash
and is computed only when the first wave is done, as it always was. With ``--executor local`` the waves run
safety, useful, harmful, contaminated one after the other in this process on the model the chain loaded: the
sequence and the files of a chain without executors. On Ray the first wave runs on up to three workers at once.

Why waves and not the direction computed on the driver first: the direction is part of the harmful recipe (its
layer is picked by an ablation check on the same model, the file and its layer check land in the harmful run's
``recipe/``); moving it would change the harmful run folder and make the driver do model work. A second wave
costs at most the wait for the slower of safety and useful, which the harmful fine-tune (it generates its
replies) usually outlasts anyway.

What crosses to a worker: a :class:`FinetuneTask` (the recipe, the chain folder as given, the
:class:`~weightspace.chain.ChainConfig` as a dict, the chat format); back comes a :class:`FinetuneOutcome`
(timings, the checkpoint's hash, the log lines). A worker loads the aligned model itself from a
:class:`~workbench.executors.ModelSpec` (checksum checked against the driver's) and keeps it for all its tasks:
:func:`weightspace.finetune.finetune` trains a deep copy and leaves the loaded model untouched, so each task
starts from the aligned weights; :class:`FinetuneWorker` checks that no task changed them in place. The task
writes its fine-tune folder itself (staged in a hidden sibling ``.ft-NAME.tmp-*`` in the chain folder and renamed
into place: same file system, so atomic); the driver alone writes the phase markers and the chain report. On a
cluster the chain folder must therefore be on storage every node mounts at the same path; the driver checks
that it sees each folder a worker wrote.

Example::

    >>> from weightspace.chain import ChainConfig
    >>> FT_WAVES
    (('safety', 'useful', 'harmful'), ('contaminated',))
    >>> t = FinetuneTask("useful", "runs/chain", ChainConfig(n=8).to_dict(), {"system_prompt": None, "raw": False},
    ...                  "phase 2/6 finetune-useful")
    >>> str(t.folder), t.chain_config().n
    ('runs/chain/ft-useful', 8)
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from itertools import chain as _iter_chain
from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError

__all__ = ["FT_WAVES", "FinetuneTask", "FinetuneOutcome", "FinetuneWorker", "run_finetune_task", "run_finetunes"]

FT_WAVES = (("safety", "useful", "harmful"), ("contaminated",))


@dataclass(frozen=True)
class FinetuneTask:
    """One fine-tune of the chain: small and picklable (an executor task)."""

    recipe: str
    out: str  # the chain folder as the driver was given it (a worker changes to the driver's working folder)
    config: dict[str, Any]  # ChainConfig.to_dict()
    fmt: dict[str, Any]  # workbench.chat.ChatFormat fields: system_prompt, raw
    label: str  # "phase 3/6 finetune-harmful", for the log lines
    direction_sha: str | None = None  # contaminated: sha256 of the harmful run's direction file as the driver sees it

    @property
    def folder(self) -> Path:
        return Path(self.out) / f"ft-{self.recipe}"

    def chain_config(self) -> Any:
        from weightspace.chain import ChainConfig

        return ChainConfig.from_dict(self.config)


@dataclass
class FinetuneOutcome:
    """What a finished fine-tune sends back to the driver (its folder is already in place)."""

    recipe: str
    checkpoint_sha256: str
    seconds_detail: dict[str, Any]
    seconds: float  # wall time of the task
    cpu_seconds: float  # CPU time of the worker process during the task
    load_1min_start: float | None
    load_1min_end: float | None
    worker: dict[str, Any]  # pid, host
    log: list[str] = field(default_factory=list)  # lines not printed yet (a remote worker's)


def _versions(model: Any) -> tuple[int, ...]:
    """The in-place modification counters of every parameter and buffer of ``model`` (torch bumps a tensor's
    ``_version`` on every in-place write: the cheap way to see that a task left the loaded weights alone)."""
    return tuple(t._version for t in _iter_chain(model.parameters(), model.buffers()))


class FinetuneWorker:
    """The aligned model of one worker (loaded once) and where its tasks log.

    ``log``: a callable that prints each line at once (the local executor: the chain's own ``say``), or ``None``:
    the lines go back to the driver in :attr:`FinetuneOutcome.log`.
    """

    def __init__(self, lm: Any, log: Callable[[str], None] | None = None) -> None:
        self.lm, self.log = lm, log
        self._versions = _versions(lm.model)

    @classmethod
    def from_spec(cls, spec: Any) -> "FinetuneWorker":
        """On a worker: load the model from ``spec`` (a :class:`workbench.executors.ModelSpec`)."""
        return cls(spec.load())

    def run(self, task: FinetuneTask) -> FinetuneOutcome:
        """Build the task's recipe and fine-tune a copy of the aligned model into ``task.folder``."""
        from workbench.chat import ChatFormat

        from weightspace.chain import _harmful_direction_file, _load, _run_finetune, _sha_or_none

        lines: list[str] = []
        say = self.log or lines.append
        cfg, out = task.chain_config(), Path(task.out)
        if task.direction_sha is not None and _sha_or_none(_harmful_direction_file(out)) != task.direction_sha:
            raise WorkbenchError(f"the {task.recipe} fine-tune on {socket.gethostname()} does not see the refusal "
                                 f"direction {_harmful_direction_file(out)} the driver sees: the chain folder must be on "
                                 f"storage every Ray node mounts at the same path (README, 'Scaling out')")
        load_start = _load()
        say(f"{task.label} -> {task.folder} (load {load_start})")
        t0, c0 = time.perf_counter(), time.process_time()
        rep = _run_finetune(cfg, task.recipe, self.lm, ChatFormat(**task.fmt), out, say)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        if _versions(self.lm.model) != self._versions:
            raise WorkbenchError(f"the {task.recipe} fine-tune changed the loaded aligned model in place; the next "
                                 f"fine-tune on this worker would not start from the aligned weights")
        return FinetuneOutcome(task.recipe, rep["checkpoint"]["model_safetensors_sha256"], rep.get("seconds_detail"),
                               secs, cpu, load_start, _load(), {"pid": os.getpid(), "host": socket.gethostname()},
                               lines)


def run_finetune_task(worker: FinetuneWorker, task: FinetuneTask) -> FinetuneOutcome:
    """The executor's task function (module level, so a Ray worker finds it by name)."""
    return worker.run(task)


def run_finetunes(cfg: Any, out: Path, lm: Any, fmt: Any, source: str, *, resume: bool,
                  say: Callable[[str], None], phases: dict[str, dict[str, Any]]) -> None:
    """Run (or, with ``resume``, skip) the chain's fine-tune phases in :data:`FT_WAVES` on ``cfg``'s executor.

    ``lm``: the aligned model the driver loaded from ``source`` (the local executor fine-tunes copies of it; Ray
    workers load their own). Fills ``phases`` (the chain report's timings) in phase order and writes each phase's
    marker as its result arrives, so a chain killed part-way resumes with the fine-tunes that finished.
    """
    from workbench.executors import ModelSpec

    from weightspace.chain import (PHASES, _ckpt_sha, _finished, _ft_phase_config, _harmful_direction_file, _now,
                                   _resumed, _sha_or_none, _write_marker, folder_of)

    executor = cfg.executor_()
    if executor.in_process:
        init: Callable[[], Any] = lambda: FinetuneWorker(lm, log=say)  # noqa: E731
    else:
        init = partial(FinetuneWorker.from_spec, ModelSpec(source, dtype=cfg.dtype, device=cfg.device,
                                                           attn_implementation=cfg.attn, checksum=lm.checksum))
    fmt_d = {"system_prompt": fmt.system_prompt, "raw": fmt.raw}
    total = len(PHASES)

    def record(todo: list[tuple[FinetuneTask, dict[str, Any]]], i: int, res: FinetuneOutcome) -> None:
        """On the driver, as each fine-tune finishes: check its folder is visible here, mark the phase done."""
        task, pc = todo[i]
        phase = f"finetune-{task.recipe}"
        for line in res.log:
            say(line)
        if not _finished(phase, task.folder) or _ckpt_sha(task.folder) != res.checkpoint_sha256:
            raise WorkbenchError(f"the {task.recipe} fine-tune finished on {res.worker['host']} but {task.folder} does "
                                 f"not hold its checkpoint here: on a Ray cluster the chain folder must be on storage "
                                 f"every node mounts at the same path (README, 'Scaling out')")
        remote = {} if executor.in_process else {"worker": res.worker}
        _write_marker(task.folder, phase, pc, res.seconds,
                      {"seconds_detail": res.seconds_detail, "cpu_seconds": round(res.cpu_seconds, 2), **remote})
        phases[phase].update(status="ran", seconds=round(res.seconds, 2), seconds_when_run=round(res.seconds, 2),
                             cpu_seconds=round(res.cpu_seconds, 2), finished_utc=_now(),
                             load_1min_start=res.load_1min_start, load_1min_end=res.load_1min_end, **remote)
        say(f"{task.label}: done in {res.seconds:.1f} s")

    with contextlib.ExitStack() as stack:
        pool = None  # opened for the first fine-tune that runs (a resumed chain may need none: no Ray started)
        for wave in FT_WAVES:
            todo: list[tuple[FinetuneTask, dict[str, Any]]] = []
            for recipe in wave:
                phase = f"finetune-{recipe}"
                label = f"phase {PHASES.index(phase) + 1}/{total} {phase}"
                folder = out / folder_of(phase)
                pc = _ft_phase_config(cfg, recipe, lm, fmt, out)  # contaminated: after the harmful run's wave
                entry = _resumed(phase, folder, pc, label, say) if resume else None
                phases[phase] = entry or {"folder": str(folder)}  # in phase order, whatever order they finish in
                if entry is None:
                    sha = _sha_or_none(_harmful_direction_file(out)) if recipe == "contaminated" else None
                    todo.append((FinetuneTask(recipe, str(out), cfg.to_dict(), fmt_d, label, sha), pc))
            if not todo:
                continue
            if pool is None:
                pool = stack.enter_context(executor.pool(init))
            if not executor.in_process:
                say(f"fine-tunes {', '.join(t.recipe for t, _ in todo)} on {executor.name} "
                    f"({min(pool.size, len(todo))} workers at once)")
            pool.map(run_finetune_task, [t for t, _ in todo], desc="fine-tunes", on_result=partial(record, todo))
