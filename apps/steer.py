"""One column of the Steer tab, without Gradio: a steered greedy generation streamed token by token,
its scores, and each generated token's projection onto the steering direction.

The generation loop is a small incremental greedy decoder over the native backend's hooks and a
KV cache. Every forward pass (one prompt prefill or one decoding step) registers the column's hooks,
runs under the model's lock and removes the hooks before releasing it, so columns and users that share
a model interleave step by step but never see each other's interventions. The loop yields the same
tokens as :meth:`workbench.backends.base.Backend.generate` (greedy) with the same interventions.

>>> import torch
>>> from workbench.tiny import build_tiny
>>> from workbench.loading import from_memory
>>> from workbench.backends import get_backend
>>> from workbench.vectors import Direction
>>> lm = from_memory(*build_tiny("llama"))
>>> be = get_backend("native", lm)
>>> d = Direction(torch.ones(64), layer=1, method="demo", model_id=lm.model_id, model_checksum=lm.checksum,
...               d_model=64, component="resid_pre")
>>> spec = ColumnSpec("addition x2", "addition", d, strength=2.0)
>>> res = compute_column(be, be, "Tell me a joke", spec, probe=Probe.from_direction(d), max_new_tokens=8)
>>> len(res.token_ids) <= 8 and res.scores.kl_next >= 0
True
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import torch

from workbench.arch import cache_kwarg as _cache_kwarg
from workbench.arch import new_cache as _new_cache
from workbench.backends.base import Backend
from workbench.chat import Batch, ChatFormat, encode, position_ids_from_mask
from workbench.errors import WorkbenchError
from workbench.interventions import Intervention
from workbench.scoring import is_refusal, refusal_token_ids
from workbench.sites import Site, parse_layers
from workbench.vectors import Direction

from steering.kernel import KernelAblation

KINDS = ("none", "addition", "ablation", "orthogonalised", "optimised")
KIND_LABELS = {
    "none": "none (unmodified)",
    "addition": "activation addition",
    "ablation": "directional ablation (every layer)",
    "orthogonalised": "orthogonalised weights",
    "optimised": "optimised ablation (per-layer weights of a 'steer optimize' run)",
}

Lock = Any  # anything usable as a context manager (threading.Lock / RLock / nullcontext)


# -- what a column does -------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """Where to read the per-token projection: a site and the unit direction."""

    site: Site
    unit: torch.Tensor

    @classmethod
    def from_direction(cls, d: Direction) -> "Probe":
        return cls(Site(d.layer, d.component), d.unit)


@dataclass
class ColumnSpec:
    """One column's setting: ``kind`` in KINDS, the direction it uses, strength and layers for addition.

    ``layers`` is ``None`` (the direction's own layer) or a layer spec like ``"10"``, ``"8-12"``, ``"4,6"``.
    For ``orthogonalised`` the caller supplies the orthogonalised model's backend; no hooks are added. For
    ``optimised``, ``kernel`` is a :class:`steering.kernel.KernelAblation` (a ``steer optimize`` run's choice),
    applied at run time with its per-layer attention / MLP weights as ``steer removal`` applies it; the direction
    is the kernel's.
    """

    label: str
    kind: str = "none"
    direction: Direction | None = None
    strength: float = 1.0
    layers: str | Sequence[int] | None = None
    kernel: KernelAblation | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise WorkbenchError(f"unknown intervention '{self.kind}'. Valid: {', '.join(KINDS)}")
        if self.kind == "optimised":
            if self.kernel is None:
                raise WorkbenchError("the 'optimised' intervention needs a kernel ablation "
                                     "(chosen_ablation.safetensors of 'workbench steer optimize')")
            self.direction = self.kernel.direction
        if self.kind != "none" and self.direction is None:
            raise WorkbenchError(f"the '{self.kind}' intervention needs a direction")
        if not math.isfinite(float(self.strength)):
            raise WorkbenchError(f"strength must be a finite number, got {self.strength}")

    def with_random_direction(self, seed: int, label: str | None = None) -> "ColumnSpec":
        """The same setting on a random direction of the same norm (seeded): the random control. An optimised
        column keeps its per-layer weights and swaps the kernel's direction."""
        from steering.directions import random_like

        if self.direction is None:
            return replace(self, label=label or self.label)
        rnd = random_like(self.direction, seed=int(seed))
        kernel = KernelAblation(self.kernel.profile, rnd) if self.kernel is not None else None
        return replace(self, label=label or self.label, direction=rnd, kernel=kernel)

    def describe(self, n_layers: int | None = None) -> str:
        if self.kind == "none":
            return "unmodified"
        d = self.direction
        assert d is not None
        idx = d.meta.get("direction_index") if isinstance(d.meta, dict) else None
        src = f"{d.method} @ layer {d.layer}" if idx is None else f"{d.method} @ layer index {float(idx):.2f}"
        if self.kind == "addition":
            where = self.layers if self.layers not in (None, "", []) else d.layer
            return f"addition x{float(self.strength):g} of {src} at layer(s) {where} ({d.component})"
        if self.kind == "ablation":
            return f"ablation of {src}, every layer"
        if self.kind == "optimised":
            assert self.kernel is not None
            p = self.kernel.profile
            return (f"optimised ablation of {src} (attention peak {p.attn.peak:.2f} at layer {p.attn.position:.1f}, "
                    f"MLP peak {p.mlp.peak:.2f} at layer {p.mlp.position:.1f})")
        return f"orthogonalised weights against {src}"


def build_interventions(spec: ColumnSpec, n_layers: int) -> list[Intervention]:
    """The hooks a column needs (none for ``none`` and ``orthogonalised``)."""
    from steering.interventions import ablation, addition

    if spec.kind in ("none", "orthogonalised"):
        return []
    if spec.kind == "optimised":  # the path of 'steer removal': per-layer weighted Ablation interventions
        assert spec.kernel is not None
        return spec.kernel.interventions(n_layers)
    d = spec.direction
    assert d is not None
    if d.d_model <= 0:
        raise WorkbenchError("the direction is empty")
    if spec.kind == "addition":
        layers = None
        if spec.layers not in (None, "", []):
            layers = parse_layers(spec.layers, n_layers)  # type: ignore[arg-type]
        else:
            parse_layers([d.layer], n_layers)  # a clear error if the direction's layer is out of range
        return addition(d, float(spec.strength), layers=layers)
    return ablation(d, n_layers)


# -- the prompt batch -----------------------------------------------------------------------------

def encode_prompt(backend: Backend, prompt: str, fmt: ChatFormat | None = None, *,
                  max_prompt_tokens: int | None = None, max_new_tokens: int = 0) -> Batch:
    """Template and tokenise one prompt; refuse empty and over-long prompts (the app's limit, and prompt
    plus new tokens beyond the model's context) with a clear message."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise WorkbenchError("the prompt is empty: type a prompt or pick one from the built-in sets")
    lm = backend.lm
    batch = encode(lm.tokenizer, [prompt], fmt)
    n = int(batch.lengths[0])
    if max_prompt_tokens is not None and n > max_prompt_tokens:
        raise WorkbenchError(
            f"the prompt is {n} tokens long (chat template included); this app accepts at most "
            f"{max_prompt_tokens} tokens per prompt. Shorten it (nothing is truncated silently)."
        )
    ctx = lm.max_positions
    if ctx and n + max(0, int(max_new_tokens)) > ctx:
        raise WorkbenchError(
            f"too many tokens: the prompt ({n} tokens) plus max new tokens ({int(max_new_tokens)}) exceed the "
            f"model's context of {ctx} tokens; shorten the prompt or lower max new tokens"
        )
    return batch


# -- the streaming greedy loop --------------------------------------------------------------------

class GreedyStream:
    """Greedy decoding of one prompt, one forward pass per :meth:`step`, hooks only inside the lock.

    After each step, ``token_ids`` / ``pieces`` / ``text`` hold what was generated so far (the end-of-
    sequence token excluded) and ``projections[i]`` the projection of generated token ``i``'s residual
    at the probe site onto the unit direction (known one step after the token appears; the last one is
    filled in by :func:`score_column`). ``first_logits`` is the next-token logits at the last prompt
    position (float32 ``[V]``).
    """

    def __init__(self, backend: Backend, batch: Batch, *, interventions: Sequence[Intervention] = (),
                 max_new_tokens: int = 32, lock: Lock | None = None, probe: Probe | None = None) -> None:
        if batch.size != 1:
            raise WorkbenchError("GreedyStream decodes one prompt at a time")
        if max_new_tokens < 1:
            raise WorkbenchError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not hasattr(backend, "hooked"):
            raise WorkbenchError(f"streaming needs the native backend, got '{backend.name}'")
        self.backend = backend
        self.batch = batch.to(backend.lm.device)
        self.interventions = list(interventions)
        self.max_new_tokens = int(max_new_tokens)
        self.lock = lock if lock is not None else nullcontext()
        self.probe = probe
        self.token_ids: list[int] = []
        self.pieces: list[str] = []
        self.projections: list[float | None] = []
        self.text = ""
        self.first_logits: torch.Tensor | None = None
        self.stopped_by_eos = False
        self.done = False
        self._eos = set(backend.eos_ids())
        self._ctx = backend.context(self.batch)
        self._store: dict[Site, torch.Tensor] = {}
        cap = [probe.site] if probe is not None else []
        self._fns = backend.site_functions(cap, self.interventions, self._ctx, self._store)
        self._cache = _new_cache(backend.lm.model)
        self._cache_kw = _cache_kwarg(backend.lm.model)
        self._next_input = self.batch.input_ids
        self._mask = self.batch.attention_mask
        self._pos = self.batch.position_ids
        self._offset = 0
        self._unit = probe.unit.to(backend.lm.device) if probe is not None else None
        if probe is not None:
            self._probe_key = Site(backend.arch.check_layer(probe.site.layer), probe.site.component)
            if self._unit.numel() != backend.lm.d_model:
                raise WorkbenchError(f"the direction has size {self._unit.numel()} but the model's d_model is "
                                     f"{backend.lm.d_model}")

    def _wrapped(self) -> dict[Site, Callable[[torch.Tensor], torch.Tensor]]:
        # The backend's position tracker counts tokens seen inside one ``hooked`` block, which here is
        # one step; set the absolute offset of this step's chunk before every site function runs.
        off, ctx = self._offset, self._ctx

        def wrap(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
            def g(act: torch.Tensor) -> torch.Tensor:
                ctx.offset = off
                return fn(act)

            return g

        return {s: wrap(f) for s, f in self._fns.items()}

    def step(self) -> bool:
        """One forward pass and one new token. Returns False once the stream is finished."""
        if self.done:
            return False
        model = self.backend.lm.model
        self._store.clear()
        with self.lock, torch.no_grad(), self.backend.hooked(self._ctx, self._wrapped()):
            out = model(input_ids=self._next_input, attention_mask=self._mask, position_ids=self._pos,
                        use_cache=True, logits_to_keep=1, **{self._cache_kw: self._cache})
        logits = out.logits[0, -1].float()
        chunk = int(self._next_input.shape[1])
        if self.first_logits is None:
            self.first_logits = logits.detach().cpu()
        elif self._unit is not None and self._probe_key in self._store:
            # this step's input was the previous generated token: its residual is now known
            act = self._store[self._probe_key][0, -1].float()
            self.projections[len(self.token_ids) - 1] = float(act @ self._unit.float())
        self._offset += chunk
        tok = int(logits.argmax())
        if tok in self._eos:
            self.stopped_by_eos = True
            self.done = True
            self._flush()
            return False
        self._append(tok)
        if len(self.token_ids) >= self.max_new_tokens:
            self.done = True
            self._flush()
            return False
        dev = self._mask.device
        self._next_input = torch.tensor([[tok]], dtype=self.batch.input_ids.dtype, device=dev)
        self._mask = torch.cat([self._mask, torch.ones((1, 1), dtype=self._mask.dtype, device=dev)], dim=1)
        self._pos = self._pos[:, -1:] + 1
        return True

    def _append(self, tok: int) -> None:
        # A token's piece is the new text it completes; bytes of an unfinished character (decoded as
        # U+FFFD) are held back until the token that completes it, so "".join(pieces) == text.
        tokenizer = self.backend.lm.tokenizer
        self.token_ids.append(tok)
        text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        emitted = "".join(self.pieces)
        if not text.startswith(emitted):  # pragma: no cover - tokenizers whose prefix decodes are unstable
            k = 0
            while k < min(len(text), len(emitted)) and text[k] == emitted[k]:
                k += 1
            emitted = emitted[:k]
        piece = text[len(emitted):]
        if piece.endswith("\ufffd"):
            piece = ""
        self.pieces.append(piece)
        self.projections.append(None)
        self.text = text

    def _flush(self) -> None:
        rest = self.text[len("".join(self.pieces)):]
        if rest and self.pieces:
            self.pieces[-1] += rest

    def __iter__(self) -> Iterator["GreedyStream"]:
        while self.step():
            yield self
        yield self

    def run(self) -> "GreedyStream":
        while self.step():
            pass
        return self


# -- scores -------------------------------------------------------------------------------------

@dataclass
class ColumnScores:
    """The numbers shown under a column (scorer names as in ``workbench.scoring.SCORERS``)."""

    refusal: bool  # refusal_phrase on the generated text
    refusal_logit: float  # refusal_logit at the last prompt position, under this column's setting
    kl_next: float  # kl_last: KL(unmodified || this column) of the next-token distribution, last prompt position
    kl_reply: float  # the same KL averaged over every position that produced a reply token (teacher-forced)
    perplexity: float  # of this column's reply tokens under the unmodified model (nan for an empty reply)
    mean_projection: float  # mean projection of the reply tokens onto the unit direction (nan without a probe)
    n_tokens: int

    def as_row(self) -> dict[str, Any]:
        return {"refusal": self.refusal, "refusal_logit": self.refusal_logit, "kl_next": self.kl_next,
                "kl_reply": self.kl_reply, "perplexity": self.perplexity,
                "mean_projection": self.mean_projection, "n_tokens": self.n_tokens}


def refusal_logodds(logits: torch.Tensor, token_ids: Sequence[int]) -> float:
    """log p(refusal tokens) - log(1 - p(refusal tokens)) from next-token logits ``[V]``."""
    logp = torch.log_softmax(logits.double().reshape(-1), dim=-1)
    lp_r = torch.logsumexp(logp[torch.tensor(list(token_ids), dtype=torch.long)], dim=-1)
    p_r = lp_r.exp().clamp(max=1 - 1e-12)
    return float(lp_r - torch.log1p(-p_r))


def _full_batch(batch: Batch, token_ids: Sequence[int]) -> Batch:
    ids = batch.input_ids[:, batch.attention_mask[0].bool()].cpu()
    if token_ids:
        ids = torch.cat([ids, torch.tensor([list(token_ids)], dtype=ids.dtype)], dim=1)
    mask = torch.ones_like(ids)
    return Batch(ids, mask, position_ids_from_mask(mask), mask.sum(-1), batch.n_post)


def score_column(ref_backend: Backend, col_backend: Backend, batch: Batch, token_ids: Sequence[int], *,
                 interventions: Sequence[Intervention] = (), probe: Probe | None = None, lock: Lock | None = None,
                 same_as_reference: bool = False) -> tuple[ColumnScores, list[float], str]:
    """Score a finished reply by teacher forcing prompt + reply through the unmodified model and through
    this column's setting (two forward passes; one when ``same_as_reference``).

    Returns the scores, the per-token projections (teacher-forced, at each reply token's own position)
    and the decoded reply.
    """
    lock = lock if lock is not None else nullcontext()
    token_ids = list(token_ids)
    n = len(token_ids)
    full = _full_batch(batch, token_ids)
    t0 = int(batch.lengths[0])
    cap = [probe.site] if probe is not None else []
    tok = ref_backend.lm.tokenizer
    with lock:  # tokenizer calls too: HF fast tokenizers are not safe to call from several threads at once
        refusal_ids = refusal_token_ids(tok)
        ref = ref_backend.run(full, logits=True, capture=cap if same_as_reference else ())
        col = ref if same_as_reference else col_backend.run(full, logits=True, capture=cap,
                                                            interventions=interventions)
    # positions t0-1 .. t0+n-2 predicted the n reply tokens (t0-1 alone for an empty reply)
    sl = slice(t0 - 1, t0 - 1 + max(n, 1))
    lp_ref = torch.log_softmax(ref.logits[0, sl].double(), dim=-1)
    lp_col = lp_ref if same_as_reference else torch.log_softmax(col.logits[0, sl].double(), dim=-1)
    kl = (lp_ref.exp() * (lp_ref - lp_col)).sum(-1).clamp(min=0)
    if n:
        nll = -lp_ref[torch.arange(n), torch.tensor(token_ids)]
        ppl = float(torch.exp(nll.mean()))
    else:
        ppl = float("nan")
    projections: list[float] = []
    if probe is not None:
        act = col.acts[probe.site][0, t0:t0 + n].float()
        projections = (act @ probe.unit.to(act.device).float()).tolist()
    text = tok.decode(token_ids, skip_special_tokens=True)
    scores = ColumnScores(
        refusal=is_refusal(text),
        refusal_logit=refusal_logodds(col.logits[0, t0 - 1], refusal_ids),
        kl_next=float(kl[0]),
        kl_reply=float(kl.mean()),
        perplexity=ppl,
        mean_projection=float(sum(projections) / len(projections)) if projections else float("nan"),
        n_tokens=n,
    )
    return scores, projections, text


# -- a whole column -------------------------------------------------------------------------------

@dataclass
class ColumnResult:
    label: str
    prompt: str
    text: str
    token_ids: list[int]
    pieces: list[str]
    projections: list[float]
    scores: ColumnScores
    stopped_by_eos: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Column:
    """A column being computed: the stream, then its scores. ``col_backend`` is the unmodified backend,
    or the orthogonalised copy's backend for the ``orthogonalised`` kind."""

    def __init__(self, spec: ColumnSpec, ref_backend: Backend, col_backend: Backend, batch: Batch, prompt: str, *,
                 probe: Probe | None = None, max_new_tokens: int = 32, lock: Lock | None = None) -> None:
        self.spec = spec
        self.prompt = prompt
        self.ref_backend = ref_backend
        self.col_backend = col_backend
        self.batch = batch
        self.probe = probe
        self.lock = lock
        self.interventions = build_interventions(spec, col_backend.n_layers)
        self.stream = GreedyStream(col_backend, batch, interventions=self.interventions,
                                   max_new_tokens=max_new_tokens, lock=lock, probe=probe)
        self.result: ColumnResult | None = None

    @property
    def streaming(self) -> bool:
        return not self.stream.done

    def step(self) -> bool:
        return self.stream.step()

    def finish(self) -> ColumnResult:
        """Run the stream to its end (if needed) and score it."""
        self.stream.run()
        if self.result is None:
            same = self.spec.kind == "none" and self.col_backend is self.ref_backend
            scores, proj, text = score_column(self.ref_backend, self.col_backend, self.batch, self.stream.token_ids,
                                              interventions=self.interventions, probe=self.probe, lock=self.lock,
                                              same_as_reference=same)
            self.result = ColumnResult(self.spec.label, self.prompt, self.stream.text, list(self.stream.token_ids),
                                       list(self.stream.pieces), proj, scores, self.stream.stopped_by_eos)
        return self.result

    def projections(self) -> list[float | None]:
        """Per-token projections as far as known (teacher-forced values once scored)."""
        if self.result is not None and self.result.projections:
            return list(self.result.projections)
        return list(self.stream.projections)


def compute_column(ref_backend: Backend, col_backend: Backend, prompt: str, spec: ColumnSpec, *,
                   fmt: ChatFormat | None = None, probe: Probe | None = None, max_new_tokens: int = 32,
                   lock: Lock | None = None, max_prompt_tokens: int | None = None) -> ColumnResult:
    """Generate and score one column (no streaming): the function the UI's columns are made of."""
    with lock if lock is not None else nullcontext():
        batch = encode_prompt(col_backend, prompt, fmt, max_prompt_tokens=max_prompt_tokens,
                              max_new_tokens=max_new_tokens)
    col = Column(spec, ref_backend, col_backend, batch, prompt, probe=probe, max_new_tokens=max_new_tokens, lock=lock)
    return col.finish()


def step_round_robin(columns: Sequence[Column]) -> Iterator[Sequence[Column]]:
    """Advance every column one token at a time, in turn, yielding after each round."""
    while True:
        active = [c for c in columns if c.streaming]
        if not active:
            return
        for c in active:
            c.step()
        yield columns


__all__ = [
    "KINDS", "KIND_LABELS", "Probe", "ColumnSpec", "build_interventions", "encode_prompt", "GreedyStream",
    "ColumnScores", "score_column", "refusal_logodds", "ColumnResult", "Column", "compute_column",
    "step_round_robin",
]
