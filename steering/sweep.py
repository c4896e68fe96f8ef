"""Sweeps: addition over layer x strength and ablation over layers, each beside a random direction of
equal norm, scored on test prompts (every per-prompt output kept), with trade-off plots.

>>> # see ``workbench steer sweep --help``
"""

from __future__ import annotations

from typing import Any, Sequence

from workbench.backends.base import Backend
from workbench.chat import ChatFormat
from workbench.errors import WorkbenchError
from workbench.vectors import Direction

from steering.directions import random_like
from steering.evaluate import Condition, Evaluation, evaluate_conditions
from steering.interventions import ablation, addition


def addition_conditions(directions: dict[int, Direction], alphas: Sequence[float], *, random_control: bool = True,
                        seed: int = 0, apply_to: str = "all") -> list[Condition]:
    conds = []
    for layer, d in sorted(directions.items()):
        rnd = random_like(d, seed=seed + layer)
        for a in alphas:
            conds.append(Condition(f"add L{layer} x{a:g}", addition(d, a, apply_to=apply_to),
                                   {"mode": "addition", "layer": layer, "alpha": a, "control": False}))
            if random_control:
                conds.append(Condition(f"random add L{layer} x{a:g}", addition(rnd, a, apply_to=apply_to),
                                       {"mode": "addition", "layer": layer, "alpha": a, "control": True}))
    return conds


def ablation_conditions(directions: dict[int, Direction], n_layers: int, *, random_control: bool = True,
                        seed: int = 0) -> list[Condition]:
    conds = []
    for layer, d in sorted(directions.items()):
        conds.append(Condition(f"ablate L{layer}", ablation(d, n_layers),
                               {"mode": "ablation", "layer": layer, "control": False}))
        if random_control:
            conds.append(Condition(f"random ablate L{layer}", ablation(random_like(d, seed=seed + layer), n_layers),
                                   {"mode": "ablation", "layer": layer, "control": True}))
    return conds


def run_sweep(backend: Backend, fmt: ChatFormat | None, conditions: Sequence[Condition], **kw: Any) -> Evaluation:
    if not conditions:
        raise WorkbenchError("the sweep has no conditions (no layers or strengths selected)")
    return evaluate_conditions(backend, fmt, list(conditions), **kw)


def tradeoff_plot(summary: list[dict[str, Any]], mode: str, title: str, x: str = "kl_harmless") -> Any:
    """Refusal vs side effect, real directions against their random controls (with 95 % intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = "harmful_refusal_rate" if mode == "ablation" else "harmless_refusal_rate"
    base = next((r for r in summary if r["condition"] == "unmodified"), None)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for control, color, label in ((False, "C3", "direction"), (True, "C7", "random control (equal norm)")):
        rows = [r for r in summary if r.get("info_mode") == mode and r.get("info_control") == control]
        if not rows:
            continue
        xs, ys = [r[x] for r in rows], [r[y] for r in rows]
        yerr = [[r[y] - r[f"{y}_lo"] for r in rows], [r[f"{y}_hi"] - r[y] for r in rows]]
        ax.errorbar(xs, ys, yerr=yerr, fmt="o", color=color, label=label, capsize=2, ms=5)
        for r in rows:
            tag = f"L{r['info_layer']}" + (f"×{r['info_alpha']:g}" if "info_alpha" in r else "")
            ax.annotate(tag, (r[x], r[y]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if base is not None:
        ax.scatter([base[x]], [base[y]], marker="*", s=200, color="k", label="unmodified", zorder=5)
    ax.set(xlabel=x.replace("_", " "), ylabel=y.replace("_", " "), title=title, ylim=(-0.05, 1.05))
    ax.legend(fontsize=8)
    return fig
