"""The ``native`` backend: plain PyTorch forward hooks on the Hugging Face model.

Hooks are registered for the duration of one call and removed in a ``finally`` block, so the
model never keeps them, even when the call raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from workbench.backends.base import Backend, RunOutput, SiteFn
from workbench.chat import Batch
from workbench.interventions import HookContext, Intervention
from workbench.sites import Site


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    return new


class NativeBackend(Backend):
    """Plain PyTorch hooks (the default and fastest backend)."""

    records_first_step = True

    name = "native"

    @contextmanager
    def hooked(self, ctx: HookContext, fns: dict[Site, SiteFn]) -> Iterator[None]:
        """Register the site functions (and the position tracker) for the duration of the block."""
        handles = []
        seen = {"n": 0}

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
        logits: bool | str = True,
    ) -> RunOutput:
        model = self.lm.model
        batch = batch.to(self.lm.device)
        ctx = self.context(batch)
        store: dict[Site, torch.Tensor] = {}
        fns = self.site_functions(capture, interventions, ctx, store)
        with torch.no_grad(), self.hooked(ctx, fns):
            target = model if logits else model.base_model
            extra = {"logits_to_keep": 1} if logits == "last" else {}
            out = target(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
                **extra,
            )
        return RunOutput(out.logits if logits else None, self._remap(store, capture, self.n_layers))

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
                out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=True,
                                     **kw)
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
