"""Float32 tensors and deltas, read one tensor (or one block of rows) at a time.

Every value is converted from its stored dtype straight to float32 (bf16/fp16 -> fp32 is exact; nothing
goes through fp16) and checked for non-finite values. Matrices come back in the analysis layout
(``[out, in]``, see :mod:`weightspace.naming`) as views, without extra copies.

Example::

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from weightspace.checkpoints import open_checkpoint
    >>> from weightspace.plan import match_checkpoints
    >>> a, b = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> save_file({"w": torch.tensor([[1., 2.]], dtype=torch.bfloat16)}, a + "/model.safetensors")
    >>> save_file({"w": torch.tensor([[1.5, 2.]], dtype=torch.bfloat16)}, b + "/model.safetensors")
    >>> plan = match_checkpoints({"A": open_checkpoint(a), "B": open_checkpoint(b)})
    >>> spec = DeltaSpec("ft", plan.checkpoints["B"], plan.checkpoints["A"])
    >>> load_delta(spec, plan.tensors[0])
    tensor([[0.5000, 0.0000]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from workbench.errors import WorkbenchError

from weightspace.checkpoints import Checkpoint
from weightspace.plan import TensorInfo

__all__ = ["DeltaSpec", "load_f32", "load_delta", "delta_blocks", "to_stored", "BLOCK_ELEMENTS"]

BLOCK_ELEMENTS = 1 << 22  # rows per block are chosen so a block holds at most this many values


@dataclass(frozen=True)
class DeltaSpec:
    """A labelled update ``new - old`` between two checkpoints (e.g. ``Delta_T = W_FT - W_A``).

    Example::

        >>> spec = DeltaSpec("useful", open_checkpoint("runs/ft-useful"), open_checkpoint("runs/aligned"))  # doctest: +SKIP
        >>> spec.describe()["formula"]                                                                     # doctest: +SKIP
        'ft-useful - aligned'
    """

    label: str
    new: Checkpoint
    old: Checkpoint

    def describe(self) -> dict[str, str]:
        return {"label": self.label, "new": self.new.label, "old": self.old.label,
                "formula": f"{self.new.label} - {self.old.label}"}


def _check_finite(t: torch.Tensor, ck: Checkpoint, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise WorkbenchError(
            f"checkpoint '{ck.label}': tensor {name} has {bad} non-finite value(s) (nan or inf); refusing to "
            f"compute with it"
        )


def _orient(t: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    return t.T if (info.transpose and t.ndim == 2) else t


def _row_step(info: TensorInfo, block_elements: int) -> int:
    row = max(1, info.numel // max(1, info.stored_shape[0]))
    return max(1, block_elements // row)


def _read_into(ck: Checkpoint, info: TensorInfo, out: torch.Tensor, *, subtract: bool = False,
               block_elements: int = BLOCK_ELEMENTS) -> None:
    """Fill (or subtract from) ``out`` (stored layout, float32) block by block of rows.

    Each block is read with the file opened and closed again, so no file pages stay mapped: the peak is
    ``out`` plus one block, whatever the tensor's size.
    """
    if len(info.stored_shape) == 0:
        t = ck.read(info.name)
        _check_finite(t, ck, info.name)
        out.sub_(t.to(torch.float32)) if subtract else out.copy_(t)
        return
    rows = info.stored_shape[0]
    step = _row_step(info, block_elements)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        b = ck.read_rows(info.name, start, stop)
        _check_finite(b, ck, info.name)
        if subtract:
            out[start:stop].sub_(b.to(torch.float32))
        else:
            out[start:stop].copy_(b)
        del b


def load_f32(ck: Checkpoint, info: TensorInfo) -> torch.Tensor:
    """One tensor as float32 in the analysis layout (a transposed view for Conv1D / embeddings)."""
    out = torch.empty(info.stored_shape, dtype=torch.float32)
    _read_into(ck, info, out)
    return _orient(out, info)


def load_delta(spec: DeltaSpec, info: TensorInfo) -> torch.Tensor:
    """``new - old`` in float32, analysis layout. Peak memory: the delta plus one block of rows."""
    out = torch.empty(info.stored_shape, dtype=torch.float32)
    _read_into(spec.new, info, out)
    _read_into(spec.old, info, out, subtract=True)
    return _orient(out, info)


def delta_blocks(specs: list[DeltaSpec], info: TensorInfo,
                 block_elements: int = BLOCK_ELEMENTS) -> Iterator[list[torch.Tensor]]:
    """Blocks of stored rows of several deltas at once (same rows for every spec), as float32.

    Used for sums over elements (flattened cosines, norms) with memory bounded by ``block_elements``
    per tensor, whatever the tensor's size. Blocks are in the *stored* layout (sums do not care).
    """
    shape = info.stored_shape
    if len(shape) == 0:
        yield [load_delta(s, info).reshape(1) for s in specs]
        return
    step = _row_step(info, block_elements)
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        cache: dict[int, torch.Tensor] = {}
        out = []
        for s in specs:
            blocks = []
            for ck in (s.new, s.old):
                key = id(ck)
                if key not in cache:
                    b = ck.read_rows(info.name, start, stop)
                    _check_finite(b, ck, info.name)
                    cache[key] = b.to(torch.float32)
                blocks.append(cache[key])
            out.append(blocks[0] - blocks[1])
        yield out


def to_stored(w: torch.Tensor, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """Back from the analysis layout to the stored layout and dtype (contiguous)."""
    if w.ndim == 2 and info.transpose:
        w = w.T
    if tuple(w.shape) != tuple(info.stored_shape):
        raise WorkbenchError(f"internal: tensor {info.name} has shape {tuple(w.shape)}, expected {info.stored_shape}")
    return w.to(dtype).contiguous()
