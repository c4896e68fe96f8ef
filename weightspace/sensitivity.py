"""How much do the chain's verdicts depend on the choices made before the run? (eta, rho, aggregation)

The chain applies each rule at one setting: Exp 3 at the plot eta (0.5) over the per-tensor mean, Exp 2
averaged over the rho grid. A reviewer asks whether the verdict would change at another energy level, another
rho, or if the overlap were aggregated per layer or weighted by subspace size, and whether one module type
carries it. ``workbench weightspace sensitivity`` recomputes, from a finished chain folder and without a model:

* **Exp 3 per eta**: the full rule (:func:`weightspace.verdicts.exp3_overlap`) at every eta of the grid;
* **Exp 3 per module type and per layer** (at the plot eta): the paired difference
  MSO(useful~harmful) - MSO(safety~harmful) over that group's tensors, its bootstrap CI and the
  non-inferiority part of the rule (margin 0.02), with each pair's ratio to the random baseline;
* **Exp 3 per aggregation** (at the plot eta): per-tensor mean (the rule's), size-weighted pooled
  (each tensor weighted by min(k_a, k_b), as ``overlap_groups.csv``'s ``mso_pooled``) and the mean of
  per-layer means (CI over layers), each with the non-inferiority verdict;
* **Exp 1 energy parity per rho** (carried from the chain's verdict) and **Exp 2 per rho**: the Exp 2 rule
  (:func:`weightspace.chain_report._exp2_verdict`) on one rho at a time instead of the grid average.

Nothing is re-fitted and no rule is changed: these are the same statistics on other slices, reported as
descriptive sensitivity (the pre-registered verdicts stay those of the chain). Output: ``sensitivity.json``,
one CSV per table and ``sensitivity.png``.

Example::

    workbench weightspace sensitivity --chain runs/study-default --out runs/study-default-sensitivity
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from workbench.errors import WorkbenchError

UH, SH = "useful~harmful", "safety~harmful"
__all__ = ["load_tensor_rows", "exp3_by_eta", "exp3_by_group", "exp3_by_aggregation", "exp2_by_rho",
           "sensitivity", "add_arguments", "cmd_sensitivity"]


def load_tensor_rows(path: str | Path) -> dict[tuple[str, float], dict[str, dict[str, Any]]]:
    """``overlap_tensors.csv`` as ``{(pair, eta): {tensor: {mso, baseline, k_a, k_b, layer, module}}}``."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"{path} is missing: the chain's overlap phase has not finished")
    out: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            out.setdefault((r["pair"], float(r["eta"])), {})[r["tensor"]] = {
                "mso": float(r["mso"]), "baseline": float(r["baseline"]), "k_a": int(r["k_a"]),
                "k_b": int(r["k_b"]), "layer": r["layer"], "module": r["module"]}
    return out


def _paired(rows: dict, eta: float, keep: Any = None) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    a, b = rows.get((UH, eta), {}), rows.get((SH, eta), {})
    names = [n for n in a if n in b and (keep is None or keep(a[n]))]

    def arr(d: dict, key: str) -> np.ndarray:
        return np.array([d[n][key] for n in names], dtype=np.float64)

    return names, {k: arr(a, k) for k in ("mso", "baseline", "k_a", "k_b")}, \
        {k: arr(b, k) for k in ("mso", "baseline", "k_a", "k_b")}


def exp3_by_eta(rows: dict, etas: Sequence[float], *, seed: int = 0, n_boot: int | None = None) -> list[dict[str, Any]]:
    """The whole Exp 3 rule at each eta (the same tensors the chain's verdict uses at its plot eta)."""
    from weightspace import verdicts as V

    out = []
    for eta in etas:
        names, u, s = _paired(rows, eta)
        kw = {"n_boot": n_boot} if n_boot else {}
        r = V.exp3_overlap({"mso": u["mso"].tolist(), "baseline": u["baseline"].tolist()},
                           {"mso": s["mso"].tolist(), "baseline": s["baseline"].tolist()}, seed=seed, **kw)
        out.append({"eta": eta, "n_tensors": len(names), "value": r["value"], "ci": r["ci"], "verdict": r["verdict"],
                    "noninferiority": r.get("noninferiority"),
                    "useful~harmful_over_baseline": r.get("pairs", {}).get(UH, {}).get("value"),
                    "safety~harmful_over_baseline": r.get("pairs", {}).get(SH, {}).get("value")})
    return out


def _noninf(values: np.ndarray, *more: np.ndarray, stat: Any, seed: int, n_boot: int | None) -> dict[str, Any]:
    from weightspace import verdicts as V

    kw = {"n_boot": n_boot} if n_boot else {}
    samples = (values, *more)
    value = float(stat(*samples)) if values.size else None
    ci = V.bootstrap_ci(stat, *samples, seed=seed, **kw) if values.size else None
    verdict = V.decide(value, ci, above=-V.OVERLAP_MARGIN) if value is not None else V.INCONCLUSIVE
    return {"value": value, "ci": ci, "verdict": verdict}


def exp3_by_group(rows: dict, eta: float, level: str, *, seed: int = 0, n_boot: int | None = None) -> list[dict[str, Any]]:
    """Per module type (``level="module"``) or layer (``"layer"``): the paired MSO difference over that group's
    tensors with its CI and the non-inferiority verdict, and each pair's mean MSO / mean baseline."""
    if level not in ("module", "layer"):
        raise WorkbenchError(f"level must be 'module' or 'layer', got {level!r}")
    groups = sorted({t[level] for t in rows.get((UH, eta), {}).values()},
                    key=lambda g: (0, int(g), "") if g.isdigit() else (1, 0, g))
    out = []
    for g in groups:
        names, u, s = _paired(rows, eta, keep=lambda t, g=g: t[level] == g)
        if not names:
            continue
        r = _noninf(u["mso"], s["mso"], stat=lambda a, b: float((a - b).mean()), seed=seed, n_boot=n_boot)
        out.append({level: g, "eta": eta, "n_tensors": len(names), "mso_useful_harmful": float(u["mso"].mean()),
                    "mso_safety_harmful": float(s["mso"].mean()),
                    "useful~harmful_over_baseline": float(u["mso"].mean() / u["baseline"].mean()),
                    "safety~harmful_over_baseline": float(s["mso"].mean() / s["baseline"].mean()),
                    "difference": r["value"], "ci": r["ci"], "noninferiority": r["verdict"]})
    return out


def exp3_by_aggregation(rows: dict, eta: float, *, seed: int = 0, n_boot: int | None = None) -> list[dict[str, Any]]:
    """The Exp 3 difference aggregated three ways at ``eta``: per-tensor mean (the rule's), size-weighted
    pooled (weights min(k_a, k_b) per pair, as ``mso_pooled``), mean of per-layer means (CI over layers)."""
    names, u, s = _paired(rows, eta)
    out = []
    r = _noninf(u["mso"], s["mso"], stat=lambda a, b: float((a - b).mean()), seed=seed, n_boot=n_boot)
    out.append({"aggregation": "per-tensor mean (the rule)", "n_units": len(names), **r})
    wu, ws = np.minimum(u["k_a"], u["k_b"]), np.minimum(s["k_a"], s["k_b"])

    def pooled(a: np.ndarray, b: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> float:
        return float((a * wa).sum() / wa.sum() - (b * wb).sum() / wb.sum())

    r = _noninf(u["mso"], s["mso"], wu, ws, stat=pooled, seed=seed, n_boot=n_boot)
    out.append({"aggregation": "size-weighted pooled (min k)", "n_units": len(names), **r})
    layers = exp3_by_group(rows, eta, "layer", seed=seed, n_boot=n_boot)
    d = np.array([x["difference"] for x in layers if x["layer"].isdigit()], dtype=np.float64)
    r = _noninf(d, stat=lambda a: float(a.mean()), seed=seed, n_boot=n_boot)
    out.append({"aggregation": "mean of per-layer means (CI over layers)", "n_units": int(d.size), **r})
    return out


def exp2_by_rho(cfg: Any, sweep_dir: Path) -> list[dict[str, Any]]:
    """The Exp 2 rule (rates) on one rho at a time."""
    from weightspace.chain_report import _exp2_verdict

    out = []
    for rho in cfg.rhos:
        r = _exp2_verdict(dataclasses.replace(cfg, rhos=(rho,)), sweep_dir)
        out.append({"rho": rho, "value": r.get("value"), "ci": r.get("ci"), "verdict": r.get("verdict"),
                    "utility_lost_beyond_random": r.get("utility_lost_beyond_random"),
                    "harm_removed_beyond_random": r.get("harm_removed_beyond_random")})
    return out


def sensitivity(chain: str | Path, *, n_boot: int | None = None) -> dict[str, Any]:
    """Every table above for one chain folder (see the module docstring)."""
    from weightspace.chain_report import _read
    from weightspace.stand_in import chain_config

    chain = Path(chain)
    cfg = chain_config(chain)
    rows = load_tensor_rows(chain / "overlap" / "overlap_tensors.csv")
    etas = sorted({eta for (p, eta) in rows if p == UH})
    eta = cfg.plot_eta
    res: dict[str, Any] = {"chain": str(chain), "plot_eta": eta, "seed": cfg.seed,
                           "note": "descriptive: the pre-registered verdicts are the chain's (plot eta, rho-grid "
                                   "average, per-tensor mean); these are the same statistics on other slices",
                           "exp3_by_eta": exp3_by_eta(rows, etas, seed=cfg.seed, n_boot=n_boot),
                           "exp3_by_module": exp3_by_group(rows, eta, "module", seed=cfg.seed, n_boot=n_boot),
                           "exp3_by_layer": exp3_by_group(rows, eta, "layer", seed=cfg.seed, n_boot=n_boot),
                           "exp3_by_aggregation": exp3_by_aggregation(rows, eta, seed=cfg.seed, n_boot=n_boot)}
    try:
        rep = _read(chain / "chain_report.json")
    except (OSError, ValueError):
        rep = {}
    parity = rep.get("verdicts", {}).get("exp1_energy_parity", {}).get("per_rho")
    res["exp1_energy_parity_by_rho"] = parity or []
    res["exp2_by_rho"] = exp2_by_rho(cfg, chain / "sweep") if (chain / "sweep" / "evals").is_dir() else []
    return res


def figure(res: dict[str, Any]) -> Any:
    """Three panels: Exp 3 difference vs eta, per module type, per layer (95 % CIs, the -margin line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from weightspace.verdicts import OVERLAP_MARGIN

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    def band(ax: Any, xs: Sequence[Any], rows: Sequence[dict[str, Any]], key: str, label: str) -> None:
        ys = [r[key] for r in rows]
        lo = [r["ci"][0] if r["ci"] else np.nan for r in rows]
        hi = [r["ci"][1] if r["ci"] else np.nan for r in rows]
        ax.errorbar(range(len(xs)), ys, yerr=[np.subtract(ys, lo), np.subtract(hi, ys)], fmt="o-", capsize=3)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.axhline(-OVERLAP_MARGIN, color="red", ls="--", lw=0.8, label=f"-margin ({OVERLAP_MARGIN})")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([str(x) for x in xs], rotation=45, ha="right", fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("MSO(useful~harmful) - MSO(safety~harmful)")

    band(axes[0], [r["eta"] for r in res["exp3_by_eta"]], res["exp3_by_eta"], "value", "eta")
    axes[0].set_title("Exp 3 by energy level (all matrices)")
    axes[0].legend(fontsize=8)
    band(axes[1], [r["module"] for r in res["exp3_by_module"]], res["exp3_by_module"], "difference", "module type")
    axes[1].set_title(f"by module type (eta {res['plot_eta']})")
    band(axes[2], [r["layer"] for r in res["exp3_by_layer"]], res["exp3_by_layer"], "difference", "layer")
    axes[2].set_title(f"by layer (eta {res['plot_eta']})")
    fig.tight_layout()
    return fig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chain", required=True, help="a finished chain folder (workbench weightspace chain --out)")
    p.add_argument("--out", required=True, help="run folder for sensitivity.json, the CSVs and sensitivity.png")
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples (default: the verdicts' 2000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sensitivity run folder")


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """``workbench weightspace sensitivity``: Exp 3 per eta / module type / layer / aggregation, Exp 2 per rho."""
    from workbench.runs import RunFolder

    if args.n_boot is not None and args.n_boot < 100:
        raise WorkbenchError(f"--n-boot must be >= 100, got {args.n_boot}")
    res = sensitivity(args.chain, n_boot=args.n_boot)  # every error before the run folder exists
    with RunFolder(args.out, config={"command": "weightspace sensitivity", "chain": args.chain,
                                     "n_boot": args.n_boot}, overwrite=args.overwrite, inputs=[args.chain]) as run:
        run.write_json("sensitivity.json", res)
        for key in ("exp3_by_eta", "exp3_by_module", "exp3_by_layer", "exp3_by_aggregation",
                    "exp1_energy_parity_by_rho", "exp2_by_rho"):
            if res[key]:
                run.write_csv(f"{key}.csv", [{k: (v if not isinstance(v, list) else " ".join(f"{x:.6g}" for x in v))
                                              for k, v in r.items()} for r in res[key]])
        run.save_figure("sensitivity.png", figure(res))
    for r in res["exp3_by_eta"]:
        print(f"Exp 3 at eta {r['eta']}: {r['value']:+.4f} CI {r['ci']} (non-inferiority {r['noninferiority']}; "
              f"MSO / baseline useful~harmful {r['useful~harmful_over_baseline']:.2f}, safety~harmful "
              f"{r['safety~harmful_over_baseline']:.2f}) -> {r['verdict']}")
    for r in res["exp3_by_aggregation"]:
        print(f"Exp 3, {r['aggregation']}: {r['value']:+.4f} CI {r['ci']} -> non-inferiority {r['verdict']}")
    for r in res["exp2_by_rho"]:
        print(f"Exp 2 at rho {r['rho']}: {r['value']} CI {r['ci']} -> {r['verdict']}")
    return 0
