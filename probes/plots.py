"""Plots for probe sweeps and activation overlap (PNG, matplotlib Agg)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def probe_curves(rows: list[dict[str, Any]], title: str) -> Any:
    L = [r["layer"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for metric, ax in zip(("auroc", "accuracy"), axes):
        for kind, color in (("logistic", "C0"), ("mean_diff", "C1")):
            y = [r[f"{kind}_{metric}"] for r in rows]
            ax.plot(L, y, marker="o", ms=3, color=color, label=kind)
            if f"{kind}_{metric}_lo" in rows[0]:
                ax.fill_between(L, [r[f"{kind}_{metric}_lo"] for r in rows], [r[f"{kind}_{metric}_hi"] for r in rows],
                                color=color, alpha=0.2)
        ax.set(xlabel="layer", ylabel=f"held-out {metric}", ylim=(0.4, 1.02))
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(loc="lower right")
    fig.suptitle(title + " (bands: bootstrap 95 % CI)")
    return fig


def cosine_curve(rows: list[dict[str, Any]], title: str) -> Any:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["layer"] for r in rows], [r["cos_logistic_mean_diff"] for r in rows], marker="o", ms=3)
    ax.set(xlabel="layer", ylabel="cosine", title=title, ylim=(-0.05, 1.05))
    return fig


def heatmap(M: np.ndarray, title: str, xlabel: str, ylabel: str, xticks: list[Any] | None = None,
            yticks: list[Any] | None = None, vmin: float | None = None, vmax: float | None = None,
            cmap: str = "viridis") -> Any:
    fig, ax = plt.subplots(figsize=(6.5, 5))
    im = ax.imshow(M, aspect="auto", origin="lower", vmin=vmin, vmax=vmax, cmap=cmap)
    fig.colorbar(im, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if xticks is not None:
        ax.set_xticks(range(len(xticks)), [str(x) for x in xticks], rotation=90, fontsize=7)
    if yticks is not None:
        ax.set_yticks(range(len(yticks)), [str(y) for y in yticks], fontsize=7)
    return fig


def overlap_vs_layer(table: dict[str, list[dict[str, Any]]], eta: float, centered: bool, title: str,
                     ceiling_pair: str | None = None) -> Any:
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (pair, rows) in enumerate(sorted(table.items())):
        L = [r["layer"] for r in rows]
        style = dict(lw=2.5, ls="--") if pair == ceiling_pair else dict(lw=1.5)
        label = f"{pair} (noise ceiling)" if pair == ceiling_pair else pair
        ax.plot(L, [r["mso"] for r in rows], color=f"C{i}", label=label, **style)
        if "mso_lo" in rows[0]:
            ax.fill_between(L, [r["mso_lo"] for r in rows], [r["mso_hi"] for r in rows], color=f"C{i}", alpha=0.15)
        ax.plot(L, [r["baseline"] for r in rows], color=f"C{i}", lw=0.8, ls=":")
    ax.set(xlabel="layer", ylabel="mode subspace overlap",
           title=f"{title}  (η={eta}, {'centred' if centered else 'uncentred'}; dotted: random baseline max(k)/d)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return fig
