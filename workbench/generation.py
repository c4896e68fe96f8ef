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


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


def auto_batch_size(backend: Backend, n_prompts: int, max_tokens: int, *, cap: int = 128,
                    budget_bytes: int | None = None) -> int:
    """The widest generation batch that fits a memory budget (default: a quarter of the available RAM,
    at most 8 GiB), at most ``cap`` and ``n_prompts`` rows.

    Decoding on a CPU is memory-bound: a decode step at batch 64 costs little more than at batch 8, so
    wide batches are nearly free. Per row the estimate counts the KV cache (2 x layers x KV heads x head
    dim x ``max_tokens``) and the eager attention scores of one layer at prefill (heads x ``max_tokens``^2),
    in the model's dtype, times 2 for transient copies.

    >>> from workbench.tiny import build_tiny
    >>> from workbench.loading import from_memory
    >>> from workbench.backends import get_backend
    >>> auto_batch_size(get_backend("native", from_memory(*build_tiny("llama"))), 40, 96)
    40
    """
    cfg = backend.lm.model.config
    cfg = getattr(cfg, "text_config", cfg)
    layers = int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 1))
    heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1))
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    d = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 64))
    head_dim = int(getattr(cfg, "head_dim", None) or max(1, d // heads))
    elem = torch.finfo(backend.lm.dtype).bits // 8 if backend.lm.dtype.is_floating_point else 4
    per_row = 2 * (2 * layers * kv * head_dim * max_tokens + heads * max_tokens * max_tokens + 4 * d * max_tokens) * elem
    budget = budget_bytes if budget_bytes is not None else min(_available_bytes() // 4, 8 << 30)
    return int(max(1, min(cap, n_prompts, budget // max(1, per_row))))


def generate_texts(backend: Backend, prompts: Sequence[str], fmt: ChatFormat | None = None, *,
                   max_new_tokens: int = 64, interventions: Sequence[Intervention] = (),
                   batch_size: int | None = None, do_sample: bool = False, seed: int = 0,
                   progress: bool | str = False) -> list[str]:
    """Generate a completion for every prompt (greedy by default) under the given interventions.

    ``batch_size=None`` (default) sizes the batches for the machine (:func:`auto_batch_size`); a batch
    stops as soon as every row has ended."""
    return _generate(backend, prompts, fmt, max_new_tokens=max_new_tokens, interventions=interventions,
                     batch_size=batch_size, do_sample=do_sample, seed=seed, progress=progress, first=False)[0]


def generate_with_first_logprobs(backend: Backend, prompts: Sequence[str], fmt: ChatFormat | None = None, *,
                                 max_new_tokens: int = 64, interventions: Sequence[Intervention] = (),
                                 batch_size: int | None = None, progress: bool | str = False
                                 ) -> tuple[list[str], torch.Tensor]:
    """Greedy completions and the next-token log-probabilities ``[N, V]`` at the last prompt position under the
    interventions (what :func:`workbench.scoring.next_token_logprobs` computes), taken from the generation's
    own prefill where the backend records it (native), else by one extra forward pass.

    Example::

        >>> from workbench.loading import from_memory
        >>> from workbench.tiny import build_tiny
        >>> from workbench.backends import get_backend
        >>> from workbench.scoring import next_token_logprobs
        >>> be = get_backend("native", from_memory(*build_tiny("llama")))
        >>> texts, lp = generate_with_first_logprobs(be, ["Hi", "Tell me a story"], max_new_tokens=2)
        >>> torch.allclose(lp, next_token_logprobs(be, ["Hi", "Tell me a story"]), atol=1e-4)
        True
    """
    texts, lp = _generate(backend, prompts, fmt, max_new_tokens=max_new_tokens, interventions=interventions,
                          batch_size=batch_size, do_sample=False, seed=0, progress=progress,
                          first=backend.records_first_step)
    if lp is None:
        lp = map_last_logits(backend, prompts, fmt, next_token_logprobs_of, interventions=interventions)
    return texts, lp


def next_token_logprobs_of(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of next-token logits ``[B, V]`` (softmax in float64, returned float32 on the CPU)."""
    return torch.log_softmax(logits.double(), -1).float().cpu()


def _generate(backend: Backend, prompts: Sequence[str], fmt: ChatFormat | None, *, max_new_tokens: int,
              interventions: Sequence[Intervention], batch_size: int | None, do_sample: bool, seed: int,
              progress: bool | str, first: bool) -> tuple[list[str], torch.Tensor | None]:
    if max_new_tokens < 1:
        raise WorkbenchError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size is None:
        longest = max((len(t) for t in prompts), default=1) // 2 + 64  # a cheap upper bound on prompt tokens
        batch_size = auto_batch_size(backend, len(prompts), longest + max_new_tokens)
    out: list[str] = [""] * len(prompts)
    lps: list[Any] = [None] * len(prompts)
    for idx, b in batches(backend, prompts, fmt, batch_size, progress):
        kw: dict[str, Any] = {}
        rec: list[torch.Tensor] = []
        if first:
            kw["first_step"] = rec
        toks = backend.generate(b, max_new_tokens=max_new_tokens, interventions=interventions, do_sample=do_sample,
                                seed=seed, **kw)
        for i, text in zip(idx, backend.decode(toks)):
            out[i] = text
        if first:
            lp = next_token_logprobs_of(rec[0])
            for j, i in enumerate(idx):
                lps[i] = lp[j]
    return out, (torch.stack(lps) if first else None)


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
