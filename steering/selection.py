"""Direction selection as in Arditi et al.: score the candidates (layer x post-instruction position) on
validation prompts, filter, pick the one whose ablation most lowers refusal.

Scores per candidate r (refusal logit score, no generation):
- ``ablation_score``: mean refusal score on harmful validation prompts with r ablated everywhere;
- ``steering_score``: mean refusal score on harmless validation prompts with r added at its layer;
- ``kl``: mean KL on harmless validation prompts under ablation.
Filters: KL > ``kl_max``; steering score not above the harmless baseline (no induced refusal);
layer in the last ``1 - max_layer_frac`` of the model.

Two paths choose the same way among the candidates they score exactly:

- exhaustive (``screen=False``): every candidate is scored exactly (three batched forward passes each);
  the first-order estimates of :mod:`steering.screening` are computed too (``estimate=True``) and their
  Spearman rank correlation with the exact scores is recorded in ``SelectionResult.screening``;
- screened (``screen=True``): one forward and backward pass estimates every candidate's ablation (and
  addition) score; only the ``top_k`` best estimates among the candidates the layer filter keeps get an exact
  ablation score, and the KL and induced-refusal filters are then checked in order of that exact score until
  one candidate passes (it is the lowest exact ablation score among the passing ones of the group, exactly
  as if the whole group had been checked; a KL above ``kl_max`` skips the steering pass, NaN). If none passes,
  the next ``top_k`` by estimate follow. Once one passes, ``confirm_groups`` more groups (default 1) are scored
  as well (their filters checked only where the exact score beats the current choice), so a candidate a few
  ranks below the first passing group by estimate can still win — the estimate ranks near-ties imperfectly
  (on the default model's full grid the exhaustive choice sat at estimate rank 13 while the first passing group
  was ranks 6-10). If no candidate passes at all, every candidate is scored and the fallback is today's (lowest
  ablation score, flagged).

  **KL screen** (``kl_screen``, default on): where few candidates pass the KL filter the ablation estimate alone
  wastes exact scores on candidates that fail it (smollm2's full grid: 10 of 138 pass, the exhaustive choice sat at
  ablation-estimate rank 66). The screen also estimates every candidate's KL to second order
  (:func:`steering.screening.ablation_kl_second_order`: it ranks well, Spearman 0.91-0.94, but its scale is off by
  10-40x), finds by bisection over that order where the *exact* KL crosses ``kl_max`` (about log2(n) exact KL
  passes, each kept for the candidate's filter check), and puts the ``kl_margin`` (2) times as many
  lowest-estimate candidates first, in ablation-estimate order; the rest follow in that order. Nothing is
  dropped: a wrong KL estimate costs exact scores, not a wrong filter decision.

  Rows record the estimates (``ablation_score_est``, ``steering_score_est``, ``est_rank``; with the KL screen
  ``kl_est`` and ``kl_est_rank``), the exact scores where computed (NaN elsewhere) and ``exact`` (``full`` /
  ``ablation`` / ``kl``: only its KL, measured by the bisection / ``none``).

The exact scores of a candidate are one :class:`ExactTask` of an executor (:mod:`workbench.executors`): in this
process (default) or on Ray workers that each load the model once; the baselines and the gradient screen always
run in this process, and the rows are the same either way.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from workbench.backends.base import Backend
from workbench.chat import ChatFormat
from workbench.errors import WorkbenchError
from workbench.scoring import kl_divergence, next_token_logprobs, refusal_scores
from workbench.vectors import Direction

from steering.interventions import ablation, addition
from steering.screening import ZERO_NORM, screen_candidates, spearman


@dataclass
class SelectionResult:
    rows: list[dict[str, Any]]
    best: Direction
    baseline: dict[str, float]
    screening: dict[str, Any] = field(default_factory=dict)


def exact_ablation_score(backend: Backend, fmt: ChatFormat | None, direction: Direction, harmful_val: Sequence[str],
                         *, batch_size: int = 16) -> float:
    """Mean refusal score on the harmful prompts with the direction ablated everywhere (one batched pass)."""
    return float(refusal_scores(backend, harmful_val, fmt, interventions=ablation(direction, backend.n_layers),
                                batch_size=batch_size).mean())


def exact_kl(backend: Backend, fmt: ChatFormat | None, direction: Direction, harmless_val: Sequence[str], *,
             reference: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token KL on the harmless prompts with the direction ablated everywhere, against ``reference``
    (the unmodified model's log-probabilities; one batched pass)."""
    return float(kl_divergence(backend, harmless_val, fmt, interventions=ablation(direction, backend.n_layers),
                               reference=reference, batch_size=batch_size).mean())


def exact_filter_scores(backend: Backend, fmt: ChatFormat | None, direction: Direction, harmless_val: Sequence[str],
                        *, reference: torch.Tensor, alpha: float, batch_size: int = 16,
                        kl_max: float | None = None, known_kl: float | None = None) -> tuple[float, float]:
    """``(kl, steering_score)`` on the harmless prompts: mean KL under ablation (:func:`exact_kl`, or
    ``known_kl`` when it was already measured) and mean refusal score with ``alpha * vector`` added at the
    direction's layer. With ``kl_max``, a KL above it already fails the candidate and the steering pass is
    skipped (NaN)."""
    kl = known_kl if known_kl is not None else exact_kl(backend, fmt, direction, harmless_val, reference=reference,
                                                        batch_size=batch_size)
    if kl_max is not None and kl > kl_max:
        return kl, math.nan
    steer = float(refusal_scores(backend, harmless_val, fmt, interventions=addition(direction, alpha),
                                 batch_size=batch_size).mean())
    return kl, steer


@dataclass(frozen=True)
class ExactTask:
    """Exact scores of one candidate (an executor task): its ablation score and / or its filter scores (KL and
    steering score; with ``kl_max``, a KL above it skips the steering pass; ``known_kl``: a KL already
    measured, not measured again), or with ``kl_only`` its KL alone."""

    candidate: int
    ablation: bool
    filters: bool
    kl_max: float | None = None
    kl_only: bool = False
    known_kl: float | None = None


@dataclass
class _Scorer:
    """A worker's state for exact scoring: the model's backend and everything every candidate is scored on."""

    backend: Backend
    fmt: ChatFormat | None
    candidates: Sequence[Direction]
    harmful_val: Sequence[str]
    harmless_val: Sequence[str]
    reference: torch.Tensor  # next-token log-probabilities of the unmodified model on harmless_val (KL reference)
    alpha: float
    batch_size: int


@dataclass(frozen=True)
class ScorerSpec:
    """What a worker in another process needs to build a :class:`_Scorer`: how to load the model
    (:class:`workbench.executors.ModelSpec`), the backend's name, and the (small) candidates, prompts and KL
    reference."""

    model: Any
    backend: str
    fmt: ChatFormat | None
    candidates: tuple[Direction, ...]
    harmful_val: tuple[str, ...]
    harmless_val: tuple[str, ...]
    reference: torch.Tensor
    alpha: float
    batch_size: int

    def build(self) -> _Scorer:
        from workbench.backends import get_backend

        be = get_backend(self.backend, self.model.load())
        return _Scorer(be, self.fmt, self.candidates, self.harmful_val, self.harmless_val, self.reference,
                       self.alpha, self.batch_size)


def exact_scores(state: _Scorer, task: ExactTask) -> dict[str, float]:
    """The executor's task function: ``ablation_score`` and / or ``kl`` and ``steering_score`` of one candidate."""
    d = state.candidates[task.candidate]
    out: dict[str, float] = {}
    if task.ablation:
        out["ablation_score"] = exact_ablation_score(state.backend, state.fmt, d, state.harmful_val,
                                                     batch_size=state.batch_size)
    if task.kl_only:
        out["kl"] = exact_kl(state.backend, state.fmt, d, state.harmless_val, reference=state.reference,
                             batch_size=state.batch_size)
    if task.filters:
        out["kl"], out["steering_score"] = exact_filter_scores(state.backend, state.fmt, d, state.harmless_val,
                                                               reference=state.reference, alpha=state.alpha,
                                                               batch_size=state.batch_size, kl_max=task.kl_max,
                                                               known_kl=task.known_kl)
    return out


def select_direction(backend: Backend, fmt: ChatFormat | None, candidates: Sequence[Direction], *,
                     harmful_val: Sequence[str], harmless_val: Sequence[str], kl_max: float = 0.1,
                     max_layer_frac: float = 0.8, alpha: float = 1.0, batch_size: int = 16,
                     progress: bool = True, screen: bool = False, top_k: int = 5, estimate: bool = True,
                     screen_batch_size: int = 8, executor: Any = None, model: Any = None,
                     confirm_groups: int = 1, kl_screen: bool = True, kl_margin: float = 2.0,
                     kl_samples: int = 4) -> SelectionResult:
    """Select one candidate (see the module docstring for the two paths).

    ``screen``: gradient-screened selection (exact scores for the ``top_k`` best estimates, more groups only
    when none of them passes the filters); otherwise every candidate is scored exactly and, with ``estimate``,
    the first-order estimates and their rank correlation with the exact scores are recorded as well.
    ``screen_batch_size``: prompts per forward and backward pass of the screening (memory).
    ``confirm_groups``: groups scored after the first group with a passing candidate (screened path; 0 stops
    at that group).
    ``kl_screen`` (screened path): order the candidates likely to pass the KL filter first (second-order KL
    estimates from ``kl_samples`` random backward passes, their boundary found by bisection on exact KLs, the
    ``kl_margin`` times as many lowest-estimate candidates as lie below it counted as likely); with the
    exhaustive path and ``estimate`` the KL estimates are computed for their rank correlation only.

    ``executor`` (:mod:`workbench.executors`; default local): where the exact scores are computed, one task
    per candidate (:class:`ExactTask`). The baselines and the gradient screen always run here, on ``backend``.
    Locally everything runs on ``backend`` in today's order. On Ray each worker loads the model once from
    ``model`` (a :class:`workbench.executors.ModelSpec`) with the backend of the same name; the filters of a
    group are then checked ``workers`` candidates at a time in the same order, and only the results up to the
    first candidate that passes are kept, so the rows are those of a local run."""
    if not candidates:
        raise WorkbenchError("no candidate directions to select from")
    if top_k < 1:
        raise WorkbenchError(f"top_k must be >= 1, got {top_k}")
    if confirm_groups < 0:
        raise WorkbenchError(f"confirm_groups must be >= 0, got {confirm_groups}")
    if kl_screen and not (kl_margin >= 1.0 and math.isfinite(kl_margin)):
        raise WorkbenchError(f"kl_margin must be a finite number >= 1, got {kl_margin}")
    if kl_screen and kl_samples < 1:
        raise WorkbenchError(f"kl_samples must be >= 1 with the KL screen, got {kl_samples}")
    n_layers = backend.n_layers
    rows: list[dict[str, Any]] = []
    for i, d in enumerate(candidates):
        rows.append({"candidate": i, "layer": d.layer, "position": d.position, "method": d.method, "norm": d.norm})
    nonzero = [i for i, d in enumerate(candidates) if d.norm > ZERO_NORM]
    if not nonzero:
        raise WorkbenchError(f"all {len(rows)} candidate directions are zero vectors")

    def layer_reason(d: Direction) -> str:
        return f"layer >= {max_layer_frac:.0%} of depth" if d.layer >= max_layer_frac * n_layers else ""

    est = None
    if screen or estimate:
        est = screen_candidates(backend, fmt, candidates, harmful=harmful_val, harmless=harmless_val, alpha=alpha,
                                batch_size=screen_batch_size, kl_samples=kl_samples if kl_screen else 0)
        base_h_est, base_b_est = float(est.harmful_scores.mean()), float(est.harmless_scores.mean())
        order = sorted(nonzero, key=lambda i: (math.isnan(float(est.ablation_delta[i])), float(est.ablation_delta[i])))
        rank = {i: k + 1 for k, i in enumerate(order)}
        for i, r in enumerate(rows):
            r["ablation_score_est"] = base_h_est + float(est.ablation_delta[i])
            r["steering_score_est"] = base_b_est + float(est.addition_delta[i])
            r["est_rank"] = rank.get(i, math.nan)
            if est.ablation_kl is not None:
                r["kl_est"] = float(est.ablation_kl[i])
    if screen:
        assert est is not None
        baseline = {"harmful_refusal_score": float(est.harmful_scores.mean()),
                    "harmless_refusal_score": float(est.harmless_scores.mean())}
        ref = est.harmless_logprobs
    else:
        base_h = refusal_scores(backend, harmful_val, fmt, batch_size=batch_size)
        base_b = refusal_scores(backend, harmless_val, fmt, batch_size=batch_size)
        ref = next_token_logprobs(backend, harmless_val, fmt, batch_size=batch_size)
        baseline = {"harmful_refusal_score": float(base_h.mean()), "harmless_refusal_score": float(base_b.mean())}
    for i, r in enumerate(rows):
        r.update(ablation_score=math.nan, kl=math.nan, steering_score=math.nan, exact="none")
        if i not in nonzero:
            r["filtered"] = "zero direction (identical activations in both sets)"

    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(nonzero) if not screen else min(top_k, len(nonzero)), desc="select", unit="candidate")
    counts = {"ablation": 0, "filters": 0, "kl": 0}
    known_kl: dict[int, float] = {}
    kl_cal: dict[str, Any] = {}
    t_exact = time.perf_counter()
    from workbench.executors import LocalExecutor

    executor = executor or LocalExecutor()
    if executor.in_process:
        def init() -> _Scorer:
            return _Scorer(backend, fmt, candidates, harmful_val, harmless_val, ref, alpha, batch_size)
    else:
        if model is None:
            raise WorkbenchError("select_direction on a Ray executor needs model= (a workbench.executors.ModelSpec: "
                                 "how each worker loads the model)")
        init = ScorerSpec(model, getattr(backend, "name", "native"), fmt, tuple(candidates), tuple(harmful_val),
                          tuple(harmless_val), ref.detach().cpu(), alpha, batch_size).build

    def commit_ablation(i: int, res: dict[str, float]) -> None:
        rows[i]["ablation_score"] = res["ablation_score"]
        rows[i]["exact"] = "ablation"
        counts["ablation"] += 1

    def commit_filters(i: int, res: dict[str, float]) -> bool:
        """Today's filters on candidate i (exact KL and steering score); True when it passes them all."""
        r, d = rows[i], candidates[i]
        r["kl"], r["steering_score"] = res["kl"], res["steering_score"]
        counts["filters"] += 1
        reasons = [x for x in [layer_reason(d)] if x]
        if r["kl"] > kl_max:
            reasons.append(f"KL {r['kl']:.3f} > {kl_max}")
        if r["steering_score"] <= baseline["harmless_refusal_score"]:
            reasons.append("no induced refusal")
        r["filtered"] = "; ".join(reasons)
        r["exact"] = "full"
        if bar is not None:
            bar.update(1)
        return not reasons

    def first_passing(order: list[int]) -> int | None:
        """The first candidate of ``order`` that passes the filters, checked ``pool.size`` at a time; results
        after it are dropped (a local pool checks one at a time, exactly as before)."""
        for start in range(0, len(order), pool.size):
            wave = order[start:start + pool.size]
            res = pool.map(exact_scores, [ExactTask(i, False, True, kl_max, known_kl=known_kl.get(i)) for i in wave])
            for i, r in zip(wave, res):
                if commit_filters(i, r):
                    return i
        return None

    def kl_first(eligible: list[int], kl_est: torch.Tensor) -> list[int]:
        """``eligible`` (in estimate order) with the candidates likely to pass the KL filter first: bisection over
        the KL-estimate order finds where the exact KL crosses ``kl_max`` (one exact KL per step, kept for the
        filter check later); the ``kl_margin`` times as many lowest estimates as lie below it are "likely"."""
        bykl = sorted(eligible, key=lambda i: float(kl_est[i]))
        lo, hi = 0, len(bykl)
        while lo < hi:
            mid = (lo + hi) // 2
            i = bykl[mid]
            (res,) = pool.map(exact_scores, [ExactTask(i, False, False, kl_only=True)])
            known_kl[i] = rows[i]["kl"] = res["kl"]
            counts["kl"] += 1
            if rows[i]["exact"] == "none":
                rows[i]["exact"] = "kl"
            if res["kl"] <= kl_max:
                lo = mid + 1
            else:
                hi = mid
        likely = set(bykl[:math.ceil(lo * kl_margin)])
        kl_cal.update(boundary_rank=lo, checks=counts["kl"], likely=len(likely), margin=kl_margin,
                      samples=kl_samples)
        for k, i in enumerate(bykl):
            rows[i]["kl_est_rank"] = k + 1
        return sorted(eligible, key=lambda i: i not in likely)  # stable: estimate order within each part

    chosen: int | None = None
    groups = 0
    with executor.pool(init) as pool:
        if not screen:
            # today's path: every candidate, three batched passes each (committed as each one arrives)
            def both(k: int, r: dict[str, float]) -> None:
                commit_ablation(nonzero[k], r)
                commit_filters(nonzero[k], r)

            pool.map(exact_scores, [ExactTask(i, True, True, None) for i in nonzero], on_result=both)
            passing = [i for i in nonzero if not rows[i]["filtered"]]
            chosen = min(passing, key=lambda i: rows[i]["ablation_score"]) if passing else None
        else:
            eligible = [i for i in order if not layer_reason(candidates[i])]
            if kl_screen and eligible:
                assert est is not None and est.ablation_kl is not None
                eligible = kl_first(eligible, est.ablation_kl)
            confirmed = 0
            for start in range(0, len(eligible), top_k):
                group = eligible[start:start + top_k]
                groups += 1
                if bar is not None and start:
                    bar.total = bar.n + len(group)
                    bar.refresh()
                for i, r in zip(group, pool.map(exact_scores, [ExactTask(i, True, False) for i in group])):
                    commit_ablation(i, r)
                ranked = sorted(group, key=lambda i: rows[i]["ablation_score"])
                had = chosen is not None
                if had:  # a confirmation group: only a lower exact score than the current choice can win
                    ranked = [i for i in ranked if rows[i]["ablation_score"] < rows[chosen]["ablation_score"]]
                found = first_passing(ranked)
                if found is not None:
                    chosen = found
                confirmed += had
                if chosen is not None and confirmed >= confirm_groups:
                    break
        if chosen is None:  # as today: every non-zero candidate scored, the lowest ablation score taken anyway
            rest = [i for i in nonzero if rows[i]["exact"] != "full"]
            if bar is not None and rest:
                bar.total = bar.n + len(rest)
                bar.refresh()
            def rest_done(k: int, r: dict[str, float]) -> None:
                if "ablation_score" in r:
                    commit_ablation(rest[k], r)
                commit_filters(rest[k], r)

            pool.map(exact_scores, [ExactTask(i, rows[i]["exact"] in ("none", "kl"), True, kl_max if screen else None,
                                              known_kl=known_kl.get(i)) for i in rest], on_result=rest_done)
        worker_stats = pool.stats()
    fallback = chosen is None
    if fallback:
        chosen = min(nonzero, key=lambda i: rows[i]["ablation_score"])
        warnings.warn(f"every one of the {len(rows)} candidates failed a filter; selecting the lowest ablation score "
                      f"anyway (marked 'selected_despite_filters' in the table)", stacklevel=2)
    if bar is not None:
        bar.close()
    t_exact = time.perf_counter() - t_exact
    for i in nonzero:  # rows the screened path did not check completely say why
        r = rows[i]
        if r["exact"] in ("none", "kl"):
            what = "only its KL measured (KL bisection)" if r["exact"] == "kl" else "not scored exactly"
            r["filtered"] = "; ".join(x for x in [layer_reason(candidates[i]),
                                                   f"screened out (estimate rank {r['est_rank']}, {what})"] if x)
        elif r["exact"] == "ablation":
            r["filtered"] = "not filter-checked (exact ablation score above the selected candidate's)"
    best_row = rows[chosen]
    best_row["selected_despite_filters"] = fallback
    for r in rows:
        r["selected"] = r is best_row
    exact_abl = [r["ablation_score"] for r in rows]
    screening: dict[str, Any] = {
        "mode": "screened" if screen else "exhaustive", "top_k": top_k if screen else None,
        "n_candidates": len(rows), "n_nonzero": len(nonzero), "n_exact_ablation": counts["ablation"],
        "n_exact_filters": counts["filters"], "n_exact_kl_only": counts["kl"], "groups": groups if screen else None,
        "confirm_groups": confirm_groups if screen else None,
        "estimate_seconds": est.seconds if est is not None else None, "exact_seconds": t_exact,
        "kl_screen": ({**kl_cal, "estimate_seconds": est.kl_seconds if est is not None else None} if screen and kl_screen
                      else None),
        "screen_batch_size": screen_batch_size if est is not None else None,
        "executor": {**executor.describe(), "worker_stats": worker_stats},
    }
    if est is not None:
        screening["selected_est_rank"] = best_row["est_rank"]
        if not screen:  # the whole grid scored both ways: how well the estimate ranks
            screening["spearman_ablation"] = spearman([r["ablation_score_est"] for r in rows], exact_abl)
            screening["spearman_steering"] = spearman([r["steering_score_est"] for r in rows],
                                                      [r["steering_score"] for r in rows])
            if est.ablation_kl is not None:
                screening["spearman_kl"] = spearman([r["kl_est"] for r in rows], [r["kl"] for r in rows])
    return SelectionResult(rows, candidates[chosen], baseline, screening)


def selection_heatmaps(rows: list[dict[str, Any]], title: str) -> Any:
    """Panels over layer x position: ablation score, steering score, KL (selected marked) and, when the rows
    carry them, the first-order ablation estimates (blank cells: not computed, e.g. screened out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({r["layer"] for r in rows})
    positions = sorted({r["position"] for r in rows}, key=lambda p: int(p[3:]) if p.startswith("pos") else 0)
    panels = [("ablation_score", "viridis_r"), ("steering_score", "viridis"), ("kl", "magma")]
    if any("ablation_score_est" in r for r in rows):
        panels.append(("ablation_score_est", "viridis_r"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2 + 0.25 * len(positions)))
    for ax, (key, cmap) in zip(axes, panels):
        M = np.full((len(positions), len(layers)), np.nan)
        for r in rows:
            M[positions.index(r["position"]), layers.index(r["layer"])] = r.get(key, np.nan)
        im = ax.imshow(M, aspect="auto", cmap=cmap, origin="lower")
        fig.colorbar(im, ax=ax)
        ax.set(title=key, xlabel="layer", ylabel="position")
        ax.set_xticks(range(len(layers)), layers, fontsize=7)
        ax.set_yticks(range(len(positions)), positions, fontsize=7)
        for r in rows:
            if r.get("selected"):
                ax.scatter([layers.index(r["layer"])], [positions.index(r["position"])], marker="*", s=200,
                           color="red")
            elif r.get("filtered"):
                ax.scatter([layers.index(r["layer"])], [positions.index(r["position"])], marker="x", s=20,
                           color="white")
    fig.suptitle(title + "  (★ selected, × filtered or not checked exactly)")
    return fig


def calibrate_strength(backend: Backend, fmt: ChatFormat | None, direction: Direction, harmless_val: Sequence[str], *,
                       alphas: Sequence[float] = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0), kl_prompts: Sequence[str] | None = None,
                       batch_size: int = 16) -> tuple[float, list[dict[str, Any]]]:
    """Pick the activation-addition strength on validation prompts (no test data): the smallest ``alpha``
    whose mean induced refusal logit score on harmless prompts is above 0 (refusal tokens more likely
    than not), else the strongest. Returns the chosen alpha and one row per alpha tried."""
    rows = []
    for a in alphas:
        s = refusal_scores(backend, harmless_val, fmt, interventions=addition(direction, a), batch_size=batch_size)
        rows.append({"alpha": float(a), "induced_refusal_score": float(s.mean()),
                     "share_score_above_0": float((s > 0).float().mean())})
        if float(s.mean()) > 0:
            break
    # the loop stops at the first positive mean, so the strongest row is that one (or, with none, the strongest)
    chosen = max(rows, key=lambda r: r["induced_refusal_score"])
    for r in rows:
        r["chosen"] = r is chosen
    return chosen["alpha"], rows
