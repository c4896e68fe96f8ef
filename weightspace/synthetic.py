"""Seeded synthetic fine-tunes: a checkpoint plus a small low-rank perturbation, written tensor by tensor.

For benchmarks and demos of the weight-space tools on real model sizes without training: every matrix
``W`` (analysis layout ``[out, in]``) becomes ``W + s (A B^T + C D^T)`` with ``A B^T`` of rank ``rank`` drawn
from the tensor's own seed and ``C D^T`` of rank ``common_rank`` drawn from ``common_seed`` (shared between
synthetic models made with the same ``common_seed``, so their updates overlap), scaled so that
``||Delta||_F = scale * ||W||_F``. Vectors (norms, biases) are copied unchanged. Memory: a few copies of one
tensor.

Example::

    >>> write_perturbed("qwen2.5-coder-0.5b-instruct", "/tmp/ft1", seed=1)   # doctest: +SKIP
    PosixPath('/tmp/ft1')
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError

from weightspace.checkpoints import Checkpoint, open_checkpoint
from weightspace.deltas import load_f32, to_stored
from weightspace.plan import match_checkpoints
from weightspace.spectral import tensor_seed
from weightspace.writer import TensorEntry, copy_model_files, stream_safetensors

__all__ = ["low_rank", "write_perturbed"]


def low_rank(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    """A seeded ``[m, n]`` float32 matrix of rank ``min(rank, m, n)`` (Gaussian factors).

    Example::

        >>> int(torch.linalg.matrix_rank(low_rank(6, 5, 2, seed=0)))
        2
    """
    g = torch.Generator().manual_seed(int(seed))
    r = max(1, min(rank, m, n))
    A = torch.randn(m, r, generator=g)
    B = torch.randn(n, r, generator=g)
    return A @ B.T


def write_perturbed(source: str | Path | Checkpoint, out: str | Path, *, rank: int = 4, scale: float = 1e-2,
                    seed: int = 0, common_rank: int = 0, common_seed: int = 12345, overwrite: bool = False,
                    progress: bool = False) -> Path:
    """Write ``source`` + a seeded low-rank perturbation of every matrix to the folder ``out``."""
    src = open_checkpoint(source, label="source")
    import tempfile

    from workbench.runs import check_out, replace_folder, write_marker

    out = Path(out)
    check_out(out, overwrite=overwrite, inputs=[src.folder])
    if scale <= 0 or rank < 1 or common_rank < 0:
        raise WorkbenchError("need scale > 0, rank >= 1 and common_rank >= 0")
    plan = match_checkpoints({"source": src})
    by_name = {t.name: t for t in plan.tensors}

    def produce(name: str) -> torch.Tensor:
        info = by_name[name]
        w = load_f32(src, info)
        if info.is_matrix:
            m, n = w.shape
            d = low_rank(m, n, rank, tensor_seed(seed, name))
            if common_rank:
                d += low_rank(m, n, common_rank, tensor_seed(common_seed, name))
            nw, nd = float(torch.linalg.matrix_norm(w)), float(torch.linalg.matrix_norm(d))
            if nw > 0 and nd > 0:
                w = w + d.mul_(scale * nw / nd)
            del d
        return to_stored(w, info, src.dtype(name))

    wrap: Any = None
    if progress:
        from tqdm.auto import tqdm

        wrap = lambda it: tqdm(it, desc=f"perturb -> {out.name}", unit="tensor")  # noqa: E731
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:  # written beside `out`, moved into place when complete (an earlier folder is replaced only then)
        copy_model_files(src.folder, tmp)
        entries = [TensorEntry(t.name, src.dtype(t.name), t.stored_shape) for t in plan.tensors]
        stream_safetensors(tmp / "model.safetensors", entries, produce, metadata={"format": "pt"}, progress=wrap)
        write_marker(tmp, kind="synthetic-checkpoint", complete=True)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
