"""The ``nnsight`` backend: the same semantics as ``native``, through nnsight 0.8.1.

The already-loaded Hugging Face model is wrapped once per backend instance in
``nnsight.TransformersModel(model, tokenizer=tok, task="text-generation")`` (the new name of
``LanguageModel``). Sites map onto envoys:

* ``resid_pre``  -> ``layers[i].input`` (the decoder layer's first input, the hidden states);
* ``resid_post`` -> ``layers[i].output`` (a tensor in transformers 5, a tuple before; both handled);
* ``attn_out``   -> ``attn(i).output[0]``;
* ``mlp_out``    -> ``mlp(i).output``.

They are visited in forward order (layer ascending; within a layer resid_pre, attn_out, mlp_out,
resid_post), since nnsight serves values in execution order. Each site runs the function from
:meth:`Backend.site_functions`, which applies the interventions in order and records captures,
and the result is assigned back into the trace only when it differs from what the model produced.

Notes on nnsight 0.8.1 that shaped this file:

* nnsight installs a controller as each module's instance ``forward`` and leaves it there for the
  life of the model (no hooks; inert outside a trace, a few microseconds per module call), so
  ``count_hooks`` is unchanged and plain ``model(...)`` calls give the same logits.
* ``TransformersModel`` builds a ``transformers.pipeline`` around the model: ``device`` is passed
  so the pipeline never moves the model, and the tokenizer's pad token / padding side, which
  nnsight reconfigures, are restored.
* Inputs are passed as ``input_ids`` / ``attention_mask`` / ``position_ids`` (from the mask), so
  nnsight's own batching re-stacks them unchanged and adds nothing.
* Traced code must live in a file and, on Python 3.11, a comprehension inside a ``with
  model.trace(...)`` block raises ``UnboundLocalError``: the blocks below only call module-level
  helpers with plain loops.
* In ``generate`` the interventions loop over a *bounded* ``tracer.iter[:max_new_tokens]``. When
  every row stops early the loop is cut short (nnsight warns; the warning is silenced here), and
  statements after the loop would not run, so the generated ids are read in a second, empty
  ``tracer.invoke()`` (nnsight's own advice).
* Exceptions raised inside interventions propagate with their original type.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from workbench.backends.base import Backend, RunOutput, SiteFn, logits_kept
from workbench.chat import Batch
from workbench.interventions import HookContext, Intervention
from workbench.loading import LoadedModel
from workbench.sites import Site

# Forward order of the components inside one decoder layer.
_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}

# The warning nnsight emits when a bounded ``tracer.iter`` loop asks for more steps than the
# generation ran (every row hit EOS early). Expected here, so silenced.
_CUT_SHORT = r".*was never reached: the loop asked for a step the run did not make.*"


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    return new


def _apply_plan(plan: list, ctx: HookContext, seen: list) -> None:
    """Run one forward chunk's site functions (called from inside an nnsight trace).

    ``plan`` is ``[(component, envoy, fn), ...]`` in forward order. The first activation read
    gives the chunk length, which keeps ``ctx.offset`` in step with native's tracker: 0 for the
    prompt / prefill, then prompt_width, prompt_width + 1, ... for cached decoding steps.
    """
    first = True
    for comp, envoy, fn in plan:
        if comp == "resid_pre":
            act = envoy.input
            out = None
        else:
            out = envoy.output
            act = _first(out)
        if first:
            ctx.offset = seen[0]
            seen[0] += int(act.shape[1])
            first = False
        new = fn(act)
        if new is act:
            continue
        if comp == "resid_pre":
            envoy.input = new
        else:
            envoy.output = _replace_first(out, new)


class NNsightBackend(Backend):
    """nnsight 0.8.1 wrapping the already-loaded model (numerically identical to ``native``)."""

    name = "nnsight"

    def __init__(self, lm: LoadedModel) -> None:
        super().__init__(lm)
        self._nn: Any = None
        self._names: dict[int, str] = {}  # id(module) -> dotted path in lm.model
        self._envoys: dict[int, Any] = {}  # id(module) -> its nnsight envoy

    # -- the wrapper ------------------------------------------------------------------------------

    def wrapper(self) -> Any:
        """The nnsight model over ``lm.model`` (built on first use, then reused)."""
        if self._nn is None:
            from nnsight import TransformersModel

            model, tok = self.lm.model, self.lm.tokenizer
            kw: dict[str, Any] = {}
            if getattr(model, "hf_device_map", None) is None:
                # Otherwise the pipeline nnsight builds moves a CPU model to cuda:0 when CUDA exists.
                kw["device"] = self.lm.device
            # nnsight configures the tokenizer it is given (pad token, left padding); the
            # workbench tokenises itself, so give the shared tokenizer back unchanged.
            side = getattr(tok, "padding_side", None)
            pad = tok.pad_token
            try:
                self._nn = TransformersModel(model, tokenizer=tok, task="text-generation", **kw)
            finally:
                if side is not None and tok.padding_side != side:
                    tok.padding_side = side
                if pad is None and tok.pad_token is not None:
                    try:
                        tok.pad_token = None
                    except Exception:  # pragma: no cover - tokenizers that refuse None
                        pass
            self._names = {id(m): n for n, m in model.named_modules()}
        return self._nn

    def _envoy(self, module: torch.nn.Module) -> Any:
        key = id(module)
        env = self._envoys.get(key)
        if env is None:
            nn = self.wrapper()
            path = self._names.get(key)
            if path is None:  # a module added after wrapping
                self._names = {id(m): n for n, m in self.lm.model.named_modules()}
                path = self._names[key]
            env = nn.get(path) if path else nn
            self._envoys[key] = env
        return env

    def _plan(self, fns: dict[Site, SiteFn]) -> list:
        """``[(component, envoy, fn), ...]`` in forward order."""
        plan = []
        for site in sorted(fns, key=lambda s: (s.layer, _ORDER[s.component])):
            if site.component in ("resid_pre", "resid_post"):
                module = self.arch.layers[site.layer]
            elif site.component == "attn_out":
                module = self.arch.attn(site.layer)
            else:
                module = self.arch.mlp(site.layer)
            plan.append((site.component, self._envoy(module), fns[site]))
        return plan

    # -- the interface ----------------------------------------------------------------------------

    def run(
        self,
        batch: Batch,
        *,
        capture: Sequence[Site] = (),
        interventions: Sequence[Intervention] = (),
        logits: bool | str | int = True,
    ) -> RunOutput:
        nn = self.wrapper()
        batch = batch.to(self.lm.device)
        ctx = self.context(batch)
        store: dict[Site, torch.Tensor] = {}
        fns = self.site_functions(capture, interventions, ctx, store)
        plan = self._plan(fns)
        seen = [0]
        target = self.lm.model if logits else self.lm.model.base_model
        result = None
        keep = logits_kept(logits)
        extra = {"logits_to_keep": keep} if keep else {}
        with torch.no_grad():
            with nn.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, use_cache=False, fn=target, **extra) as tracer:
                _apply_plan(plan, ctx, seen)
                if logits:
                    result = tracer.result.save()
        out_logits = result.logits if logits else None
        return RunOutput(out_logits, self._remap(store, capture, self.n_layers))

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
    ) -> torch.Tensor:
        nn = self.wrapper()
        batch = batch.to(self.lm.device)
        ctx = self.context(batch)
        fns = self.site_functions((), interventions, ctx, None)
        plan = self._plan(fns)
        seen = [0]
        steps = int(max_new_tokens)
        kw = self.hf_generate_kwargs(max_new_tokens, do_sample, temperature, top_p)
        kw.update(use_cache=True, streamer=None)
        ids = None
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CUT_SHORT)
            if do_sample:
                torch.manual_seed(seed)
            with nn.generate(**kw) as tracer:
                with tracer.invoke(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   position_ids=batch.position_ids):
                    if plan:
                        for _step in tracer.iter[:steps]:
                            _apply_plan(plan, ctx, seen)
                with tracer.invoke():
                    ids = tracer.result.save()
        new = ids[:, batch.width:]
        if new.shape[1] < max_new_tokens:  # every row stopped early
            pad = torch.full((new.shape[0], max_new_tokens - new.shape[1]), self.pad_id(), dtype=new.dtype,
                             device=new.device)
            new = torch.cat([new, pad], dim=1)
        return new.cpu()
