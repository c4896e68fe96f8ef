"""The ``native`` backend: plain PyTorch forward hooks on the Hugging Face model.

Hooks are registered for the duration of one call and removed in a ``finally`` block, so the
model never keeps them, even when the call raises.

**Shared prompt prefix.** Chat-formatted prompts all start with the same tokens (the system prompt and the
user-turn header: 25 of the ~44 tokens of a built-in prompt on the default model). When every row of a batch
starts with the same ``P >= MIN_SHARED`` tokens, :meth:`NativeBackend.run` and :meth:`NativeBackend.generate`
compute those tokens once (batch 1, interventions active), repeat their KV cache over the batch and run only
the rest; captures and full logits are put back into the batch's usual left-padded layout, so callers see
the same tensors as from one full forward (to float rounding; pad columns hold no defined values either way).
It is used only when it cannot change a result: every intervention is position-wise
(:attr:`~workbench.interventions.Intervention.position_wise`) or restricted to some rows
(:class:`~workbench.interventions.OnRows`, several settings in one batch) around a position-wise one, in which
case the prefix runs once per distinct set of interventions (one row per setting, :func:`prefix_groups`), no
``last``/``post_instruction``/negative-index
position falls inside the prefix of any row, and the model's cache is a plain (non-sliding) one. Set
``backend.share_prefix = False`` to turn it off.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from workbench.arch import cache_kwarg, plain_cache
from workbench.backends.base import Backend, RunOutput, SiteFn, logits_kept
from workbench.chat import Batch
from workbench.interventions import HookContext, Intervention, OnRows
from workbench.sites import Site

#: the fewest shared leading tokens worth a separate prefix pass
MIN_SHARED = 8


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    return new


def prefix_safe(iv: Intervention) -> bool:
    """Whether ``iv`` may run on a shared prefix computed apart from the rest of the row: position-wise, or
    :class:`OnRows` around a position-wise intervention (then the prefix runs once per row group)."""
    return iv.position_wise or (isinstance(iv, OnRows) and iv.inner.position_wise)


def prefix_groups(interventions: Sequence[Intervention], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that get the same interventions share a prefix computation: ``(reps, group)`` with ``reps`` [G] the
    caller's id of one row per distinct set of :class:`OnRows` restrictions that covers it and ``group`` [B]
    each row's index into ``reps``. Without :class:`OnRows` every row is in one group.

    >>> from workbench.interventions import Addition
    >>> from workbench.sites import Site
    >>> a = OnRows(Addition(Site(0, "resid_pre"), torch.ones(2)), rows=[2, 3])
    >>> reps, group = prefix_groups([a], torch.tensor([0, 2, 1, 3]))
    >>> reps.tolist(), group.tolist()
    ([0, 2], [0, 1, 0, 1])
    """
    on_rows = [set(iv.rows.tolist()) for iv in interventions if isinstance(iv, OnRows)]
    sigs = [tuple(k for k, r in enumerate(on_rows) if int(row) in r) for row in rows.tolist()]
    first: dict[tuple[int, ...], int] = {}
    reps: list[int] = []
    group: list[int] = []
    for row, sig in zip(rows.tolist(), sigs):
        if sig not in first:
            first[sig] = len(reps)
            reps.append(int(row))
        group.append(first[sig])
    return torch.tensor(reps, dtype=torch.long), torch.tensor(group, dtype=torch.long)


class NativeBackend(Backend):
    """Plain PyTorch hooks (the default and fastest backend)."""

    records_first_step = True

    name = "native"
    #: compute a prompt prefix that every row shares once per batch (see the module docstring)
    share_prefix: bool = True

    # -- the shared-prefix path -------------------------------------------------------------------

    def shared_prefix(self, batch: Batch, interventions: Sequence[Intervention]) -> int:
        """How many leading tokens every row of ``batch`` shares and may be computed once (0: do not split)."""
        if not self.share_prefix or batch.size < 2 or not all(prefix_safe(iv) for iv in interventions):
            return 0
        if not plain_cache(self.lm.model):
            return 0  # sliding-window / hybrid caches: not split
        m = int(batch.lengths.min())
        reach = batch.n_post  # positions counted from the end must stay out of the prefix
        for iv in interventions:
            if not isinstance(iv.apply_to, str):
                reach = max([reach] + [-int(p) for p in iv.apply_to if int(p) < 0])
        limit = m - reach - 1
        if limit < MIN_SHARED:
            return 0
        pads = batch.pads.to(batch.input_ids.device)
        cols = pads.unsqueeze(1) + torch.arange(limit, device=pads.device).unsqueeze(0)
        real = batch.input_ids.gather(1, cols)
        diff = (real != real[:1]).any(0).nonzero()
        n = int(diff[0]) if len(diff) else limit
        return n if n >= MIN_SHARED else 0

    def _prefix_pass(self, batch: Batch, n: int, interventions: Sequence[Intervention], capture: Sequence[Site],
                     logits: bool, rows: torch.Tensor | None = None
                     ) -> tuple[Any, dict[Site, torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """Run the shared prefix once per row group (:func:`prefix_groups` of the caller's row ids ``rows``,
        default 0..B-1) with the interventions: its KV cache spread over the batch, its captures ``[G, n, d]``,
        (``logits``) its logits ``[G, n, V]`` and each row's group ``[B]``."""
        rows = torch.arange(batch.size) if rows is None else rows.cpu()
        reps, group = prefix_groups(interventions, rows)
        g = int(reps.shape[0])
        ids = batch.input_ids[:1, int(batch.pads[0]):int(batch.pads[0]) + n].expand(g, n)
        ctx = HookContext(pads=torch.zeros(g, dtype=torch.long), prompt_width=int(batch.lengths.min()),
                          n_post=batch.n_post, offset=0, rows=reps)
        store: dict[Site, torch.Tensor] = {}
        fns = self.site_functions(capture, interventions, ctx, store)
        with torch.no_grad(), self.hooked(ctx, fns):
            target = self.lm.model if logits else self.lm.model.base_model
            out = target(input_ids=ids, attention_mask=torch.ones_like(ids),
                         position_ids=torch.arange(n, device=ids.device).unsqueeze(0).expand(g, n), use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        if g == 1:
            cache.batch_repeat_interleave(batch.size)
        else:
            cache.batch_select_indices(group.to(ids.device))
        return cache, store, (out.logits if logits else None), group

    def prefill_shared(self, batch: Batch, interventions: Sequence[Intervention], rows: torch.Tensor | None = None
                       ) -> tuple[int, Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a decoding loop of its own (``steering.decoding.greedy_decode``): ``(n, cache, ids, mask, pos)``
        with the shared prefix's ``n`` tokens already in ``cache`` and the inputs of the rest (run them with
        ``HookContext(offset=n, shared=n)``); ``n == 0`` (cache None, the batch's own inputs) when no prefix
        may be split off."""
        batch = batch.to(self.lm.device)
        n = self.shared_prefix(batch, interventions)
        if not n:
            return 0, None, batch.input_ids, batch.attention_mask, batch.position_ids
        cache, _, _, _ = self._prefix_pass(batch, n, interventions, (), False, rows)
        ids, mask, pos = self._suffix(batch, n, self.pad_id())
        return n, cache, ids, mask, pos

    @staticmethod
    def _suffix(batch: Batch, n: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ids, attention mask over prefix + suffix, and position ids of the rows without their first ``n``
        tokens, left-padded as before (row ``i`` keeps its ``pads[i]``)."""
        width = batch.width - n
        col = torch.arange(width, device=batch.input_ids.device).unsqueeze(0)
        real = col >= batch.pads.to(col.device).unsqueeze(1)
        ids = torch.where(real, batch.input_ids[:, n:], torch.full_like(batch.input_ids[:, n:], pad_id))
        mask = torch.cat([torch.ones(batch.size, n, dtype=batch.attention_mask.dtype, device=col.device),
                          real.to(batch.attention_mask.dtype)], dim=1)
        pos = torch.where(real, batch.position_ids[:, n:], torch.ones_like(batch.position_ids[:, n:]))
        return ids, mask, pos

    @staticmethod
    def _reassemble(prefix: torch.Tensor, rest: torch.Tensor, pads: torch.Tensor,
                    group: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, ...]`` in the batch's left-padded layout from the prefix ``[G, n, ...]`` (row ``i`` takes
        the prefix of its ``group[i]``; G = 1 without groups) and the rest ``[B, T - n, ...]`` (row ``i``: pads,
        prefix, its own tokens)."""
        n = prefix.shape[1]
        b = rest.shape[0]
        if group is not None and prefix.shape[0] > 1:
            prefix = prefix[group.to(prefix.device)]
        out = torch.cat([rest.new_zeros((b, n) + tuple(rest.shape[2:])), rest], dim=1)
        cols = pads.to(rest.device).unsqueeze(1) + torch.arange(n, device=rest.device).unsqueeze(0)
        idx = cols.view(b, n, *([1] * (rest.dim() - 2))).expand(b, n, *rest.shape[2:])
        out.scatter_(1, idx, prefix.to(rest.dtype).expand(b, *prefix.shape[1:]))
        # columns left of a row's prefix are pads; the rest's pad columns that landed there are not values
        return out

    @contextmanager
    def hooked(self, ctx: HookContext, fns: dict[Site, SiteFn]) -> Iterator[None]:
        """Register the site functions (and the position tracker) for the duration of the block."""
        handles = []
        seen = {"n": ctx.offset}  # a chunk after a separately computed shared prefix starts at its length

        def track(module: Any, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            ctx.offset = seen["n"]
            seen["n"] += int(h.shape[1])

        try:
            handles.append(self.arch.layers[0].register_forward_pre_hook(track, with_kwargs=True))
            for site, fn in fns.items():
                layer = self.arch.layers[site.layer]
                if site.component == "resid_pre":

                    def pre(module: Any, args: tuple, kwargs: dict, _fn: SiteFn = fn) -> Any:
                        if args:
                            return (_fn(args[0]),) + tuple(args[1:]), kwargs
                        kwargs = dict(kwargs)
                        kwargs["hidden_states"] = _fn(kwargs["hidden_states"])
                        return args, kwargs

                    handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
                else:
                    module = {
                        "resid_post": layer,
                        "attn_out": self.arch.attn(site.layer),
                        "mlp_out": self.arch.mlp(site.layer),
                    }[site.component]

                    def post(module: Any, args: tuple, out: Any, _fn: SiteFn = fn) -> Any:
                        return _replace_first(out, _fn(_first(out)))

                    handles.append(module.register_forward_hook(post))
            yield
        finally:
            for h in handles:
                h.remove()

    def run(
        self,
        batch: Batch,
        *,
        capture: Sequence[Site] = (),
        interventions: Sequence[Intervention] = (),
        logits: bool | str | int = True,
    ) -> RunOutput:
        model = self.lm.model
        batch = batch.to(self.lm.device)
        keep = logits_kept(logits)
        n = self.shared_prefix(batch, interventions)
        if n:
            return self._run_shared(batch, n, capture, interventions, logits)
        ctx = self.context(batch)
        store: dict[Site, torch.Tensor] = {}
        fns = self.site_functions(capture, interventions, ctx, store)
        with torch.no_grad(), self.hooked(ctx, fns):
            target = model if logits else model.base_model
            extra = {"logits_to_keep": keep} if keep else {}
            out = target(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
                **extra,
            )
        return RunOutput(out.logits if logits else None, self._remap(store, capture, self.n_layers))

    def _run_shared(self, batch: Batch, n: int, capture: Sequence[Site], interventions: Sequence[Intervention],
                    logits: bool | str | int) -> RunOutput:
        """:meth:`run` with the first ``n`` tokens (shared by every row) computed once."""
        keep = logits_kept(logits)
        if keep is not None and keep > batch.width - n:
            keep = None  # the kept positions reach into the prefix: unembed everything, keep the tail below
        full = logits is not False and keep is None
        cache, pstore, plogits, group = self._prefix_pass(batch, n, interventions, capture, full)
        ids, mask, pos = self._suffix(batch, n, self.pad_id())
        ctx = HookContext(pads=batch.pads.clone(), prompt_width=batch.width, n_post=batch.n_post, offset=n, shared=n)
        store: dict[Site, torch.Tensor] = {}
        fns = self.site_functions(capture, interventions, ctx, store)
        with torch.no_grad(), self.hooked(ctx, fns):
            target = self.lm.model if logits else self.lm.model.base_model
            extra = {"logits_to_keep": keep} if keep else {}
            out = target(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{cache_kwarg(self.lm.model): cache}, **extra)
        acts = {s: self._reassemble(pstore[s], a, batch.pads, group) for s, a in store.items()}
        out_logits = None
        if keep is not None:
            out_logits = out.logits
        elif full:
            out_logits = self._reassemble(plogits, out.logits, batch.pads, group)
            want = logits_kept(logits)
            if want is not None:
                out_logits = out_logits[:, -want:]
        return RunOutput(out_logits, self._remap(acts, capture, self.n_layers))

    def generate(
        self,
        batch: Batch,
        *,
        max_new_tokens: int = 32,
        interventions: Sequence[Intervention] = (),
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        first_step: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """As :meth:`Backend.generate`; with ``first_step`` (a list), the raw next-token logits ``[B, V]`` of the
        prefill (the last prompt position, interventions active, before any logits processor such as a
        repetition penalty) are appended to it: what a forward over the prompts alone gives."""
        model = self.lm.model
        batch = batch.to(self.lm.device)
        n, cache, ids, mask, _ = self.prefill_shared(batch, interventions)
        gen_in: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if n:  # the shared prefix once; generate continues from its repeated cache
            prefix = batch.input_ids[:1, int(batch.pads[0]):int(batch.pads[0]) + n].expand(batch.size, n)
            gen_in = {"input_ids": torch.cat([prefix, ids], dim=1), "attention_mask": mask, cache_kwarg(self.lm.model): cache}
            ctx = HookContext(pads=batch.pads.clone(), prompt_width=batch.width, n_post=batch.n_post, offset=n,
                              shared=n)
        else:
            ctx = self.context(batch)
        fns = self.site_functions((), interventions, ctx, None)
        kw = self.hf_generate_kwargs(max_new_tokens, do_sample, temperature, top_p)
        if do_sample:
            torch.manual_seed(seed)
        head = model.get_output_embeddings()
        handle = None
        if first_step is not None:
            seen: list[torch.Tensor] = []

            def record(module: Any, args: tuple, out: torch.Tensor) -> None:
                if not seen:  # the first unembedding of a generate call is the prefill
                    seen.append(out[:, -1].detach().float().cpu())

            handle = head.register_forward_hook(record)
        try:
            with torch.no_grad(), self.hooked(ctx, fns):
                out = model.generate(**gen_in, use_cache=True, **kw)
        finally:
            if handle is not None:
                handle.remove()
        if first_step is not None:
            first_step.append(seen[0])
        new = out[:, batch.width:]
        if new.shape[1] < max_new_tokens:  # every row stopped early
            pad = torch.full((new.shape[0], max_new_tokens - new.shape[1]), self.pad_id(), dtype=new.dtype,
                             device=new.device)
            new = torch.cat([new, pad], dim=1)
        return new.cpu()
