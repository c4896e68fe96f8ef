"""Run folders: every command writes its config, versions, model checksum and all outputs here.

A run is written to a hidden staging sibling (``.NAME.tmp-PID-XXXX``) and moved into place only when it
completes (:meth:`RunFolder.commit`, or leaving a ``with`` block without an error), so a failed or
interrupted run never leaves a half-written folder and never loses the previous result. Every run folder
carries the marker file ``workbench_run.json``; ``overwrite`` replaces only folders that carry it, and
never the current folder, a parent of it, home, or a folder holding an input of the command.

>>> import tempfile
>>> with RunFolder(tempfile.mkdtemp() + "/run", config={"seed": 0}) as run:
...     _ = run.write_json("result.json", {"x": 1})
>>> sorted(p.name for p in run.final.iterdir())
['config.json', 'environment.json', 'result.json', 'workbench_run.json']
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.io import save_figure, write_csv, write_json, write_text

_PACKAGES = ("torch", "transformers", "safetensors", "numpy", "scipy", "scikit-learn", "transformer-lens",
             "nnsight", "gradio", "peft", "ray", "safety-subspace-workbench")

RUN_MARKER = "workbench_run.json"
TOOL = "safety-subspace-workbench"

_OPEN: list["RunFolder"] = []  # staged runs not yet committed or aborted (this process)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def environment() -> dict[str, Any]:
    vers: dict[str, str | None] = {}
    for p in _PACKAGES:
        try:
            vers[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            vers[p] = None
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        pass
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": vers,
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


# -- markers and the replace rule ---------------------------------------------------------------

def write_marker(folder: str | Path, *, kind: str = "run", complete: bool = False, **extra: Any) -> None:
    """Mark ``folder`` as made by the workbench (the only kind of folder ``overwrite`` may replace)."""
    write_json(Path(folder) / RUN_MARKER, {"tool": TOOL, "kind": kind, "complete": complete,
                                           "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(
                                               timespec="seconds"), **extra})


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The folder's run marker, or None when it carries none (or a foreign / unreadable one)."""
    p = Path(folder) / RUN_MARKER
    try:
        if not p.is_file():
            return None
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("tool") == TOOL else None


def is_run_folder(folder: str | Path) -> bool:
    """True when ``folder`` carries the workbench's run marker."""
    return read_marker(folder) is not None


def _non_empty(p: Path) -> bool:
    try:
        return p.is_dir() and any(p.iterdir())
    except OSError:
        return True


def _protected(r: Path) -> str | None:
    cwd = Path.cwd().resolve()
    if r == Path(r.anchor):
        return "the file-system root"
    if r == Path.home().resolve():
        return "your home folder"
    if cwd == r:
        return "the current folder"
    if cwd.is_relative_to(r):
        return "a parent of the current folder"
    return None


def check_out(path: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Check that ``path`` may receive a run, before any work; return it resolved. Creates nothing.

    Refused: an existing file; the file-system root, home, the current folder or a parent of it; a folder
    that is or holds one of ``inputs`` (the paths the command reads); an existing non-empty folder unless
    ``overwrite``, and with ``overwrite`` any non-empty folder that lacks the workbench's run marker.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "notes.txt").write_text("mine") and None
    >>> check_out(d, overwrite=True)
    Traceback (most recent call last):
    ...
    workbench.errors.WorkbenchError: ...is not a workbench run folder...
    """
    p = Path(path)
    if str(path).strip() == "":
        raise WorkbenchError("the output folder (--out) is empty; name a folder for the run")
    if p.exists() and not p.is_dir():
        raise WorkbenchError(f"output path {p} exists and is not a folder; choose another --out")
    r = p.resolve()
    what = _protected(r)
    if what is not None:
        raise WorkbenchError(f"refusing to write a run into {p}: it is {what}; choose a new folder for --out")
    for i in inputs:
        if i is None or str(i) == "":
            continue
        ri = Path(i).resolve()
        if ri == r or ri.is_relative_to(r):
            raise WorkbenchError(f"--out {p} is or holds an input of this command ({i}); choose another --out")
    if _non_empty(p):
        if not overwrite:
            raise WorkbenchError(f"output folder {p} already exists and is not empty; choose another --out or pass "
                                 f"--overwrite (which replaces only folders the workbench made)")
        if not is_run_folder(p):
            raise WorkbenchError(f"output folder {p} is not a workbench run folder (no {RUN_MARKER} marker); "
                                 f"--overwrite replaces only folders the workbench made. Move or delete it yourself, "
                                 f"or choose another --out")
    return r


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(final: Path) -> None:
    """Remove staging folders of this target left by processes that no longer exist (e.g. SIGKILL)."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            pid = int(tmp.name[len(final.name) + 6:].split("-")[0])
        except ValueError:
            continue
        if tmp.is_dir() and is_run_folder(tmp) and not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(staged: Path, final: Path, *, keep_previous: Path | None = None) -> None:
    """Move the finished ``staged`` folder to ``final``; an existing ``final`` (a run folder) is removed only
    after the swap, or kept as ``keep_previous``."""
    old = None
    if final.exists():
        if _non_empty(final) and not is_run_folder(final):  # re-checked at the swap: never delete foreign files
            raise WorkbenchError(f"{final} changed during the run and is no longer a workbench run folder; "
                                 f"the new run stays in {staged}")
        old = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        os.replace(final, old)
    try:
        os.replace(staged, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        if keep_previous is not None and _non_empty(old):
            if keep_previous.exists():
                if _non_empty(keep_previous) and not is_run_folder(keep_previous):
                    print(f"[workbench] {keep_previous} is not a run folder; previous results kept in {old}",
                          file=sys.stderr)
                    return
                shutil.rmtree(keep_previous)
            os.replace(old, keep_previous)
        else:
            shutil.rmtree(old, ignore_errors=True)


# -- the run folder ----------------------------------------------------------------------------

class RunFolder:
    """A folder for one run's artefacts, staged and moved into place when the run completes.

    Write to ``run.path`` (the staging folder); ``run.final`` is where the run lands. Use it as a context
    manager (commit on success, discard the staging folder on an error), or call :meth:`commit` /
    :meth:`abort`; the ``workbench`` command line commits every open run when a command succeeds and
    aborts them when it fails or is interrupted (Ctrl-C, SIGTERM). A RunFolder created inside another open
    run's staging folder (a stage of the main job) is written in place.

    ``overwrite`` replaces an existing run folder (one with the marker, see :func:`check_out`), only
    after the new run completed; ``keep_previous`` keeps the replaced run as ``NAME.previous`` instead.
    ``inputs``: paths the command reads; a folder holding any of them is never used as the output.
    """

    def __init__(self, path: str | Path, *, config: dict[str, Any] | None = None, overwrite: bool = False,
                 inputs: Iterable[str | Path | None] = (), keep_previous: bool = False, kind: str = "run") -> None:
        self.final = Path(path)
        inputs = list(inputs)
        self._staged = _inside_open_run(self.final) is None
        self._done = False
        self._previous = self.final.with_name(self.final.name + ".previous") if keep_previous else None
        if self._staged:
            check_out(self.final, overwrite=overwrite or keep_previous, inputs=inputs)
            if self._previous is not None and _non_empty(self._previous) and not is_run_folder(self._previous):
                raise WorkbenchError(f"{self._previous} exists and is not a workbench run folder; move it away "
                                     f"(it would receive the previous results)")
            self.final.parent.mkdir(parents=True, exist_ok=True)
            _clean_stale(self.final)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-{os.getpid()}-",
                                              dir=self.final.parent))
            os.chmod(self.path, 0o777 & ~_umask())
            _OPEN.append(self)
        else:
            if _non_empty(self.final):
                if not overwrite:
                    raise WorkbenchError(f"output folder {self.final} already exists and is not empty")
                if not is_run_folder(self.final):
                    raise WorkbenchError(f"{self.final} is not a workbench run folder; not replacing it")
                shutil.rmtree(self.final)
            self.final.mkdir(parents=True, exist_ok=True)
            self.path = self.final
        self.config = {k: v for k, v in (config or {}).items() if not callable(v)}
        self._kind = kind
        write_marker(self.path, kind=kind, complete=False, command=self.config.get("command"))
        write_json(self.path / "config.json", self.config)
        write_json(self.path / "environment.json", environment())

    # -- life cycle
    def commit(self) -> Path:
        """Mark the run complete and move it into place; returns the final path."""
        if self._done:
            return self.final
        write_marker(self.path, kind=self._kind, complete=True, command=self.config.get("command"))
        if self._staged:
            replace_folder(self.path, self.final, keep_previous=self._previous)
            if self._previous is not None and self._previous.exists():
                print(f"[workbench] previous results kept in {self._previous}", file=sys.stderr)
        self._close()
        self.path = self.final
        return self.final

    def abort(self) -> None:
        """Discard the staging folder (the previous result, if any, stays)."""
        if self._done:
            return
        if self._staged:
            shutil.rmtree(self.path, ignore_errors=True)
        self._close()

    def _close(self) -> None:
        self._done = True
        if self in _OPEN:
            _OPEN.remove(self)

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    # -- writing
    def sub(self, name: str) -> Path:
        p = self.path / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, name: str, obj: Any) -> Path:
        write_json(self.path / name, obj)
        return self.path / name

    def write_csv(self, name: str, rows: list[dict[str, Any]]) -> Path:
        write_csv(self.path / name, rows)
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        write_text(self.path / name, text)
        return self.path / name

    def save_figure(self, name: str, fig: Any) -> Path:
        save_figure(fig, self.path / name)
        return self.path / name

    def record_model(self, lm: Any) -> None:
        self.write_json("model.json", lm.describe())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _inside_open_run(p: Path) -> "RunFolder | None":
    r = p.resolve()
    for run in _OPEN:
        if run._staged and r.is_relative_to(run.path.resolve()):
            return run
    return None


def open_runs() -> list[RunFolder]:
    """Staged runs of this process not yet committed or aborted."""
    return list(_OPEN)


def commit_open_runs(exclude: Iterable[RunFolder] = ()) -> list[Path]:
    """Commit every open staged run except ``exclude`` (the command line commits the runs its command
    opened, when it succeeded)."""
    ex = {id(r) for r in exclude}
    return [run.commit() for run in list(_OPEN) if id(run) not in ex]


def abort_open_runs(exclude: Iterable[RunFolder] = ()) -> None:
    """Discard every open staged run except ``exclude`` (on an error or an interruption)."""
    ex = {id(r) for r in exclude}
    for run in reversed(list(_OPEN)):
        if id(run) not in ex:
            run.abort()
