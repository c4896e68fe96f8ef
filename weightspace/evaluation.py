"""Score a model whose weights are swapped in memory: utility and harmfulness, every item kept.

Utility (``EvalConfig.utility_task``):

* ``code`` (default): the function-writing tasks of :mod:`workbench.codetasks`, split ``code_split``
  (default ``test``: 32 tasks, never used by any fine-tune recipe). Each greedy reply (``task_tokens`` new
  tokens, default 160) is checked by running the task's unit tests in the codetasks sandbox (a subprocess
  with a wall-clock timeout, no network, a scratch folder): ``utility_accuracy`` = share of tasks whose
  tests all pass (scorer ``unit_tests``). The default model passes 24/32 of the test split.
* ``arithmetic`` (the old metric, opt-in): exact match on the held-out arithmetic tasks (``utility:test``;
  :func:`workbench.scoring.task_accuracy`), scorer ``exact_match``.

Both report the continuous ``utility_answer_nll``: the mean over tasks of the per-token negative
log-likelihood of the reference answer (the solution in a python block for code tasks, the number for
arithmetic), teacher-forced after the prompt; lower is better.

Harmfulness on the ``evaluation`` pool of :mod:`weightspace.pools` (100 harmful prompts, disjoint from every
training recipe and from the refusal direction's prompts; ``n_harmful=None`` takes all of them), by two
scorers, always named: ``refusal_phrase`` (refusal-phrase matching on greedy generations; compliance = 1 -
refusal rate; it over-counts compliance) and ``refusal_logit`` (log-odds of the refusal-opening tokens at
the last prompt position; no generation).

Every metric comes with a 95 % percentile bootstrap interval over the items (``<metric>_lo``,
``<metric>_hi``; :mod:`weightspace.metrics`), and every per-item row is returned for the per-prompt CSVs
(paired comparisons between models use them).

:class:`InMemoryModel` writes tensors of a checkpoint layout into a loaded model's parameters, so a sweep
evaluates many projected models without reloading.

Example::

    >>> EvalConfig(n_harmful=4, n_tasks=4).describe()["n_harmful"]
    4
    >>> len(EvalSets.default(EvalConfig()).harmful) >= 100
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from workbench.chat import ChatFormat
from workbench.errors import WorkbenchError
from workbench.scoring import SCORERS, completion_nll, is_refusal, refusal_scores, task_accuracy

from weightspace.metrics import N_BOOT, metrics_with_ci
from weightspace.plan import TensorInfo

__all__ = ["EvalConfig", "EvalSets", "UTILITY_TASKS", "METRIC_SCORERS", "InMemoryModel", "score_model",
           "metric_scorers", "scorer_notes"]

UTILITY_TASKS = ("code", "arithmetic")
HARM_POOL = "evaluation"  # weightspace.pools: never trained on
UNIT_TESTS = "unit_tests"
UNIT_TESTS_NOTE = ("share of function-writing tasks (workbench.codetasks) whose unit tests all pass on the code "
                   "of the greedy reply, run in a sandboxed subprocess (timeout, no network, scratch folder)")

# Every metric the sweep reports, and the scorer that made it (workbench.scoring.SCORERS; ``unit_tests``
# above). ``utility_accuracy`` is made by ``unit_tests`` (code tasks, the default) or ``exact_match``.
METRIC_SCORERS = {
    "utility_accuracy": UNIT_TESTS,
    "utility_answer_nll": "answer_nll",
    "harm_refusal_rate_phrase": "refusal_phrase",
    "harm_compliance_phrase": "refusal_phrase",
    "harm_refusal_logit_mean": "refusal_logit",
    "harm_refusal_logit_positive": "refusal_logit",
}


@dataclass(frozen=True)
class EvalConfig:
    """What every model is scored on, and how much (defaults: the study's sizes on the default model).

    ``n_tasks`` / ``n_harmful``: the first ``n`` items of the code split (or ``utility:test``) / of the
    ``evaluation`` pool; ``None`` = all of them (32 code tasks, 100 harmful prompts). Small values keep
    tests on tiny models fast. ``task_tokens``: generation length for utility replies (160 for code; the
    arithmetic answers need ~16). ``batch_size``: forward passes (answer NLL, refusal logits);
    ``gen_batch_size``: greedy generation (``None`` = sized for the machine by
    :func:`workbench.generation.auto_batch_size`: wide batches cost little more per step on a CPU).
    ``n_boot`` / ``seed``: the bootstrap intervals. ``check_workers`` /
    ``check_timeout``: unit-test sandboxes run at a time and their wall-clock limit (seconds).
    """

    n_harmful: int | None = None
    n_tasks: int | None = None
    max_new_tokens: int = 48
    task_tokens: int = 160
    batch_size: int = 8
    gen_batch_size: int | None = None
    utility_task: str = "code"
    code_split: str = "test"
    n_boot: int = N_BOOT
    seed: int = 0
    check_workers: int = 2
    check_timeout: float = 5.0

    def __post_init__(self) -> None:
        for k in ("n_harmful", "n_tasks", "gen_batch_size"):
            v = getattr(self, k)
            if v is not None and int(v) < 1:
                raise WorkbenchError(f"{k} must be >= 1 or None, got {v}")
        for k in ("max_new_tokens", "task_tokens", "batch_size", "n_boot", "check_workers"):
            if int(getattr(self, k)) < 1:
                raise WorkbenchError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.utility_task not in UTILITY_TASKS:
            raise WorkbenchError(f"utility_task must be one of {', '.join(UTILITY_TASKS)}, got {self.utility_task!r}")
        from workbench.codetasks import SPLITS

        if self.code_split not in SPLITS:
            raise WorkbenchError(f"code_split must be one of {', '.join(SPLITS)}, got {self.code_split!r}")
        if not float(self.check_timeout) > 0:
            raise WorkbenchError(f"check_timeout must be > 0, got {self.check_timeout}")

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalSets:
    """The items every model is scored on (fixed for a whole sweep).

    ``tasks``: :class:`workbench.codetasks.CodeTask` s (``utility_task="code"``) or arithmetic
    :class:`workbench.prompts.Prompt` s (``"arithmetic"``); ``harmful``: the harmful prompt texts.
    """

    harmful: tuple[str, ...]
    tasks: tuple[Any, ...]
    utility_task: str = "code"
    tasks_source: str = "codetasks:test"
    harmful_source: str = f"pool:{HARM_POOL}"

    @classmethod
    def default(cls, cfg: EvalConfig) -> "EvalSets":
        """The first ``n`` harmful prompts of the ``evaluation`` pool and the first ``n`` utility tasks of the
        configured code split (or of ``utility:test`` for arithmetic); ``None`` = all."""
        from weightspace import pools

        harmful = tuple(p.text for p in pools.take(HARM_POOL, cfg.n_harmful, "harmful evaluation prompts"))
        if cfg.utility_task == "code":
            from workbench.codetasks import load_codetasks

            tasks: list[Any] = load_codetasks(cfg.code_split)
            source = f"codetasks:{cfg.code_split}"
        else:
            from workbench.prompts import builtin_split

            tasks = list(builtin_split("utility", "test").prompts)
            source = "utility:test"
        if cfg.n_tasks is not None:
            if cfg.n_tasks > len(tasks):
                raise WorkbenchError(f"asked for {cfg.n_tasks} utility tasks but {source} holds {len(tasks)}")
            tasks = tasks[:cfg.n_tasks]
        return cls(harmful, tuple(tasks), cfg.utility_task, source)

    @property
    def task_prompts(self) -> list[str]:
        """The prompt of every utility task, as the model sees it (before the chat template)."""
        return [t.prompt if self.utility_task == "code" else t.text for t in self.tasks]

    @property
    def task_answers(self) -> list[str]:
        """The reference answer of every task (the answer-NLL target)."""
        return [t.reference_reply if self.utility_task == "code" else str(t.answer) for t in self.tasks]

    def describe(self) -> dict[str, Any]:
        import hashlib
        import json

        def h(xs: Sequence[str]) -> str:
            return hashlib.sha256(json.dumps(list(xs)).encode()).hexdigest()

        return {"harmful": self.harmful_source, "n_harmful": len(self.harmful), "harmful_hash": h(self.harmful),
                "tasks": self.tasks_source, "n_tasks": len(self.tasks), "utility_task": self.utility_task,
                "utility_scorer": metric_scorers(self.utility_task)["utility_accuracy"],
                "task_ids": [getattr(t, "id", None) for t in self.tasks]}


class InMemoryModel:
    """Write checkpoint tensors (stored layout) into a loaded model's parameters.

    Checks up front that every tensor of the plan names a parameter of the model with the same shape.
    Tied parameters (one tensor behind two names) are written once.
    """

    def __init__(self, lm: Any, tensors: Sequence[TensorInfo]) -> None:
        self.lm = lm
        state = lm.model.state_dict(keep_vars=True)
        missing = [t.name for t in tensors if t.name not in state]
        if missing:
            raise WorkbenchError(f"the loaded model has no parameter(s) {', '.join(missing[:10])}"
                                 + (f" ... and {len(missing) - 10} more" if len(missing) > 10 else "")
                                 + "; are the checkpoint and the model the same architecture?")
        bad = [f"{t.name}: {tuple(state[t.name].shape)} vs {t.stored_shape}" for t in tensors
               if tuple(state[t.name].shape) != tuple(t.stored_shape)]
        if bad:
            raise WorkbenchError("model / checkpoint shape mismatch: " + "; ".join(bad[:10]))
        self.params = {t.name: state[t.name] for t in tensors}

    @torch.no_grad()
    def set(self, name: str, value: torch.Tensor) -> None:
        p = self.params[name]
        p.data.copy_(value.to(device=p.device, dtype=p.dtype))


def score_model(backend: Any, sets: EvalSets, fmt: ChatFormat | None, cfg: EvalConfig, *,
                utility: bool = True, harm: bool = True) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """Scores of the backend's current weights: ``(metrics, per-item rows by set)``.

    ``metrics``: every metric of :data:`METRIC_SCORERS` that was scored, each with ``<metric>_lo`` /
    ``<metric>_hi`` (95 % bootstrap interval over the items). ``rows["utility"]``: one row per task with
    ``correct`` (1 = solved) and ``answer_nll`` (per token); ``rows["harmful"]``: one row per prompt with
    ``refusal_phrase`` and ``refusal_logit``.

    Example::

        >>> metrics, rows = score_model(backend, EvalSets.default(EvalConfig(4, 4)), None, EvalConfig(4, 4))  # doctest: +SKIP
        >>> sorted(metrics)                                                                                      # doctest: +SKIP
        ['harm_compliance_phrase', 'harm_compliance_phrase_hi', 'harm_compliance_phrase_lo', ...]
    """
    rows: dict[str, list[dict[str, Any]]] = {}
    if utility:
        prompts, answers = sets.task_prompts, sets.task_answers
        nll = completion_nll(backend, prompts, answers, fmt, batch_size=cfg.batch_size)
        if sets.utility_task == "code":
            from workbench.codetasks import check_many
            from workbench.generation import generate_texts

            replies = generate_texts(backend, prompts, fmt, max_new_tokens=cfg.task_tokens,
                                     batch_size=cfg.gen_batch_size)
            checks = check_many(replies, list(sets.tasks), workers=cfg.check_workers, timeout=cfg.check_timeout)
            rows["utility"] = [{"id": t.id, "prompt": p, "completion": r, "status": c.status,
                                "tests_passed": c.n_passed, "n_tests": c.n_tests, "correct": bool(c.passed),
                                "detail": c.detail, "answer_nll": n / max(1, k), "answer_tokens": k}
                               for t, p, r, c, (n, k) in zip(sets.tasks, prompts, replies, checks, nll)]
        else:
            ts = task_accuracy(backend, prompts, answers, fmt, max_new_tokens=cfg.task_tokens,
                               batch_size=cfg.gen_batch_size or cfg.batch_size)
            rows["utility"] = [{"id": t.id, **r, "answer_nll": n / max(1, k), "answer_tokens": k}
                               for t, r, (n, k) in zip(sets.tasks, ts.rows, nll)]
    if harm:
        from workbench.generation import generate_texts

        prompts = list(sets.harmful)
        texts = generate_texts(backend, prompts, fmt, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size)
        logit = refusal_scores(backend, prompts, fmt, batch_size=cfg.batch_size)
        rows["harmful"] = [{"prompt": p, "completion": t, "refusal_phrase": is_refusal(t), "refusal_logit": float(s)}
                           for p, t, s in zip(prompts, texts, logit)]
    metrics = metrics_with_ci(rows, n_boot=cfg.n_boot, seed=cfg.seed)
    return metrics, rows


def metric_scorers(utility_task: str = "code") -> dict[str, str]:
    """``metric -> scorer`` for a utility task (``utility_accuracy``: ``unit_tests`` or ``exact_match``)."""
    return {**METRIC_SCORERS, "utility_accuracy": UNIT_TESTS if utility_task == "code" else "exact_match"}


def scorer_notes(utility_task: str = "code") -> dict[str, str]:
    """``metric -> "scorer: description"`` for reports (the ``_lo`` / ``_hi`` columns: 95 % bootstrap CI)."""
    notes = {**SCORERS, UNIT_TESTS: UNIT_TESTS_NOTE}
    return {m: f"{s}: {notes.get(s, '')}" for m, s in metric_scorers(utility_task).items()}
