"""Every server path the app accepts stays inside its runs folder.

The app is a server: a path typed into it (a run folder to load, a probe sweep's output folder, a vector
file, a probes run folder) names a file on the *server*. Each one is resolved (symlinks and ``..``
included, :meth:`pathlib.Path.resolve`) and must lie inside the runs root (``workbench app --runs``,
default ``runs``); a relative path is relative to that root. Nothing outside it is read, listed or
written. A file that is missing, unreadable or outside the root gets one and the same message, so the
app cannot be used to learn which files exist on the server.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> confine("sweep-1", root) == root.resolve() / "sweep-1"
True
>>> try:
...     confine("../elsewhere", root)
... except WorkbenchError as e:
...     print(str(e).split(";")[0].replace(str(root.resolve()), "<root>"))
'../elsewhere' is outside the runs folder <root>
"""

from __future__ import annotations

import os
from pathlib import Path

from workbench.errors import WorkbenchError


def resolve_root(root: str | Path) -> Path:
    """The runs root as an absolute path without symlinks (it need not exist yet)."""
    try:
        return Path(root).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise WorkbenchError(f"bad runs folder {str(root)!r}: {e}") from None


def _resolved_inside(user_path: str | Path, root: Path) -> Path | None:
    """``user_path`` (relative to ``root`` unless absolute) resolved, or None when it is outside ``root`` or
    cannot be resolved at all (a NUL byte, a symlink loop)."""
    try:
        full = (root / Path(str(user_path).strip())).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return full if full == root or root in full.parents else None


def is_inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` (resolved) lies inside ``root`` (resolved) or is ``root`` itself."""
    return _resolved_inside(path, resolve_root(root)) is not None


def confine(user_path: str | Path | None, root: str | Path, what: str = "path", *, allow_root: bool = True) -> Path:
    """``user_path`` resolved, relative to ``root`` unless absolute; a :class:`WorkbenchError` naming the runs
    root when it lies outside it (through ``..``, an absolute path or a symlink). Use this for paths that are
    written; for reading use :func:`readable_file` / :func:`readable_folder` (no existence oracle).
    ``allow_root=False`` refuses the root itself (an output folder is staged next to its final place)."""
    r = resolve_root(root)
    if user_path is None or not str(user_path).strip():
        raise WorkbenchError(f"give {what} inside the runs folder {r}")
    full = _resolved_inside(user_path, r)
    if full is None:
        raise WorkbenchError(f"{str(user_path).strip()!r} is outside the runs folder {r}; give {what} inside it "
                             f"(a relative path is taken relative to it)")
    if full == r and not allow_root:
        raise WorkbenchError(f"{str(user_path).strip()!r} is the runs folder {r} itself; give {what} inside it")
    return full


def _refused(user_path: str | Path, root: Path, what: str) -> WorkbenchError:
    return WorkbenchError(f"no readable {what} {str(user_path).strip()!r} inside the runs folder {root}")


def readable_file(user_path: str | Path | None, root: str | Path, what: str = "file") -> Path:
    """A readable regular file inside ``root``; one message ("no readable <what> '<path>' inside the runs
    folder <root>") whether it is missing, unreadable, not a file or outside the root."""
    r = resolve_root(root)
    if user_path is None or not str(user_path).strip():
        raise WorkbenchError(f"give {what} inside the runs folder {r}")
    full = _resolved_inside(user_path, r)
    if full is None or not full.is_file() or not os.access(full, os.R_OK):
        raise _refused(user_path, r, what)
    return full


def readable_folder(user_path: str | Path | None, root: str | Path, what: str = "folder") -> Path:
    """A readable folder inside ``root`` (``root`` itself included); the same message whether it is missing,
    unreadable, not a folder or outside the root."""
    r = resolve_root(root)
    if user_path is None or not str(user_path).strip():
        raise WorkbenchError(f"give {what} inside the runs folder {r}")
    full = _resolved_inside(user_path, r)
    if full is None or not full.is_dir() or not os.access(full, os.R_OK | os.X_OK):
        raise _refused(user_path, r, what)
    return full


__all__ = ["confine", "readable_file", "readable_folder", "resolve_root", "is_inside"]
