"""The figure of ``steer decline`` (PNG, matplotlib Agg): cosine and held-out AUROC of the harm and decline
directions per layer, and the judged rates of every ablation condition with their 95 % Wilson intervals.

>>> rows = [{"layer": i, "cosine": 0.2, "harm_auroc": 0.9, "harm_auroc_lo": 0.8, "harm_auroc_hi": 1.0,
...          "decline_auroc": 0.7, "decline_auroc_lo": 0.6, "decline_auroc_hi": 0.8} for i in range(3)]
>>> cols = ("harmful_refusal_judge", "everyday_decline_judge")
>>> summary = [{"condition": c, **{k + s: v for k in cols for s, v in (("", 0.5), ("_lo", 0.4), ("_hi", 0.6))}}
...            for c in ("unmodified", "harm ablated")]
>>> len(decline_figure(rows, summary, layer=1, title="demo").axes)
2
"""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

RATES = (("harmful_refusal_judge", "harmful refusal"), ("everyday_decline_judge", "off-topic decline"))


def decline_figure(per_layer: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], layer: int,
                   title: str) -> Any:
    """Left: cosine(harm, decline) and each direction's held-out AUROC (bands: bootstrap 95 % CI; dashed: scored on
    the other direction's labels) per layer, the ablation layer marked. Right: harmful refusal and off-topic decline (judge) per condition, Wilson 95 % CI."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
    L = [r["layer"] for r in per_layer]
    a.plot(L, [r["cosine"] for r in per_layer], color="k", marker="o", ms=3, label="cosine(harm, decline)")
    for kind, other, color in (("harm", "decline", "C3"), ("decline", "harm", "C0")):
        a.plot(L, [r[f"{kind}_auroc"] for r in per_layer], color=color, marker="o", ms=3,
               label=f"{kind} direction AUROC")
        if f"{kind}_auroc_lo" in per_layer[0]:
            a.fill_between(L, [r[f"{kind}_auroc_lo"] for r in per_layer], [r[f"{kind}_auroc_hi"] for r in per_layer],
                           color=color, alpha=0.2)
        if f"{kind}_on_{other}_auroc" in per_layer[0]:
            a.plot(L, [r[f"{kind}_on_{other}_auroc"] for r in per_layer], color=color, ls="--", lw=1,
                   label=f"{kind} direction on {other} labels")
    a.axvline(layer, color="grey", ls="--", lw=1, label=f"ablation layer {layer}")
    a.axhline(0.5, color="grey", ls=":", lw=0.8)
    a.set(xlabel="layer", ylabel="cosine / held-out AUROC", ylim=(min(-0.05, *[r["cosine"] for r in per_layer]), 1.05))
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.legend(fontsize=7, loc="lower right")
    names = [r["condition"] for r in summary]
    x = np.arange(len(names))
    w = 0.38
    for i, (col, label) in enumerate(RATES):
        y = np.array([r[col] for r in summary])
        err = np.array([[r[col] - r[f"{col}_lo"] for r in summary], [r[f"{col}_hi"] - r[col] for r in summary]])
        b.bar(x + (i - 0.5) * w, y, w, yerr=err, capsize=3, color=("C3", "C0")[i], label=label)
    b.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
    b.set(ylabel="rate (judge), 95 % Wilson CI", ylim=(0, 1.05))
    b.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
