"""Optimised per-layer ablation: search the kernel parameters of :mod:`steering.kernel` (attention and MLP
outputs separately, plus the embedding weight) and the fractional direction index with Optuna's
multi-objective TPE sampler, co-minimising

- the mean refusal logit score (:func:`workbench.scoring.refusal_scores`) on harmful *validation* prompts, and
- the mean KL to the unmodified model (:func:`workbench.scoring.kl_divergence`) on harmless *validation* prompts.

The search never sees a test prompt (the command line reads ``harmful:val`` / ``harmless:val`` only). Every
trial is a point (refusal score, KL); the Pareto front is the set no other trial beats on both
(:func:`pareto_front`), and the chosen trial follows one rule (:func:`choose_trial`): the lowest refusal score
among the trials with KL <= ``kl_max``.

The search box (:class:`SearchSpace`) samples a kernel's floor as a fraction of its peak (``floor_frac``), so
every sample satisfies ``floor <= peak`` without rejections; rows report the kernel's own ``floor``. A range
whose two ends are equal is a fixed value (not sampled). The optimiser core (:func:`run_study`) takes any
objective ``Candidate -> (refusal, kl)``: :class:`ModelObjective` is the real one, and the tests plant a
synthetic one with a known optimum.

>>> space = SearchSpace.for_model(8, index_range=None)
>>> sorted(space.free())[:3], space.record()["width"]
(['attn_floor_frac', 'attn_peak', 'attn_position'], [1.0, 7.0])
>>> rows = [{"number": 0, "refusal_score": 1.0, "kl": 0.05}, {"number": 1, "refusal_score": -2.0, "kl": 0.3},
...         {"number": 2, "refusal_score": 0.5, "kl": 0.1}, {"number": 3, "refusal_score": 0.7, "kl": 0.2}]
>>> sorted(pareto_front(rows)), choose_trial(rows, kl_max=0.2)["number"]
([0, 1, 2], 2)
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence


from workbench.backends.base import Backend
from workbench.chat import ChatFormat
from workbench.errors import WorkbenchError
from workbench.scoring import kl_divergence, next_token_logprobs, refusal_scores
from workbench.vectors import Direction

from steering.kernel import AblationProfile, Kernel, KernelAblation, interpolate_direction

PARTS = ("attn", "mlp")
KERNEL_PARAMS = ("peak", "position", "floor_frac", "width")
STUDY_NAME = "steer-optimize"
CHOICE_RULE = ("the lowest mean refusal score on harmful validation prompts among the trials whose mean KL on "
               "harmless validation prompts is <= kl_max (ties: lower KL, then the earlier trial); when no trial "
               "is within kl_max, the trial with the lowest KL, flagged within_kl_max=false")

Range = tuple[float, float]


@dataclass(frozen=True)
class Candidate:
    """One point of the search: the ablation profile and the fractional direction index (None: fixed direction)."""

    profile: AblationProfile
    index: float | None = None

    def row(self) -> dict[str, Any]:
        """Flat kernel parameters: ``attn_peak, attn_position, attn_floor, attn_width, mlp_..., embed, direction_index``."""
        out: dict[str, Any] = {}
        for part in PARTS:
            k: Kernel = getattr(self.profile, part)
            out.update({f"{part}_peak": k.peak, f"{part}_position": k.position, f"{part}_floor": k.floor,
                        f"{part}_width": k.width})
        out["embed"] = self.profile.embed
        out["direction_index"] = self.index
        return out

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Candidate":
        """The candidate of a row written by :meth:`row` (e.g. a row of ``trials.csv`` read back)."""
        def num(k: str) -> float:
            return float(row[k])

        kernels = [Kernel(num(f"{p}_peak"), num(f"{p}_position"), num(f"{p}_floor"), num(f"{p}_width")) for p in PARTS]
        idx = row.get("direction_index")
        return cls(AblationProfile(*kernels, embed=num("embed")),
                   None if idx is None or idx == "" else float(idx))


def _check_range(name: str, r: Range, lo: float, hi: float) -> Range:
    a, b = float(r[0]), float(r[1])
    if not (math.isfinite(a) and math.isfinite(b)) or not lo <= a <= b <= hi:
        raise WorkbenchError(f"search range of {name} must satisfy {lo} <= low <= high <= {hi}, got [{a}, {b}]")
    return (a, b)


@dataclass(frozen=True)
class SearchSpace:
    """The box the optimiser samples, per kernel (attn and mlp share the box): ``peak``, ``position`` (layers),
    ``floor_frac`` (floor = floor_frac * peak), ``width`` (layers); ``embed``; ``index`` (layers; None: the
    direction is fixed)."""

    peak: Range = (0.2, 1.0)
    position: Range = (0.0, 1.0)
    floor_frac: Range = (0.0, 1.0)
    width: Range = (1.0, 1.0)
    embed: Range = (0.0, 1.0)
    index: Range | None = None

    def __post_init__(self) -> None:
        _check_range("peak", self.peak, 0.0, 1.0)
        _check_range("floor_frac", self.floor_frac, 0.0, 1.0)
        _check_range("embed", self.embed, 0.0, 1.0)
        _check_range("position", self.position, -math.inf, math.inf)
        w = _check_range("width", self.width, 0.0, math.inf)
        if w[0] <= 0:
            raise WorkbenchError(f"search range of width must start above 0 layers, got [{w[0]}, {w[1]}]")
        if self.index is not None:
            _check_range("direction index", self.index, 0.0, math.inf)

    @classmethod
    def for_model(cls, n_layers: int, *, index_range: Range | None = (0.2, 0.9)) -> "SearchSpace":
        """The default box for a model of ``n_layers`` layers: peak in [0.2, 1], the peak anywhere in
        ``0 .. n_layers - 1``, floor any fraction of the peak, width 1 .. n_layers - 1 layers, embedding weight in
        [0, 1]; ``index_range``: the direction index as fractions of depth (``(0.2, 0.9)``: layers
        0.2 (n - 1) .. 0.9 (n - 1)), None for a fixed direction."""
        if n_layers < 1:
            raise WorkbenchError(f"n_layers must be >= 1, got {n_layers}")
        last = float(n_layers - 1)
        idx = None
        if index_range is not None:
            lo, hi = _check_range("direction index (fraction of depth)", index_range, 0.0, 1.0)
            idx = (lo * last, hi * last)
        return cls(position=(0.0, last), width=(1.0, max(1.0, last)), index=idx)

    def ranges(self) -> dict[str, Range]:
        """Every parameter's range, by Optuna parameter name."""
        out: dict[str, Range] = {}
        for part in PARTS:
            for p in KERNEL_PARAMS:
                out[f"{part}_{p}"] = getattr(self, p)
        out["embed"] = self.embed
        if self.index is not None:
            out["direction_index"] = self.index
        return out

    def free(self) -> dict[str, Range]:
        """The parameters the sampler draws (ranges of non-zero length)."""
        return {k: r for k, r in self.ranges().items() if r[1] > r[0]}

    def candidate(self, params: dict[str, float]) -> Candidate:
        """The candidate of sampled ``params`` (fixed parameters take their one value)."""
        v = {k: float(params.get(k, r[0])) for k, r in self.ranges().items()}
        kernels = {}
        for part in PARTS:
            peak = v[f"{part}_peak"]
            kernels[part] = Kernel(peak=peak, position=v[f"{part}_position"],
                                   floor=min(peak, v[f"{part}_floor_frac"] * peak), width=v[f"{part}_width"])
        return Candidate(AblationProfile(kernels["attn"], kernels["mlp"], embed=v["embed"]),
                         v.get("direction_index"))

    def suggest(self, trial: Any) -> Candidate:
        return self.candidate({k: trial.suggest_float(k, r[0], r[1]) for k, r in self.free().items()})

    def record(self) -> dict[str, Any]:
        return {k: (list(v) if v is not None else None) for k, v in asdict(self).items()}


# -- the rules (one small function each, tested with planted rows) ------------------------------------------

def pareto_front(rows: Sequence[dict[str, Any]]) -> set[int]:
    """Trial numbers no other trial dominates: no other has refusal_score <= and kl <= with one of them <."""
    pts = [(r["number"], float(r["refusal_score"]), float(r["kl"])) for r in rows]
    return {n for n, s, k in pts
            if not any(s2 <= s and k2 <= k and (s2 < s or k2 < k) for _, s2, k2 in pts)}


def choose_trial(rows: Sequence[dict[str, Any]], kl_max: float) -> dict[str, Any]:
    """The chosen trial: the lowest mean refusal score among the trials with mean KL <= ``kl_max`` (ties: lower
    KL, then the earlier trial). When none is within ``kl_max``: the lowest-KL trial. The returned row is a copy
    with ``within_kl_max`` set. Always on the Pareto front."""
    if not rows:
        raise WorkbenchError("no completed trials to choose from")
    ok = [r for r in rows if float(r["kl"]) <= kl_max]
    if ok:
        best = min(ok, key=lambda r: (float(r["refusal_score"]), float(r["kl"]), r["number"]))
    else:
        best = min(rows, key=lambda r: (float(r["kl"]), float(r["refusal_score"]), r["number"]))
    return {**best, "within_kl_max": bool(ok)}


# -- the objective on a model ---------------------------------------------------------------------------

class CountingBackend:
    """A backend proxy that counts model evaluations: batched forward passes (``forward_passes``) and the prompts
    in them (``prompt_forwards``)."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self.forward_passes = 0
        self.prompt_forwards = 0

    def run(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        self.forward_passes += 1
        self.prompt_forwards += int(batch.input_ids.shape[0])
        return self._backend.run(batch, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class ModelObjective:
    """``Candidate -> (mean refusal score on harmful, mean KL on harmless)`` on a model.

    ``directions``: one Direction (fixed) or one per layer (interpolated at the candidate's index). The
    unmodified model's next-token log-probabilities on the harmless prompts (the KL reference) and its mean
    refusal score on the harmful ones (``baseline_refusal``) are computed once, here; ``evaluations`` counts
    the batched forward passes so far (``setup_evaluations`` of them for the reference and baseline)."""

    def __init__(self, backend: Backend, fmt: ChatFormat | None, directions: Direction | Sequence[Direction],
                 harmful: Sequence[str], harmless: Sequence[str], *, batch_size: int = 16) -> None:
        if not harmful or not harmless:
            raise WorkbenchError("the optimisation needs harmful and harmless validation prompts")
        self.backend = CountingBackend(backend)
        self.fmt, self.batch_size = fmt, batch_size
        self.harmful, self.harmless = list(harmful), list(harmless)
        self.fixed = directions if isinstance(directions, Direction) else None
        self.per_layer = None if self.fixed is not None else list(directions)
        self.n_layers = backend.n_layers
        self.reference = next_token_logprobs(self.backend, self.harmless, fmt, batch_size=batch_size)
        self.baseline_refusal = float(refusal_scores(self.backend, self.harmful, fmt, batch_size=batch_size).mean())
        self.setup_evaluations = self.backend.forward_passes

    @property
    def evaluations(self) -> int:
        return self.backend.forward_passes

    def direction(self, cand: Candidate) -> Direction:
        if self.fixed is not None:
            return self.fixed
        if cand.index is None:
            raise WorkbenchError("per-layer directions need a direction index in the search space")
        return interpolate_direction(self.per_layer or [], cand.index)

    def ablation(self, cand: Candidate) -> KernelAblation:
        return KernelAblation(cand.profile, self.direction(cand))

    def __call__(self, cand: Candidate) -> tuple[float, float]:
        ivs = self.ablation(cand).interventions(self.n_layers)
        s = refusal_scores(self.backend, self.harmful, self.fmt, interventions=ivs, batch_size=self.batch_size)
        kl = kl_divergence(self.backend, self.harmless, self.fmt, interventions=ivs, reference=self.reference,
                           batch_size=self.batch_size)
        return float(s.mean()), float(kl.mean())


# -- the study ------------------------------------------------------------------------------------------

def sampler_seed(seed: int, n_done: int) -> int:
    """The TPE sampler's seed for a study that already has ``n_done`` trials: a resumed study must not replay the
    random start-up draws of the first call, so the seed depends on where the study stands (deterministic)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(n_done)]).generate_state(1)[0])


def run_study(objective: Callable[[Candidate], tuple[float, float]], space: SearchSpace, *, n_trials: int,
              seed: int = 0, storage: Any = None, study_name: str = STUDY_NAME, n_startup_trials: int = 10,
              progress: bool | str = False) -> Any:
    """Run (or continue) a two-objective Optuna study until it has ``n_trials`` completed trials.

    ``storage``: None (in memory) or an Optuna storage / URL (``sqlite:///PATH``); an existing study of that name
    is continued, and only the missing trials run. Objectives (both minimised): refusal score, KL. Each trial
    records ``objective_seconds`` and, when the objective counts them (``objective.evaluations``),
    ``model_evaluations``; :func:`trial_rows` adds ``seconds``, the trial's wall time with the sampler's.
    Sampler: TPE, multivariate, seeded with :func:`sampler_seed` (so the same calls give the same trials).
    """
    import optuna

    if n_trials < 1:
        raise WorkbenchError(f"n_trials must be >= 1, got {n_trials}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage, directions=["minimize", "minimize"],
                                load_if_exists=True)
    n_done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    with warnings.catch_warnings():  # multivariate TPE is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(seed=sampler_seed(seed, n_done), multivariate=True,
                                                   n_startup_trials=n_startup_trials)
    todo = max(0, n_trials - n_done)
    bar: Any = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=todo, desc=progress if isinstance(progress, str) else "optimize", unit="trial")

    def one(trial: Any) -> tuple[float, float]:
        cand = space.suggest(trial)
        t0, e0 = time.perf_counter(), getattr(objective, "evaluations", None)
        refusal, kl = objective(cand)
        trial.set_user_attr("objective_seconds", time.perf_counter() - t0)
        if e0 is not None:
            trial.set_user_attr("model_evaluations", int(objective.evaluations) - int(e0))  # type: ignore[attr-defined]
        return float(refusal), float(kl)

    def tick(study: Any, trial: Any) -> None:
        if bar is not None:
            bar.update(1)
            if trial.values:
                bar.set_postfix(refusal=f"{trial.values[0]:.2f}", kl=f"{trial.values[1]:.3f}")

    try:
        if todo:
            study.optimize(one, n_trials=todo, callbacks=[tick], gc_after_trial=False)
    finally:
        if bar is not None:
            bar.close()
    return study


def trial_rows(study: Any, space: SearchSpace) -> list[dict[str, Any]]:
    """One row per completed trial: number, refusal_score, kl, the kernel parameters (:meth:`Candidate.row`),
    seconds (wall time: sampling, objective, storage), objective_seconds and model_evaluations."""
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        cand = space.candidate(t.params)
        wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_start and t.datetime_complete else math.nan
        rows.append({"number": t.number, "refusal_score": t.values[0], "kl": t.values[1], **cand.row(),
                     "seconds": wall, "objective_seconds": t.user_attrs.get("objective_seconds", math.nan),
                     "model_evaluations": t.user_attrs.get("model_evaluations", 0)})
    return sorted(rows, key=lambda r: r["number"])


def cost_to_trial(rows: Sequence[dict[str, Any]], invocations: Sequence[dict[str, Any]], number: int) -> dict[str, Any]:
    """What the search spent until trial ``number`` completed: the set-up (direction extraction, KL reference,
    baseline) of every call that started before it, plus every trial up to and including it.

    ``seconds_to_trial`` and ``model_evaluations_to_trial`` (batched forward passes)."""
    calls = [i for i in invocations if i["trials_before"] <= number]
    trials = [r for r in rows if r["number"] <= number]
    return {"seconds_to_trial": sum(i["setup_seconds"] for i in calls) + sum(float(r["seconds"]) for r in trials),
            "model_evaluations_to_trial": (sum(i["setup_evaluations"] for i in calls)
                                           + sum(int(r["model_evaluations"]) for r in trials))}


def pareto_plot(rows: Sequence[dict[str, Any]], chosen: dict[str, Any], kl_max: float, n_layers: int,
                profile: AblationProfile, baseline_refusal: float | None, title: str) -> Any:
    """Left: every trial (refusal score vs KL), the Pareto front, the chosen trial and the KL limit. Right: the
    chosen per-layer weights of the attention and MLP outputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(rows)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax.scatter([r["kl"] for r in rows], [r["refusal_score"] for r in rows], s=12, color="C7", label="trial")
    fr = sorted((r for r in rows if r["number"] in front), key=lambda r: r["kl"])
    ax.plot([r["kl"] for r in fr], [r["refusal_score"] for r in fr], "o-", color="C0", ms=4, label="Pareto front")
    ax.scatter([chosen["kl"]], [chosen["refusal_score"]], marker="*", s=220, color="C3", zorder=5,
               label=f"chosen (trial {chosen['number']})")
    ax.axvline(kl_max, color="C3", ls=":", lw=1, label=f"KL max {kl_max:g}")
    if baseline_refusal is not None:
        ax.axhline(baseline_refusal, color="k", ls="--", lw=1, label="unmodified")
    ax.set(xlabel="mean KL, harmless validation", ylabel="mean refusal score, harmful validation", title=title)
    ax.legend(fontsize=7)
    lw = profile.layer_weights(n_layers)
    ax2.plot(range(n_layers), lw["attn_out"], "o-", ms=3, label="attention output")
    ax2.plot(range(n_layers), lw["mlp_out"], "s-", ms=3, label="MLP output")
    ax2.axhline(profile.embed, color="C7", ls=":", lw=1, label=f"embedding {profile.embed:.2f}")
    ax2.set(xlabel="layer", ylabel="ablation weight", ylim=(-0.05, 1.05), title="chosen per-layer weights")
    ax2.legend(fontsize=7)
    return fig


__all__ = ["Candidate", "SearchSpace", "pareto_front", "choose_trial", "CountingBackend", "ModelObjective",
           "run_study", "trial_rows", "pareto_plot", "sampler_seed", "cost_to_trial", "CHOICE_RULE"]
