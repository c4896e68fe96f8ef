"""Each tensor's reference state (its SVD, or its vector) computed once and kept on disk, not in memory.

A sweep projects every tensor at every grid point (rho x kind x model), and every projection needs the
tensor's reference state :meth:`weightspace.reference.Reference.prepare` (for a reference update: the left
singular vectors ``U`` and values ``S``, float64 unless the matrix is huge). Computing it once per grid
point repeats every SVD dozens of times; keeping every tensor's state in memory for the whole sweep holds
about 1 to 2x the float32 model per worker (``U`` of an ``m x n`` matrix is ``m x min(m, n)`` float64), on
top of the model being scored, so a sweep's memory grew with the model. :class:`BasisCache` keeps each
tensor's state in one safetensors file of a folder (the sweep uses a hidden folder inside its staging run
folder and deletes it at the end): a projection loads one tensor's state, uses it and drops it, so the memory
beyond the model scored is about the largest tensor's working set, whatever the model's size.

Bit for bit: a state read back equals the state computed (safetensors stores the raw bytes; ``U`` as the SVD
returns it, column-major, is stored transposed and read back as the same column-major view; ``total`` is
stored as a hex float), so the projections, energies and scores are those of states kept in memory.

A cache whose folder does not exist (a Ray worker on another machine, without the driver's file system)
computes a tensor's state whenever it is asked for and drops it: the same numbers, more time, no more memory.

Example::

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from weightspace.checkpoints import open_checkpoint
    >>> from weightspace.deltas import DeltaSpec
    >>> from weightspace.plan import match_checkpoints
    >>> from weightspace.reference import DeltaReference
    >>> a, b = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> save_file({"w": torch.zeros(3, 2)}, a + "/model.safetensors")
    >>> save_file({"w": torch.tensor([[1., 0.], [0., 2.], [0., 0.]])}, b + "/model.safetensors")
    >>> plan = match_checkpoints({"A": open_checkpoint(a), "B": open_checkpoint(b)})
    >>> ref = DeltaReference(DeltaSpec("ref", plan.checkpoints["B"], plan.checkpoints["A"]))
    >>> cache = BasisCache(tempfile.mkdtemp(), ref, plan.tensors)
    >>> cache.fill()
    >>> cache["w"].spectrum.S.tolist(), len(list(cache.folder.glob("*.safetensors")))
    ([2.0, 1.0], 1)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from workbench.errors import WorkbenchError

from weightspace.plan import TensorInfo
from weightspace.reference import Prepared, Reference
from weightspace.spectral import KINDS, Spectrum

__all__ = ["BasisCache", "FOLDER_PREFIX", "encode", "decode"]

FOLDER_PREFIX = ".reference-bases-"  # the sweep's cache folder inside its staging run folder


def _file_name(name: str) -> str:
    """A file name for a tensor name (names may hold characters a file system refuses)."""
    return hashlib.sha256(name.encode()).hexdigest()[:24] + ".safetensors"


def _put(tensors: dict[str, torch.Tensor], meta: dict[str, str], key: str, t: torch.Tensor) -> None:
    """Store ``t`` without a copy where it is a transposed view (an SVD's column-major ``U``, an analysis-layout
    view) and record the layout, so that it is read back with the same strides."""
    if t.ndim == 2 and not t.is_contiguous() and t.T.is_contiguous():
        tensors[key], meta[key + ".layout"] = t.T, "transposed"
    else:
        tensors[key] = t.contiguous()


def _get(tensors: dict[str, torch.Tensor], meta: dict[str, str], key: str) -> torch.Tensor | None:
    t = tensors.get(key)
    if t is not None and meta.get(key + ".layout") == "transposed":
        t = t.T
    return t


def encode(name: str, prepared: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of one tensor's state (a :class:`Prepared` or ``None``) for a safetensors file."""
    meta = {"name": name}
    tensors: dict[str, torch.Tensor] = {}
    if prepared is None:
        meta["state"] = "none"
        return tensors, meta
    if not isinstance(prepared, Prepared):
        raise WorkbenchError(f"internal: cannot store a reference state of type {type(prepared).__name__}")
    meta["state"] = "prepared"
    meta["zero"] = "1" if prepared.zero else "0"
    sp = prepared.spectrum
    if sp is not None:
        _put(tensors, meta, "U", sp.U)
        _put(tensors, meta, "S", sp.S)
        meta.update({"total": float(sp.total).hex(), "m": str(sp.m), "n": str(sp.n), "method": sp.method,
                     "seed": str(sp.seed)})
    if prepared.vector is not None:
        _put(tensors, meta, "vector", prepared.vector)
    return tensors, meta


def decode(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Any:
    """The state :func:`encode` stored."""
    if meta.get("state") == "none":
        return None
    sp = None
    if "U" in tensors:
        sp = Spectrum(_get(tensors, meta, "U"), _get(tensors, meta, "S"), float.fromhex(meta["total"]),
                      int(meta["m"]), int(meta["n"]), meta["method"], int(meta["seed"]))
    return Prepared(zero=meta["zero"] == "1", spectrum=sp, vector=_get(tensors, meta, "vector"))


class BasisCache:
    """``cache[name]``: the reference state of tensor ``name``, read from ``folder`` (computed and written there
    the first time; :meth:`fill` computes every tensor's up front).

    ``tensors``: the tensors the cache serves (``name in cache`` is False for others, so a projection prepares
    those itself); ``kinds`` / ``max_rho`` / ``operator``: what :meth:`Reference.prepare` is asked for (the
    sweep: its kinds and its largest rho). The cache holds no tensor: each read is one file, dropped by the
    caller after use. ``folder=None``, or a folder that does not exist here: nothing is stored, every read
    computes (see the module docstring).
    """

    def __init__(self, folder: str | Path | None, reference: Reference, tensors: Iterable[TensorInfo], *,
                 kinds: Sequence[str] = KINDS, max_rho: float = 1.0, operator: str = "projector") -> None:
        self.folder = Path(folder) if folder is not None else None
        self.reference = reference
        self.infos = {t.name: t for t in tensors}
        self.kinds, self.max_rho, self.operator = tuple(kinds), float(max_rho), operator

    @property
    def stored(self) -> bool:
        """Whether the states go to disk here (the folder exists on this machine)."""
        return self.folder is not None and self.folder.is_dir()

    def path(self, name: str) -> Path:
        if self.folder is None:
            raise WorkbenchError("internal: this basis cache has no folder")
        return self.folder / _file_name(name)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def compute(self, name: str) -> Any:
        """The state of ``name``, computed (not stored)."""
        return self.reference.prepare(self.infos[name], operator=self.operator, kinds=self.kinds,
                                      max_rho=self.max_rho)

    def _write(self, name: str, prepared: Any) -> None:
        from safetensors.torch import save_file

        path = self.path(name)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tensors, meta = encode(name, prepared)
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none

    def __getitem__(self, name: str) -> Any:
        if name not in self.infos:
            raise KeyError(name)
        if self.stored:
            path = self.path(name)
            if path.is_file():
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
                if meta.get("name") != name:
                    raise WorkbenchError(f"internal: {path} holds the reference state of {meta.get('name')!r}, "
                                         f"not of {name!r}")
                return decode(tensors, meta)
            prepared = self.compute(name)
            self._write(name, prepared)
            return prepared
        return self.compute(name)

    def fill(self, progress: Any = None) -> None:
        """Compute and write every tensor's state not on disk yet, one tensor in memory at a time.

        ``progress``: wraps the list of names (a progress bar), or None."""
        if not self.stored:
            raise WorkbenchError(f"the basis cache folder {self.folder} does not exist")
        names = [n for n in self.infos if not self.path(n).is_file()]
        for name in (progress(names) if progress is not None else names):
            self._write(name, self.compute(name))

    def disk_bytes(self) -> int:
        """Bytes of the state files written so far."""
        if not self.stored:
            return 0
        return sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))  # type: ignore[union-attr]
