"""Atomic file writes and hashing helpers.

Every artefact is written to a temporary file in the same folder and renamed into place, so a
crash never leaves a half-written result.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> write_json(d / "x.json", {"a": 1})
>>> read_json(d / "x.json")
{'a': 1}
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def _atomic(path: Path, writer: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: Path | str, text: str) -> None:
    """Write text atomically."""

    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic(Path(path), w)


def _default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def write_json(path: Path | str, obj: Any) -> None:
    """Write JSON atomically (tensors and numpy values become lists/numbers)."""
    write_text(path, json.dumps(obj, indent=2, default=_default, allow_nan=True) + "\n")


def read_json(path: Path | str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_csv(path: Path | str, rows: list[dict[str, Any]]) -> None:
    """Write a list of dicts as CSV atomically (columns: union of keys, in first-seen order)."""
    import csv
    import io

    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=cols)
    wr.writeheader()
    for r in rows:
        wr.writerow(r)
    write_text(path, buf.getvalue())


def save_tensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors atomically."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(clean, tmp, metadata=metadata))


def load_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def sha256_file(path: Path | str, chunk: int = 1 << 22) -> str:
    """sha256 hex digest of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_text(json.dumps(obj, sort_keys=True, default=_default))


def save_figure(fig: Any, path: Path | str, dpi: int = 120) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    def w(tmp: str) -> None:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")

    _atomic(Path(path), w)
    plt.close(fig)
