"""Direction selection as in Arditi et al.: score every candidate (layer x post-instruction
position) on validation prompts, filter, pick the one whose ablation most lowers refusal.

Scores per candidate r (refusal logit score, no generation):
- ``ablation_score``: mean refusal score on harmful validation prompts with r ablated everywhere;
- ``steering_score``: mean refusal score on harmless validation prompts with r added at its layer;
- ``kl``: mean KL on harmless validation prompts under ablation.
Filters: KL > ``kl_max``; steering score not above the harmless baseline (no induced refusal);
layer in the last ``1 - max_layer_frac`` of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from workbench.backends.base import Backend
from workbench.chat import ChatFormat
from workbench.errors import WorkbenchError
from workbench.scoring import kl_divergence, next_token_logprobs, refusal_scores
from workbench.vectors import Direction

from steering.interventions import ablation, addition


@dataclass
class SelectionResult:
    rows: list[dict[str, Any]]
    best: Direction
    baseline: dict[str, float]


def select_direction(backend: Backend, fmt: ChatFormat | None, candidates: Sequence[Direction], *,
                     harmful_val: Sequence[str], harmless_val: Sequence[str], kl_max: float = 0.1,
                     max_layer_frac: float = 0.8, alpha: float = 1.0, batch_size: int = 16,
                     progress: bool = True) -> SelectionResult:
    if not candidates:
        raise WorkbenchError("no candidate directions to select from")
    n_layers = backend.n_layers
    base_h = refusal_scores(backend, harmful_val, fmt, batch_size=batch_size)
    base_b = refusal_scores(backend, harmless_val, fmt, batch_size=batch_size)
    ref = next_token_logprobs(backend, harmless_val, fmt, batch_size=batch_size)
    baseline = {"harmful_refusal_score": float(base_h.mean()), "harmless_refusal_score": float(base_b.mean())}
    it: Any = candidates
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(candidates, desc="select", unit="candidate")
    rows = []
    for i, d in enumerate(it):
        row: dict[str, Any] = {"candidate": i, "layer": d.layer, "position": d.position, "method": d.method,
                               "norm": d.norm}
        reasons = []
        if d.norm <= 1e-6:
            row.update(ablation_score=float("nan"), kl=float("nan"), steering_score=float("nan"),
                       filtered="zero direction (identical activations in both sets)")
            rows.append(row)
            continue
        if d.layer >= max_layer_frac * n_layers:
            reasons.append(f"layer >= {max_layer_frac:.0%} of depth")
        abl = ablation(d, n_layers)
        row["ablation_score"] = float(refusal_scores(backend, harmful_val, fmt, interventions=abl,
                                                     batch_size=batch_size).mean())
        row["kl"] = float(kl_divergence(backend, harmless_val, fmt, interventions=abl, reference=ref,
                                        batch_size=batch_size).mean())
        row["steering_score"] = float(refusal_scores(backend, harmless_val, fmt,
                                                     interventions=addition(d, alpha), batch_size=batch_size).mean())
        if row["kl"] > kl_max:
            reasons.append(f"KL {row['kl']:.3f} > {kl_max}")
        if row["steering_score"] <= baseline["harmless_refusal_score"]:
            reasons.append("no induced refusal")
        row["filtered"] = "; ".join(reasons)
        rows.append(row)
    kept = [r for r in rows if not r["filtered"]]
    fallback = False
    if not kept:
        kept = [r for r in rows if r["norm"] > 1e-6]
        if not kept:
            raise WorkbenchError(f"all {len(rows)} candidate directions are zero vectors")
        fallback = True
        import warnings

        warnings.warn(f"every one of the {len(rows)} candidates failed a filter; selecting the lowest ablation score "
                      f"anyway (marked 'selected_despite_filters' in the table)", stacklevel=2)
    best_row = min(kept, key=lambda r: r["ablation_score"])
    best_row["selected_despite_filters"] = fallback
    for r in rows:
        r["selected"] = r is best_row
    return SelectionResult(rows, candidates[best_row["candidate"]], baseline)


def selection_heatmaps(rows: list[dict[str, Any]], title: str) -> Any:
    """Three panels over layer x position: ablation score, steering score, KL (selected marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({r["layer"] for r in rows})
    positions = sorted({r["position"] for r in rows}, key=lambda p: int(p[3:]) if p.startswith("pos") else 0)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.2 + 0.25 * len(positions)))
    for ax, key, cmap in zip(axes, ("ablation_score", "steering_score", "kl"), ("viridis_r", "viridis", "magma")):
        M = np.full((len(positions), len(layers)), np.nan)
        for r in rows:
            M[positions.index(r["position"]), layers.index(r["layer"])] = r[key]
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
    fig.suptitle(title + "  (★ selected, × filtered)")
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
    ok = [r for r in rows if r["induced_refusal_score"] > 0]
    chosen = ok[0] if ok else max(rows, key=lambda r: r["induced_refusal_score"])
    for r in rows:
        r["chosen"] = r is chosen
    return chosen["alpha"], rows
