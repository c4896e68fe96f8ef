"""Capture activations for a prompt set at many sites and positions in one forward pass per batch.

Reading positions: ``"last"`` (last prompt token), ``"post_instruction"`` (the tokens the chat
template appends after the user's text; stored as ``pos-k`` ... ``pos-1``), ``"mean"`` (mean over
the prompt's real tokens), explicit indices (``-3`` from the end of the prompt, ``0`` from its
first real token; stored as ``pos-3`` / ``pos0``) and ``"all"`` (every real token, flattened,
with ``token_index`` giving (prompt, position)).

>>> from workbench.tiny import build_tiny
>>> from workbench.loading import from_memory
>>> lm = from_memory(*build_tiny("qwen2"))
>>> acts = capture(lm, ["Hi", "Tell me a story"], layers="all", positions=["last", "mean"], cache=False, progress=False)
>>> acts.get("last").shape   # [prompts, sites, d]
torch.Size([2, 2, 64])
>>> acts.layer(-1).shape      # [prompts, d]
torch.Size([2, 64])
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from workbench.backends import get_backend
from workbench.chat import Batch, ChatFormat, encode
from workbench.errors import WorkbenchError
from workbench.io import load_tensors, read_json, save_tensors, sha256_json, sha256_text, write_json
from workbench.loading import LoadedModel
from workbench.paths import activations_cache
from workbench.sites import COMPONENTS, Site, parse_sites

FORMAT_VERSION = 1


def _position_keys(positions: Sequence[str | int], n_post: int) -> list[str]:
    keys: list[str] = []
    for p in positions:
        if isinstance(p, int) or (isinstance(p, str) and p.lstrip("-").isdigit()):
            keys.append(f"pos{int(p)}")
        elif p == "post_instruction":
            keys.extend(f"pos-{k}" for k in range(n_post, 0, -1))
        elif p in ("last", "mean", "all"):
            keys.append(p)
        else:
            raise WorkbenchError(
                f"unknown reading position '{p}'. Valid: last, post_instruction, mean, all, or an integer index"
            )
    out: list[str] = []
    for k in keys:
        if k not in out:
            out.append(k)
    return out


@dataclass
class Activations:
    """Captured activations: ``data[position] -> [prompts, sites, d]`` plus provenance metadata."""

    data: dict[str, torch.Tensor]
    sites: list[Site]
    meta: dict[str, Any] = field(default_factory=dict)
    token_index: torch.Tensor | None = None  # [n_tokens, 2] for the "all" position

    @property
    def positions(self) -> list[str]:
        return list(self.data)

    @property
    def n_prompts(self) -> int:
        return int(self.meta.get("n_prompts", next(iter(self.data.values())).shape[0]))

    @property
    def layers(self) -> list[int]:
        out: list[int] = []
        for s in self.sites:
            if s.layer not in out:
                out.append(s.layer)
        return out

    def site_index(self, site: Site) -> int:
        try:
            return self.sites.index(site)
        except ValueError:
            raise WorkbenchError(
                f"site {site} was not captured; captured: {', '.join(s.name for s in self.sites)}"
            ) from None

    def get(self, position: str = "last") -> torch.Tensor:
        """``[prompts, sites, d]`` at a position key ("last" and "pos-1" are the same token)."""
        if position not in self.data:
            alias = {"last": "pos-1", "pos-1": "last"}.get(position)
            if alias in self.data:
                return self.data[alias]
            raise WorkbenchError(f"position '{position}' was not captured; captured: {', '.join(self.data)}")
        return self.data[position]

    def select(self, rows: Any) -> "Activations":
        """A new Activations with a subset of prompts (e.g. ``slice(0, 100)`` or an index list)."""
        if self.token_index is not None:
            raise WorkbenchError("select() is not supported for captures with the 'all' position")
        data = {k: v[rows] for k, v in self.data.items()}
        n = next(iter(data.values())).shape[0]
        meta = dict(self.meta, n_prompts=n)
        if "prompt_hashes" in meta:
            idx = list(range(len(meta["prompt_hashes"])))[rows] if isinstance(rows, slice) else list(rows)
            meta["prompt_hashes"] = [self.meta["prompt_hashes"][i] for i in idx]
        return Activations(data, list(self.sites), meta)

    def layer(self, layer: int, position: str = "last", component: str = "resid_post") -> torch.Tensor:
        """``[prompts, d]`` at one layer (negative indices count from the last captured model layer)."""
        n = int(self.meta.get("n_layers", max(self.layers) + 1))
        site = Site(layer % n if -n <= layer < n else layer, component)
        return self.get(position)[:, self.site_index(site)]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"acts.{k}": v for k, v in self.data.items()}
        if self.token_index is not None:
            tensors["token_index"] = self.token_index
        save_tensors(folder / "activations.safetensors", tensors, {"format": "workbench-activations"})
        write_json(folder / "activations.json", {**self.meta, "sites": [s.name for s in self.sites],
                                                 "positions": list(self.data), "format_version": FORMAT_VERSION})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Activations":
        folder = Path(folder)
        if not (folder / "activations.json").exists():
            raise WorkbenchError(f"{folder} holds no saved activations (activations.json missing)")
        meta = read_json(folder / "activations.json")
        t = load_tensors(folder / "activations.safetensors")
        data = {k: t[f"acts.{k}"] for k in meta["positions"]}
        sites = [Site.parse(s) for s in meta.pop("sites")]
        meta.pop("positions")
        return cls(data, sites, meta, t.get("token_index"))


def _gather(act: torch.Tensor, batch: Batch, keys: list[str]) -> dict[str, torch.Tensor]:
    """Reduce one site's ``[B, T, d]`` to each position key."""
    out: dict[str, torch.Tensor] = {}
    b, t, _ = act.shape
    pads = batch.pads.to(act.device)
    mask = batch.attention_mask.to(act.device).bool()
    rows = torch.arange(b, device=act.device)
    for k in keys:
        if k == "last":
            out[k] = act[:, -1]
        elif k == "mean":
            m = mask.unsqueeze(-1).to(act.dtype)
            out[k] = (act * m).sum(1) / m.sum(1)
        elif k == "all":
            out[k] = act[mask]
        else:
            i = int(k[3:])
            idx = (t + i) * torch.ones_like(pads) if i < 0 else pads + i
            bad = (idx < pads) | (idx >= t)
            if bool(bad.any()):
                j = int(bad.nonzero()[0])
                raise WorkbenchError(
                    f"position {i} is outside prompt {j} ({int(batch.lengths[j])} tokens); valid: "
                    f"-{int(batch.lengths[j])}..{int(batch.lengths[j]) - 1}"
                )
            out[k] = act[rows, idx]
    return out


def cache_key(lm: LoadedModel, texts: Sequence[str], sites: Sequence[Site], keys: Sequence[str],
              template_hash: str) -> str:
    return sha256_json({
        "v": FORMAT_VERSION,
        "model": lm.checksum,
        "dtype": str(lm.dtype),
        "attn": getattr(lm.model.config, "_attn_implementation", None),
        "template": template_hash,
        "texts": sha256_json(list(texts)),
        "sites": [s.name for s in sites],
        "keys": list(keys),
    })[:32]


def capture(
    lm: LoadedModel,
    prompts: Sequence[str] | Any,
    *,
    layers: str | int | Sequence[int] | None = "all",
    components: Sequence[str] = ("resid_post",),
    positions: Sequence[str | int] = ("last",),
    fmt: ChatFormat | None = None,
    backend: str = "native",
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> Activations:
    """Run the prompts through the model once and keep activations at the chosen sites and positions.

    ``prompts`` is a list of strings or a :class:`workbench.prompts.PromptSet`. Prompts are sorted by
    length into batches (less padding) and results returned in the original order. With ``cache=True``
    a repeated capture of the same model / prompts / sites / positions / template is read from disk.
    """
    texts = list(prompts.texts) if hasattr(prompts, "texts") else list(prompts)
    if not texts:
        raise WorkbenchError("the prompt set is empty: give at least one prompt")
    if isinstance(components, str):
        components = [components]
    for c in components:
        if c not in COMPONENTS:
            raise WorkbenchError(f"unknown component '{c}'. Valid: {', '.join(COMPONENTS)}")
    if batch_size < 1:
        raise WorkbenchError(f"batch_size must be >= 1, got {batch_size}")
    fmt = fmt or ChatFormat(system_prompt=None)
    tok = lm.tokenizer
    n_layers = lm.n_layers
    sites = parse_sites(layers, n_layers, components)
    full = encode(tok, texts, fmt, max_positions=lm.max_positions)
    keys = _position_keys(list(positions), full.n_post)
    thash = fmt.template_hash(tok)
    key = cache_key(lm, texts, sites, keys, thash)
    folder = activations_cache() / key
    if cache and (folder / "activations.json").exists():
        acts = Activations.load(folder)
        acts.meta["from_cache"] = True
        return acts

    be = get_backend(backend, lm)
    order = sorted(range(len(texts)), key=lambda i: int(full.lengths[i]))
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    token_rows: list[torch.Tensor] = []
    t_start = time.perf_counter()
    iterator = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"capture {lm.model_id}", unit="batch", total=(len(order) + batch_size - 1) // batch_size)
    for start in iterator:
        idx = order[start:start + batch_size]
        sub = encode(tok, [texts[i] for i in idx], fmt)
        out = be.run(sub, capture=sites, logits=False)
        per_site = [_gather(out.acts[s], sub, keys) for s in sites]
        for k in keys:
            if k == "all":
                chunks[k].append(torch.stack([ps[k] for ps in per_site], dim=1).float().cpu())
            else:
                chunks[k].append(torch.stack([ps[k] for ps in per_site], dim=1).float().cpu())
        if "all" in keys:
            m = sub.attention_mask.bool()
            for r, i in enumerate(idx):
                n = int(m[r].sum())
                token_rows.append(torch.stack([torch.full((n,), i), torch.arange(n)], dim=1))
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    data: dict[str, torch.Tensor] = {}
    token_index = None
    for k in keys:
        cat = torch.cat(chunks[k], dim=0)
        if k == "all":
            token_index = torch.cat(token_rows, dim=0)
            perm = torch.argsort(token_index[:, 0] * (10**9) + token_index[:, 1])
            data[k] = cat[perm]
            token_index = token_index[perm]
        else:
            data[k] = cat[inv]
    for k, v in data.items():
        if not torch.isfinite(v).all():
            raise WorkbenchError(f"non-finite activations captured at position '{k}' (model or dtype problem)")
    meta = {
        "model_id": lm.model_id,
        "model_checksum": lm.checksum,
        "dtype": str(lm.dtype).replace("torch.", ""),
        "backend": backend,
        "n_layers": n_layers,
        "d_model": lm.d_model,
        "n_prompts": len(texts),
        "n_post": full.n_post,
        "template_hash": thash,
        "system_prompt": fmt.system_prompt,
        "raw": fmt.raw,
        "prompt_set_hash": sha256_json(texts)[:16],
        "prompt_hashes": [sha256_text(t)[:16] for t in texts],
        "seconds": round(time.perf_counter() - t_start, 3),
        "cache_key": key,
    }
    acts = Activations(data, sites, meta, token_index)
    if cache:
        acts.save(folder)
    return acts
