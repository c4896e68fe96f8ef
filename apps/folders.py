"""Read run folders for the Probes and Weight space tabs: their PNG plots and CSV / JSON tables.

Nothing here knows a folder's exact layout: probe runs (``probe_layers.json``,
``probe_auroc_vs_layer.png``, ``overlap.csv``, ``overlap_*.png``), weight-space runs and main-job
folders (with ``probes/`` and ``overlap/`` subfolders) are all read the same way: every PNG and every
table, searched a few levels deep.

Every folder is read only inside the app's runs root (see :mod:`apps.paths`): a folder outside it, or a
symlink inside it that points outside, is neither listed nor read.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "probe_layers.csv").write_text("layer,auroc\\n0,0.5\\n1,0.9\\n")
>>> view = scan_folder(d, root=d)
>>> [p.name for p in view.tables], read_table(view.tables[0]).shape
(['probe_layers.csv'], (2, 2))
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apps.paths import is_inside, readable_folder, resolve_root
from workbench.errors import WorkbenchError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
TABLE_EXTS = (".csv", ".json")
MAX_DEPTH = 3
MAX_FILES = 200
MAX_TABLE_BYTES = 20_000_000


@dataclass
class FolderView:
    root: Path
    images: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)

    def rel(self, p: Path) -> str:
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)

    def find(self, name: str) -> Path | None:
        """The shallowest file with this name (e.g. ``probe_auroc_vs_layer.png``)."""
        for p in sorted(self.images + self.tables, key=lambda q: (len(q.parts), str(q))):
            if p.name == name:
                return p
        return None

    def images_matching(self, prefix: str) -> list[Path]:
        return [p for p in self.images if p.name.startswith(prefix)]


def _walk(root: Path, depth: int, limit: Path | None = None) -> list[Path]:
    """Files under ``root`` (symlinked folders not followed; symlinked files only when they resolve inside
    ``limit``, the runs root)."""
    out: list[Path] = []
    limit = root if limit is None else limit
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return out
    for p in entries:
        if p.name.startswith("."):
            continue
        if p.is_dir() and not p.is_symlink():
            if depth < MAX_DEPTH:
                out.extend(_walk(p, depth + 1, limit))
        elif p.is_file() and (not p.is_symlink() or is_inside(p, limit)):
            out.append(p)
        if len(out) > MAX_FILES * 4:
            break
    return out


def scan_folder(path: str | Path, *, root: str | Path) -> FolderView:
    """Every image and table under ``path`` (a few levels deep), which must lie inside the runs root
    ``root`` (relative paths are relative to it); a clear error for a bad folder, the same one whether it
    is missing or outside the root."""
    limit = resolve_root(root)
    folder = readable_folder(path, limit, "run folder")
    root = folder
    files = _walk(root, 0, limit)
    view = FolderView(root,
                      [p for p in files if p.suffix.lower() in IMAGE_EXTS][:MAX_FILES],
                      [p for p in files if p.suffix.lower() in TABLE_EXTS][:MAX_FILES])
    if not view.images and not view.tables:
        raise WorkbenchError(f"{root} holds no plots (.png) or tables (.csv, .json)")
    return view


def read_table(path: str | Path) -> Any:
    """A CSV or a JSON list of records as a pandas DataFrame; other JSON as a Python object."""
    import pandas as pd

    p = Path(path)
    if p.stat().st_size > MAX_TABLE_BYTES:
        raise WorkbenchError(f"{p} is larger than {MAX_TABLE_BYTES // 1_000_000} MB; open it outside the app")
    if p.suffix.lower() == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        df = pd.DataFrame(rows)
        for c in df.columns:
            conv = pd.to_numeric(df[c], errors="coerce")
            if conv.notna().sum() == df[c].astype(bool).sum():
                df[c] = conv
        return df
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{p} is not valid JSON ({e.msg})") from None
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        return pd.DataFrame(obj)
    return obj


def load_image(path: str | Path) -> Any:
    """A PIL image read into memory (so Gradio need not serve files from arbitrary folders)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.copy()


def find_run_folders(roots: list[str | Path], markers: tuple[str, ...], max_depth: int = 4) -> list[str]:
    """Folders under ``roots`` that contain any of the ``markers`` files or glob patterns (newest first)."""
    found: dict[str, float] = {}

    def visit(d: Path, depth: int) -> None:
        try:
            entries = list(d.iterdir())
        except OSError:
            return
        names = [e.name for e in entries]
        if any((m in names) if "*" not in m else any(Path(n).match(m) for n in names) for m in markers):
            try:
                found[str(d)] = d.stat().st_mtime
            except OSError:
                pass
        if depth < max_depth:
            for e in entries:
                if e.is_dir() and not e.is_symlink() and not e.name.startswith("."):
                    visit(e, depth + 1)

    for r in roots:
        r = Path(r)
        if r.is_dir():
            visit(r, 0)
    return [k for k, _ in sorted(found.items(), key=lambda kv: -kv[1])][:50]


__all__ = ["FolderView", "scan_folder", "read_table", "load_image", "find_run_folders"]
