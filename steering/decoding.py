"""Batched greedy decoding with the KV cache, one locked forward pass per step (what the batteries decode with).

:func:`greedy_decode` takes prompts with their own token limits and stop rules, optionally in several
**parts** (prompt sets of different lengths: each part is prefilled on its own, left-padded to its own width,
then every part's rows continue in one decoding loop, so the parts share the steps' fixed cost instead of
paying it one after another), optionally with **answers** teacher-forced in the prefill (their NLL without a
second pass over the prompts). Interventions see the caller's row ids, so
:class:`~workbench.interventions.OnRows` steers some rows only: several settings decode in one batch.

>>> from workbench.backends import get_backend
>>> from workbench.loading import from_memory
>>> from workbench.tiny import build_tiny
>>> be = get_backend("native", from_memory(*build_tiny("llama", n_layers=2)))
>>> out = greedy_decode(be, ["hi", "Tell me a story", "hello"], None, max_new_tokens=[3, 5, 1], parts=[0, 1, 0])
>>> len(out)
3
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from workbench.arch import cache_kwarg, crop_cache, join_caches, new_cache, plain_cache
from workbench.backends.base import Backend
from workbench.chat import ChatFormat, encode
from workbench.errors import WorkbenchError
from workbench.interventions import HookContext, Intervention

__all__ = ["greedy_decode", "teacher_forcing_exact", "prefill_batches"]

Lock = Any
Stop = Callable[[str], bool]


def teacher_forcing_exact(backend: Backend, interventions: Sequence[Intervention]) -> bool:
    """Whether answers teacher-forced in :func:`greedy_decode`'s prefill score as
    :func:`workbench.scoring.completion_nll` does: every intervention touches every position (``apply_to='all'``,
    so an answer's tokens count the same as prompt or as generated ones) and the model's cache is a plain one
    that can be cut back (no sliding window)."""
    if not plain_cache(backend.lm.model):
        return False
    return all(iv.apply_to == "all" for iv in interventions)  # OnRows carries its inner intervention's rule


@dataclass
class _Rows:
    """Rows being decoded: their KV cache, mask and next inputs. (A decoding step's positions all lie past every
    prompt, so its hook context needs no left pads: every position rule reads them as real, generated ones.)"""

    rows: list[int]  # the caller's prompt index of each row
    cache: Any
    mask: torch.Tensor
    pos: torch.Tensor  # [B, 1] the position of each row's next input
    nxt: list[int]  # each row's next input token
    width: int  # the cache's length
    ids: dict[int, list[int]] = field(default_factory=dict)


def greedy_decode(backend: Backend, prompts: Sequence[str], fmt: ChatFormat | None, *,
                  max_new_tokens: int | Sequence[int], interventions: Sequence[Intervention] = (),
                  lock: Lock | None = None, batch_size: int = 8,
                  stop: Stop | None | Sequence[Stop | None] = None,
                  on_batch: Callable[[int], None] | None = None,
                  first_step: list[torch.Tensor] | None = None,
                  answers: Sequence[str | None] | None = None,
                  answer_nll: list[list[tuple[float, int]]] | None = None,
                  parts: Sequence[int] | None = None,
                  on_row: Callable[[int, str], None] | None = None) -> list[str]:
    """Greedy replies for every prompt (batches of prompts of similar length, left-padded), each step a forward
    pass with the KV cache taken under ``lock`` with the hooks registered inside it. A row ends at an
    end-of-sequence token, after its ``max_new_tokens`` (one for all or one per prompt), or when its
    ``stop(text so far)`` is true (one rule for all or one per prompt); ended rows leave the batch (and its KV
    cache), so the remaining rows' steps get cheaper. The prompts' shared leading tokens run once per setting
    (the native backend's shared prefix, ``prefill_shared``). ``on_batch(k)``: ``k`` more rows finished;
    ``on_row(i, reply)``: prompt ``i``'s reply is final (e.g. to start checking it while the others decode).

    Without ``parts``, each batch of ``batch_size`` prompts is prefilled and decoded on its own. With ``parts``
    (a part id per prompt), each part's prompts are prefilled in batches of ``batch_size`` on their own and then
    **all** rows decode in one loop (the caller sizes the parts; rows of different widths are joined with
    :func:`workbench.arch.join_caches`; on a model whose cache cannot be joined the batches decode one after
    another, with the same replies).

    Interventions see the caller's row ids (:attr:`workbench.interventions.HookContext.rows`: the index of the
    prompt in ``prompts``), so :class:`~workbench.interventions.OnRows` can steer some prompts only. With
    ``first_step`` (a list), the next-token log-probabilities ``[len(prompts), V]`` at each prompt's last
    position (interventions active) are appended to it: what a forward over the prompts alone gives.

    With ``answers`` (a text, or None, per prompt) and ``answer_nll`` (a list), each answer is teacher-forced
    right after its prompt in the same prefill (the cache is cut back to the prompt before decoding) and the
    list of every prompt's (summed NLL, answer tokens) ((0.0, 0) without an answer) is appended to
    ``answer_nll``: what :func:`workbench.scoring.completion_nll` gives, without a second pass over the prompts.
    Only where that is exact (:func:`teacher_forcing_exact`; raised otherwise)."""
    lock = lock if lock is not None else nullcontext()
    prompts = list(prompts)
    k = len(prompts)
    limits = [int(max_new_tokens)] * k if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
    stops: list[Stop | None] = list(stop) if isinstance(stop, (list, tuple)) else [stop] * k  # type: ignore[list-item]
    part_of = list(parts) if parts is not None else None
    for what, v in (("max_new_tokens", limits), ("stop rules", stops), ("parts", part_of)):
        if v is not None and len(v) != k:
            raise WorkbenchError(f"{len(prompts)} prompts but {len(v)} {what}")
    if any(m < 1 for m in limits):
        raise WorkbenchError(f"max_new_tokens must be >= 1, got {min(limits)}")
    lm = backend.lm
    tok = lm.tokenizer
    with lock:
        full = encode(tok, prompts, fmt, max_positions=lm.max_positions)
        answer_ids: list[list[int]] | None = None
        if answers is not None:
            if answer_nll is None or len(answers) != k:
                raise WorkbenchError(f"answers need an answer_nll list and one answer (or None) per prompt "
                                     f"({k} prompts, {len(answers)} answers)")
            if not teacher_forcing_exact(backend, interventions):
                raise WorkbenchError("answers can be teacher-forced in the decoding prefill only when every "
                                     "intervention applies to all positions and the model has no sliding window; "
                                     "score them with workbench.scoring.completion_nll")
            answer_ids = [tok(a, add_special_tokens=False)["input_ids"] if a else [] for a in answers]
            for i, a in enumerate(answer_ids):
                if lm.max_positions and int(full.lengths[i]) + len(a) > lm.max_positions:
                    raise WorkbenchError(f"prompt {i} and its answer take {int(full.lengths[i]) + len(a)} tokens, "
                                         f"more than the model's context of {lm.max_positions}")
    out: dict[int, str] = {}
    first: list[torch.Tensor | None] = [None] * k
    nlls: list[tuple[float, int]] = [(0.0, 0)] * k
    eos = set(backend.eos_ids())
    ivs = list(interventions)

    def finish(rows: list[int], ids: dict[int, list[int]]) -> None:
        """Rows whose replies are final: decoded once, reported."""
        if not rows:
            return
        with lock:
            done = {i: tok.decode(ids[i], skip_special_tokens=True) for i in rows}
        out.update(done)
        if on_row is not None:
            for i, text in done.items():
                on_row(i, text)
        if on_batch is not None:
            on_batch(len(rows))

    def choose(r: _Rows, new: list[int]) -> list[int]:
        """Append each row's new token; the batch-local rows that ended."""
        ended = []
        for j, (i, t) in enumerate(zip(r.rows, new)):
            if t in eos:
                ended.append(j)
                continue
            r.ids[i].append(int(t))
            s = stops[i]
            if len(r.ids[i]) >= limits[i] or (s is not None and s(tok.decode(r.ids[i], skip_special_tokens=True))):
                ended.append(j)
        return ended

    def advance(r: _Rows, new: list[int]) -> bool:
        """Take each row's new token; ended rows leave the batch and its cache. False once none is left."""
        ended = choose(r, new)
        finish([r.rows[j] for j in ended], r.ids)
        if len(ended) == len(r.rows):
            r.rows = []
            return False
        if ended:
            gone = set(ended)
            kept = [j for j in range(len(r.rows)) if j not in gone]
            sel = torch.tensor(kept, dtype=torch.long, device=r.mask.device)
            r.cache.batch_select_indices(sel)
            r.mask, r.pos = r.mask[sel], r.pos[sel]
            r.rows = [r.rows[j] for j in kept]
            new = [new[j] for j in kept]
        r.nxt = new
        return True

    def prefill(idx: list[int]) -> _Rows | None:
        """The prompts ``idx`` (and their answers) in one forward: their first tokens chosen; None if all ended."""
        rows = torch.tensor(idx, dtype=torch.long)
        with lock:
            batch = encode(tok, [prompts[i] for i in idx], fmt).to(lm.device)
            shared = getattr(backend, "prefill_shared", None)
            n, cache, nxt, mask, pos = (shared(batch, ivs, rows) if shared is not None
                                        else (0, None, batch.input_ids, batch.attention_mask, batch.position_ids))
        ctx = backend.context(batch)
        ctx.rows, ctx.offset, ctx.shared = rows, n, n
        cache = cache if cache is not None else new_cache(lm.model)
        width = int(mask.shape[1])  # the cache's length once the prompts are in
        inp, inp_mask, inp_pos, keep = nxt, mask, pos, 1
        ans = [answer_ids[i] for i in idx] if answer_ids is not None else []
        n_ans = max((len(a) for a in ans), default=0)
        if n_ans:  # each row's answer after its prompt, right-padded
            a_ids = torch.full((len(idx), n_ans), backend.pad_id(), dtype=nxt.dtype)
            a_mask = torch.zeros((len(idx), n_ans), dtype=mask.dtype)
            for r, a in enumerate(ans):
                a_ids[r, :len(a)] = torch.tensor(a, dtype=nxt.dtype)
                a_mask[r, :len(a)] = 1
            inp = torch.cat([nxt, a_ids.to(nxt.device)], dim=1)
            inp_mask = torch.cat([mask, a_mask.to(mask.device)], dim=1)
            inp_pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(n_ans, device=pos.device)], dim=1)
            keep = n_ans + 1
        fns = backend.site_functions((), ivs, ctx, None)
        with lock, torch.no_grad(), backend.hooked(ctx, fns):
            logits = lm.model(input_ids=inp, attention_mask=inp_mask, position_ids=inp_pos, use_cache=True,
                              logits_to_keep=keep, **{cache_kwarg(lm.model): cache}).logits
            if n_ans:  # the answers' NLL, then the cache back to the prompts
                for r, a in enumerate(ans):
                    if a:
                        lp = torch.log_softmax(logits[r, :len(a)].float(), -1)
                        tgt = torch.tensor(a, dtype=torch.long, device=lp.device)
                        nlls[idx[r]] = (float(-lp[torch.arange(len(a)), tgt].sum()), len(a))
                crop_cache(cache, width)
            last = logits[:, 0] if n_ans else logits[:, -1]
            if first_step is not None:
                lps = torch.log_softmax(last.float(), -1).cpu()
                for r, i in enumerate(idx):
                    first[i] = lps[r]
            new = last.argmax(-1).tolist()
        st = _Rows(list(idx), cache, mask, pos[:, -1:], [], width, {i: [] for i in idx})
        return st if advance(st, new) else None

    def loop(r: _Rows) -> None:
        """Decode ``r`` until every row has ended."""
        ctx = HookContext(pads=torch.zeros(len(r.rows), dtype=torch.long), prompt_width=r.width, n_post=full.n_post)
        fns = backend.site_functions((), ivs, ctx, None)
        while r.rows:
            ctx.pads, ctx.rows = torch.zeros(len(r.rows), dtype=torch.long), torch.tensor(r.rows, dtype=torch.long)
            r.mask = torch.cat([r.mask, torch.ones((r.mask.shape[0], 1), dtype=r.mask.dtype, device=r.mask.device)],
                               dim=1)
            r.pos = r.pos + 1
            nxt = torch.tensor([r.nxt], dtype=torch.long, device=r.mask.device).T
            ctx.offset = r.width  # the absolute index of this step's token (before the hooks start counting)
            with lock, torch.no_grad(), backend.hooked(ctx, fns):
                logits = lm.model(input_ids=nxt, attention_mask=r.mask, position_ids=r.pos, use_cache=True,
                                  logits_to_keep=1, **{cache_kwarg(lm.model): r.cache}).logits[:, -1]
                new = logits.argmax(-1).tolist()
            r.width += 1
            advance(r, new)

    def batches(idx: list[int]) -> list[list[int]]:
        order = sorted(idx, key=lambda i: int(full.lengths[i]))
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]

    if part_of is None:
        for b in batches(list(range(k))):
            st = prefill(b)
            if st is not None:
                loop(st)
    else:
        real = [full.input_ids[i, int(full.pads[i]):].tolist() for i in range(k)]
        n_ans = [len(answer_ids[i]) if answer_ids is not None else 0 for i in range(k)]
        groups = [b for p in dict.fromkeys(part_of)
                  for b in prefill_batches([i for i in range(k) if part_of[i] == p], real, n_ans, batch_size)]
        states = [st for st in (prefill(b) for b in groups) if st is not None]
        if len(states) > 1 and plain_cache(lm.model):
            loop(_join(states))
        else:
            for st in states:
                loop(st)
    texts = [out[i] for i in range(k)]
    if first_step is not None:
        first_step.append(torch.stack(first))  # type: ignore[arg-type]
    if answer_nll is not None and answer_ids is not None:
        answer_nll.append(nlls)
    return texts


#: the cost of one more prefill pass, in padded tokens (a forward's fixed cost on a CPU, roughly)
PASS_TOKENS = 64


def prefill_batches(rows: Sequence[int], ids: Sequence[Sequence[int]], answers: Sequence[int], batch_size: int,
                    pass_tokens: int = PASS_TOKENS) -> list[list[int]]:
    """``rows`` split into prefill batches of at most ``batch_size`` that minimise the tokens a prefill computes:
    each batch costs its rows x (its longest prompt after the prefix all rows share + its longest answer), plus
    ``pass_tokens`` per pass. Rows are ordered by answer and prompt length and cut into runs (dynamic programming).

    >>> prefill_batches(range(8), [[1, 2]] * 8, [60, 1] * 4, 8)  # short and long answers apart
    [[1, 3, 5, 7], [0, 2, 4, 6]]
    >>> prefill_batches(range(8), [[1, 2]] * 8, [2, 1] * 4, 8)  # not worth a second pass
    [[1, 3, 5, 7, 0, 2, 4, 6]]
    """
    rows = list(rows)
    if not rows:
        return []
    shared = 0  # the prefix every row shares is computed once per batch: not part of a row's cost
    while all(len(ids[i]) > shared for i in rows) and len({ids[i][shared] for i in rows}) == 1:
        shared += 1
    order = sorted(rows, key=lambda i: (answers[i], len(ids[i])))
    best = [0.0] + [float("inf")] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        widest = longest = 0
        for start in range(end - 1, max(-1, end - 1 - batch_size), -1):
            widest = max(widest, len(ids[order[start]]) - shared)
            longest = max(longest, answers[order[start]])
            cost = best[start] + (end - start) * (widest + longest) + pass_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    out: list[list[int]] = []
    end = len(order)
    while end:
        out.append(order[cut[end]:end])
        end = cut[end]
    return out[::-1]


def _join(states: list[_Rows]) -> _Rows:
    """Rows of several prefilled batches as one batch: every cache left-padded to the widest (masked)."""
    width = max(s.width for s in states)
    cache = join_caches([s.cache for s in states], [s.width for s in states])
    mask = torch.cat([torch.cat([s.mask.new_zeros((s.mask.shape[0], width - s.width)), s.mask], dim=1)
                      for s in states], dim=0)
    ids: dict[int, list[int]] = {}
    for s in states:
        ids.update(s.ids)
    return _Rows([i for s in states for i in s.rows], cache, mask, torch.cat([s.pos for s in states]),
                 [t for s in states for t in s.nxt], width, ids)
