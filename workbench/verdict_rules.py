"""Verdict vocabulary shared by the weight-space and activation-space sides, and the rule of experiment 4.

Dependencies point one way (``probes`` and ``weightspace`` import ``workbench``, never each other), so what both
need lives here: the three verdicts, :func:`decide` (a statistic's interval against a threshold fixed in
advance), :func:`combine`, the "well above the random baseline" factor, and the experiment-4 rule, which
``probes/overlap.py`` applies when it writes ``overlap_summary.json`` and ``weightspace/verdicts.py``
re-exports beside the rules of experiments 1-3.

**Exp 4, activation overlap** (:func:`exp4_activation_overlap`; claim, issue #10: "useful and harmful
activation subspaces overlap about as much as two harmful sets"), fixed before any real number was read:

* statistic: ``D = MSO(U~H) - MSO(H1~H2)`` with ``MSO(U~H) = (MSO(U,H1) + MSO(U,H2)) / 2``, each MSO averaged
  over the layers of the study's 65-90 % depth slice (the study's own average) at one energy level η (the
  summary's); paired: every subsample draw subsamples each prompt set once and the difference is taken within
  the draw;
* interval: 95 % subsampling interval (:mod:`workbench.subsampling`: half-samples without replacement,
  ``CI = [D - c (q_hi - D), D - c (q_lo - D)]``);
* equivalence margin ``delta = EXP4_MARGIN = 0.10`` (MSO units): "about as much" = within 0.10 of the noise
  ceiling. Why 0.10: the study gives no margin ("comparable"), so one must be fixed in advance; MSO is a mean
  squared cosine in [0, 1] and 0.10 is a tenth of that range; at a ceiling near 0.7 it lets U~H fall to about
  86 % of it; it is five times Exp 3's per-tensor margin (0.02, a mean over hundreds of tensors) because this
  is a mean over a handful of layers and ~150 prompts; and it is far below the gap the rule must catch (a
  useful set in a subspace of its own gives ``D`` near minus the ceiling, the planted control in
  ``tests/test_exp4_verdict.py``);
* both overlaps must be well above chance: ``MSO(U~H)`` and ``MSO(H1~H2)`` each with its interval's low end
  above ``WELL_ABOVE = 2`` times its random baseline ``max(k_a, k_b) / d`` (mean over the same layers and
  pairs); two sets at chance level overlap "about as much" trivially, which confirms nothing;
* verdict: **holds** when the interval of ``D`` lies inside ``[-delta, delta]`` and both overlaps are well
  above chance; **does not hold** when the interval lies entirely outside ``[-delta, delta]`` (``direction``
  says which side: ``"below"`` = the harmful sets share a subspace the useful set does not, the separation
  the study denies; ``"above"`` = useful and harmful prompts overlap MORE than the two harmful sets, i.e. the
  subspace follows the prompts' form rather than their harmfulness: not "about as much", but no evidence of
  a distinct harmful subspace either); else **inconclusive** (the interval straddles a margin, or an overlap
  is not clearly above chance). Without draws (``n_boot = 0``) the point values decide, as in every rule.

>>> r = exp4_activation_overlap(0.70, 0.72, u_h_baseline=0.05, h1_h2_baseline=0.05,
...                             u_h_draws=[0.66, 0.70, 0.74], h1_h2_draws=[0.69, 0.72, 0.75])
>>> r["verdict"], round(r["value"], 6), [round(x, 4) for x in r["ci"]]
('holds', -0.02, [-0.0295, -0.0105])
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from workbench.subsampling import METHOD as SUBSAMPLING_METHOD
from workbench.subsampling import subsample_ci

__all__ = ["HOLDS", "FAILS", "INCONCLUSIVE", "WELL_ABOVE", "ALPHA", "EXP4_MARGIN", "EXP4_CLAIM", "decide",
           "combine", "exp4_activation_overlap", "exp4_from_block"]

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
WELL_ABOVE = 2.0  # "well above the random baseline" = at least twice it (Exp 3, Exp 4, the controls)
ALPHA = 0.05
EXP4_MARGIN = 0.10  # Exp 4: |MSO(U~H) - MSO(H1~H2)| "about as much" (MSO units; see the module text)
EXP4_CLAIM = "useful and harmful activation subspaces overlap about as much as two harmful sets"


def decide(value: float | None, ci: Sequence[float] | None, *, above: float | None = None,
           below: float | None = None, inside: float | None = None) -> str:
    """The verdict for one statistic against a threshold fixed in advance.

    ``above=t``: holds when the interval's low end > t, does not hold when its high end <= t.
    ``below=t``: holds when high <= t, does not hold when low > t. ``inside=t``: holds when the interval lies
    in ``[-t, t]``, does not hold when it lies entirely outside. Otherwise inconclusive; without an interval
    the value itself decides (``ci = [value, value]``).

    Example::

        >>> decide(0.3, [0.1, 0.5], above=0.0), decide(0.3, [-0.1, 0.5], above=0.0), decide(0.01, None, inside=0.05)
        ('holds', 'inconclusive', 'holds')
    """
    if value is None:
        return INCONCLUSIVE
    lo, hi = (value, value) if ci is None else (float(ci[0]), float(ci[1]))
    if above is not None:
        return HOLDS if lo > above else FAILS if hi <= above else INCONCLUSIVE
    if below is not None:
        return HOLDS if hi <= below else FAILS if lo > below else INCONCLUSIVE
    if inside is not None:
        return HOLDS if (lo >= -inside and hi <= inside) else FAILS if (lo > inside or hi < -inside) else INCONCLUSIVE
    raise ValueError("give above, below or inside")


def combine(parts: Sequence[str]) -> str:
    """Several sub-verdicts into one: holds if all hold, does not hold if one does not, else inconclusive."""
    if parts and all(p == HOLDS for p in parts):
        return HOLDS
    return FAILS if any(p == FAILS for p in parts) else INCONCLUSIVE


def _finite(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def exp4_activation_overlap(u_h: float, h1_h2: float, *, u_h_baseline: float, h1_h2_baseline: float,
                            u_h_draws: Sequence[float] | None = None, h1_h2_draws: Sequence[float] | None = None,
                            scale: float = 1.0, margin: float = EXP4_MARGIN, threshold: float = WELL_ABOVE,
                            alpha: float = ALPHA, layers: str = "slice") -> dict[str, Any]:
    """The experiment-4 verdict from the two layer-averaged overlaps and their paired subsample draws.

    ``u_h`` / ``h1_h2``: full-sample MSO(U~H) and MSO(H1~H2) averaged over ``layers``; ``*_baseline``: their
    random baselines (mean ``max(k) / d`` over the same layers and pairs); ``*_draws``: the same averages on each
    subsample draw (index ``b`` of both lists = one draw); ``scale``: the subsampling factor ``c``
    (:func:`workbench.subsampling.subsample_scale`). See the module text for the rule.
    """
    u, h = _finite(u_h), _finite(h1_h2)
    base = {"u_h": _finite(u_h_baseline), "h1_h2": _finite(h1_h2_baseline)}
    d = None if u is None or h is None else u - h
    ci = ci_u = ci_h = None
    n_draws = 0
    if u_h_draws is not None and h1_h2_draws is not None and len(u_h_draws) and d is not None:
        bu, bh = np.asarray(u_h_draws, dtype=np.float64), np.asarray(h1_h2_draws, dtype=np.float64)
        if bu.shape != bh.shape:
            raise ValueError(f"paired draws must have the same length, got {bu.shape} and {bh.shape}")
        n_draws = int(bu.size)
        ci = subsample_ci(bu - bh, d, scale, alpha=alpha, bounds=(-1.0, 1.0))
        ci_u = subsample_ci(bu, u, scale, alpha=alpha, bounds=(0.0, 1.0))
        ci_h = subsample_ci(bh, h, scale, alpha=alpha, bounds=(0.0, 1.0))
    equivalence = decide(d, ci, inside=margin)
    above = {}
    for name, val, c in (("u_h", u, ci_u), ("h1_h2", h, ci_h)):
        b = base[name]
        t = None if b is None else threshold * b
        v = INCONCLUSIVE if t is None else decide(val, c, above=t)
        above[name] = {"mso": val, "ci": c, "baseline": b, "threshold": t, "verdict": v,
                       "rule": f"well above chance: holds when the CI low end > {threshold} x the random baseline, "
                               f"does not hold when its high end <= it"}
    lo, hi = (d, d) if ci is None else ci
    direction = None if d is None else "below" if (hi is not None and hi < -margin) else \
        "above" if (lo is not None and lo > margin) else "within"
    if equivalence == FAILS:
        verdict = FAILS
    elif equivalence == HOLDS and all(a["verdict"] == HOLDS for a in above.values()):
        verdict = HOLDS
    else:
        verdict = INCONCLUSIVE
    where = "the 65-90 % depth slice" if layers == "slice" else "all layers"
    return {
        "claim": EXP4_CLAIM,
        "statistic": f"D = MSO(U~H) - MSO(H1~H2), MSO(U~H) = mean(MSO(U,H1), MSO(U,H2)), each averaged over "
                     f"{where}; paired over subsample draws",
        "value": d, "ci": ci,
        "rule": f"holds when the 95% subsampling CI of D lies inside [-{margin}, {margin}] and both MSO(U~H) and "
                f"MSO(H1~H2) have CI low ends above {threshold} x their random baselines max(k)/d; does not hold "
                f"when the CI of D lies entirely outside [-{margin}, {margin}] (direction: below = the harmful sets "
                f"share a subspace the useful set does not; above = useful and harmful overlap more than the two "
                f"harmful sets); else inconclusive",
        "verdict": verdict, "equivalence": equivalence, "direction": direction, "well_above_baseline": above,
        "margin": margin, "threshold": threshold, "layers": layers, "n_draws": n_draws, "scale": scale,
        "ci_method": SUBSAMPLING_METHOD if n_draws else "no draws: the point values decide",
    }


def exp4_from_block(block: Mapping[str, Any], **kw: Any) -> dict[str, Any] | None:
    """:func:`exp4_activation_overlap` on one ``exp4`` block of ``overlap_summary.json`` (as
    :meth:`probes.overlap.ProtocolOverlap.exp4` writes it: ``u_h``, ``h1_h2``, ``u_h_baseline``,
    ``h1_h2_baseline``, ``ci_scale`` and ``boot = {"u_h": [...], "h1_h2": [...]}``); ``None`` for no block."""
    if not block:
        return None
    boot = block.get("boot") or {}
    return exp4_activation_overlap(
        block["u_h"], block["h1_h2"], u_h_baseline=block["u_h_baseline"], h1_h2_baseline=block["h1_h2_baseline"],
        u_h_draws=boot.get("u_h"), h1_h2_draws=boot.get("h1_h2"), scale=float(block.get("ci_scale", 1.0)),
        layers=block.get("layers", "slice"), **kw)
