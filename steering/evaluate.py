"""Evaluate steering conditions on prompt sets: every per-prompt generation and score is kept.

Metrics per condition (each names its scorer, see :data:`workbench.scoring.SCORERS`):
refusal rate on harmful prompts and over-refusal on harmless prompts (``refusal_phrase``), mean
refusal logit score on both (``refusal_logit``), KL to the unmodified model on harmless prompts
(``kl_last``), perplexity of the unmodified model's own harmless completions (``perplexity``) and
exact-match task accuracy (``exact_match``), with bootstrap 95 % intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from workbench.backends.base import Backend
from workbench.chat import ChatFormat
from workbench.generation import generate_with_first_logprobs
from workbench.interventions import Intervention
from workbench.scoring import (completion_nll, is_refusal, kl_from_logprobs, perplexity,
                               refusal_scores_from_logprobs, task_accuracy)
from workbench.stats import bootstrap_mean_ci


@dataclass
class Condition:
    """A named list of interventions (empty = the unmodified model)."""

    name: str
    interventions: list[Intervention] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    summary: list[dict[str, Any]]
    per_prompt: list[dict[str, Any]]


def _rate(flags: Sequence[bool], n_boot: int, seed: int) -> tuple[float, float, float]:
    v = np.asarray(flags, dtype=float)
    lo, hi = bootstrap_mean_ci(v, n_boot, seed)
    return float(v.mean()), lo, hi


def evaluate_conditions(
    backend: Backend,
    fmt: ChatFormat | None,
    conditions: Sequence[Condition],
    *,
    harmful: Sequence[str],
    harmless: Sequence[str],
    tasks: tuple[Sequence[str], Sequence[str]] | None = None,
    max_new_tokens: int = 32,
    batch_size: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> Evaluation:
    """Generate and score every condition. The unmodified model is always evaluated first (reference).

    Generation batches are sized for the machine unless ``batch_size`` is given. Work is not repeated:
    when ``harmful`` and ``harmless`` are the same prompts they are generated and scored once, and the
    perplexity reference text is the unmodified model's own harmless completions from the same pass.
    """
    conds = list(conditions)
    if not conds or conds[0].interventions:
        conds = [Condition("unmodified")] + conds
    same = list(harmful) == list(harmless)
    ref_logp: torch.Tensor | None = None  # the unmodified model's next-token log-probabilities (harmless)
    ppl_texts: list[str] | None = None
    summary, rows = [], []
    for c in conds:
        tag = c.name
        # the next-token distribution at the last prompt position (refusal score, KL) comes from each
        # generation's own prefill (native backend; one extra forward pass with the others)
        gh, logp_h = generate_with_first_logprobs(backend, harmful, fmt, max_new_tokens=max_new_tokens,
                                                  interventions=c.interventions, batch_size=batch_size,
                                                  progress=f"{tag}: harmful" if progress else False)
        gb, logp_b = (gh, logp_h) if same else generate_with_first_logprobs(
            backend, harmless, fmt, max_new_tokens=max_new_tokens, interventions=c.interventions,
            batch_size=batch_size, progress=f"{tag}: harmless" if progress else False)
        if ppl_texts is None:  # the unmodified model's own completions are the perplexity reference text
            ppl_texts = gb
        nll = completion_nll(backend, harmless, ppl_texts, fmt, interventions=c.interventions)
        if ref_logp is None:  # conds[0] is the unmodified model (inserted above when missing)
            ref_logp = logp_b
        sh = refusal_scores_from_logprobs(backend.lm.tokenizer, logp_h)
        sb = refusal_scores_from_logprobs(backend.lm.tokenizer, logp_b)
        kl = kl_from_logprobs(ref_logp, logp_b)
        fh, fb = [is_refusal(t) for t in gh], [is_refusal(t) for t in gb]
        r_h, r_h_lo, r_h_hi = _rate(fh, n_boot, seed)
        r_b, r_b_lo, r_b_hi = _rate(fb, n_boot, seed + 1)
        kl_lo, kl_hi = bootstrap_mean_ci(kl.numpy(), n_boot, seed + 2)
        row: dict[str, Any] = {
            "condition": c.name, **{f"info_{k}": v for k, v in c.info.items()},
            "harmful_refusal_rate": r_h, "harmful_refusal_rate_lo": r_h_lo, "harmful_refusal_rate_hi": r_h_hi,
            "harmless_refusal_rate": r_b, "harmless_refusal_rate_lo": r_b_lo, "harmless_refusal_rate_hi": r_b_hi,
            "harmful_refusal_score": float(sh.mean()), "harmless_refusal_score": float(sb.mean()),
            "kl_harmless": float(kl.mean()), "kl_harmless_lo": kl_lo, "kl_harmless_hi": kl_hi,
            "perplexity": perplexity(nll),
            "n_harmful": len(harmful), "n_harmless": len(harmless),
            "scorers": "refusal_rate=refusal_phrase; refusal_score=refusal_logit; kl=kl_last; perplexity=perplexity",
        }
        for i, (p, t, f, s) in enumerate(zip(harmful, gh, fh, sh.tolist())):
            rows.append({"condition": c.name, "set": "harmful", "index": i, "prompt": p, "completion": t,
                         "refusal_phrase": f, "refusal_logit": s})
        for i, (p, t, f, s, k) in enumerate(zip(harmless, gb, fb, sb.tolist(), kl.tolist())):
            rows.append({"condition": c.name, "set": "harmless", "index": i, "prompt": p, "completion": t,
                         "refusal_phrase": f, "refusal_logit": s, "kl_last": k})
        if tasks is not None:
            ts = task_accuracy(backend, tasks[0], tasks[1], fmt, interventions=c.interventions,
                               batch_size=batch_size, progress=f"{tag}: tasks" if progress else False)
            lo, hi = bootstrap_mean_ci([r["correct"] for r in ts.rows], n_boot, seed + 3)
            row.update(task_accuracy=ts.accuracy, task_accuracy_lo=lo, task_accuracy_hi=hi, n_tasks=len(ts.rows))
            for i, r in enumerate(ts.rows):
                rows.append({"condition": c.name, "set": "tasks", "index": i, "prompt": r["question"],
                             "completion": r["reply"], "answer": r["answer"], "exact_match": r["correct"]})
        summary.append(row)
    return Evaluation(summary, rows)
