"""The hooking-backend interface every other module uses.

A backend runs forward passes and ``generate`` on a loaded model, capturing activations at
:class:`~workbench.sites.Site` s and applying :class:`~workbench.interventions.Intervention` s.
Three implementations agree numerically: ``native`` (plain PyTorch hooks, the default),
``transformer_lens`` (TransformerBridge) and ``nnsight``.

>>> from workbench.tiny import build_tiny
>>> from workbench.loading import from_memory
>>> from workbench.backends import get_backend
>>> from workbench.chat import encode
>>> from workbench.sites import Site
>>> lm = from_memory(*build_tiny("llama"))
>>> be = get_backend("native", lm)
>>> out = be.run(encode(lm.tokenizer, ["Hello there"]), capture=[Site(1, "resid_post")])
>>> out.acts[Site(1, "resid_post")].shape[-1]
64
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from workbench.arch import Arch, get_arch
from workbench.chat import Batch
from workbench.errors import WorkbenchError
from workbench.interventions import HookContext, Intervention
from workbench.loading import LoadedModel
from workbench.sites import Site


@dataclass
class RunOutput:
    """Logits ``[B, T, V]`` (None when not asked for) and captured activations ``{site: [B, T, d]}``.

    A captured activation is the value *after* the interventions at that same site.
    """

    logits: torch.Tensor | None
    acts: dict[Site, torch.Tensor] = field(default_factory=dict)


SiteFn = Callable[[torch.Tensor], torch.Tensor]


def logits_kept(logits: bool | str | int) -> int | None:
    """How many trailing positions :meth:`Backend.run` unembeds: 1 for ``"last"``, ``K`` for an int ``K``,
    None for True (every position) or False (none).

    >>> logits_kept("last"), logits_kept(5), logits_kept(True), logits_kept(False)
    (1, 5, None, None)
    """
    if isinstance(logits, bool):
        return None
    if logits == "last":
        return 1
    if isinstance(logits, int):
        if logits < 1:
            raise WorkbenchError(f"logits={logits}: the number of trailing positions to unembed must be >= 1")
        return int(logits)
    raise WorkbenchError(f"logits={logits!r}: use True, False, 'last' or an int K >= 1")


class Backend(ABC):
    """Run forward passes / generation with captures and interventions."""

    name: ClassVar[str] = "abstract"
    #: ``generate(..., first_step=[])`` records the prefill's next-token logits (see the native backend)
    records_first_step: ClassVar[bool] = False

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.arch: Arch = get_arch(lm.model)

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    # -- shared helpers -------------------------------------------------------------------------

    def check_sites(self, sites: Sequence[Site]) -> None:
        for s in sites:
            self.arch.check_layer(s.layer)

    def context(self, batch: Batch) -> HookContext:
        return HookContext(pads=batch.pads.clone(), prompt_width=batch.width, n_post=batch.n_post, offset=0)

    def site_functions(
        self,
        capture: Sequence[Site],
        interventions: Sequence[Intervention],
        ctx: HookContext,
        store: dict[Site, torch.Tensor] | None,
    ) -> dict[Site, SiteFn]:
        """One function per touched site: apply its interventions in order, then record the result."""
        capture = list(capture)
        interventions = list(interventions)
        self.check_sites(capture + [iv.site for iv in interventions])
        norm = lambda s: Site(self.arch.check_layer(s.layer), s.component)  # noqa: E731
        by_site: dict[Site, list[Intervention]] = {}
        for iv in interventions:
            by_site.setdefault(norm(iv.site), []).append(iv)
        cap = {norm(s) for s in capture}
        fns: dict[Site, SiteFn] = {}
        for site in set(by_site) | cap:
            ivs = by_site.get(site, [])
            record = site in cap and store is not None

            def fn(act: torch.Tensor, _ivs: list[Intervention] = ivs, _site: Site = site, _rec: bool = record) -> torch.Tensor:
                for iv in _ivs:
                    act = iv(act, ctx)
                if _rec:
                    store[_site] = act.detach()  # type: ignore[index]
                return act

            fns[site] = fn
        return fns

    @staticmethod
    def _remap(acts: dict[Site, torch.Tensor], capture: Sequence[Site], n: int) -> dict[Site, torch.Tensor]:
        """Return captures keyed by the sites as the caller named them (negative layers included)."""
        out = {}
        for s in capture:
            key = Site(s.layer % n, s.component)
            if key not in acts:
                raise WorkbenchError(f"site {s} was not reached in the forward pass")
            out[s] = acts[key]
        return out

    # -- the interface --------------------------------------------------------------------------

    @abstractmethod
    def run(
        self,
        batch: Batch,
        *,
        capture: Sequence[Site] = (),
        interventions: Sequence[Intervention] = (),
        logits: bool | str | int = True,
    ) -> RunOutput:
        """One forward pass over a left-padded batch (position ids from the attention mask).

        ``logits``: True for ``[B, T, V]``, ``"last"`` for the last position only ``[B, 1, V]`` (cheap
        next-token scoring), an int ``K >= 1`` for the last ``K`` positions ``[B, min(K, T), V]`` (the
        unembedding of the other positions is skipped: teacher-forced scoring of a completion), False to skip
        the unembedding (captures only)."""

    @abstractmethod
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
        """New token ids ``[B, max_new_tokens]`` (rows that stopped early are filled with the pad id),
        generated with the KV cache and the interventions active at every step."""

    # -- conveniences built on the interface ----------------------------------------------------

    def pad_id(self) -> int:
        tok = self.lm.tokenizer
        pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pid if pid is not None else 0)

    def hf_generate_kwargs(self, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float
                           ) -> dict[str, Any]:
        """Arguments for Hugging Face ``generate`` that every HF-driven backend passes identically."""
        kw: dict[str, Any] = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, min_new_tokens=0,
                                  pad_token_id=self.pad_id(), eos_token_id=self.eos_ids() or None)
        if do_sample:
            kw.update(temperature=temperature, top_p=top_p, top_k=0)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw

    def eos_ids(self) -> list[int]:
        ids: list[int] = []
        gc = getattr(self.lm.model, "generation_config", None)
        e = getattr(gc, "eos_token_id", None) if gc is not None else None
        if e is None:
            e = self.lm.tokenizer.eos_token_id
        if isinstance(e, int):
            ids = [e]
        elif e is not None:
            ids = [int(x) for x in e]
        return ids

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Decode generated ids, cutting each row at its first end-of-sequence token."""
        eos = set(self.eos_ids())
        out = []
        for row in tokens.tolist():
            cut = []
            for t in row:
                if t in eos:
                    break
                cut.append(t)
            out.append(self.lm.tokenizer.decode(cut, skip_special_tokens=True))
        return out
