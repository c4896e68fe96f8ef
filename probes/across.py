"""``workbench probe`` and ``workbench overlap`` across several models: one executor task per model.

Give ``--model`` more than once (``workbench probe --model ckpt/step-1000 --model ckpt/step-2000 ...``) and each
model is one task of the command's executor (:mod:`workbench.executors`: ``--executor local`` runs them one after
the other in this process, ``--executor ray`` on Ray workers). A task is a :class:`ModelTask`: how to load the
model (a :class:`workbench.executors.ModelSpec`: a path or zoo key, dtype, device), the chat-format options and
the work (:class:`ProbeWork`: the four prompt splits' texts and the sweep settings; :class:`OverlapWork`: the
prompt sets' texts, the protocols and the η grid). The worker loads the model, checks the layers and the
context, captures, fits or measures, and returns the model's outcome: :class:`probes.cli.ProbeOutcome`
(per-layer metric rows, the ``2 x layers x d_model`` directions and a ``layers x layers`` cosine matrix) or
:class:`probes.cli.OverlapOutcome` (per-layer rows and the subsample draws, ``protocols x pairs x etas x
layers x n_boot`` floats). The activations never leave the worker: they are the large part, and the driver
needs only what those files hold. The driver collects the outcomes in model order and alone writes the run
folder (:func:`write_models`), only once every model has finished (a failure leaves nothing behind). Before any
task it checks every option and that every model exists (:func:`workbench.loading.check_model_source`); the
checks that need the model (layers, context length) run on the worker, before its capture. The run folder:

* one model: exactly the files of a single-model run (``probe_layers.csv``, ... / ``overlap.csv``, ...);
* several: one subfolder per model (named by :func:`model_labels`) holding those files and its
  ``model.json``, plus ``probe_layers_by_model.csv`` / ``overlap_layers_by_model.csv`` (a ``model`` column
  then the per-layer columns), one comparison plot (``probe_auroc_by_model.png`` / ``overlap_by_model.png``)
  and ``models.json`` (per model: its folder name, source, model id, checksum and headline numbers; where the
  tasks ran).

Example::

    >>> model_labels(["smollm2-135m-instruct", "runs/ft1/final", "runs/ft2/final"])
    ['smollm2-135m-instruct', 'ft1_final', 'ft2_final']
"""

from __future__ import annotations

import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from probes.cli import (OverlapOutcome, ProbeOutcome, overlap_layer_rows, overlap_outcome, probe_outcome,
                        probe_summary, write_overlap_run, write_probe_run)
from probes.overlap import PROTOCOLS
from workbench.argtypes import check_context
from workbench.errors import WorkbenchError
from workbench.executors import Executor, ModelSpec
from workbench.prompts import PromptSet
from workbench.runs import RunFolder, seed_everything
from workbench.sites import parse_layers

__all__ = ["ModelTask", "ProbeWork", "OverlapWork", "model_sources", "model_labels", "run_model_task", "run_tasks",
           "run_across", "write_models", "probe_writer", "overlap_writer"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# -- which models, under which names ----------------------------------------------------------------------

def model_sources(models: Sequence[str] | str | None, default: str) -> list[str]:
    """The ``--model`` values of a command (``None``: ``[default]``), each given once.

    >>> model_sources(None, "tiny"), model_sources(["a", "b"], "tiny")
    (['tiny'], ['a', 'b'])
    >>> model_sources(["a", "./a"], "tiny")
    Traceback (most recent call last):
    ...
    workbench.errors.WorkbenchError: --model './a' names the same model as 'a'; give each model once
    """
    if models is None:
        return [default]
    items = [models] if isinstance(models, str) else list(models)
    if not items:
        raise WorkbenchError("give at least one --model")
    seen: dict[str, str] = {}
    out = []
    for m in items:
        m = str(m).strip()
        if not m:
            raise WorkbenchError("--model is empty; give a zoo key, a model folder or a .gguf file")
        p = Path(m).expanduser()
        key = str(p.resolve()) if p.exists() else os.path.normpath(p)  # ./a is a, a folder is its real path
        if key in seen:
            raise WorkbenchError(f"--model {m!r} names the same model as {seen[key]!r}; give each model once")
        seen[key] = m
        out.append(m)
    return out


def _parts(source: str) -> list[str]:
    p = Path(source).expanduser()
    parts = list(p.resolve().parts[1:]) if p.exists() else [x for x in source.replace("\\", "/").split("/") if x]
    return [x for x in parts if x not in (".", "..")] or ["model"]


def _safe(name: str) -> str:
    s = _UNSAFE.sub("_", name).strip("_")
    s = re.sub(r"^\.+", "_", s)  # never a hidden folder, '.' or '..'
    return s or "model"


def model_labels(sources: Sequence[str]) -> list[str]:
    """A folder name for each model of a run: the last part of its path or key (a hub id ``org/name``: ``name``),
    letters, digits and ``. _ -`` only; when two would clash, more of every path (``ft1_final``), and a number
    as the last resort.

    >>> model_labels(["Qwen/Qwen2.5-0.5B", "my model/v 2"])
    ['Qwen2.5-0.5B', 'v_2']
    """
    parts = [_parts(s) for s in sources]
    longest = max((len(p) for p in parts), default=1)
    for k in range(1, longest + 1):
        labels = [_safe("_".join(p[-k:])) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    out: list[str] = []
    for lab in labels:
        n, new = 2, lab
        while new in out:
            new, n = f"{lab}-{n}", n + 1
        out.append(new)
    return out


# -- the tasks -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeWork:
    """A probe sweep's share of a task: the four splits (``pos:train``, ``pos:test``, ``neg:train``,
    ``neg:test``: :func:`probes.cli.probe_splits`) and the sweep settings."""

    splits: dict[str, PromptSet]
    layers: str = "all"
    position: str = "last"
    n_boot: int = 1000

    def measure(self, lm: Any, fmt: Any, backend: str, seed: int) -> ProbeOutcome:
        parse_layers(self.layers, lm.n_layers)
        check_context(lm, fmt, [ps.texts for ps in self.splits.values()])
        return probe_outcome(lm, fmt, self.splits, layers=self.layers, position=self.position, backend=backend,
                             n_boot=self.n_boot, seed=seed)


@dataclass(frozen=True)
class OverlapWork:
    """Experiment 4's share of a task: the prompt sets (texts), ``protocols = {protocol: {role: set}}``, the η
    grid and the subsample draws."""

    sets: dict[str, list[str]]
    protocols: dict[str, dict[str, str]]
    etas: tuple[float, ...]
    position: str = "last"
    n_boot: int = 30

    def measure(self, lm: Any, fmt: Any, backend: str, seed: int) -> OverlapOutcome:
        check_context(lm, fmt, list(self.sets.values()))
        return overlap_outcome(lm, fmt, self.sets, self.protocols, position=self.position, backend=backend,
                               etas=self.etas, n_boot=self.n_boot, seed=seed)


@dataclass(frozen=True)
class ModelTask:
    """One model of a run across models (an executor task; small and picklable, never a model object).

    Example::

        >>> t = ModelTask("m", ModelSpec("smollm2-135m-instruct"), None, False, "native", 0,
        ...               ProbeWork({}, n_boot=10))
        >>> t.model.source, t.work.n_boot
        ('smollm2-135m-instruct', 10)
    """

    label: str
    model: ModelSpec
    system_prompt: str | None
    raw: bool
    backend: str
    seed: int
    work: ProbeWork | OverlapWork


def run_model_task(state: Any, task: ModelTask) -> ProbeOutcome | OverlapOutcome:
    """The executor's task function: load the model, measure, return the outcome (errors name the model)."""
    from workbench.cli import format_from_args

    seed_everything(task.seed)  # every model starts from the seed, wherever and in whatever order it runs
    try:
        lm = task.model.load()
        fmt = format_from_args(types.SimpleNamespace(system_prompt=task.system_prompt, raw=task.raw), lm)
        return task.work.measure(lm, fmt, task.backend, task.seed)
    except WorkbenchError as e:
        raise WorkbenchError(f"model {task.model.source}: {e}") from e


def run_tasks(executor: Executor, tasks: Sequence[ModelTask], progress: bool = True
              ) -> tuple[list[Any], dict[str, Any]]:
    """Every task's outcome, in task order, and where they ran (``executor.describe()`` with ``worker_stats``).
    No worker state: each task loads its own model (one model per task)."""
    with executor.pool(None) as pool:
        outcomes = pool.map(run_model_task, list(tasks), progress=progress and len(tasks) > 1, desc="models")
        stats = pool.stats()
    return outcomes, {**executor.describe(), "worker_stats": stats}


# -- the run folder --------------------------------------------------------------------------------------

def _probe_headline(out: ProbeOutcome) -> dict[str, Any]:
    s = probe_summary(out)
    return {k: s[k] for k in ("best_layer", "best_logistic_auroc", "best_logistic_auroc_ci", "best_mean_diff_auroc")}


def _overlap_headline(summary: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for p, s in summary["protocols"].items():
        e = (s.get("exp4") or {}).get(PROTOCOLS[p].headline)
        out[p] = None if not e else {"layers": e["layers"], "u_h": e["u_h"], "h1_h2": e["h1_h2"], "diff": e["diff"],
                                     "diff_ci": e["diff_ci"], "verdict": (e.get("verdict") or {}).get("verdict")}
    return out


def write_models(run: RunFolder, tasks: Sequence[ModelTask], outcomes: Sequence[Any], config: dict[str, Any],
                 write_one: Callable[[RunFolder, Any], dict[str, Any]], executor: dict[str, Any]
                 ) -> list[dict[str, Any]]:
    """Write the outcomes of a run across models into ``run`` (see the module docstring); ``write_one(folder,
    outcome)`` writes one model's files (:func:`probes.cli.write_probe_run` or
    :func:`probes.cli.write_overlap_run` with the run's settings). Returns each model's ``write_one`` result.

    One task: its files go into ``run`` itself (with ``model.json``), as in a single-model run."""
    from probes import plots

    if len(tasks) == 1:
        run.write_json("model.json", outcomes[0].model)
        return [write_one(run, outcomes[0])]
    results, combined, listing, curves = [], [], [], {}
    probe = isinstance(outcomes[0], ProbeOutcome)
    for task, out in zip(tasks, outcomes):
        cfg = {k: v for k, v in config.items() if k != "model_folders"} | {"model": task.model.source}
        with RunFolder(run.path / task.label, config=cfg) as sub:
            sub.write_json("model.json", out.model)
            res = write_one(sub, out)
        results.append(res)
        if probe:
            rows = res["rows"]
            headline = _probe_headline(out)
        else:
            rows = overlap_layer_rows(out.result, list(task.work.protocols), res["summary"]["eta"])
            headline = _overlap_headline(res["summary"])
        curves[task.label] = rows
        combined.extend({"model": task.label, **r} for r in rows)
        listing.append({"model": task.label, "source": task.model.source,  # its files: OUT/<model>/
                        "model_id": out.model["model_id"], "checksum": out.model["checksum"],
                        "n_layers": out.model["n_layers"], "d_model": out.model["d_model"], "summary": headline})
    cmd = config.get("command")
    if probe:
        run.write_csv("probe_layers_by_model.csv", combined)
        title = f"{config.get('positive')} vs {config.get('negative')} ({config.get('position')} token)"
        run.save_figure("probe_auroc_by_model.png", plots.probe_models(curves, title))
    else:
        run.write_csv("overlap_layers_by_model.csv", combined)
        first = tasks[0].work
        assert isinstance(first, OverlapWork)
        pairs = results[0]["summary"]["protocols"]
        columns = [f"{p}:{pair}" for p in first.protocols for pair in pairs[p]["pairs"]]
        eta = results[0]["summary"]["eta"]
        run.save_figure("overlap_by_model.png", plots.overlap_models(curves, columns, eta, "activation overlap"))
    run.write_json("models.json", {"command": cmd, "models": listing, "executor": executor})
    return results


def run_across(args: Any, sources: Sequence[str], work: ProbeWork | OverlapWork, executor: Executor,
               inputs: Sequence[str], command: str, write_one: Callable[[RunFolder, Any], dict[str, Any]]
               ) -> list[tuple[str, dict[str, Any]]]:
    """A command across ``sources``: one task per model on ``executor``, then the run folder ``args.out``
    (:func:`write_models`), opened only when every model has finished. Returns ``(label, write_one result)``
    per model. ``args``: the command's options (model options, ``--seed``, ``--out``, ``--overwrite``)."""
    from workbench.loading import check_model_source

    for src in sources:  # a mistyped path fails here, not after the models before it have run
        check_model_source(src)
    labels = model_labels(sources)
    tasks = [ModelTask(label, ModelSpec(src, dtype=str(args.dtype), device=str(args.device),
                                        device_map=getattr(args, "device_map", None),
                                        trust_remote_code=bool(getattr(args, "trust_remote_code", False))),
                       args.system_prompt, bool(args.raw), args.backend, int(args.seed), work)
             for label, src in zip(labels, sources)]
    outcomes, where = run_tasks(executor, tasks)
    if len(sources) == 1:
        args.model = sources[0]  # config.json as in a single-model run
    config = vars(args) | {"command": command}
    if len(sources) > 1:
        config["model_folders"] = dict(zip(labels, sources))
    run = RunFolder(args.out, config=config, overwrite=args.overwrite, inputs=inputs)
    results = write_models(run, tasks, outcomes, config, write_one, where)
    return list(zip(labels, results))


def probe_writer(positive: str, negative: str, position: str) -> Callable[[RunFolder, Any], dict[str, Any]]:
    """``write_one`` of :func:`write_models` for a probe sweep."""
    def write(folder: RunFolder, out: Any) -> dict[str, Any]:
        return write_probe_run(folder, out, positive, negative, position)

    return write


def overlap_writer(protocols: dict[str, dict[str, str]], **settings: Any) -> Callable[[RunFolder, Any], dict[str, Any]]:
    """``write_one`` of :func:`write_models` for experiment 4 (``settings``: those of
    :func:`probes.cli.write_overlap_run`)."""
    def write(folder: RunFolder, out: Any) -> dict[str, Any]:
        return write_overlap_run(folder, out, protocols, **settings)

    return write
