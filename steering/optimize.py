"""Optimised per-layer ablation: search the kernel parameters of :mod:`steering.kernel` (attention and MLP
outputs separately, plus the embedding weight) and the fractional direction index with Optuna's
multi-objective TPE sampler, co-minimising

- the mean refusal logit score (:func:`workbench.scoring.refusal_scores`) on harmful *validation* prompts, and
- the mean KL to the unmodified model (:func:`workbench.scoring.kl_divergence`) on harmless *validation* prompts.

The search never sees a test prompt (the command line reads ``harmful:val`` / ``harmless:val`` only). Every
trial is a point (refusal score, KL); the Pareto front is the set no other trial beats on both
(:func:`pareto_front`), and the chosen trial follows one rule (:func:`choose_trial`): the lowest refusal score
among the trials whose KL passes ``kl_max``.

How KL passes (``rule``, :data:`CHOICE_RULES`): ``"upper"`` (the default) asks the one-sided upper confidence
bound of the mean KL (:func:`kl_upper_bound`: mean + t(confidence, n - 1) x sd / sqrt(n) over the n harmless
validation prompts, confidence 0.95) to be <= ``kl_max``; ``"mean"`` asks it of the mean itself. Why: a mean
over 32 prompts is noisy (per-prompt KL is right-skewed, its standard deviation about the size of its mean), and
the rule picks the trial with the lowest refusal score, which on the front is the one with the most KL, so its
mean is the most likely to be under-estimated (issue 12: the chosen trial's KL was 0.140 on 32 validation
prompts and 0.237 on 68 test prompts, where the per-prompt KL's standard deviation was 0.226: a standard error
of 0.040 at n = 32). Each trial therefore records the per-prompt KL's standard deviation and count
(:class:`TrialScore`; Optuna user attributes ``kl_sd``, ``kl_n``). Trials of studies run before they were recorded have no bound: under ``"upper"`` they cannot be
chosen (only ``"mean"`` reads them), and a study with none recorded is refused with a one-line error.

The search box (:class:`SearchSpace`) samples a kernel's floor as a fraction of its peak (``floor_frac``), so
every sample satisfies ``floor <= peak`` without rejections; rows report the kernel's own ``floor``. A range
whose two ends are equal is a fixed value (not sampled). The optimiser core (:func:`run_study`) takes any
objective ``Candidate -> TrialScore`` (or ``(refusal, kl)``): :class:`ModelObjective` is the real one, and
the tests plant a synthetic one with a known optimum.

>>> space = SearchSpace.for_model(8, index_range=None)
>>> sorted(space.free())[:3], space.record()["width"]
(['attn_floor_frac', 'attn_peak', 'attn_position'], [1.0, 7.0])
>>> round(kl_upper_bound(0.1, 0.04, 16), 4)  # 0.1 + t(0.95, 15) x 0.04 / sqrt(16) = 0.1 + 1.753 x 0.01
0.1175
>>> rows = [{"number": 0, "refusal_score": 1.0, "kl": 0.05}, {"number": 1, "refusal_score": -2.0, "kl": 0.3},
...         {"number": 2, "refusal_score": 0.5, "kl": 0.1}, {"number": 3, "refusal_score": 0.2, "kl": 0.18}]
>>> for r, sd in zip(rows, (0.04, 0.2, 0.04, 0.08)):
...     r.update(kl_sd=sd, kl_n=16)
>>> sorted(pareto_front(rows)), [choose_trial(rows, kl_max=0.2, rule=r)["number"] for r in ("mean", "upper")]
([0, 1, 2, 3], [3, 2])
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
KL_RULES = ("upper", "mean")
DEFAULT_KL_RULE = "upper"
DEFAULT_KL_CONFIDENCE = 0.95
#: The choice rule of :func:`choose_trial`, by ``rule`` (written to optimize.json; {confidence} is filled in).
CHOICE_RULES = {
    "upper": ("the lowest mean refusal score on harmful validation prompts among the trials whose one-sided "
              "{confidence:g} upper confidence bound of the mean KL on harmless validation prompts (mean + "
              "t({confidence:g}, n - 1) x sd / sqrt(n) over the n prompts' KL) is <= kl_max (ties: lower mean KL, then "
              "the earlier trial); trials without per-prompt KL statistics (run before they were recorded) are not "
              "eligible; when no trial is within kl_max, the trial with the lowest bound, flagged "
              "within_kl_max=false"),
    "mean": ("the lowest mean refusal score on harmful validation prompts among the trials whose mean KL on "
             "harmless validation prompts is <= kl_max (ties: lower KL, then the earlier trial); when no trial "
             "is within kl_max, the trial with the lowest KL, flagged within_kl_max=false"),
}

Range = tuple[float, float]


@dataclass(frozen=True)
class TrialScore:
    """What one trial measured: the mean refusal score on the harmful prompts, the mean KL on the harmless ones,
    and the per-prompt KL's sample standard deviation (``kl_sd``, ddof 1; NaN for fewer than 2 prompts) and
    count (``kl_n``), which :func:`kl_upper_bound` turns into a bound on the mean.

    >>> s = TrialScore.of([1.0, -1.0], [0.1, 0.3, 0.2])
    >>> s.refusal_score, round(s.kl, 6), round(s.kl_sd, 6), s.kl_n
    (0.0, 0.2, 0.1, 3)
    """

    refusal_score: float
    kl: float
    kl_sd: float = math.nan
    kl_n: int = 0

    @classmethod
    def of(cls, refusal: Sequence[float] | Any, kl: Sequence[float] | Any) -> "TrialScore":
        """The score of per-prompt refusal scores and per-prompt KL values (sequences or 1-D tensors)."""
        import numpy as np

        r, k = np.asarray(refusal, dtype=np.float64), np.asarray(kl, dtype=np.float64)
        if r.size == 0 or k.size == 0:
            raise WorkbenchError("a trial score needs at least one refusal score and one KL value")
        return cls(float(r.mean()), float(k.mean()), float(k.std(ddof=1)) if k.size >= 2 else math.nan, int(k.size))


def _number(x: Any) -> float:
    """``float(x)``; NaN for None, "" or anything else that is not a number."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def kl_upper_bound(mean: float, sd: float, n: int, confidence: float = DEFAULT_KL_CONFIDENCE) -> float:
    """One-sided upper confidence bound of a mean KL from ``n`` per-prompt values: mean + t(confidence, n - 1)
    x sd / sqrt(n) (Student t). NaN when it cannot be computed (``n < 2`` or ``sd`` NaN / missing: a trial of
    a study run before the statistics were recorded). The t bound assumes a roughly normal mean; per-prompt KL
    is right-skewed, so at n = 32 its real coverage is a few points under the nominal level.

    >>> round(kl_upper_bound(0.2, 0.1, 4), 4), kl_upper_bound(0.2, float("nan"), 4)
    (0.3177, nan)
    """
    if not 0.5 <= confidence < 1:
        raise WorkbenchError(f"the KL confidence level must be in [0.5, 1), got {confidence}")
    mean, sd, n = _number(mean), _number(sd), _number(n)  # a CSV row's strings, "" or None for a missing value
    if not (n >= 2 and math.isfinite(sd) and math.isfinite(mean)):
        return math.nan
    n = int(n)
    from scipy import stats

    return mean + float(stats.t.ppf(confidence, n - 1)) * sd / math.sqrt(n)


def row_kl_upper(row: dict[str, Any], confidence: float = DEFAULT_KL_CONFIDENCE) -> float:
    """:func:`kl_upper_bound` of a trial row (``kl``, ``kl_sd``, ``kl_n``; a row without them gives NaN)."""
    return kl_upper_bound(row["kl"], row.get("kl_sd", math.nan), row.get("kl_n", 0), confidence)


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


def choice_rule(rule: str = DEFAULT_KL_RULE, confidence: float = DEFAULT_KL_CONFIDENCE) -> str:
    """The text of :func:`choose_trial`'s rule ``rule`` at ``confidence`` (what optimize.json records)."""
    if rule not in KL_RULES:
        raise WorkbenchError(f"unknown KL rule {rule!r}; valid rules: {', '.join(KL_RULES)}")
    return CHOICE_RULES[rule].format(confidence=confidence)


CHOICE_RULE = choice_rule()


def choose_trial(rows: Sequence[dict[str, Any]], kl_max: float, rule: str = DEFAULT_KL_RULE,
                 confidence: float = DEFAULT_KL_CONFIDENCE) -> dict[str, Any]:
    """The chosen trial (:data:`CHOICE_RULES`): the lowest mean refusal score among the trials whose KL
    statistic is <= ``kl_max`` (ties: lower mean KL, then the earlier trial); when none is: the trial with the
    lowest statistic. The statistic is, by ``rule``: ``"upper"``, the upper confidence bound of the mean KL
    (:func:`row_kl_upper`; rows without ``kl_sd`` / ``kl_n`` are not eligible), or ``"mean"``, the mean KL.

    The returned row is a copy with ``kl_upper`` (NaN when unknown) and ``within_kl_max`` set. Under ``"mean"``
    it is always on the Pareto front of (refusal score, mean KL); under ``"upper"`` not necessarily (a trial
    with a lower mean but a wider spread may fail the bound)."""
    choice_rule(rule, confidence)  # checks the rule
    if not rows:
        raise WorkbenchError("no completed trials to choose from")
    bound = {r["number"]: row_kl_upper(r, confidence) for r in rows}
    if rule == "upper":
        stat = bound
        pool = [r for r in rows if math.isfinite(stat[r["number"]])]
        if not pool:
            raise WorkbenchError(f"none of the {len(rows)} trials records per-prompt KL statistics (kl_sd, kl_n: a "
                                 f"study run before they were recorded, or fewer than 2 harmless prompts); choose "
                                 f"with the mean rule (--kl-rule mean) or resume the study with more trials")
    else:
        stat = {r["number"]: float(r["kl"]) for r in rows}
        pool = list(rows)
    ok = [r for r in pool if stat[r["number"]] <= kl_max]
    if ok:
        best = min(ok, key=lambda r: (float(r["refusal_score"]), float(r["kl"]), r["number"]))
    else:
        best = min(pool, key=lambda r: (stat[r["number"]], float(r["refusal_score"]), r["number"]))
    return {**best, "kl_upper": bound[best["number"]], "within_kl_max": bool(ok)}


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
    """``Candidate -> TrialScore`` on a model: the mean refusal score on the harmful prompts, the mean KL on the
    harmless ones and the per-prompt KL's standard deviation and count (:class:`TrialScore`).

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

    def __call__(self, cand: Candidate) -> TrialScore:
        ivs = self.ablation(cand).interventions(self.n_layers)
        s = refusal_scores(self.backend, self.harmful, self.fmt, interventions=ivs, batch_size=self.batch_size)
        kl = kl_divergence(self.backend, self.harmless, self.fmt, interventions=ivs, reference=self.reference,
                           batch_size=self.batch_size)
        return TrialScore.of(s.tolist(), kl.tolist())


# -- the study ------------------------------------------------------------------------------------------

def sampler_seed(seed: int, n_done: int) -> int:
    """The TPE sampler's seed for a study that already has ``n_done`` trials: a resumed study must not replay the
    random start-up draws of the first call, so the seed depends on where the study stands (deterministic)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(n_done)]).generate_state(1)[0])


def run_study(objective: Callable[[Candidate], TrialScore | tuple[float, float]], space: SearchSpace, *, n_trials: int,
              seed: int = 0, storage: Any = None, study_name: str = STUDY_NAME, n_startup_trials: int = 10,
              progress: bool | str = False) -> Any:
    """Run (or continue) a two-objective Optuna study until it has ``n_trials`` completed trials.

    ``storage``: None (in memory) or an Optuna storage / URL (``sqlite:///PATH``); an existing study of that name
    is continued, and only the missing trials run. Objectives (both minimised): refusal score, KL. Each trial
    records ``objective_seconds``; when the objective counts them (``objective.evaluations``),
    ``model_evaluations``; when it returns a :class:`TrialScore`, ``kl_sd`` and ``kl_n`` (a plain
    ``(refusal, kl)`` records neither); :func:`trial_rows` adds ``seconds``, the trial's wall time with the
    sampler's.
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
        score = objective(cand)
        trial.set_user_attr("objective_seconds", time.perf_counter() - t0)
        if e0 is not None:
            trial.set_user_attr("model_evaluations", int(objective.evaluations) - int(e0))  # type: ignore[attr-defined]
        if isinstance(score, TrialScore):
            trial.set_user_attr("kl_sd", score.kl_sd)
            trial.set_user_attr("kl_n", score.kl_n)
            return score.refusal_score, score.kl
        refusal, kl = score
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
    """One row per completed trial: number, refusal_score, kl, kl_sd and kl_n (the per-prompt KL's standard
    deviation and count; NaN and 0 for a trial that did not record them, e.g. of an older study), the kernel
    parameters (:meth:`Candidate.row`), seconds (wall time: sampling, objective, storage), objective_seconds and
    model_evaluations."""
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        cand = space.candidate(t.params)
        wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_start and t.datetime_complete else math.nan
        rows.append({"number": t.number, "refusal_score": t.values[0], "kl": t.values[1],
                     "kl_sd": t.user_attrs.get("kl_sd", math.nan), "kl_n": t.user_attrs.get("kl_n", 0), **cand.row(),
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
    up = float(chosen.get("kl_upper", math.nan))
    if math.isfinite(up):
        ax.plot([chosen["kl"], up], [chosen["refusal_score"]] * 2, "|-", color="C3", lw=1.5,
                label="chosen: KL upper bound")
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


__all__ = ["Candidate", "SearchSpace", "TrialScore", "kl_upper_bound", "row_kl_upper", "pareto_front", "choose_trial",
           "CountingBackend", "ModelObjective", "run_study", "trial_rows", "pareto_plot", "sampler_seed",
           "cost_to_trial", "choice_rule", "CHOICE_RULE", "CHOICE_RULES", "KL_RULES", "DEFAULT_KL_RULE", "DEFAULT_KL_CONFIDENCE"]
