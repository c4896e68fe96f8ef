"""Write a safetensors file one tensor at a time (atomically), and copy a model folder's other files.

:func:`stream_safetensors` writes the header first (names, dtypes, shapes are known up front), then asks
``produce(name)`` for each tensor in turn and appends its bytes, so only one tensor is in memory at a
time. The file is written through :func:`workbench.io._atomic` (temporary file + rename): a failure while
producing any tensor leaves no partial file behind.

Example::

    >>> import tempfile, torch
    >>> from safetensors.torch import load_file
    >>> p = tempfile.mkdtemp() + "/model.safetensors"
    >>> entries = [TensorEntry("a", torch.bfloat16, (2,)), TensorEntry("b", torch.float32, (1, 2))]
    >>> stream_safetensors(p, entries, lambda name: {"a": torch.ones(2, dtype=torch.bfloat16),
    ...                                              "b": torch.zeros(1, 2)}[name])
    >>> sorted((k, v.dtype, tuple(v.shape)) for k, v in load_file(p).items())
    [('a', torch.bfloat16, (2,)), ('b', torch.float32, (1, 2))]
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.io import _atomic

from weightspace.checkpoints import SAFETENSORS_DTYPES, WEIGHT_SUFFIXES

__all__ = ["TensorEntry", "stream_safetensors", "copy_model_files", "SKIP_FILES"]

_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# Files of a model folder that are not copied next to a new checkpoint: weights, indexes, provenance of
# the source (a zoo cache's provenance would be wrong for a derived model) and run artefacts.
SKIP_FILES = ("provenance.json", "model.safetensors.index.json")


@dataclass(frozen=True)
class TensorEntry:
    """Name, dtype and shape of one tensor to write."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * torch.empty((), dtype=self.dtype).element_size()


def _header(entries: Sequence[TensorEntry], metadata: dict[str, str] | None) -> tuple[bytes, list[TensorEntry]]:
    # Larger items first so every tensor starts at an offset aligned to its item size.
    order = sorted(entries, key=lambda e: -torch.empty((), dtype=e.dtype).element_size())
    head: dict[str, object] = {}
    if metadata:
        head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for e in order:
        if e.dtype not in _CODES:
            raise WorkbenchError(f"cannot write dtype {e.dtype} of {e.name} to safetensors")
        head[e.name] = {"dtype": _CODES[e.dtype], "shape": [int(s) for s in e.shape], "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return raw, order


def stream_safetensors(path: str | Path, entries: Sequence[TensorEntry], produce: Callable[[str], torch.Tensor],
                       metadata: dict[str, str] | None = None,
                       progress: Callable[[Sequence[TensorEntry]], Sequence[TensorEntry]] | None = None) -> None:
    """Write ``entries`` to ``path``, calling ``produce(name)`` once per tensor (one in memory at a time).

    ``produce`` must return a tensor of exactly the entry's dtype and shape. ``progress`` may wrap the
    iteration (e.g. ``tqdm``). Raises :class:`WorkbenchError` on a mismatch; nothing is left on disk then.
    """
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise WorkbenchError("duplicate tensor names in the checkpoint to write")
    raw, order = _header(entries, metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for e in (progress(order) if progress else order):
                t = produce(e.name)
                if t.dtype != e.dtype or tuple(t.shape) != tuple(e.shape):
                    raise WorkbenchError(f"tensor {e.name}: produced {t.dtype} {tuple(t.shape)}, "
                                         f"expected {e.dtype} {tuple(e.shape)}")
                t = t.detach().cpu().contiguous()
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                del t

    _atomic(Path(path), write)


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy the non-weight files of a model folder (config, generation config, tokenizer, chat template).

    Weight files, safetensors indexes and ``provenance.json`` are not copied. Returns the copied names.

    Example::

        >>> import tempfile, pathlib
        >>> a, b = pathlib.Path(tempfile.mkdtemp()), pathlib.Path(tempfile.mkdtemp())
        >>> _ = (a / "config.json").write_text("{}"); _ = (a / "model.safetensors").write_bytes(b"")
        >>> copy_model_files(a, b)
        ['config.json']
    """
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.suffix in WEIGHT_SUFFIXES or p.name in SKIP_FILES \
                or p.name.endswith(".index.json"):
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    if "config.json" not in copied:
        raise WorkbenchError(f"{src} has no config.json: the written checkpoint would not load with transformers")
    return copied
