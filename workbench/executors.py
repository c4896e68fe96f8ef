"""Run independent tasks in this process or on a Ray cluster: one interface, two implementations.

A command that scores many variants of one model (the projected models of ``weightspace sweep``, the candidate
directions of ``steer select``) hands the work to an :class:`Executor`:

* :class:`LocalExecutor` (``--executor local``, the default): everything in this process, in task order, exactly
  as the command ran before executors existed;
* :class:`RayExecutor` (``--executor ray``): a pool of Ray actors, on a local Ray started for the run (and
  shut down after it) or on an existing cluster (``--ray-address auto`` or ``HOST:PORT``); with
  ``--ray-gpus-per-worker`` (the default with a CUDA ``--device``) each actor also reserves GPUs.

The work is ``fn(state, task) -> result``. ``state`` is built once per worker by ``init()`` (loading a model
is the expensive part) and kept for every task that worker runs; ``fn`` and ``init`` are module-level
callables (``functools.partial`` of one is fine) and tasks and results are small picklable objects: paths,
configs, indices, per-prompt rows. No model object ever crosses the boundary: a Ray worker loads its own copy
(:class:`ModelSpec` says how, and checks that the checksum matches the driver's). The driver collects the
results in task order and alone writes the run folder, so a run on Ray lands in the same files as a local run.

Example::

    >>> from functools import partial
    >>> def add(state, task):
    ...     return state["offset"] + task
    >>> with get_executor("local").pool(partial(dict, offset=10)) as pool:
    ...     pool.map(add, [1, 2, 3])
    [11, 12, 13]

On Ray the same lines run on ``get_executor("ray", workers=2)``; each of the two workers calls ``init`` once.

Why actors and not plain Ray tasks: a Ray task cannot keep a loaded model between calls, and loading one per
task would cost more than the scoring. Each actor reserves ``cpus_per_worker`` CPUs and sets that many torch
threads (OpenMP threads beyond a process's share thrash: see the README's note on threads). Ray itself is
imported only when a Ray pool opens, so the core workbench does not pay for it.

GPU workers: an actor created without GPUs sees none (Ray sets its ``CUDA_VISIBLE_DEVICES`` to nothing), so a
command whose ``--device`` is CUDA gives each worker ``gpus_per_worker`` GPUs (``--ray-gpus-per-worker``, default
1 with a CUDA device; fractional shares such as 0.5 put two workers on one GPU). Ray then sets the worker's
``CUDA_VISIBLE_DEVICES`` to the GPU(s) it reserved, so inside the worker ``cuda`` (``cuda:0``) *is* its GPU:
:meth:`ModelSpec.load` on a GPU worker loads a CUDA model on ``cuda`` whatever the index the command gave
(``--device cuda:1`` means GPU 1 for the driver's own model; each worker uses the GPU Ray reserved for it,
:func:`worker_device`). A cluster with fewer GPUs than one worker needs is refused when the pool opens, instead
of leaving the actors pending forever.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import socket
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from workbench.errors import WorkbenchError

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "RayExecutor", "Pool", "ModelSpec", "get_executor",
           "add_executor_args", "executor_from_args", "parse_ray_address", "worker_device", "gpus_for_device",
           "FORWARDED_ENV"]

EXECUTORS = ("local", "ray")
# Environment variables a Ray worker takes over from the driver (where models are cached, offline mode).
FORWARDED_ENV = ("WORKBENCH_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
CONNECT_TIMEOUT = 5.0  # seconds: a HOST:PORT that does not answer within this is refused before Ray retries
GPU_PRECISION = 1e-4  # Ray's resolution of fractional resource quantities
# True in a Ray worker process whose actor reserved GPUs (set by _Worker; read by worker_device)
_GPU_WORKER = False
_CUDA = re.compile(r"^cuda(?::\d+)?$")


def _is_cuda(device: Any) -> bool:
    """Whether ``device`` (a ``--device`` string) names a CUDA device: ``cuda`` or ``cuda:N``."""
    return device is not None and bool(_CUDA.match(str(device).strip()))


def worker_device(device: str) -> str:
    """The device a model of the command's ``device`` loads on in this process.

    On a Ray worker that reserved GPUs, Ray has set ``CUDA_VISIBLE_DEVICES`` to the worker's GPU(s), whose first
    is ``cuda:0`` in the worker: a CUDA device of any index becomes ``cuda`` there (``cuda:1`` would be another
    worker's GPU, or none). Everywhere else (the driver, the local executor, a CPU worker) ``device`` unchanged.

    Example::

        >>> worker_device("cuda:1"), worker_device("cpu")  # not on a GPU worker: unchanged
        ('cuda:1', 'cpu')
    """
    if _GPU_WORKER and _is_cuda(device):
        return "cuda"
    return str(device)


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the driver's model: what :func:`workbench.loading.load_model` needs, and the checksum
    the loaded model must have (``None``: not checked).

    Example::

        >>> ModelSpec("smollm2-135m-instruct", dtype="float32").describe()["source"]
        'smollm2-135m-instruct'
    """

    source: str
    dtype: str = "float32"
    device: str = "cpu"
    device_map: Any = None
    trust_remote_code: bool = False
    attn_implementation: str | None = "eager"
    checksum: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, lm: Any = None) -> "ModelSpec":
        """From the model options of a command (``add_model_args``), checked against the driver's ``lm``."""
        return cls(source=str(args.model), dtype=str(args.dtype), device=str(args.device),
                   device_map=getattr(args, "device_map", None),
                   trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
                   checksum=getattr(lm, "checksum", None))

    def load(self) -> Any:
        """The model (a :class:`workbench.loading.LoadedModel`); a checksum other than the driver's is refused.

        On a Ray worker with GPUs a CUDA ``device`` is the worker's own GPU, ``cuda`` (:func:`worker_device`).
        """
        from workbench.loading import load_model

        lm = load_model(self.source, dtype=self.dtype, device=worker_device(self.device), device_map=self.device_map,
                        trust_remote_code=self.trust_remote_code, attn_implementation=self.attn_implementation)
        if self.checksum is not None and lm.checksum != self.checksum:
            raise WorkbenchError(f"the worker on {socket.gethostname()} loaded {self.source!r} with checksum "
                                 f"{lm.checksum[:12]}, the driver's has {self.checksum[:12]}: every worker needs the "
                                 f"same model files (same path or zoo cache) as the driver")
        return lm

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "dtype": self.dtype, "device": self.device, "checksum": self.checksum}


# -- the interface -------------------------------------------------------------------------------------

class Pool(ABC):
    """Workers that have built (or will build, on first use) their state; run tasks with :meth:`map`."""

    @property
    @abstractmethod
    def size(self) -> int:
        """The most workers that run tasks at the same time."""

    @abstractmethod
    def map(self, fn: Callable[[Any, Any], Any], tasks: Sequence[Any], *, progress: bool = False,
            desc: str = "tasks", on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
        """``[fn(state, task) for task in tasks]``, in task order.

        ``on_result(index, result)`` is called on the driver as each result arrives (completion order on Ray,
        task order locally). An exception of a task propagates (on Ray with the task's number added) and the
        remaining tasks are not started.
        """

    @abstractmethod
    def stats(self) -> list[dict[str, Any]]:
        """Per worker: ``pid``, ``host``, ``init_seconds``, ``tasks`` run, ``task_seconds`` (sum)."""


class Executor(ABC):
    """Where tasks run. Subclasses: :class:`LocalExecutor`, :class:`RayExecutor`."""

    name: str = "executor"
    in_process: bool = False  # True: ``init`` may close over live objects (a loaded model); nothing is pickled

    @property
    @abstractmethod
    def workers(self) -> int | None:
        """Workers asked for (``None``: as many as the CPUs allow)."""

    @abstractmethod
    def pool(self, init: Callable[[], Any] | None = None) -> "_PoolContext":
        """A context manager giving a :class:`Pool` whose workers each call ``init()`` once."""

    def map(self, fn: Callable[[Any, Any], Any], tasks: Sequence[Any], *, init: Callable[[], Any] | None = None,
            progress: bool = False, desc: str = "tasks") -> list[Any]:
        """One pool for one batch of tasks: ``[fn(state, task) for task in tasks]`` in task order."""
        with self.pool(init) as p:
            return p.map(fn, tasks, progress=progress, desc=desc)

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "workers": self.workers}


class _PoolContext:
    """``with executor.pool(init) as pool:`` (opens on enter, releases every worker on exit)."""

    def __init__(self, open_: Callable[[], Pool], close: Callable[[Pool], None]) -> None:
        self._open, self._close, self._pool = open_, close, None

    def __enter__(self) -> Pool:
        self._pool = self._open()
        return self._pool

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._close(self._pool)
            self._pool = None


def _bar(total: int, progress: bool, desc: str) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="task")


# -- local ---------------------------------------------------------------------------------------------

class _LocalPool(Pool):
    def __init__(self, init: Callable[[], Any] | None) -> None:
        self._init, self._built, self._state = init, False, None
        self._stats = {"pid": os.getpid(), "host": socket.gethostname(), "init_seconds": 0.0, "tasks": 0,
                       "task_seconds": 0.0}

    @property
    def size(self) -> int:
        return 1

    def _state_now(self) -> Any:
        if not self._built:
            t0 = time.perf_counter()
            self._state = self._init() if self._init is not None else None
            self._stats["init_seconds"] = time.perf_counter() - t0
            self._built = True
        return self._state

    def map(self, fn: Callable[[Any, Any], Any], tasks: Sequence[Any], *, progress: bool = False,
            desc: str = "tasks", on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
        tasks = list(tasks)
        if not tasks:
            return []
        state = self._state_now()
        bar = _bar(len(tasks), progress, desc)
        out = []
        try:
            for i, task in enumerate(tasks):
                t0 = time.perf_counter()
                r = fn(state, task)
                self._stats["tasks"] += 1
                self._stats["task_seconds"] += time.perf_counter() - t0
                out.append(r)
                if on_result is not None:
                    on_result(i, r)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return out

    def stats(self) -> list[dict[str, Any]]:
        return [dict(self._stats)]


class LocalExecutor(Executor):
    """Everything in this process, one task after the other (the workbench's behaviour without executors).

    ``init`` runs once, in this process, so it may close over objects the driver already holds (a loaded
    model); nothing is pickled.
    """

    name = "local"
    in_process = True

    @property
    def workers(self) -> int:
        return 1

    def pool(self, init: Callable[[], Any] | None = None) -> _PoolContext:
        return _PoolContext(lambda: _LocalPool(init), lambda p: None)


# -- Ray -----------------------------------------------------------------------------------------------

_HOSTPORT = re.compile(r"^(?:ray://)?(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")


def parse_ray_address(address: str | None) -> str | None:
    """``None`` (start a local Ray for the run), ``"auto"`` (the cluster ``ray start --head`` started on this
    machine, or ``RAY_ADDRESS``) or ``HOST:PORT`` (also ``ray://HOST:PORT``, the Ray client); anything else is
    refused.

    Example::

        >>> parse_ray_address("auto"), parse_ray_address("10.0.0.5:6379"), parse_ray_address(None)
        ('auto', '10.0.0.5:6379', None)
        >>> parse_ray_address("10.0.0.5")
        Traceback (most recent call last):
        ...
        workbench.errors.WorkbenchError: --ray-address must be 'auto' or HOST:PORT (e.g. 10.0.0.5:6379, or ray://HOST:10001 for the Ray client), got '10.0.0.5'
    """
    if address is None or address == "":
        return None
    a = str(address).strip()
    if a == "auto":
        return a
    m = _HOSTPORT.match(a)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise WorkbenchError(f"--ray-address must be 'auto' or HOST:PORT (e.g. 10.0.0.5:6379, or ray://HOST:10001 "
                             f"for the Ray client), got {address!r}")
    return a


def _check_gpus(gpus: Any) -> float | None:
    """``gpus_per_worker`` as a float Ray accepts (``None`` stays ``None``), or a clear error.

    Example::

        >>> _check_gpus(None), _check_gpus("0.5"), _check_gpus(2)
        (None, 0.5, 2.0)
        >>> _check_gpus(1.5)
        Traceback (most recent call last):
        ...
        workbench.errors.WorkbenchError: --ray-gpus-per-worker above 1 must be a whole number of GPUs (a worker shares a GPU or holds whole ones), got 1.5
    """
    if gpus is None:
        return None
    try:
        g = float(gpus)
    except (TypeError, ValueError):
        g = float("nan")
    if not math.isfinite(g) or g <= 0:
        raise WorkbenchError(f"--ray-gpus-per-worker must be a finite number > 0 (GPUs each Ray worker reserves; "
                             f"0.5: two workers per GPU), got {gpus!r}")
    if g < GPU_PRECISION:
        raise WorkbenchError(f"--ray-gpus-per-worker must be at least {GPU_PRECISION:g} (Ray's resolution of "
                             f"fractional resources), got {gpus!r}")
    if g > 1 and not g.is_integer():
        raise WorkbenchError(f"--ray-gpus-per-worker above 1 must be a whole number of GPUs (a worker shares a GPU "
                             f"or holds whole ones), got {gpus!r}")
    return g


def gpus_for_device(device: str | None, gpus_per_worker: float | None) -> float | None:
    """The GPUs each Ray worker of a command on ``device`` (its ``--device``) reserves.

    A CUDA device without ``--ray-gpus-per-worker`` gets 1: a worker created without GPUs sees none, so a model
    on ``cuda`` could not load there. GPUs for workers whose device is not CUDA are refused (they would hold
    GPUs they never use). ``device`` ``None`` (not known): ``gpus_per_worker`` as given.

    Example::

        >>> gpus_for_device("cuda:1", None), gpus_for_device("cuda", 0.5), gpus_for_device("cpu", None)
        (1.0, 0.5, None)
        >>> gpus_for_device("cpu", 1)
        Traceback (most recent call last):
        ...
        workbench.errors.WorkbenchError: --ray-gpus-per-worker 1 reserves GPUs for Ray workers that load the model on --device cpu, where they would hold GPUs they never use; give --device cuda (each worker then loads on the GPU Ray reserves for it) or leave out --ray-gpus-per-worker
    """
    gpus_per_worker = _check_gpus(gpus_per_worker)
    if device is None:
        return gpus_per_worker
    if _is_cuda(device):
        return 1.0 if gpus_per_worker is None else gpus_per_worker
    if gpus_per_worker is not None:
        raise WorkbenchError(f"--ray-gpus-per-worker {gpus_per_worker:g} reserves GPUs for Ray workers that load the "
                             f"model on --device {device}, where they would hold GPUs they never use; give --device "
                             f"cuda (each worker then loads on the GPU Ray reserves for it) or leave out "
                             f"--ray-gpus-per-worker")
    return None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise WorkbenchError(f"--executor ray needs the 'ray' package (pip install 'ray==2.60.0'; bash scripts/setup.sh "
                             f"installs it): {e}") from e
    return ray


def _check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse a HOST:PORT nothing listens on, in seconds (Ray itself retries for minutes)."""
    m = _HOSTPORT.match(address)
    assert m is not None
    host, port = m.group(1).strip("[]"), int(m.group(2))
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise WorkbenchError(f"no Ray cluster answers at {address} ({type(e).__name__}: {e}); start one there with "
                             f"`ray start --head --port {port}`, or leave out --ray-address to start a local Ray for "
                             f"this run") from e


class _Worker:
    """The body of one Ray actor: builds the state once, then runs tasks on it (never raises in ``__init__``,
    so a failed ``init`` is reported with the first task instead of as a dead actor).

    ``gpus``: the GPUs Ray reserved for this actor (0: none); with GPUs a CUDA model loads on the worker's own
    GPU (:func:`worker_device`) and the stats name the GPUs Ray made visible (``CUDA_VISIBLE_DEVICES``).
    """

    def __init__(self, init: Callable[[], Any] | None, threads: int, env: dict[str, str], cwd: str,
                 gpus: float = 0.0) -> None:
        global _GPU_WORKER
        os.environ.update(env)
        if os.path.isdir(cwd):  # relative paths of the command line mean what they mean on the driver
            os.chdir(cwd)
        _GPU_WORKER = bool(gpus and gpus > 0)  # this process is this actor's alone
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.stats = {"pid": os.getpid(), "host": socket.gethostname(), "init_seconds": 0.0, "tasks": 0,
                      "task_seconds": 0.0, "threads": torch.get_num_threads()}
        if _GPU_WORKER:
            self.stats.update(gpus=float(gpus), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        self.error: BaseException | None = None
        self.state = None
        t0 = time.perf_counter()
        try:
            self.state = init() if init is not None else None
        except Exception as e:  # reported by run()
            e.add_note(f"(raised by the worker's init on {socket.gethostname()}, pid {os.getpid()})\n"
                       + traceback.format_exc())
            self.error = e
        self.stats["init_seconds"] = time.perf_counter() - t0

    def run(self, fn: Callable[[Any, Any], Any], task: Any) -> Any:
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        r = fn(self.state, task)
        self.stats["tasks"] += 1
        self.stats["task_seconds"] += time.perf_counter() - t0
        return r

    def info(self) -> dict[str, Any]:
        return dict(self.stats)


class _RayPool(Pool):
    def __init__(self, ray: Any, init: Callable[[], Any] | None, size: int, cpus: int, started: bool,
                 gpus: float | None = None) -> None:
        self.ray, self.init, self._size, self.cpus, self.started = ray, init, size, cpus, started
        self.gpus = gpus  # GPUs each actor reserves (None: none)
        self.env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        self.actors: list[Any] = []
        self._cls = ray.remote(_Worker)

    @property
    def size(self) -> int:
        return self._size

    def _options(self) -> dict[str, Any]:
        """The Ray options of each actor: its CPUs, one task at a time and, when asked for, its GPUs."""
        opts: dict[str, Any] = {"num_cpus": self.cpus, "max_concurrency": 1}
        if self.gpus:
            opts["num_gpus"] = self.gpus
        return opts

    def _grow(self, n: int) -> None:
        while len(self.actors) < min(n, self._size):
            self.actors.append(self._cls.options(**self._options())
                               .remote(self.init, self.cpus, self.env, os.getcwd(), self.gpus or 0.0))

    def map(self, fn: Callable[[Any, Any], Any], tasks: Sequence[Any], *, progress: bool = False,
            desc: str = "tasks", on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
        ray = self.ray
        tasks = list(tasks)
        if not tasks:
            return []
        self._grow(len(tasks))
        fn_ref = ray.put(fn)
        todo: Iterator[tuple[int, Any]] = iter(enumerate(tasks))
        pending: dict[Any, tuple[Any, int]] = {}
        out: list[Any] = [None] * len(tasks)

        def submit(actor: Any) -> None:
            nxt = next(todo, None)
            if nxt is not None:
                i, task = nxt
                pending[actor.run.remote(fn_ref, task)] = (actor, i)

        for a in self.actors[:len(tasks)]:
            submit(a)
        bar = _bar(len(tasks), progress, desc)
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                actor, i = pending.pop(ref)
                out[i] = self._get(ref, i, len(tasks))
                if on_result is not None:
                    on_result(i, out[i])
                if bar is not None:
                    bar.update(1)
                submit(actor)
        finally:
            if bar is not None:
                bar.close()
            for ref in pending:  # only after an error: the rest are not wanted
                ray.cancel(ref, force=False)
        return out

    def _get(self, ref: Any, i: int, n: int) -> Any:
        ray = self.ray
        where = f"task {i + 1} of {n} on a Ray worker"
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, WorkbenchError):
                raise WorkbenchError(f"{cause} ({where})") from cause
            if isinstance(cause, Exception):
                cause.add_note(f"({where}; the worker's traceback:)\n{e}")
                raise cause from None
            raise WorkbenchError(f"{where} failed: {e}") from e
        except ray.exceptions.RayActorError as e:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(e).__name__]
            if "creation task" in text:  # the worker's arguments (init, task function) did not even unpickle
                hint = (": every worker needs this project installed, in a Python environment like the driver's "
                        "(see the README, 'Scaling out')" if "No module named" in text else "")
                raise WorkbenchError(f"a Ray worker could not start ({lines[-1]}){hint}") from e
            raise WorkbenchError(f"the Ray worker running task {i + 1} of {n} died (out of memory, killed, or its "
                                 f"node left the cluster): {lines[0]}") from e

    def stats(self) -> list[dict[str, Any]]:
        if not self.actors:
            return []
        return list(self.ray.get([a.info.remote() for a in self.actors]))

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # pragma: no cover - already gone
                pass
        self.actors = []


class RayExecutor(Executor):
    """A pool of Ray actors, each with ``cpus_per_worker`` CPUs (and as many torch threads) and its own state.

    ``address``: ``None`` starts a local Ray for the run (``num_cpus`` = the larger of this machine's CPUs and
    ``workers``; Ray detects the GPUs itself) and shuts it down afterwards; ``"auto"`` / ``"HOST:PORT"`` connect to
    a running cluster and leave it running. When Ray is already initialised in this process (a notebook, a test
    fixture), that session is used whatever the address and left running. ``workers``: actors at most (default:
    as many as the cluster's CPUs, and GPUs, hold); ``cpus_per_worker`` default: the CPUs / workers, at least 1.

    ``gpus_per_worker`` (``--ray-gpus-per-worker``): GPUs each actor reserves (``num_gpus``; a fraction below 1
    shares a GPU, e.g. 0.5: two workers per GPU; above 1 a whole number). ``None``: no GPU, and Ray hides the GPUs
    from the worker. The pool then holds at most ``cluster GPUs / gpus_per_worker`` workers, and a cluster with
    fewer GPUs than one worker needs is refused when the pool opens (Ray would keep the actors pending forever).

    Example::

        >>> RayExecutor(workers=2).describe()
        {'executor': 'ray', 'workers': 2, 'ray_address': None}
        >>> RayExecutor(workers=2, gpus_per_worker=0.5).describe()
        {'executor': 'ray', 'workers': 2, 'ray_address': None, 'gpus_per_worker': 0.5}
    """

    name = "ray"
    in_process = False

    def __init__(self, address: str | None = None, workers: int | None = None, *,
                 cpus_per_worker: int | None = None, gpus_per_worker: float | None = None,
                 check_address: bool = True) -> None:
        if workers is not None and int(workers) < 1:
            raise WorkbenchError(f"--workers must be >= 1, got {workers}")
        if cpus_per_worker is not None and int(cpus_per_worker) < 1:
            raise WorkbenchError(f"cpus_per_worker must be >= 1, got {cpus_per_worker}")
        self.gpus_per_worker = _check_gpus(gpus_per_worker)
        self.address = parse_ray_address(address)
        self._workers = int(workers) if workers is not None else None
        self.cpus_per_worker = int(cpus_per_worker) if cpus_per_worker is not None else None
        self._ray = _import_ray()
        if check_address and self.address not in (None, "auto") and not self._ray.is_initialized():
            _check_reachable(self.address)

    @property
    def workers(self) -> int | None:
        return self._workers

    def describe(self) -> dict[str, Any]:
        d = {**super().describe(), "ray_address": self.address}
        if self.gpus_per_worker is not None:  # only when asked for: CPU runs record what they always did
            d["gpus_per_worker"] = self.gpus_per_worker
        return d

    def _connect(self) -> bool:
        """Initialise Ray unless it already is; True when this call started it (then it is shut down after)."""
        ray = self._ray
        if ray.is_initialized():
            return False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline machines: no usage report
        try:
            if self.address is None:
                n = max(os.cpu_count() or 1, self._workers or 1)
                ray.init(num_cpus=n, include_dashboard=False, logging_level="warning")
            else:
                ray.init(address=self.address, logging_level="warning")
        except Exception as e:
            try:  # a half-started local Ray (e.g. a start-up timeout) must not leave its processes behind
                ray.shutdown()
            except Exception:  # pragma: no cover
                pass
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            hint = (" (is `ray start --head` running on this machine, or RAY_ADDRESS set?)"
                    if self.address == "auto" else "")
            raise WorkbenchError(f"could not start or reach {where}{hint}: {type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        return True

    def _size(self) -> tuple[int, int]:
        """``(workers, cpus each)`` for the CPUs (and, with ``gpus_per_worker``, the GPUs) the cluster has."""
        resources = self._ray.cluster_resources()
        total = int(resources.get("CPU", 0))
        if total < 1:
            raise WorkbenchError("the Ray cluster has no CPU resources to run workers on")
        gpu_fit = self._gpu_fit(resources) if self.gpus_per_worker else None
        if self.cpus_per_worker is not None:
            cpus = self.cpus_per_worker
        else:
            target = self._workers or total
            if gpu_fit is not None:  # the GPUs cap the workers: share the CPUs among those that will run
                target = min(target, gpu_fit)
            cpus = max(1, total // target)
        if cpus > total:
            raise WorkbenchError(f"a worker needs {cpus} CPUs but the Ray cluster has {total}")
        fit = max(1, total // cpus)
        if gpu_fit is not None:
            fit = min(fit, gpu_fit)
        return (min(self._workers, fit) if self._workers else fit), cpus

    def _gpu_fit(self, resources: dict[str, Any]) -> int:
        """How many workers of ``gpus_per_worker`` GPUs the cluster's GPUs hold (>= 1, or a clear error)."""
        g = float(self.gpus_per_worker or 0)
        have = float(resources.get("GPU", 0) or 0)
        fit = int(math.floor(have / g + 1e-9)) if g > 0 else 0
        if fit < 1:
            nodes = ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU"))
            where = f" at {self.address}" if self.address not in (None, "auto") else ""
            raise WorkbenchError(
                f"--ray-gpus-per-worker {g:g}: a worker needs {g:g} GPU(s) but the Ray cluster{where} has {have:g} "
                f"({nodes}); Ray would keep the workers pending forever. Start the Ray nodes on machines with GPUs "
                f"(`ray start` detects them; `--num-gpus N` sets them), lower --ray-gpus-per-worker (0.5: two "
                f"workers per GPU), or run on the CPU (--device cpu, without --ray-gpus-per-worker)")
        return fit

    def pool(self, init: Callable[[], Any] | None = None) -> _PoolContext:
        state: dict[str, Any] = {}

        def open_() -> Pool:
            started = self._connect()
            try:
                size, cpus = self._size()
                if self._workers and size < self._workers:
                    import warnings

                    gpus = f" and {self.gpus_per_worker:g} GPU(s)" if self.gpus_per_worker else ""
                    warnings.warn(f"the Ray cluster has room for {size} workers of {cpus} CPU(s){gpus}, not "
                                  f"{self._workers}; running {size}", stacklevel=3)
                pool = _RayPool(self._ray, init, size, cpus, started, self.gpus_per_worker)
            except BaseException:
                if started:
                    self._ray.shutdown()
                raise
            state["pool"] = pool
            return pool

        def close(pool: Pool) -> None:
            assert isinstance(pool, _RayPool)
            try:
                pool.close()
            finally:
                if pool.started:
                    self._ray.shutdown()

        return _PoolContext(open_, close)


# -- the factory and the command-line options -------------------------------------------------------------

def get_executor(name: str = "local", address: str | None = None, workers: int | None = None, *,
                 gpus_per_worker: float | None = None, device: str | None = None) -> Executor:
    """The executor called ``name`` (``local`` or ``ray``), validated before any work.

    ``address``, ``workers`` and ``gpus_per_worker`` belong to ``ray`` only; giving them with ``local`` is refused
    rather than ignored. ``device``: the command's ``--device``; on Ray a CUDA device reserves
    ``gpus_per_worker`` GPUs per worker, 1 by default, and GPUs with another device are refused
    (:func:`gpus_for_device`).

    Example::

        >>> get_executor("local").describe()
        {'executor': 'local', 'workers': 1}
        >>> get_executor("local", workers=2)
        Traceback (most recent call last):
        ...
        workbench.errors.WorkbenchError: --workers and --ray-address need --executor ray
    """
    if name not in EXECUTORS:
        raise WorkbenchError(f"unknown executor {name!r}; valid: {', '.join(EXECUTORS)}")
    if name == "local":
        if workers is not None or address:
            raise WorkbenchError("--workers and --ray-address need --executor ray")
        if gpus_per_worker is not None:
            raise WorkbenchError("--ray-gpus-per-worker needs --executor ray (the local executor runs on --device)")
        return LocalExecutor()
    return RayExecutor(address=address, workers=workers, gpus_per_worker=gpus_for_device(device, gpus_per_worker))


def add_executor_args(p: argparse.ArgumentParser) -> None:
    """``--executor {local,ray}``, ``--ray-address``, ``--ray-gpus-per-worker``, ``--workers`` (see
    :func:`get_executor`)."""
    from workbench.argtypes import positive_float, positive_int

    g = p.add_argument_group("executor (where the independent tasks run)")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: in this process, one task after the other (default); ray: a pool of Ray workers, "
                        "each loading the model once (same results)")
    g.add_argument("--ray-address", default=None,
                   help="with --executor ray: 'auto' (the cluster `ray start --head` runs on this machine, or "
                        "RAY_ADDRESS) or HOST:PORT; default: a local Ray started for this run")
    g.add_argument("--ray-gpus-per-worker", type=positive_float, default=None, metavar="X",
                   help="with --executor ray and a CUDA --device: GPUs each worker reserves (default 1 with --device "
                        "cuda / cuda:N; 0.5: two workers per GPU; above 1 a whole number). Each worker loads the model "
                        "on the GPU Ray reserves for it (its 'cuda'), whatever the N of cuda:N; refused with a "
                        "non-CUDA --device, and when the cluster has fewer GPUs than one worker needs")
    g.add_argument("--workers", type=positive_int, default=None,
                   help="with --executor ray: workers (default: one per CPU of the cluster, and with GPU workers at "
                        "most as many as its GPUs hold); each gets CPUs / workers torch threads")


def executor_from_args(args: argparse.Namespace) -> Executor:
    """The executor of a command's ``--executor`` / ``--ray-address`` / ``--ray-gpus-per-worker`` / ``--workers``
    options, for its ``--device`` (a CUDA device gives each Ray worker a GPU: :func:`gpus_for_device`)."""
    return get_executor(getattr(args, "executor", "local") or "local", getattr(args, "ray_address", None),
                        getattr(args, "workers", None), gpus_per_worker=getattr(args, "ray_gpus_per_worker", None),
                        device=getattr(args, "device", None))
