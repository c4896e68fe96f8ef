"""The ``transformer_lens`` backend: TransformerLens 4.3's ``TransformerBridge`` hook points.

Same semantics as :class:`~workbench.backends.native.NativeBackend` (captures are the value after the
interventions at that site; left-padded batches with explicit ``position_ids``; generation keeps the
KV cache and applies the interventions at every step), but every activation is read and edited
through the bridge's ``HookPoint`` s:

=============  ==================================  ==========================================
site           bridge hook point (alias)           what it is
=============  ==================================  ==========================================
resid_pre      ``blocks.{i}.hook_resid_pre``       input of decoder layer ``i``
resid_post     ``blocks.{i}.hook_resid_post``      output of decoder layer ``i`` (before the
                                                   final norm for the last layer)
attn_out       ``blocks.{i}.attn.hook_out``        output of the attention module (before any
                                                   post-attention norm, e.g. Gemma 3's)
mlp_out        ``blocks.{i}.mlp.hook_out``         output of the MLP module (before any
                                                   post-MLP norm)
=============  ==================================  ==========================================

Which model object this backend owns
------------------------------------
Booting a bridge *mutates the model it is given*: it replaces the decoder layers, attention,
MLP, norm and linear submodules by bridge wrappers (``BlockBridge``, ``AttentionBridge``,
``LinearBridge`` ...) and forces eager attention on its config. To leave ``lm.model`` exactly as
it was (module tree, config, hooks), the backend boots the bridge on a **structural twin** of
``lm.model``: a deep copy of the module tree and config that *shares every parameter and buffer
tensor* with ``lm.model`` (no weights are copied). So

* plain Hugging Face use of ``lm.model`` (``model(...)``, ``model.generate``, the native and
  nnsight backends) is unaffected by this backend;
* in-place weight edits on ``lm.model`` (``p.data.copy_``, ``w -= ...``) are seen by the bridge at
  once; if parameter or buffer *objects* are replaced (``load_state_dict(assign=True)``,
  ``model.to(other_device)``, a new ``lm.model``), the next call notices and rebuilds the twin.

The twin is ``backend.bridge.original_model``; the bridge is built lazily on first use and reused.

The KV-cache shim
-----------------
With transformers 5.24, decoder layers hand the KV cache to attention as ``cache=``, but the
bridge's attention (``AttentionBridge._update_kv_cache``) only looks for ``past_key_values`` /
``layer_past``: every cached decoding step would silently ignore the prompt. The backend installs,
on the twin's attention bridges only (instance attributes, never the class), a wrapper that
forwards ``cache`` as ``past_key_values``. ``lm.model`` never sees it.

Generation
----------
``TransformerBridge.generate`` cannot be used: it re-reads the cache from
``output.past_key_values`` (transformers 5 names it ``output.cache``), so it silently recomputes
the whole prefix at every step, and its sampler is not Hugging Face's. The backend runs its own
loop over ``TransformerBridge.forward`` with a ``transformers.DynamicCache``: one prefill over the
prompt, then one token per step (attention mask extended by one column, position ids continuing
from each row's last position), greedy ``argmax`` or Hugging Face's sampling (temperature / top-p
warpers, ``torch.multinomial`` after ``torch.manual_seed(seed)``), rows that hit EOS filled with
the pad id — the same procedure as ``model.generate`` in the native backend.

>>> from workbench.tiny import build_tiny
>>> from workbench.loading import from_memory
>>> from workbench.chat import encode
>>> from workbench.sites import Site
>>> lm = from_memory(*build_tiny("llama"))
>>> be = TransformerLensBackend(lm)
>>> out = be.run(encode(lm.tokenizer, ["Hello there"]), capture=[Site(1, "attn_out")])
>>> tuple(out.acts[Site(1, "attn_out")].shape)[-1]
64
"""

from __future__ import annotations

import copy
import inspect
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from workbench.backends.base import Backend, RunOutput, SiteFn, logits_kept
from workbench.chat import Batch
from workbench.errors import WorkbenchError
from workbench.interventions import HookContext, Intervention
from workbench.loading import LoadedModel
from workbench.sites import Site

# Site component -> bridge hook-point name (TransformerLens spelling; resolved through the bridge's aliases).
HOOK_NAMES = {
    "resid_pre": "blocks.{i}.hook_resid_pre",
    "resid_post": "blocks.{i}.hook_resid_post",
    "attn_out": "blocks.{i}.attn.hook_out",
    "mlp_out": "blocks.{i}.mlp.hook_out",
}

_SHIM_ATTR = "_workbench_cache_shim"

# GenerationConfig fields that would make Hugging Face's generate add a logits processor this backend
# does not reproduce (repetition_penalty and no_repeat_ngram_size are reproduced).
_UNSUPPORTED_GEN_FIELDS = {
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "encoder_repetition_penalty": 1.0,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None,
    "min_length": 0,
}


def hook_name(site: Site) -> str:
    """The bridge hook-point name for a site, e.g. ``blocks.3.attn.hook_out``."""
    return HOOK_NAMES[site.component].format(i=site.layer)


def _structural_twin(model: torch.nn.Module) -> torch.nn.Module:
    """Deep-copy the module tree and config, sharing every parameter and buffer tensor."""
    memo: dict[int, Any] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        memo[id(p)] = p
    for _, b in model.named_buffers(remove_duplicate=False):
        memo[id(b)] = b
    return copy.deepcopy(model, memo)


def _source_key(model: torch.nn.Module) -> tuple:
    """Identity of the model object and of its parameter / buffer tensors (not their values)."""
    return (
        id(model),
        tuple(id(p) for p in model.parameters()),
        tuple(id(b) for b in model.buffers()),
    )


def _bridge_tokenizer(tok: Any, label: str) -> Any:
    """A private copy of the tokenizer for the bridge (its boot mutates padding side / special tokens).

    ``add_bos_token=True`` in ``init_kwargs`` keeps TransformerLens from re-loading the tokenizer by
    name (which needs the hub). The backend feeds token ids, so the bridge never tokenizes anything.
    """
    t = copy.deepcopy(tok)
    t.init_kwargs = dict(getattr(t, "init_kwargs", {}) or {})
    t.init_kwargs.setdefault("name_or_path", getattr(t, "name_or_path", None) or label)
    t.init_kwargs["add_bos_token"] = True
    return t


def _install_cache_shim(bridge: torch.nn.Module) -> int:
    """Forward ``cache=`` as ``past_key_values=`` into every attention bridge's KV-cache update.

    Instance attributes on the twin's attention bridges only; returns how many were patched.
    """
    n = 0
    for m in bridge.modules():
        cls_fn = getattr(type(m), "_update_kv_cache", None)
        if cls_fn is None or _SHIM_ATTR in m.__dict__:
            continue
        bound = cls_fn.__get__(m, type(m))

        def _update_kv_cache(k: torch.Tensor, v: torch.Tensor, _orig: Any = bound, **kwargs: Any) -> Any:
            if (kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None
                    and kwargs.get("cache") is not None):
                kwargs["past_key_values"] = kwargs["cache"]
            return _orig(k, v, **kwargs)

        m.__dict__["_update_kv_cache"] = _update_kv_cache
        m.__dict__[_SHIM_ATTR] = True
        n += 1
    return n


def _identity_conversion(hp: Any, probe: torch.Tensor) -> bool:
    """True when the hook point hands ``[batch, pos, d_model]`` activations to hooks unchanged.

    ``attn.hook_out`` carries an ``AttentionAutoConversion`` that only reshapes 4-D attention
    patterns; on residual-shaped tensors it is the identity both ways.
    """
    conv = getattr(hp, "hook_conversion", None)
    if conv is None:
        return True
    try:
        ok = conv.convert(probe) is probe and conv.revert(probe) is probe
    finally:
        _clear_conversion_state(hp)
    return ok


def _clear_conversion_state(hp: Any) -> None:
    """``AttentionAutoConversion`` remembers the shape of every tensor it ever converted (keyed by id)
    and never forgets it; clear it so long sessions do not grow without bound."""
    clear = getattr(getattr(hp, "hook_conversion", None), "clear_state", None)
    if callable(clear):
        clear()


def _remove_cache_shim(bridge: torch.nn.Module) -> None:
    for m in bridge.modules():
        if m.__dict__.pop(_SHIM_ATTR, None):
            m.__dict__.pop("_update_kv_cache", None)


class TransformerLensBackend(Backend):
    """TransformerLens ``TransformerBridge`` hook points (booted from the already-loaded model)."""

    name = "transformer_lens"

    def __init__(self, lm: LoadedModel) -> None:
        super().__init__(lm)
        self._bridge: Any = None
        self._key: tuple | None = None
        self._keep_last: bool = False  # the model's forward accepts logits_to_keep

    # -- the bridge -----------------------------------------------------------------------------

    @property
    def bridge(self) -> Any:
        """The ``TransformerBridge`` over this backend's twin of ``lm.model`` (built on first use)."""
        key = _source_key(self.lm.model)
        if self._bridge is None or key != self._key:
            self._build(key)
        twin = self._bridge.original_model
        if twin.training != self.lm.model.training:
            self._bridge.train(self.lm.model.training)
        return self._bridge

    def _build(self, key: tuple) -> None:
        try:
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError as e:  # pragma: no cover - depends on the install
            raise WorkbenchError(
                "the transformer_lens backend needs transformer-lens>=4 (pip install transformer-lens); "
                f"import failed: {e}"
            ) from e
        self.close()
        model = self.lm.model
        label = str(self.lm.model_id or type(model).__name__)
        twin = _structural_twin(model)
        if not getattr(twin.config, "architectures", None):  # the bridge picks its adapter from this
            twin.config.architectures = [type(model).__name__]
        try:
            bridge = TransformerBridge.boot_transformers(
                label,
                hf_model=twin,
                tokenizer=_bridge_tokenizer(self.lm.tokenizer, label),
                device=self.lm.device,
                dtype=self.lm.dtype,
            )
        except Exception as e:
            raise WorkbenchError(
                f"TransformerLens could not bridge {type(model).__name__} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); "
                "use the native backend for this model"
            ) from e
        bridge.train(model.training)
        if _install_cache_shim(bridge) == 0:
            raise WorkbenchError(
                f"the bridge for {type(model).__name__} has no attention bridge with a KV-cache update; "
                "cached generation would be wrong; use the native backend"
            )
        n = len(bridge.blocks)
        if n != self.n_layers:
            raise WorkbenchError(f"the bridge has {n} blocks but the model has {self.n_layers} layers")
        probe = torch.zeros(1, 2, self.arch.d_model)
        for comp in HOOK_NAMES:
            for i in range(n):
                hp = bridge.get_hook_point(HOOK_NAMES[comp].format(i=i))
                if hp is None or not _identity_conversion(hp, probe):
                    raise WorkbenchError(
                        f"the bridge for {type(model).__name__} has no plain hook point "
                        f"'{HOOK_NAMES[comp].format(i=i)}' (missing, or it reshapes [batch, pos, d_model] "
                        "activations); use the native backend"
                    )
        # Blocks wire their own internal capture hooks on their first forward; wire them now so
        # hook counts on the bridge stay constant from here on.
        for block in bridge.blocks:
            wire = getattr(block, "_maybe_wire_capture_hooks", None)
            if callable(wire):
                wire()
        self._keep_last = "logits_to_keep" in inspect.signature(type(twin).forward).parameters
        self._bridge, self._key = bridge, key

    def close(self) -> None:
        """Drop the bridge and its twin (the next call builds them again)."""
        if self._bridge is not None:
            _remove_cache_shim(self._bridge)
            self._bridge.reset_hooks(including_permanent=False)
        self._bridge, self._key = None, None

    # -- hooks ----------------------------------------------------------------------------------

    @contextmanager
    def hooked(self, ctx: HookContext, fns: dict[Site, SiteFn]) -> Iterator[Any]:
        """Attach the site functions (and the position tracker) through ``bridge.hooks(...)``.

        Yields the bridge. The bridge removes exactly the hooks it added when the block exits, also
        when the forward raises.
        """
        bridge = self.bridge
        seen = {"n": 0}

        def track(act: torch.Tensor, hook: Any) -> None:
            ctx.offset = seen["n"]
            seen["n"] += int(act.shape[1])

        # The tracker goes first: hooks on one hook point fire in the order they were added.
        fwd: list[tuple[str, Any]] = [(HOOK_NAMES["resid_pre"].format(i=0), track)]
        for site, fn in sorted(fns.items()):

            def apply(act: torch.Tensor, hook: Any, _fn: SiteFn = fn) -> torch.Tensor:
                return _fn(act)

            fwd.append((hook_name(site), apply))
        try:
            with bridge.hooks(fwd_hooks=fwd):
                yield bridge
        finally:
            for site in fns:
                if site.component == "attn_out":
                    _clear_conversion_state(bridge.get_hook_point(hook_name(site)))

    # -- the interface --------------------------------------------------------------------------

    def run(
        self,
        batch: Batch,
        *,
        capture: Sequence[Site] = (),
        interventions: Sequence[Intervention] = (),
        logits: bool | str | int = True,
    ) -> RunOutput:
        batch = batch.to(self.lm.device)
        ctx = self.context(batch)
        store: dict[Site, torch.Tensor] = {}
        fns = self.site_functions(capture, interventions, ctx, store)
        with torch.no_grad(), self.hooked(ctx, fns) as bridge:
            # logits=False: unembed one position only (the captures do not depend on it)
            keep = 1 if logits is False else logits_kept(logits)
            extra = {"logits_to_keep": keep} if keep and self._keep_last else {}
            out = bridge.forward(
                batch.input_ids,
                return_type="logits",
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
                **extra,
            )
        if logits is not False and keep is not None:
            out = out[:, -keep:]
        return RunOutput(out if logits else None, self._remap(store, capture, self.n_layers))

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
        from transformers import DynamicCache

        batch = batch.to(self.lm.device)
        dev = batch.input_ids.device
        ctx = self.context(batch)
        fns = self.site_functions((), interventions, ctx, None)
        pad = self.pad_id()
        eos_list = self.eos_ids()
        eos = torch.tensor(eos_list, dtype=torch.long, device=dev) if eos_list else None
        b = batch.size
        new = torch.full((b, max(int(max_new_tokens), 0)), pad, dtype=torch.long, device=dev)
        if max_new_tokens <= 0:
            return new.cpu()
        processors = self._logits_processors(do_sample, temperature, top_p)
        if do_sample:
            torch.manual_seed(seed)
        seq = batch.input_ids
        ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
        unfinished = torch.ones(b, dtype=torch.bool, device=dev)
        with torch.no_grad(), self.hooked(ctx, fns) as bridge:
            cache = DynamicCache(config=bridge.original_model.config.get_text_config(decoder=True))
            extra = {"logits_to_keep": 1} if self._keep_last else {}  # as Hugging Face's generate does
            for step in range(max_new_tokens):
                logits = bridge.forward(
                    ids,
                    return_type="logits",
                    attention_mask=mask,
                    position_ids=pos,
                    cache=cache,
                    use_cache=True,
                    **extra,
                )
                scores = logits[:, -1].to(copy=True, dtype=torch.float32)
                del logits
                if processors is not None:
                    scores = processors(seq, scores)
                if do_sample:
                    nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                else:
                    nxt = torch.argmax(scores, dim=-1)
                if eos is not None:
                    nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
                new[:, step] = nxt
                if eos is not None:
                    unfinished &= ~torch.isin(nxt, eos)
                    if not bool(unfinished.any()):
                        break
                if step + 1 == max_new_tokens:
                    break
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                ids = nxt[:, None]
                mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=dev)], dim=1)
                pos = pos[:, -1:] + 1
        return new.cpu()

    # -- helpers --------------------------------------------------------------------------------

    def _logits_processors(self, do_sample: bool, temperature: float, top_p: float) -> Any:
        """The logits processors Hugging Face's ``generate`` would use with the native backend's arguments."""
        from transformers.generation import (
            LogitsProcessorList,
            NoRepeatNGramLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        gc = getattr(self.lm.model, "generation_config", None)
        procs = LogitsProcessorList()
        if gc is not None:
            odd = [k for k, default in _UNSUPPORTED_GEN_FIELDS.items()
                   if getattr(gc, k, default) not in (default, None, [], {})]
            if odd:
                warnings.warn(
                    f"the model's generation_config sets {', '.join(odd)}; the transformer_lens backend does not "
                    "apply these (the native backend does)", stacklevel=3,
                )
            rp = getattr(gc, "repetition_penalty", None)
            if rp is not None and rp != 1.0:
                procs.append(RepetitionPenaltyLogitsProcessor(penalty=float(rp)))
            ng = getattr(gc, "no_repeat_ngram_size", None)
            if ng:
                procs.append(NoRepeatNGramLogitsProcessor(int(ng)))
        if do_sample:
            if temperature is not None and temperature != 1.0:
                procs.append(TemperatureLogitsWarper(float(temperature)))
            if top_p is not None and top_p < 1.0:
                procs.append(TopPLogitsWarper(float(top_p)))
        return procs if len(procs) else None
