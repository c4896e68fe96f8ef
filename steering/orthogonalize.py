"""Weight orthogonalisation: remove a direction from every matrix that writes to the residual stream.

``W_out <- W_out - r r^T W_out`` for the token (and position) embeddings, every attention output
projection and every MLP output projection (biases too). The result is a plain Hugging Face
checkpoint whose logits equal runtime directional ablation. Tied input/output embeddings are
untied first so the unembedding is left unchanged.

Weighted (``weights={name: w}``, one weight per residual writer, e.g. from
:meth:`steering.kernel.AblationProfile.module_weights`): ``W_out <- W_out - w r r^T W_out`` and
``b <- b - w (b . r) r``, which equals the runtime ablation ``h <- h - w (h . r) r`` of that write
(``Ablation(..., weight=w)``) because the write is linear in the weight and bias. A writer with weight 0 is
left untouched (the embedding is then not untied either).

Not exact for architectures that normalise a block's output before adding it to the residual
stream (Gemma 2/3 "post" norms): there the elementwise norm scale re-introduces the direction.
Such models are refused unless ``allow_post_norm=True``.

>>> from workbench.tiny import build_tiny
>>> from workbench.loading import from_memory
>>> import torch
>>> lm = from_memory(*build_tiny("llama"))
>>> r = torch.randn(64)
>>> edited = orthogonalize_model(lm.model, r)
>>> float((lm.model.model.embed_tokens.weight.detach() @ (r / r.norm())).abs().max()) < 1e-5
True
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from workbench.arch import get_arch
from workbench.errors import WorkbenchError
from workbench.io import write_json


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D"  # GPT-2 style: weight is [in, out]


def _project_out_rows(W: torch.Tensor, r: torch.Tensor, weight: float) -> None:
    """In place: rows are d-vectors (embeddings, Conv1D weights [in, d])."""
    W.sub_(torch.outer(W @ r, r) if weight == 1.0 else weight * torch.outer(W @ r, r))


def _project_out_cols(W: torch.Tensor, r: torch.Tensor, weight: float) -> None:
    """In place: nn.Linear weight [d, in] writes W x; remove (the fraction ``weight`` of) r from its output space."""
    W.sub_(torch.outer(r, r @ W) if weight == 1.0 else weight * torch.outer(r, r @ W))


def _has_post_norms(model: nn.Module) -> bool:
    layer = get_arch(model).layers[0]
    return any(hasattr(layer, n) for n in ("post_attention_norm", "post_feedforward_layernorm", "post_mlp_layernorm")) or (
        hasattr(layer, "pre_feedforward_layernorm") and hasattr(layer, "post_attention_layernorm"))


def _check_weights(weights: Mapping[str, float], names: list[str]) -> dict[str, float]:
    """One finite weight per residual writer of the model, named as :meth:`Arch.writes_to_residual` names them."""
    unknown = [k for k in weights if k not in names]
    missing = [n for n in names if n not in weights]
    if unknown or missing:
        what = (f"unknown writer(s) {', '.join(unknown[:4])}" if unknown else "") + ("; " if unknown and missing else "") + (
            f"no weight for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else "")
        raise WorkbenchError(f"orthogonalisation weights must name every residual writer exactly once ({what}); "
                             f"the model's writers: {', '.join(names[:3])}, ... {names[-1]}")
    out = {}
    for n in names:
        w = float(weights[n])
        if not math.isfinite(w):
            raise WorkbenchError(f"orthogonalisation weight of {n} must be finite, got {weights[n]!r}")
        out[n] = w
    return out


def orthogonalize_model(model: nn.Module, direction: torch.Tensor, *, allow_post_norm: bool = False,
                        weights: Mapping[str, float] | None = None) -> list[str]:
    """Orthogonalise ``model``'s residual-writing weights to ``direction`` in place; return the edited names.

    ``weights``: ``{writer name: w}`` for a weighted projection ``W <- W - w r r^T W`` (every writer named,
    see the module docstring); ``None`` is weight 1 everywhere (full orthogonalisation)."""
    arch = get_arch(model)
    if direction.numel() != arch.d_model:
        raise WorkbenchError(f"direction has size {direction.numel()} but the model's d_model is {arch.d_model}")
    if not torch.isfinite(direction).all() or float(direction.norm()) == 0:
        raise WorkbenchError("direction must be finite and non-zero")
    if _has_post_norms(model) and not allow_post_norm:
        raise WorkbenchError(
            f"{type(model).__name__} normalises block outputs before the residual add; weight orthogonalisation "
            "would not equal runtime ablation there. Pass allow_post_norm=True to do it anyway."
        )
    writers = arch.writes_to_residual()
    w_of = _check_weights(weights, [n for n, _ in writers]) if weights is not None else {n: 1.0 for n, _ in writers}
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight is arch.embed.weight and w_of["embed"] != 0.0:
        # untie: the unembedding keeps the original weights
        out_emb.weight = nn.Parameter(arch.embed.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    edited = []
    with torch.no_grad():
        for name, module in writers:
            w = w_of[name]
            if w == 0.0:
                continue
            W = module.weight
            r = (direction / direction.norm()).to(device=W.device, dtype=torch.float32)
            W32 = W.detach().float()
            if isinstance(module, nn.Embedding) or _is_conv1d(module):
                _project_out_rows(W32, r, w)
            else:
                _project_out_cols(W32, r, w)
            W.copy_(W32.to(W.dtype))
            b = getattr(module, "bias", None)
            if isinstance(b, torch.Tensor):
                b32 = b.detach().float()
                b.copy_((b32 - w * (b32 @ r) * r).to(b.dtype))
            edited.append(name)
    return edited


def write_orthogonalized(lm: Any, direction: torch.Tensor, out: str | Path, *, overwrite: bool = False,
                         allow_post_norm: bool = False, report: dict[str, Any] | None = None,
                         weights: Mapping[str, float] | None = None) -> Path:
    """Write an orthogonalised copy of ``lm`` as a plain HF checkpoint (safetensors) to ``out``
    (``weights``: a weighted projection per residual writer, see :func:`orthogonalize_model`)."""
    import copy

    from workbench.runs import check_out, replace_folder, write_marker

    out = Path(out)
    check_out(out, overwrite=overwrite)  # replaces only a folder the workbench made, and only at the end
    model = copy.deepcopy(lm.model)
    edited = orthogonalize_model(model, direction, allow_post_norm=allow_post_norm, weights=weights)
    model.hf_quantizer = None
    out.parent.mkdir(parents=True, exist_ok=True)  # the temp folder must be on out's filesystem (rename)
    tmp = Path(tempfile.mkdtemp(prefix=".ortho.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))
        write_json(tmp / "orthogonalization.json", {
            "source_model": lm.model_id, "source_checksum": lm.checksum, "edited": edited,
            "direction_norm": float(direction.norm()),
            **({"weights": {k: float(v) for k, v in weights.items()}} if weights is not None else {}),
            **(report or {})})
        write_marker(tmp, kind="orthogonalized-model", complete=True)
        replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
