"""Batched text generation (and batched forward scoring) over prompt lists, with progress.

>>> from workbench.tiny import build_tiny
>>> from workbench.loading import from_memory
>>> from workbench.backends import get_backend
>>> be = get_backend("native", from_memory(*build_tiny("llama")))
>>> outs = generate_texts(be, ["Hi", "Tell me a story"], max_new_tokens=4, progress=False)
>>> len(outs)
2
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

from workbench.backends.base import Backend
from workbench.chat import Batch, ChatFormat, encode
from workbench.errors import WorkbenchError
from workbench.interventions import Intervention


def batches(backend: Backend, prompts: Sequence[str], fmt: ChatFormat | None, batch_size: int,
            progress: bool | str = False) -> Iterator[tuple[list[int], Batch]]:
    """Yield (original indices, left-padded batch) with prompts sorted by token length."""
    prompts = list(prompts)
    if not prompts:
        raise WorkbenchError("the prompt set is empty: give at least one prompt")
    if batch_size < 1:
        raise WorkbenchError(f"batch_size must be >= 1, got {batch_size}")
    lm = backend.lm
    full = encode(lm.tokenizer, prompts, fmt, max_positions=lm.max_positions)
    order = sorted(range(len(prompts)), key=lambda i: int(full.lengths[i]))
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress if isinstance(progress, str) else "batches", unit="batch")
    for s in starts:
        idx = order[s:s + batch_size]
        yield idx, encode(lm.tokenizer, [prompts[i] for i in idx], fmt)


def generate_texts(backend: Backend, prompts: Sequence[str], fmt: ChatFormat | None = None, *,
                   max_new_tokens: int = 64, interventions: Sequence[Intervention] = (), batch_size: int = 8,
                   do_sample: bool = False, seed: int = 0, progress: bool | str = False) -> list[str]:
    """Generate a completion for every prompt (greedy by default) under the given interventions."""
    if max_new_tokens < 1:
        raise WorkbenchError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    out: list[str] = [""] * len(prompts)
    for idx, b in batches(backend, prompts, fmt, batch_size, progress):
        toks = backend.generate(b, max_new_tokens=max_new_tokens, interventions=interventions, do_sample=do_sample,
                                seed=seed)
        for i, text in zip(idx, backend.decode(toks)):
            out[i] = text
    return out


def map_last_logits(backend: Backend, prompts: Sequence[str], fmt: ChatFormat | None,
                    fn: Callable[[torch.Tensor], torch.Tensor], *, interventions: Sequence[Intervention] = (),
                    batch_size: int = 16, progress: bool | str = False) -> torch.Tensor:
    """Apply ``fn`` to the next-token logits at the last prompt position ``[B, V]``; concatenate in prompt order."""
    results: list[Any] = [None] * len(prompts)
    for idx, b in batches(backend, prompts, fmt, batch_size, progress):
        out = backend.run(b, interventions=interventions, logits="last")
        vals = fn(out.logits[:, -1].float())
        for j, i in enumerate(idx):
            results[i] = vals[j]
    return torch.stack(results)
