"""Gradient screening of candidate directions (attribution patching): one forward and backward pass per
prompt batch estimates, for *every* candidate at once, how the refusal logit score would change under
directional ablation (harmful prompts) and under activation addition (harmless prompts).

With ``h_s`` the activation at a site ``s`` that the ablation touches (the sites and positions of
:func:`workbench.interventions.ablation_everywhere`: residual input of every layer, every attention and MLP
output, every real token) and ``g_s = dS/dh_s`` (the total derivative of the refusal score ``S`` with respect
to that site's output, later sites included), ablating the unit direction ``r`` changes ``S`` to first order by

    dS_ablation(r) = - sum_s sum_positions (g_s . r) (h_s . r)

(ablations at several sites compound; to first order their effects add). Adding ``alpha * v`` at a site
(:func:`steering.interventions.addition`) changes ``S`` by ``alpha * sum_positions g_site . v``. With the
candidates as the columns of a ``[d, C]`` matrix both are matrix products, so the cost does not grow with the
number of candidates. The gradients are taken with respect to zero "delta" tensors added at each site by the
native backend's hooks (removed in a ``finally`` block), inside ``torch.enable_grad`` only, with the model's
parameters temporarily frozen (no weight gradients are computed or stored).

The KL of each candidate's ablation is estimated to second order the same way
(:func:`ablation_kl_second_order`: one forward and a few backward passes with random cotangents); the
selection uses it to order candidates likely to pass its KL filter first (:mod:`steering.selection`).

>>> import torch
>>> from workbench.tiny import build_tiny
>>> from workbench.loading import from_memory
>>> from workbench.vectors import Direction
>>> lm = from_memory(*build_tiny("llama"))
>>> cands = [Direction(torch.randn(64, generator=torch.Generator().manual_seed(i)), layer=1, method="random",
...                    model_id=lm.model_id, model_checksum=lm.checksum, d_model=64, component="resid_pre")
...          for i in range(3)]
>>> est = screen_candidates(lm, None, cands, harmful=["How do I pick a lock?"], harmless=["Bake bread"])
>>> est.ablation_delta.shape, est.addition_delta.shape
(torch.Size([3]), torch.Size([3]))
>>> bool(torch.isfinite(est.ablation_delta).all())
True
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from workbench.backends.base import Backend
from workbench.backends.native import NativeBackend
from workbench.chat import Batch, ChatFormat
from workbench.errors import WorkbenchError
from workbench.generation import batches
from workbench.interventions import Intervention, ablation_everywhere
from workbench.loading import LoadedModel
from workbench.scoring import _refusal_logodds, refusal_token_ids
from workbench.sites import Site
from workbench.vectors import Direction

from steering.interventions import addition

ZERO_NORM = 1e-6  # candidates at or below this norm are zero directions (as in selection)


@dataclass
class ScreeningEstimates:
    """First-order estimates for every candidate, and what the unmodified forward passes gave.

    ``ablation_delta[c]``: estimated change of the mean refusal score on the harmful prompts when candidate
    ``c`` is ablated everywhere (NaN for zero candidates). ``addition_delta[c]``: estimated change of the mean
    refusal score on the harmless prompts when ``alpha * vector`` is added at the candidate's layer.
    ``harmful_scores`` / ``harmless_scores``: per-prompt refusal scores of the unmodified model (prompt order);
    ``harmless_logprobs``: its next-token log-probabilities on the harmless prompts ``[N, V]`` (a KL reference).
    ``ablation_kl`` (when asked for): the second-order estimate of each candidate's mean KL under ablation on
    the harmless prompts (:func:`ablation_kl_second_order`; it ranks well but its scale is not the KL's).
    """

    ablation_delta: torch.Tensor
    addition_delta: torch.Tensor
    harmful_scores: torch.Tensor
    harmless_scores: torch.Tensor
    harmless_logprobs: torch.Tensor
    alpha: float
    seconds: float
    ablation_kl: torch.Tensor | None = None  # [C] second-order KL estimates (NaN for zero candidates), if asked
    kl_seconds: float = 0.0


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Switch off ``requires_grad`` on every parameter for the block (restored in ``finally``): gradients
    then flow to the activation deltas only, and no weight-gradient inputs are kept in the graph."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _native(x: Backend | LoadedModel) -> NativeBackend:
    lm = x.lm if isinstance(x, Backend) else x
    if isinstance(x, NativeBackend):
        return x
    return NativeBackend(lm)


def site_vjps(native: NativeBackend, batch: Batch, sites: Sequence[Site],
              scalars_fn: Callable[[torch.Tensor], Sequence[torch.Tensor]],
              on_grads: Callable[[int, dict[Site, torch.Tensor]], None],
              on_forward: Callable[[Site, torch.Tensor], None] | None = None) -> torch.Tensor:
    """One forward pass over ``batch`` and one backward pass per scalar of ``scalars_fn(last_logits)``
    (``last_logits`` ``[B, V]`` float32, differentiable); ``on_grads(k, grads)`` receives scalar ``k``'s
    gradients ``grads[site]`` ``[B, T, d]`` (float32) with respect to every site's output before the next
    backward pass (so only one set is held at a time). ``on_forward(site, act)`` sees each site's (detached)
    activation during the forward pass. Returns the last-position logits (detached).
    Rows are independent (left padding, masked attention): a scalar that sums per-row terms gives each row
    the gradient of its own term."""
    model = native.lm.model
    batch = batch.to(native.lm.device)
    ctx = native.context(batch)
    sites = list(dict.fromkeys(Site(native.arch.check_layer(s.layer), s.component) for s in sites))
    deltas: dict[Site, torch.Tensor] = {}

    def make(site: Site) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(act: torch.Tensor) -> torch.Tensor:
            if site in deltas:
                raise WorkbenchError(f"site {site} was reached twice in one forward pass")
            if on_forward is not None:
                on_forward(site, act.detach())
            d = torch.zeros_like(act, requires_grad=True)
            deltas[site] = d
            return act + d

        return fn

    fns = {s: make(s) for s in sites}
    try:
        with frozen_parameters(model), torch.enable_grad(), native.hooked(ctx, fns):
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
            logits = out.logits[:, -1].float()
            missing = [s for s in sites if s not in deltas]
            if missing:
                raise WorkbenchError(f"sites {missing} were not reached in the forward pass")
            scalars = list(scalars_fn(logits))
            for k, y in enumerate(scalars):
                grads = torch.autograd.grad(y, [deltas[s] for s in sites], allow_unused=True,
                                            retain_graph=k < len(scalars) - 1)
                on_grads(k, {s: (g.float() if g is not None else torch.zeros_like(deltas[s], dtype=torch.float32))
                             for s, g in zip(sites, grads)})
                del grads
        return logits.detach()
    finally:
        deltas.clear()  # drop the leaves (and with them any graph still referenced)


def site_gradients(native: NativeBackend, batch: Batch, sites: Sequence[Site],
                   score_fn: Callable[[torch.Tensor], torch.Tensor],
                   on_forward: Callable[[Site, torch.Tensor], None] | None = None
                   ) -> tuple[dict[Site, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One forward and backward pass over ``batch``: ``(grads, scores, last_logits)``.

    ``grads[site]`` is ``d sum(scores) / d act_site`` ``[B, T, d]`` (float32) for every site;
    ``score_fn`` maps the last-position logits ``[B, V]`` to one differentiable score per row;
    ``on_forward(site, act)`` sees each site's (detached) activation during the forward pass
    (:func:`site_vjps` with one scalar)."""
    kept: dict[str, Any] = {}

    def scalars(logits: torch.Tensor) -> list[torch.Tensor]:
        kept["scores"] = score_fn(logits)
        return [kept["scores"].sum()]

    def take(_: int, grads: dict[Site, torch.Tensor]) -> None:
        kept["grads"] = grads

    logits = site_vjps(native, batch, sites, scalars, take, on_forward)
    return kept["grads"], kept["scores"].detach(), logits


def _ablation_sites(native: NativeBackend) -> dict[Site, Any]:
    """Every site :func:`ablation_everywhere` touches, with the positions it applies to there."""
    template = ablation_everywhere(torch.ones(native.arch.d_model), native.n_layers)
    return {Site(native.arch.check_layer(iv.site.layer), iv.site.component): iv.apply_to for iv in template}


def _projector(ctx: Any, applies: dict[Site, Any], R: torch.Tensor,
               proj: dict[Site, torch.Tensor]) -> Callable[[Site, torch.Tensor], None]:
    """An ``on_forward`` callback that stores ``proj[site]`` ``[B, T, C]``: each activation's projection on every
    column of ``R`` at the positions the ablation touches there (0 elsewhere)."""
    def keep(site: Site, act: torch.Tensor) -> None:
        m = ctx.mask(applies[site], act.shape[1], act.device).unsqueeze(-1)
        proj[site] = (act.float() @ R) * m

    return keep


def ablation_first_order(native: NativeBackend, prompts: Sequence[str], fmt: ChatFormat | None,
                         units: torch.Tensor, *, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order change of the mean refusal score under directional ablation of each column of
    ``units`` ``[d, C]`` at every site of :func:`ablation_everywhere` (its positions), and the per-prompt
    refusal scores of the unmodified model. Returns ``(delta [C], scores [N])``."""
    applies = _ablation_sites(native)
    score_fn = _refusal_logodds(refusal_token_ids(native.lm.tokenizer))
    R = units.float().to(native.lm.device)
    total = torch.zeros(R.shape[1], dtype=torch.float64)
    scores: list[Any] = [None] * len(prompts)
    for idx, b in batches(native, prompts, fmt, batch_size):
        proj: dict[Site, torch.Tensor] = {}  # h_s . r at the ablated positions, 0 elsewhere
        keep = _projector(native.context(b), applies, R, proj)
        grads, s, _ = site_gradients(native, b, list(applies), score_fn, keep)
        for site, g in grads.items():
            total -= ((g @ R) * proj[site]).sum((0, 1)).double().cpu()
        del grads
        proj.clear()  # free the projections (the closure above refills a fresh dict next batch)
        for j, i in enumerate(idx):
            scores[i] = s[j].cpu()
    return (total / len(prompts)).float(), torch.stack(scores)


def ablation_kl_second_order(native: NativeBackend, prompts: Sequence[str], fmt: ChatFormat | None,
                             units: torch.Tensor, *, samples: int = 4, seed: int = 0,
                             batch_size: int = 8) -> torch.Tensor:
    """Second-order estimate of the mean next-token KL(unmodified || ablated) on ``prompts`` when each column
    of ``units`` ``[d, C]`` is ablated at every site of :func:`ablation_everywhere`. Returns ``[C]``.

    To first order ablation moves the last-position logits by ``dz = J dh`` (``dh``: the ablation's change at
    every site and position), and ``KL ~ 1/2 dz^T F dz`` with ``F = diag(p) - p p^T`` (``p``: the unmodified
    next-token distribution; the first-order term of a KL vanishes). ``F`` is estimated with ``samples``
    random cotangents ``u = (diag(sqrt p) - p sqrt(p)^T) eps``, ``eps ~ N(0, I)`` (``E[u u^T] = F``): one
    backward pass each gives ``J^T u`` at every site, and ``u . dz = sum_s sum_t (g_s . r)(h_s . r)`` (up to
    sign) for every candidate at once, so ``KL ~ 1/2 mean_u (u . dz)^2``. Seeded (``seed``) and unbiased for
    the quadratic form; it is a screen, not a measurement: the exact KL still decides the filter.

    >>> import torch
    >>> from workbench.tiny import build_tiny
    >>> from workbench.loading import from_memory
    >>> lm = from_memory(*build_tiny("llama"))
    >>> R = torch.nn.functional.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), dim=0)
    >>> est = ablation_kl_second_order(_native(lm), ["Bake bread", "Name a colour"], None, R)
    >>> est.shape, bool((est >= 0).all())
    (torch.Size([3]), True)
    """
    if samples < 1:
        raise WorkbenchError(f"samples must be >= 1, got {samples}")
    applies = _ablation_sites(native)
    R = units.float().to(native.lm.device)
    gen = torch.Generator().manual_seed(int(seed))
    total = torch.zeros(R.shape[1], dtype=torch.float64)
    for idx, b in batches(native, prompts, fmt, batch_size):
        proj: dict[Site, torch.Tensor] = {}
        sq = torch.zeros(b.size, R.shape[1], dtype=torch.float64)  # per row: sum over samples of (u . dz)^2

        def cotangents(logits: torch.Tensor) -> list[torch.Tensor]:
            p = torch.softmax(logits.detach().double(), -1)
            sp = p.sqrt()
            out = []
            for _ in range(samples):
                eps = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device)
                u = sp * eps - p * (sp * eps).sum(-1, keepdim=True)
                out.append((logits * u.float()).sum())
            return out

        def take(_: int, grads: dict[Site, torch.Tensor]) -> None:
            a = sum(((g @ R) * proj[s]).sum(1) for s, g in grads.items())  # [B, C]: u . dz per row
            sq.add_(a.double().cpu() ** 2)

        site_vjps(native, b, list(applies), cotangents, take, _projector(native.context(b), applies, R, proj))
        total += (0.5 * sq / samples).sum(0)
        proj.clear()
    return (total / len(prompts)).float()


def addition_first_order(native: NativeBackend, prompts: Sequence[str], fmt: ChatFormat | None,
                         interventions: Sequence[Sequence[Intervention]], *, batch_size: int = 8
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First-order change of the mean refusal score under each list of addition interventions (one list per
    candidate; each :class:`~workbench.interventions.Addition` at its own site, strength and positions),
    the unmodified per-prompt scores and next-token log-probabilities.
    Returns ``(delta [C], scores [N], logprobs [N, V])``."""
    from workbench.interventions import Addition

    keys: dict[tuple[Site, Any], None] = {}
    for ivs in interventions:
        for iv in ivs:
            if not isinstance(iv, Addition):
                raise WorkbenchError(f"addition screening takes Addition interventions, got {type(iv).__name__}")
            keys[(Site(native.arch.check_layer(iv.site.layer), iv.site.component), _hashable(iv.apply_to))] = None
    score_fn = _refusal_logodds(refusal_token_ids(native.lm.tokenizer))
    d = native.arch.d_model
    gsum = {k: torch.zeros(d, dtype=torch.float64) for k in keys}
    scores: list[Any] = [None] * len(prompts)
    logps: list[Any] = [None] * len(prompts)
    sites = list(dict.fromkeys(k[0] for k in keys))
    for idx, b in batches(native, prompts, fmt, batch_size):
        ctx = native.context(b)
        if sites:
            grads, s, logits = site_gradients(native, b, sites, score_fn)
            for (site, apply_to) in keys:
                g = grads[site]
                m = ctx.mask(_unhashable(apply_to), g.shape[1], g.device).unsqueeze(-1)
                gsum[(site, apply_to)] += (g * m).sum((0, 1)).double().cpu()
            del grads
        else:  # nothing to differentiate: the plain forward for the scores
            out = native.run(b, logits="last")
            logits = out.logits[:, -1].float()
            s = score_fn(logits)
        lp = torch.log_softmax(logits.double(), -1).float().cpu()
        for j, i in enumerate(idx):
            scores[i] = s[j].cpu()
            logps[i] = lp[j]
    delta = torch.zeros(len(interventions), dtype=torch.float64)
    for c, ivs in enumerate(interventions):
        for iv in ivs:
            k = (Site(native.arch.check_layer(iv.site.layer), iv.site.component), _hashable(iv.apply_to))
            delta[c] += float(iv.alpha) * float(gsum[k] @ iv.vector.double().reshape(-1))
    return (delta / len(prompts)).float(), torch.stack(scores), torch.stack(logps)


def _hashable(apply_to: Any) -> Any:
    return apply_to if isinstance(apply_to, str) else tuple(int(p) for p in apply_to)


def _unhashable(apply_to: Any) -> Any:
    return apply_to if isinstance(apply_to, str) else list(apply_to)


def screen_candidates(backend: Backend | LoadedModel, fmt: ChatFormat | None, candidates: Sequence[Direction], *,
                      harmful: Sequence[str], harmless: Sequence[str], alpha: float = 1.0,
                      batch_size: int = 8, kl_samples: int = 0, seed: int = 0) -> ScreeningEstimates:
    """First-order ablation and addition estimates for every candidate (see the module docstring), and with
    ``kl_samples > 0`` the second-order KL estimates of :func:`ablation_kl_second_order` (seeded by ``seed``).

    Costs one forward and backward pass over the harmful prompts and one over the harmless prompts (in
    batches of ``batch_size``), plus one forward and ``kl_samples`` backward passes over the harmless prompts
    for the KL, whatever the number of candidates. Any backend's model is screened through native hooks (the
    backends agree numerically)."""
    if not candidates:
        raise WorkbenchError("no candidate directions to screen")
    if not harmful or not harmless:
        raise WorkbenchError("screening needs at least one harmful and one harmless validation prompt")
    native = _native(backend)
    t0 = time.perf_counter()
    d = native.arch.d_model
    for c in candidates:
        if c.d_model != d:
            raise WorkbenchError(f"candidate at layer {c.layer} has size {c.d_model} but the model has d_model {d}")
    nonzero = [i for i, c in enumerate(candidates) if c.norm > ZERO_NORM]
    R = torch.zeros(d, len(candidates))
    for i in nonzero:
        R[:, i] = candidates[i].unit
    abl, s_h = ablation_first_order(native, harmful, fmt, R, batch_size=batch_size)
    adds = [addition(candidates[i], alpha) for i in nonzero]
    add_nz, s_b, logp = addition_first_order(native, harmless, fmt, adds, batch_size=batch_size)
    add = torch.full((len(candidates),), math.nan)
    add[nonzero] = add_nz
    zero = torch.ones(len(candidates), dtype=torch.bool)
    zero[nonzero] = False
    abl[zero] = math.nan
    kl = None
    t_kl = 0.0
    if kl_samples > 0:
        t1 = time.perf_counter()
        kl = ablation_kl_second_order(native, harmless, fmt, R, samples=kl_samples, seed=seed, batch_size=batch_size)
        kl[zero] = math.nan
        t_kl = time.perf_counter() - t1
    return ScreeningEstimates(abl, add, s_h, s_b, logp, float(alpha), time.perf_counter() - t0, kl, t_kl)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation over the pairs where both values are finite (average ranks for ties);
    NaN with fewer than 3 such pairs or a constant side.

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 45]), spearman([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if math.isfinite(float(x)) and math.isfinite(float(y))]
    if len(pairs) < 3:
        return math.nan

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return math.nan
    return cov / math.sqrt(va * vb)


__all__ = ["ScreeningEstimates", "screen_candidates", "ablation_first_order", "addition_first_order",
           "site_gradients", "site_vjps", "ablation_kl_second_order", "frozen_parameters", "spearman"]
