"""Find the parts of a Hugging Face causal LM that the workbench hooks and edits.

Works for the common decoder layouts (``model.model.layers`` for Llama / Qwen / Mistral / Gemma /
Phi-3 and most others, ``model.transformer.h`` for GPT-2 / GPT-J, ``model.gpt_neox.layers``).

>>> from workbench.tiny import build_tiny
>>> m, tok = build_tiny("llama")
>>> a = get_arch(m)
>>> a.n_layers, a.d_model
(2, 64)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.errors import WorkbenchError

_LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                "model.decoder.layers", "transformer.layers")
_EMBED_PATHS = ("model.embed_tokens", "model.language_model.embed_tokens", "transformer.wte",
                "gpt_neox.embed_in", "model.decoder.embed_tokens")
_NORM_PATHS = ("model.norm", "model.language_model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
               "model.decoder.final_layer_norm")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_ATTN_OUT_NAMES = ("o_proj", "c_proj", "dense", "out_proj", "wo")
_MLP_OUT_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out")


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class Arch:
    """Handles on the modules of one model."""

    model: nn.Module
    layers: nn.ModuleList
    embed: nn.Module
    final_norm: nn.Module | None
    layers_path: str

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.embed.weight.shape[1])

    def layer(self, i: int) -> nn.Module:
        return self.layers[self.check_layer(i)]

    def check_layer(self, i: int) -> int:
        """Normalise a layer index (negative allowed) or raise a clear error."""
        n = self.n_layers
        if not isinstance(i, int) or isinstance(i, bool):
            raise WorkbenchError(f"layer must be an integer, got {i!r}")
        if not -n <= i < n:
            raise WorkbenchError(f"layer {i} is out of range: this model has {n} layers (valid: 0..{n - 1}, or -{n}..-1)")
        return i % n

    def attn(self, i: int) -> nn.Module:
        return self._child(self.layer(i), _ATTN_NAMES, "attention")

    def mlp(self, i: int) -> nn.Module:
        return self._child(self.layer(i), _MLP_NAMES, "MLP")

    @staticmethod
    def _child(parent: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
        for n in names:
            m = getattr(parent, n, None)
            if isinstance(m, nn.Module):
                return m
        raise WorkbenchError(
            f"cannot find the {what} module in {type(parent).__name__} (looked for {', '.join(names)})"
        )

    def attn_out_proj(self, i: int) -> nn.Module:
        return self._child(self.attn(i), _ATTN_OUT_NAMES, "attention output projection")

    def mlp_out_proj(self, i: int) -> nn.Module:
        return self._child(self.mlp(i), _MLP_OUT_NAMES, "MLP output projection")

    def writes_to_residual(self) -> list[tuple[str, nn.Module]]:
        """Modules whose output is written into the residual stream (for weight orthogonalisation)."""
        out: list[tuple[str, nn.Module]] = [("embed", self.embed)]
        pos = _get(self.model, "transformer.wpe")
        if isinstance(pos, nn.Module):
            out.append(("pos_embed", pos))
        for i in range(self.n_layers):
            out.append((f"layers.{i}.attn_out", self.attn_out_proj(i)))
            out.append((f"layers.{i}.mlp_out", self.mlp_out_proj(i)))
        return out


def get_arch(model: nn.Module) -> Arch:
    """Locate layers, embeddings and final norm, or explain what is unsupported."""
    for path in _LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            break
    else:
        raise WorkbenchError(
            f"unsupported architecture {type(model).__name__}: no decoder layer list found at any of "
            f"{', '.join(_LAYER_PATHS)}"
        )
    embed = None
    for p in _EMBED_PATHS:
        embed = _get(model, p)
        if isinstance(embed, nn.Module):
            break
    if embed is None:
        embed = model.get_input_embeddings()
    norm = None
    for p in _NORM_PATHS:
        norm = _get(model, p)
        if isinstance(norm, nn.Module):
            break
    return Arch(model=model, layers=layers, embed=embed, final_norm=norm, layers_path=path)


def count_hooks(model: nn.Module) -> int:
    """Total number of forward / pre-forward / backward hooks on every module (for leak tests)."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    n += len(getattr(torch.nn.modules.module, "_global_forward_hooks", {}))
    n += len(getattr(torch.nn.modules.module, "_global_forward_pre_hooks", {}))
    return n


def cache_kwarg(model: Any) -> str:
    """transformers 5 calls the KV-cache argument ``cache``; older releases ``past_key_values``."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def plain_cache(model: Any) -> bool:
    """Whether ``model``'s KV cache is a plain one (every layer full attention, no sliding window), whose
    positions can be split off, cut back and joined (shared prefixes, teacher forcing, :func:`join_caches`)."""
    cfg = model.config
    kinds = getattr(cfg, "layer_types", None) or []
    return all(k == "full_attention" for k in kinds) and not getattr(cfg, "use_sliding_window", False)


def join_caches(caches: list[Any], widths: list[int]) -> Any:
    """One KV cache holding the rows of several (plain, :func:`plain_cache`) caches of lengths ``widths``: each
    left-padded with zeros to the longest (the caller masks those positions), then stacked along the batch.
    Returns the first cache, changed in place."""
    from transformers.cache_utils import DynamicLayer

    width = max(widths)
    for layers in zip(*(c.layers for c in caches)):
        if any(type(x) is not DynamicLayer or not x.is_initialized for x in layers):
            raise WorkbenchError("only plain dynamic KV caches can be joined")
        for name in ("keys", "values"):
            parts = []
            for x, w in zip(layers, widths):
                t = getattr(x, name)
                if int(t.shape[-2]) != w:
                    raise WorkbenchError(f"a cache holds {t.shape[-2]} positions, not the {w} given")
                pad = t.new_zeros(t.shape[:-2] + (width - w, t.shape[-1]))
                parts.append(torch.cat([pad, t], dim=-2) if w < width else t)
            setattr(layers[0], name, torch.cat(parts, dim=0))
    return caches[0]


def crop_cache(cache: Any, length: int) -> None:
    """Cut a KV cache back to its first ``length`` positions (e.g. after teacher-forced tokens scored in a
    prefill); raises when the cache cannot be cut exactly."""
    extra = int(cache.get_seq_length()) - int(length)
    if extra > 0:
        cache.crop(-extra)
    if int(cache.get_seq_length()) != int(length):
        raise WorkbenchError(f"could not cut the KV cache back to {length} positions "
                             f"(it holds {cache.get_seq_length()})")


def new_cache(model: Any) -> Any:
    """An empty KV cache for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - older transformers
        return DynamicCache()

