"""Run independent tasks in this process or on a Ray cluster: one interface, two implementations.

A command that scores many variants of one model (the projected models of ``weightspace sweep``, the candidate
directions of ``steer select``) hands the work to an :class:`Executor`:

* :class:`LocalExecutor` (``--executor local``, the default): everything in this process, in task order, exactly
  as the command ran before executors existed;
* :class:`RayExecutor` (``--executor ray``): a pool of Ray actors, on a local Ray started for the run (and
  shut down after it) or on an existing cluster (``--ray-address auto`` or ``HOST:PORT``).

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
"""

from __future__ import annotations

import argparse
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
           "add_executor_args", "executor_from_args", "parse_ray_address", "FORWARDED_ENV"]

EXECUTORS = ("local", "ray")
# Environment variables a Ray worker takes over from the driver (where models are cached, offline mode).
FORWARDED_ENV = ("WORKBENCH_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
CONNECT_TIMEOUT = 5.0  # seconds: a HOST:PORT that does not answer within this is refused before Ray retries


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
        """The model (a :class:`workbench.loading.LoadedModel`); a checksum other than the driver's is refused."""
        from workbench.loading import load_model

        lm = load_model(self.source, dtype=self.dtype, device=self.device, device_map=self.device_map,
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
    so a failed ``init`` is reported with the first task instead of as a dead actor)."""

    def __init__(self, init: Callable[[], Any] | None, threads: int, env: dict[str, str], cwd: str) -> None:
        os.environ.update(env)
        if os.path.isdir(cwd):  # relative paths of the command line mean what they mean on the driver
            os.chdir(cwd)
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.stats = {"pid": os.getpid(), "host": socket.gethostname(), "init_seconds": 0.0, "tasks": 0,
                      "task_seconds": 0.0, "threads": torch.get_num_threads()}
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
    def __init__(self, ray: Any, init: Callable[[], Any] | None, size: int, cpus: int, started: bool) -> None:
        self.ray, self.init, self._size, self.cpus, self.started = ray, init, size, cpus, started
        self.env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        self.actors: list[Any] = []
        self._cls = ray.remote(_Worker)

    @property
    def size(self) -> int:
        return self._size

    def _grow(self, n: int) -> None:
        while len(self.actors) < min(n, self._size):
            self.actors.append(self._cls.options(num_cpus=self.cpus, max_concurrency=1)
                               .remote(self.init, self.cpus, self.env, os.getcwd()))

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
    ``workers``) and shuts it down afterwards; ``"auto"`` / ``"HOST:PORT"`` connect to a running cluster and leave
    it running. When Ray is already initialised in this process (a notebook, a test fixture), that session is
    used whatever the address and left running. ``workers``: actors at most (default: the cluster's CPUs /
    ``cpus_per_worker``); ``cpus_per_worker`` default: the CPUs / ``workers``, at least 1.

    Example::

        >>> RayExecutor(workers=2).describe()
        {'executor': 'ray', 'workers': 2, 'ray_address': None}
    """

    name = "ray"
    in_process = False

    def __init__(self, address: str | None = None, workers: int | None = None, *,
                 cpus_per_worker: int | None = None, check_address: bool = True) -> None:
        if workers is not None and int(workers) < 1:
            raise WorkbenchError(f"--workers must be >= 1, got {workers}")
        if cpus_per_worker is not None and int(cpus_per_worker) < 1:
            raise WorkbenchError(f"cpus_per_worker must be >= 1, got {cpus_per_worker}")
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
        return {**super().describe(), "ray_address": self.address}

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
        """``(workers, cpus each)`` for the CPUs the cluster has."""
        total = int(self._ray.cluster_resources().get("CPU", 0))
        if total < 1:
            raise WorkbenchError("the Ray cluster has no CPU resources to run workers on")
        if self.cpus_per_worker is not None:
            cpus = self.cpus_per_worker
        else:
            cpus = max(1, total // (self._workers or total))
        if cpus > total:
            raise WorkbenchError(f"a worker needs {cpus} CPUs but the Ray cluster has {total}")
        fit = max(1, total // cpus)
        return (min(self._workers, fit) if self._workers else fit), cpus

    def pool(self, init: Callable[[], Any] | None = None) -> _PoolContext:
        state: dict[str, Any] = {}

        def open_() -> Pool:
            started = self._connect()
            try:
                size, cpus = self._size()
                if self._workers and size < self._workers:
                    import warnings

                    warnings.warn(f"the Ray cluster has room for {size} workers of {cpus} CPU(s), not "
                                  f"{self._workers}; running {size}", stacklevel=3)
                pool = _RayPool(self._ray, init, size, cpus, started)
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

def get_executor(name: str = "local", address: str | None = None, workers: int | None = None) -> Executor:
    """The executor called ``name`` (``local`` or ``ray``), validated before any work.

    ``address`` and ``workers`` belong to ``ray`` only; giving them with ``local`` is refused rather than
    ignored.

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
        return LocalExecutor()
    return RayExecutor(address=address, workers=workers)


def add_executor_args(p: argparse.ArgumentParser) -> None:
    """``--executor {local,ray}``, ``--ray-address``, ``--workers`` (see :func:`get_executor`)."""
    from workbench.argtypes import positive_int

    g = p.add_argument_group("executor (where the independent tasks run)")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: in this process, one task after the other (default); ray: a pool of Ray workers, "
                        "each loading the model once (same results)")
    g.add_argument("--ray-address", default=None,
                   help="with --executor ray: 'auto' (the cluster `ray start --head` runs on this machine, or "
                        "RAY_ADDRESS) or HOST:PORT; default: a local Ray started for this run")
    g.add_argument("--workers", type=positive_int, default=None,
                   help="with --executor ray: workers (default: one per CPU of the cluster); each gets CPUs / workers "
                        "torch threads")


def executor_from_args(args: argparse.Namespace) -> Executor:
    """The executor of a command's ``--executor`` / ``--ray-address`` / ``--workers`` options."""
    return get_executor(getattr(args, "executor", "local") or "local", getattr(args, "ray_address", None),
                        getattr(args, "workers", None))
