"""Per layer, the harm and the decline direction side by side: their cosine and each one's held-out AUROC as a
projection score (on its own labels and on the other's), and the rule that fixes the ablation layer before
anything is ablated (:data:`RULE_LAYER`, :func:`choose_layer`).

>>> rows = [{"layer": l, "harm_auroc": a, "harm_dprime": d}
...         for l, a, d in [(0, 0.9, 1.0), (1, 1.0, 2.0), (2, 1.0, 3.0), (3, 0.95, 9.0), (4, 1.0, 9.0)]]
>>> choose_layer(rows, n_layers=5)[0]   # candidates 1..3 (1 <= l < 4); AUROC 1.0 at 1 and 2; larger d' at 2
2
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.vectors import Direction

from steering.screening import ZERO_NORM


RULE_LAYER = ("ablation layer, fixed before any ablation: among the layers l with 0.2 L <= l < 0.8 L (every layer "
              "when none is), the one where the harm direction's held-out AUROC (projection score, harmful:val vs "
              "harmless:val) is highest; ties go to the larger held-out separation d' (difference of the two class "
              "means of the projection over their pooled standard deviation), then to the lower layer. --layer "
              "replaces the rule (recorded). Both directions are taken at that layer.")


def _projection_stats(d: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, *, n_boot: int, seed: int
                      ) -> dict[str, float]:
    """AUROC (with a bootstrap interval) and d' of the projection score on held-out ``pos`` / ``neg`` [n, d]."""
    from probes.metrics import scored_metrics

    u = (d / d.norm()).double()
    sp, sn = (pos.double() @ u).numpy(), (neg.double() @ u).numpy()
    y = np.r_[np.ones(len(sp), int), np.zeros(len(sn), int)]
    m = scored_metrics(y, np.r_[sp, sn], threshold=float((sp.mean() + sn.mean()) / 2), n_boot=n_boot, seed=seed)
    pooled = float(np.sqrt((sp.var(ddof=1) + sn.var(ddof=1)) / 2)) if min(len(sp), len(sn)) > 1 else float("nan")
    dprime = float((sp.mean() - sn.mean()) / pooled) if pooled > 0 else float("inf")
    return {"auroc": m["auroc"], "auroc_lo": m.get("auroc_lo", float("nan")),
            "auroc_hi": m.get("auroc_hi", float("nan")), "dprime": dprime}


def per_layer_rows(harm: Sequence[Direction], decline: Sequence[Direction], held: dict[str, torch.Tensor], *,
                   n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per layer: cosine of the two directions, each one's held-out AUROC / d' on its own labels and on
    the other's. ``held``: ``harmful``, ``harmless``, ``declined``, ``answered`` activations ``[n, layers, d]`` in
    the layer order of ``harm`` / ``decline``."""
    if [d.layer for d in harm] != [d.layer for d in decline]:
        raise WorkbenchError("the harm and decline directions must cover the same layers")
    rows = []
    nan = float("nan")
    for j, (h, c) in enumerate(zip(harm, decline)):
        # a zero direction (e.g. the residual input of layer 0 at the last token, the same token in every
        # prompt) has no cosine and no projection score: NaN, and the row says which one
        zero = [name for name, d in (("harm", h), ("decline", c)) if d.norm <= ZERO_NORM]
        row: dict[str, Any] = {"layer": h.layer, "cosine": nan if zero else float(h.unit @ c.unit),
                               "harm_norm": h.norm, "decline_norm": c.norm, "zero_direction": ",".join(zero)}
        for name, vec in (("harm", h.vector), ("decline", c.vector)):
            for labels, (p, n) in (("harm", ("harmful", "harmless")), ("decline", ("declined", "answered"))):
                if name in zero:
                    s = {"auroc": nan, "auroc_lo": nan, "auroc_hi": nan, "dprime": nan}
                else:
                    s = _projection_stats(vec, held[p][:, j], held[n][:, j], n_boot=n_boot, seed=seed + h.layer)
                pre = name if name == labels else f"{name}_on_{labels}"
                row.update({f"{pre}_{k}": v for k, v in s.items()})
        rows.append(row)
    return rows


def choose_layer(rows: Sequence[dict[str, Any]], n_layers: int, override: int | None = None) -> tuple[int, str]:
    """The ablation layer by :data:`RULE_LAYER` (``override``: the given layer); returns it and the reason."""
    if override is not None:
        if not 0 <= override < n_layers:
            raise WorkbenchError(f"--layer {override} is outside the model's 0..{n_layers - 1}")
        return int(override), f"given (--layer {override})"
    scored = [r for r in rows if np.isfinite(r["harm_auroc"])]  # zero harm directions have no AUROC
    cands = [r for r in scored if 0.2 * n_layers <= r["layer"] < 0.8 * n_layers] or scored
    if not cands:
        raise WorkbenchError("no per-layer rows with a non-zero harm direction to choose a layer from")
    best = max(cands, key=lambda r: (r["harm_auroc"], r["harm_dprime"], -r["layer"]))
    return int(best["layer"]), (f"rule: harm AUROC {best['harm_auroc']:.3f}, d' {best['harm_dprime']:.2f} among "
                                f"layers {cands[0]['layer']}..{cands[-1]['layer']}")
