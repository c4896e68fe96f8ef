"""Map Hugging Face tensor names to a layer, a module type and an orientation.

Module types: ``q k v qkv o gate up gate_up down embed pos_embed lm_head norm other`` (``qkv`` is a fused
projection such as GPT-2's ``c_attn``; ``gate_up`` a fused MLP input).

Orientation ("left = output space"): every 2-D tensor is analysed in the ``nn.Linear.weight`` layout
``[out, in]``. Two kinds of stored tensors are transposed for the analysis (and back when written):

* GPT-2-style ``Conv1D`` weights (``c_attn``, ``c_proj``, ``c_fc``, ``q_attn``), stored ``[in, out]``;
* embedding tables (``embed_tokens``, ``wte``, ``wpe``, ...), stored ``[vocab, d_model]``: an embedding
  is a linear map from one-hot tokens to the residual stream, so its output space is ``d_model`` and its
  analysis layout is ``[d_model, vocab]`` (this is what lets an activation-space direction act on it).

``lm_head`` is an ordinary Linear ``[vocab, d_model]``: its output space is the vocabulary.

Example::

    >>> r = classify("transformer.h.3.attn.c_attn.weight", conv1d=True)
    >>> (r.layer, r.module, r.param, r.transpose)
    (3, 'qkv', 'weight', True)
    >>> classify("model.layers.0.mlp.down_proj.weight").module
    'down'
    >>> classify("model.embed_tokens.weight").transpose
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MODULE_TYPES", "RESIDUAL_WRITERS", "RESIDUAL_READERS", "CONV1D_MODEL_TYPES", "TensorRole",
           "classify", "uses_conv1d", "is_lm_head"]

MODULE_TYPES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "embed", "pos_embed", "lm_head",
                "norm", "other")
RESIDUAL_WRITERS = frozenset({"embed", "pos_embed", "o", "down"})  # output space = residual stream
RESIDUAL_READERS = frozenset({"q", "k", "v", "qkv", "gate", "up", "gate_up", "lm_head"})  # input = residual
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt"})
_CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer|decoder_layers)\.(\d+)\.")

# leaf module name -> type (context-free)
_LEAF = {
    "q_proj": "q", "query": "q", "wq": "q", "q_attn": "q",
    "k_proj": "k", "key": "k", "wk": "k",
    "v_proj": "v", "value": "v", "wv": "v",
    "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "wqkv": "qkv", "qkv": "qkv",
    "o_proj": "o", "out_proj": "o", "wo": "o",
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "c_fc": "up", "fc1": "up", "w3": "up", "dense_h_to_4h": "up", "fc_in": "up",
    "gate_up_proj": "gate_up",
    "down_proj": "down", "fc2": "down", "w2": "down", "dense_4h_to_h": "down", "fc_out": "down",
    "embed_tokens": "embed", "wte": "embed", "word_embeddings": "embed", "embed_in": "embed",
    "tok_embeddings": "embed",
    "wpe": "pos_embed", "embed_positions": "pos_embed", "position_embeddings": "pos_embed",
    "lm_head": "lm_head", "embed_out": "lm_head", "output": "lm_head",
}
_ATTN_CTX = ("attn", "attention")
_MLP_CTX = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class TensorRole:
    """What a tensor is: its layer (``None`` outside the blocks), module type, parameter kind, orientation.

    Example::

        >>> TensorRole("model.norm.weight", None, "norm", "weight", False).layer_key
        'none'
    """

    name: str
    layer: int | None
    module: str
    param: str  # "weight", "bias" or the last name component
    transpose: bool  # stored [in, out] (Conv1D) or [vocab, d] (embedding): analysed transposed

    @property
    def layer_key(self) -> str:
        """Group key for per-layer aggregation: the layer index, or ``"none"`` (embeddings, head, final norm)."""
        return "none" if self.layer is None else str(self.layer)


def uses_conv1d(model_type: str | None, names: list[str] | None = None) -> bool:
    """True when 2-D ``c_attn``/``c_proj``/``c_fc`` weights are GPT-2 ``Conv1D`` (stored ``[in, out]``).

    Decided by the config's ``model_type``; without a config, by the presence of GPT-2's ``c_attn``.

    Example::

        >>> uses_conv1d("gpt2"), uses_conv1d("llama"), uses_conv1d(None, ["transformer.h.0.attn.c_attn.weight"])
        (True, False, True)
    """
    if model_type is not None:
        return model_type in CONV1D_MODEL_TYPES
    return any(".c_attn." in n or n.endswith(".c_attn.weight") for n in (names or []))


def is_lm_head(name: str) -> bool:
    """The output head's weight (the only tensor a tied checkpoint may omit).

    Example::

        >>> is_lm_head("lm_head.weight"), is_lm_head("model.lm_head.bias")
        (True, False)
    """
    return name == "lm_head.weight" or name.endswith(".lm_head.weight") or name == "embed_out.weight"


def classify(name: str, *, conv1d: bool = False, ndim: int = 2) -> TensorRole:
    """The :class:`TensorRole` of a tensor name (``ndim`` decides whether a transposition applies).

    Example::

        >>> classify("transformer.h.0.mlp.c_proj.weight", conv1d=True).module
        'down'
        >>> classify("transformer.h.0.attn.c_proj.bias", conv1d=True, ndim=1)
        TensorRole(name='transformer.h.0.attn.c_proj.bias', layer=0, module='o', param='bias', transpose=False)
    """
    parts = name.split(".")
    param = parts[-1] if len(parts) > 1 else "weight"
    leaf = parts[-2] if len(parts) > 1 else parts[0]
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else None
    leaf_l = leaf.lower()
    module = "other"
    if "norm" in leaf_l or re.fullmatch(r"ln(_\w+)?|\w+_ln", leaf_l):
        module = "norm"
    elif leaf in ("c_proj", "dense"):
        ctx = parts[-3].lower() if len(parts) >= 3 else ""  # the parent module: attn / mlp
        if any(c in ctx for c in _ATTN_CTX):
            module = "o"
        elif any(c in ctx for c in _MLP_CTX):
            module = "down"
    elif leaf.lower() in _LEAF:
        module = _LEAF[leaf.lower()]
        if leaf == "output" and layer is not None:
            module = "other"
    transpose = False
    if ndim == 2:
        if conv1d and leaf in _CONV1D_LEAVES:
            transpose = True
        if module in ("embed", "pos_embed"):
            transpose = True
    return TensorRole(name=name, layer=layer, module=module, param=param, transpose=transpose)
