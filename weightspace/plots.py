"""PNG figures for the weight-space drivers (matplotlib, Agg backend). Each function returns a figure.

Example::

    >>> fig = energy_bars([{"group": "0", "energy_kept": 0.5, "energy_random": 0.25}], "layer", "demo")
    >>> type(fig).__name__
    'Figure'
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["energy_bars", "mso_vs_eta", "layer_module_heatmap", "pair_matrix", "spectra_curves",
           "sweep_curves", "tradeoff"]

_KIND_COLORS = {"topk": "C0", "randomk": "C1", "random": "C2"}


def energy_bars(rows: Sequence[dict[str, Any]], level: str, title: str) -> Any:
    """Energy kept per group (bars) with the random expectation k/d (black ticks)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(rows) + 2), 3.5))
    x = np.arange(len(rows))
    ax.bar(x, [r["energy_kept"] for r in rows], color="C0", label="E_k (kept / total)")
    ax.scatter(x, [r["energy_random"] for r in rows], marker="_", s=200, color="k", label="random k/d", zorder=3)
    ax.set_xticks(x, [str(r["group"]) for r in rows], rotation=90 if len(rows) > 12 else 0)
    ax.set(xlabel=level, ylabel="energy fraction", title=title, ylim=(0, 1.05))
    ax.legend(loc="upper right", fontsize=8)
    return fig


def mso_vs_eta(model_rows: Sequence[dict[str, Any]], title: str) -> Any:
    """Model-level pooled MSO vs eta per pair; dashed: the random baseline."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    pairs = list(dict.fromkeys(r["pair"] for r in model_rows))
    for i, pair in enumerate(pairs):
        rs = sorted((r for r in model_rows if r["pair"] == pair), key=lambda r: r["eta"])
        e = [r["eta"] for r in rs]
        ax.plot(e, [r["mso_pooled"] for r in rs], marker="o", ms=3, color=f"C{i}", label=pair)
        ax.plot(e, [r["baseline_pooled"] for r in rs], ls="--", color=f"C{i}", lw=1)
    ax.set(xlabel="energy fraction η", ylabel="MSO (pooled over tensors)", title=title, ylim=(0, 1.02))
    ax.legend(fontsize=8, title="dashed: random baseline", title_fontsize=8)
    return fig


def layer_module_heatmap(tensor_rows: Sequence[dict[str, Any]], pair: str, eta: float, title: str) -> Any:
    """Mean MSO per (layer, module type) cell for one pair at one eta, and its ratio to the baseline."""
    rs = [r for r in tensor_rows if r["pair"] == pair and r["eta"] == eta]
    layers = sorted({r["layer"] for r in rs}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    mods = list(dict.fromkeys(r["module"] for r in rs))
    M = np.full((len(layers), len(mods)), np.nan)
    R = np.full_like(M, np.nan)
    for i, lay in enumerate(layers):
        for j, mod in enumerate(mods):
            cell = [r for r in rs if r["layer"] == lay and r["module"] == mod]
            if cell:
                M[i, j] = np.mean([r["mso"] for r in cell])
                R[i, j] = np.mean([r["over_baseline"] for r in cell])
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(3.5, 0.6 * len(mods) + 2), max(3.0, 0.25 * len(layers) + 1.5)))
    for ax, data, lab, kw in ((axes[0], M, "MSO", dict(vmin=0, vmax=1)), (axes[1], R, "MSO / baseline", {})):
        im = ax.imshow(data, aspect="auto", cmap="viridis", **kw)
        ax.set_xticks(range(len(mods)), mods, rotation=45)
        ax.set_yticks(range(len(layers)), layers, fontsize=7 if len(layers) > 16 else 9)
        ax.set(xlabel="module type", ylabel="layer", title=lab)
        fig.colorbar(im, ax=ax, format="%.3g")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def pair_matrix(labels: Sequence[str], values: dict[str, float], title: str) -> Any:
    """Symmetric label x label matrix of a pair statistic (e.g. pooled MSO at one eta)."""
    n = len(labels)
    M = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            v = values.get(f"{labels[i]}~{labels[j]}", values.get(f"{labels[j]}~{labels[i]}", np.nan))
            M[i, j] = M[j, i] = v
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 2))
    im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis")
    for i in range(n):
        for j in range(n):
            if not math.isnan(M[i, j]):
                ax.text(j, i, f"{M[i, j]:.3f}", ha="center", va="center", color="w" if M[i, j] < 0.6 else "k", fontsize=8)
    ax.set_xticks(range(n), labels, rotation=30)
    ax.set_yticks(range(n), labels)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return fig


def spectra_curves(spectra: dict[str, Any], modules: dict[str, str], labels: Sequence[str], title: str) -> Any:
    """Cumulative energy vs k / min(m, n) for every tensor, one panel per update, coloured by module type."""
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.6), squeeze=False)
    mods = list(dict.fromkeys(modules.values()))
    for ax, lab in zip(axes[0], labels):
        seen = set()
        for key, S in spectra.items():
            l2, name = key.split("|", 1)
            if l2 != lab:
                continue
            e = np.cumsum(np.asarray(S, dtype=np.float64) ** 2)
            if e[-1] <= 0:
                continue
            mod = modules.get(name, "other")
            c = f"C{mods.index(mod) % 10}" if mod in mods else "grey"
            ax.plot(np.arange(1, len(e) + 1) / len(e), e / e[-1], color=c, alpha=0.35, lw=0.8,
                    label=mod if mod not in seen else None)
            seen.add(mod)
        ax.set(xlabel="k / min(m, n)", ylabel="cumulative energy", title=lab, ylim=(0, 1.02))
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _by_kind(rows: Sequence[dict[str, Any]], key: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        if r.get(key) is None or (isinstance(r.get(key), float) and math.isnan(r[key])):
            continue
        xs, ys = out.setdefault(r["kind"], ([], []))
        xs.append(r["rho"] if r["rho"] is not None else 0.0)
        ys.append(r[key])
    return {k: (list(x), list(y)) for k, (x, y) in out.items()}


def sweep_curves(rows: Sequence[dict[str, Any]], refs: dict[str, dict[str, float]], panels: Sequence[tuple[str, str, str]],
                 title: str) -> Any:
    """One panel per (model role, metric, label): metric vs rho per kind, with horizontal reference lines.

    ``refs`` maps a model role to its unprojected scores (``aligned`` and the full fine-tune).
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (role, metric, label) in zip(axes[0], panels):
        rs = sorted((r for r in rows if r["model"] == role), key=lambda r: (r["kind"], r["rho"] or 0))
        los, his = _by_kind(rs, metric + "_lo"), _by_kind(rs, metric + "_hi")
        for kind, (x, y) in _by_kind(rs, metric).items():
            ax.plot(x, y, marker="o", ms=4, color=_KIND_COLORS.get(kind, "C3"), label=kind)
            lo, hi = los.get(kind, ([], []))[1], his.get(kind, ([], []))[1]
            if len(lo) == len(hi) == len(x):  # 95 % bootstrap interval over the items
                ax.fill_between(x, lo, hi, color=_KIND_COLORS.get(kind, "C3"), alpha=0.15, lw=0)
        if metric == "energy_kept":
            x, y = _by_kind(rs, "energy_random").get("topk", ([], []))
            ax.plot(x, y, ls="--", color="k", lw=1, label="random expectation k/d")
        for name, ls in (("aligned", ":"), (f"{role} (full update)", "--")):
            v = refs.get(name, {}).get(metric)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                ax.axhline(v, color="grey", ls=ls, lw=1, label=name)
        ax.set(xlabel="rank fraction ρ", ylabel=label)
        ax.set_title(f"{role}\n{label}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def tradeoff(rows: Sequence[dict[str, Any]], refs: dict[str, dict[str, float]], x_metric: str, y_metric: str,
             x_label: str, y_label: str, title: str) -> Any:
    """Harmfulness vs utility of the filtered model, one curve per kind through the rho grid."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for kind in kinds:
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["rho"] or 0)
        x, y = [r[x_metric] for r in rs], [r[y_metric] for r in rs]
        ax.plot(x, y, marker="o", color=_KIND_COLORS.get(kind, "C3"), label=kind)
        if all(r.get(m + s) is not None for r in rs for m in (x_metric, y_metric) for s in ("_lo", "_hi")):
            ax.errorbar(x, y, xerr=[[max(0.0, xi - r[x_metric + "_lo"]) for r, xi in zip(rs, x)],
                                    [max(0.0, r[x_metric + "_hi"] - xi) for r, xi in zip(rs, x)]],
                        yerr=[[max(0.0, yi - r[y_metric + "_lo"]) for r, yi in zip(rs, y)],
                              [max(0.0, r[y_metric + "_hi"] - yi) for r, yi in zip(rs, y)]],
                        fmt="none", ecolor=_KIND_COLORS.get(kind, "C3"), alpha=0.4, lw=0.8)
        for r, xi, yi in zip(rs, x, y):
            if r["rho"] is not None:
                ax.annotate(f"{r['rho']:g}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for name, marker in (("aligned", "s"), ("contaminated (full update)", "*")):
        v = refs.get(name)
        if v and v.get(x_metric) is not None and v.get(y_metric) is not None:
            ax.scatter([v[x_metric]], [v[y_metric]], marker=marker, s=90, color="k", label=name, zorder=3)
    ax.set(xlabel=x_label, ylabel=y_label, title=title)
    ax.legend(fontsize=8, title="labels: ρ", title_fontsize=8)
    return fig
