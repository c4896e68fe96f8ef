"""Plots for probe sweeps and activation overlap (PNG, matplotlib Agg)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


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


def overlap_protocols(tables: dict[str, dict[str, list[dict[str, Any]]]], averages: dict[str, dict[str, Any]],
                      slice_layers: list[int], eta: float, title: str, labels: dict[str, str]) -> Any:
    """Experiment 4 under each protocol side by side: one panel per protocol (MSO per layer with bootstrap
    bands, dotted random baselines, the study's depth slice shaded), and a last panel with the layer averages
    (all layers and the slice, 95 % CIs) of every protocol and pair.

    ``tables[protocol] = {pair: per-layer rows}``; ``averages[protocol][pair] = {"all": {...}, "slice": {...}}``
    (``mean_mso``, ``ci``, ``mean_baseline``); ``labels[protocol]``: the panel's subtitle."""
    n = len(tables)
    fig, axes = plt.subplots(1, n + 1, figsize=(5.2 * (n + 1), 4.2))
    lo, hi = (min(slice_layers) - 0.5, max(slice_layers) + 0.5) if slice_layers else (None, None)
    for ax, (proto, table) in zip(axes, tables.items()):
        n_layers = max((len(rows) for rows in table.values()), default=1)
        for i, (pair, rows) in enumerate(table.items()):
            L = [r["layer"] for r in rows]
            ceiling = pair == "H1~H2"
            ax.plot(L, [r["mso"] for r in rows], color=f"C{i}", lw=2.5 if ceiling else 1.5, ls="--" if ceiling else "-",
                    label=f"{pair} (noise ceiling)" if ceiling else pair)
            if "mso_lo" in rows[0]:
                ax.fill_between(L, [r["mso_lo"] for r in rows], [r["mso_hi"] for r in rows], color=f"C{i}", alpha=0.15)
            ax.plot(L, [r["baseline"] for r in rows], color=f"C{i}", lw=0.8, ls=":")
        if lo is not None:
            ax.axvspan(lo, hi, color="grey", alpha=0.12, label="65-90 % depth slice")
        ax.set(xlabel="layer", ylabel="mode subspace overlap", ylim=(0, 1.02), xlim=(-0.5, n_layers - 0.5),
               title=f"{proto}: {labels.get(proto, '')}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    ax = axes[-1]
    bars = [(proto, pair, which) for proto in averages for pair in averages[proto] for which in ("slice", "all")]
    x = np.arange(len(bars))
    for i, (proto, pair, which) in enumerate(bars):
        a = averages[proto][pair][which]
        err = None
        if a.get("ci"):
            err = [[max(a["mean_mso"] - a["ci"][0], 0)], [max(a["ci"][1] - a["mean_mso"], 0)]]
        ax.bar(i, a["mean_mso"], yerr=err, color=f"C{list(averages).index(proto)}",
               alpha=1.0 if which == "slice" else 0.45, capsize=2)
        ax.plot([i - 0.4, i + 0.4], [a["mean_baseline"]] * 2, color="black", lw=0.8, ls=":")
    ax.set_xticks(x, [f"{proto}\n{pair}\n{which}" for proto, pair, which in bars], fontsize=6)
    ax.set(ylabel="mean MSO (95 % CI)", ylim=(0, 1.02), title="layer averages (dark: slice, light: all layers)")
    ax.title.set_fontsize(9)
    fig.suptitle(f"{title}  (η={eta}; dotted: random baseline max(k)/d)")
    fig.tight_layout()
    return fig


def probe_models(rows: dict[str, list[dict[str, Any]]], title: str) -> Any:
    """Held-out AUROC per layer of several models, one line each: logistic probe left, mean difference right.

    ``rows[model]``: that model's per-layer rows (``probe_layers.csv``)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, kind in zip(axes, ("logistic", "mean_diff")):
        for i, (model, rs) in enumerate(rows.items()):
            L = [r["layer"] for r in rs]
            ax.plot(L, [r[f"{kind}_auroc"] for r in rs], marker="o", ms=3, color=f"C{i}", label=model)
            if f"{kind}_auroc_lo" in rs[0]:
                ax.fill_between(L, [r[f"{kind}_auroc_lo"] for r in rs], [r[f"{kind}_auroc_hi"] for r in rs],
                                color=f"C{i}", alpha=0.12)
        ax.set(xlabel="layer", ylabel="held-out AUROC", ylim=(0.4, 1.02), title=kind)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle(title + " (bands: bootstrap 95 % CI)")
    return fig


def overlap_models(rows: dict[str, list[dict[str, Any]]], columns: list[str], eta: float, title: str) -> Any:
    """MSO per layer of several models, one panel per ``protocol:pair`` column and one line per model (dotted:
    that model's random baseline).

    ``rows[model]``: that model's per-layer rows (``overlap_layers.csv``); ``columns``: the ``protocol:pair``
    columns to draw."""
    n = max(len(columns), 1)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, col in zip(axes.flat, columns):
        for i, (model, rs) in enumerate(rows.items()):
            L = [r["layer"] for r in rs]
            ax.plot(L, [r[col] for r in rs], color=f"C{i}", lw=1.5, label=model)
            ax.plot(L, [r[f"{col}:baseline"] for r in rs], color=f"C{i}", lw=0.8, ls=":")
        ax.set(xlabel="layer", ylabel="mode subspace overlap", ylim=(0, 1.02), title=col)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(columns):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}  (η={eta}; dotted: random baseline max(k)/d)")
    fig.tight_layout()
    return fig
