"""``workbench weightspace study-report``: the study's verdicts on one model, as a reviewer reads them.

Collects, into one markdown report and one JSON file:

* the chain (``workbench weightspace chain``: experiments 1-3) — its verdicts (rules of
  :mod:`weightspace.verdicts`, fixed before the run), timings, fine-tunes, tables and plots;
* experiment 4 (``workbench overlap``: activation-subspace overlap, both protocols) on any number of models
  (``--exp4 LABEL=RUN_FOLDER``, e.g. the aligned model and the useful and contaminated fine-tunes);
* the positive and negative controls (:mod:`weightspace.controls`: planted distinct / entangled updates through
  the chain's own overlap phase and Exp 3 verdict), read from ``--controls`` or run fresh into the report's
  scratch folder.

    workbench weightspace study-report --chain runs/study-default \\
        --exp4 aligned=runs/exp4-aligned --exp4 useful=runs/exp4-useful \\
        --controls runs/controls --out docs/study_default_model

writes ``docs/study_default_model.md`` and ``docs/study_default_model.json``. The JSON holds at least
``aligned_utility`` (the aligned model's utility-task score), ``n_harm_prompts``, ``controls``
(``{"planted_distinct": verdict, "planted_entangled": verdict}``) and ``verdicts`` (claim key ->
``{claim, statistic, value, ci, rule, verdict}``). ``--reading FILE`` adds a hand-written reading of the
results (markdown) under its own heading; everything else is generated from the run folders.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

__all__ = ["collect", "render", "add_arguments", "cmd_report"]

VERDICT_KEYS = ("claim", "statistic", "value", "ci", "rule", "verdict")
# the chain's plots the report shows (the rest stay listed in the chain summary)
REPORT_PLOTS = ("exp1_parallel.png", "exp2_tradeoff_phrase.png", "exp2_tradeoff_logit.png", "mso_vs_eta.png",
                "heatmap_safety_vs_harmful_eta0.5.png", "heatmap_useful_vs_harmful_eta0.5.png")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"cannot read {path}: {e}") from e


def _slim(v: dict[str, Any]) -> dict[str, Any]:
    return {k: v.get(k) for k in VERDICT_KEYS}


def _exp4(label: str, folder: Path) -> dict[str, Any]:
    p = folder / "overlap_summary.json"
    if not p.is_file():
        raise WorkbenchError(f"--exp4 {label}={folder}: no overlap_summary.json there (run `workbench overlap "
                             f"--out {folder}` first)")
    s = _read(p)
    out: dict[str, Any] = {"folder": str(folder), "eta": s.get("eta"), "slice_layers": (s.get("slice") or {}).get("layers"),
                           "n_layers": s.get("n_layers"), "protocols": {}}
    cfg_p = folder / "config.json"
    if cfg_p.is_file():
        c = _read(cfg_p)
        out["model"] = c.get("model") or (c.get("args") or {}).get("model")
    for proto, block in (s.get("protocols") or {}).items():
        ex = block.get("exp4") or {}
        row: dict[str, Any] = {"centered": block.get("centered"), "sets": block.get("sets"),
                               "n_prompts": block.get("n_prompts")}
        for which in ("slice", "all"):
            e = ex.get(which)
            if e:
                row[which] = {k: e.get(k) for k in ("u_h", "u_h_ci", "h1_h2", "h1_h2_ci", "diff", "diff_ci", "ratio",
                                                     "ratio_ci", "u_h_baseline", "h1_h2_baseline", "layer_ids")}
                row[which]["verdict"] = _slim(e["verdict"]) if isinstance(e.get("verdict"), dict) else e.get("verdict")
        out["protocols"][proto] = row
    return out


def collect(chain: str | Path, exp4: dict[str, str | Path] | None = None, controls: dict[str, Any] | None = None,
            *, exp4_protocol: str = "study", sensitivity: str | Path | None = None,
            stand_ins: list[str | Path] | None = None) -> dict[str, Any]:
    """Everything the report shows, as one JSON-able dict (see the module docstring for the required keys)."""
    chain = Path(chain)
    rp = chain / "chain_report.json"
    if not rp.is_file():
        raise WorkbenchError(f"--chain {chain}: no chain_report.json there (the chain has not finished; resume it "
                             f"with `workbench weightspace chain --out {chain} --resume`)")
    rep = _read(rp)
    base = (rep.get("sweep") or {}).get("baselines") or {}
    aligned = base.get("aligned") or {}
    es = (rep.get("sweep") or {}).get("eval_sets") or {}
    t = rep.get("timings") or {}
    verdicts = {k: _slim(v) for k, v in (rep.get("verdicts") or {}).items()}
    e4 = {lab: _exp4(lab, Path(f)) for lab, f in (exp4 or {}).items()}
    for lab, x in e4.items():
        for proto, row in x["protocols"].items():
            v = (row.get("slice") or {}).get("verdict")
            if isinstance(v, dict) and proto == exp4_protocol:
                verdicts[f"exp4_activation_overlap[{lab}]"] = v
    out: dict[str, Any] = {
        "model": rep.get("model"), "chain_folder": str(chain), "format": rep.get("format"),
        "aligned_utility": aligned.get("utility_accuracy"),
        "aligned_utility_ci": [aligned.get("utility_accuracy_lo"), aligned.get("utility_accuracy_hi")],
        "utility_scorer": es.get("utility_scorer"), "n_utility_tasks": es.get("n_tasks"),
        "n_harm_prompts": es.get("n_harmful"), "harm_pool": es.get("harmful"),
        "baselines": base, "real_harmful_share": rep.get("real_harmful_share"),
        "controls": None, "verdicts": verdicts,
        "verdict_counts": {}, "exp4": e4, "exp4_protocol_in_verdicts": exp4_protocol,
        "timings": {"chain_minutes": round(t["phase_seconds_sum_all_invocations"] / 60, 1)
                    if t.get("phase_seconds_sum_all_invocations") is not None else None,
                    "phases": {k: v.get("seconds_when_run", v.get("seconds")) for k, v in (t.get("phases") or {}).items()},
                    "cpu_count": t.get("cpu_count"), "torch_threads": t.get("torch_threads")},
        "config": rep.get("config"), "pools": rep.get("pools") or (rep.get("config") or {}).get("pools"),
        "notes": rep.get("notes"), "plots": rep.get("plots"),
    }
    if controls is not None:
        out["controls"] = {"planted_distinct": controls.get("planted_distinct"),
                           "planted_entangled": controls.get("planted_entangled"),
                           "passed": controls.get("passed"), "expected": controls.get("expected"),
                           "details": controls.get("details")}
    if sensitivity is not None:
        sp = Path(sensitivity) / "sensitivity.json"
        if not sp.is_file():
            raise WorkbenchError(f"--sensitivity {sensitivity}: no sensitivity.json there (run `workbench weightspace "
                                 f"sensitivity --chain {chain} --out {sensitivity}`)")
        out["sensitivity"] = _read(sp)
    out["stand_ins"] = []
    for folder in stand_ins or []:
        sp = Path(folder) / "stand_in.json"
        if not sp.is_file():
            raise WorkbenchError(f"--stand-in {folder}: no stand_in.json there (run `workbench weightspace stand-in "
                                 f"--chain {chain} --out {folder}`)")
        si = _read(sp)
        si["folder"] = str(folder)
        out["stand_ins"].append(si)
        if si.get("exp3"):  # the same fixed Exp 3 rule, with the second stand-in as Delta_S
            verdicts[f"exp3_overlap[{si['method']} stand-in]"] = _slim(si["exp3"])
    counts: dict[str, list[str]] = {}
    for k, v in verdicts.items():
        counts.setdefault(str(v.get("verdict")), []).append(k)
    out["verdict_counts"] = counts
    return out


def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)):
        return f"{v:.{nd}f}"
    return str(v)


def _ci(ci: Any, nd: int = 3) -> str:
    if not ci or ci[0] is None:
        return "-"
    return f"[{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def render(data: dict[str, Any], *, chain_summary: str = "", reading: str = "", commands: list[str] | None = None,
           image_map: dict[str, str] | None = None) -> str:
    """The markdown report."""
    L: list[str] = [f"# The study on {data['model']}: verdicts with intervals, controls and timings\n"]
    if commands:
        L.append("Made with (from the repository root, on the machine named below):\n")
        L.append("```\n" + "\n".join(commands) + "\n```\n")
    tm = data.get("timings") or {}
    L.append(f"- chain time: **{_f(tm.get('chain_minutes'), 1)} min** (sum of the phases, "
             f"{tm.get('cpu_count')} CPU cores, {tm.get('torch_threads')} torch threads); per phase (s): "
             + ", ".join(f"{k} {_f(v, 0)}" for k, v in (tm.get("phases") or {}).items()))
    L.append(f"- aligned model's utility ({data.get('utility_scorer')}, {data.get('n_utility_tasks')} tasks): "
             f"**{_f(data.get('aligned_utility'))}** {_ci(data.get('aligned_utility_ci'))}")
    L.append(f"- harm evaluation: **{data.get('n_harm_prompts')} prompts** ({data.get('harm_pool')}), phrase rate "
             f"and the continuous refusal-logit score, every sweep point with a 95 % bootstrap interval")
    c = data.get("controls")
    if c:
        L.append(f"- controls (planted updates through the chain's overlap phase and verdicts): distinct -> "
                 f"**{c['planted_distinct']}**, entangled -> **{c['planted_entangled']}** "
                 f"({'as expected' if c.get('passed') else 'NOT as expected: the verdicts below cannot be trusted'})")
    L.append("\n## Verdicts (rules fixed before the run: `weightspace/verdicts.py`, `workbench/verdict_rules.py`)\n")
    L.append("| claim | statistic | value | 95 % CI | verdict |")
    L.append("|---|---|---|---|---|")
    for k, v in data["verdicts"].items():
        L.append(f"| `{k}`: {v.get('claim')} | {v.get('statistic')} | {_f(v.get('value'), 4)} | "
                 f"{_ci(v.get('ci'), 4)} | **{v.get('verdict')}** |")
    L.append("\nRules:\n")
    for k, v in data["verdicts"].items():
        L.append(f"- `{k}`: {v.get('rule')}")
    L.append("\nIn short: " + "; ".join(f"**{verdict}**: {', '.join(f'`{k}`' for k in keys)}"
                                        for verdict, keys in data.get("verdict_counts", {}).items()) + ".")
    if reading.strip():
        L.append("\n## Reading\n")
        L.append(reading.strip())
    if c:
        L.append("\n## Positive and negative controls\n")
        L.append("| control | expected | safety~harmful (MSO / baseline [95 % CI]) | verdict | Exp 3 verdict | "
                 "mean MSO useful~harmful / safety~harmful / safety~useful |")
        L.append("|---|---|---|---|---|---|")
        for case in ("planted_distinct", "planted_entangled"):
            d = (c.get("details") or {}).get(case) or {}
            s = d.get("separability_safety_harmful") or {}
            m = d.get("mso_mean") or {}
            L.append(f"| {case} | {(c.get('expected') or {}).get(case)} | {_f(s.get('value'), 2)} "
                     f"{_ci(s.get('ci'), 2)} | **{c.get(case)}** | {(d.get('exp3') or {}).get('verdict')} | "
                     f"{_f(m.get('useful~harmful'))} / {_f(m.get('safety~harmful'))} / {_f(m.get('safety~useful'))} |")
        L.append("\nConstruction: `weightspace/controls.py` (`workbench weightspace controls --out DIR`).")
    L += _render_stand_ins(data.get("stand_ins") or [], data.get("baselines") or {})
    L += _render_sensitivity(data.get("sensitivity"))
    e4 = data.get("exp4") or {}
    if e4:
        L.append("\n## Experiment 4: activation-subspace overlap (both protocols)\n")
        L.append("U~H = mean of MSO(U,H1) and MSO(U,H2); the noise ceiling is MSO(H1,H2); D = U~H − H1~H2; "
                 "95 % subsampling intervals (prompt subsets without replacement).\n")
        L.append("| model | protocol | layers | U~H [CI] | H1~H2 [CI] | D [CI] | baseline U~H / H1~H2 | verdict |")
        L.append("|---|---|---|---|---|---|---|---|")
        for lab, x in e4.items():
            for proto, row in x["protocols"].items():
                for which in ("slice", "all"):
                    r = row.get(which)
                    if not r:
                        continue
                    v = r.get("verdict")
                    vv = v.get("verdict") if isinstance(v, dict) else v
                    L.append(f"| {lab} | {proto} ({'centred' if row.get('centered') else 'uncentred'}) | "
                             f"{which} | {_f(r.get('u_h'))} {_ci(r.get('u_h_ci'))} | {_f(r.get('h1_h2'))} "
                             f"{_ci(r.get('h1_h2_ci'))} | {_f(r.get('diff'))} {_ci(r.get('diff_ci'))} | "
                             f"{_f(r.get('u_h_baseline'))} / {_f(r.get('h1_h2_baseline'))} | "
                             f"{vv if which == 'slice' else '(rule on the slice)'} |")
        L.append("\nSets per protocol: " + "; ".join(
            f"{proto}: {row.get('sets')}" for proto, row in next(iter(e4.values()))["protocols"].items()))
    if image_map:
        L.append("\n## Plots\n")
        for src, dst in image_map.items():
            L.append(f"![{Path(src).stem}]({dst})")
    if chain_summary.strip():
        L.append("\n## The chain's own summary (`chain_summary.md`)\n")
        body = chain_summary.split("\n", 1)[1] if chain_summary.startswith("# ") else chain_summary
        L.append(body.replace("\n## ", "\n### ").strip())
    return "\n".join(L) + "\n"


def _render_stand_ins(sis: list[dict[str, Any]], base: dict[str, Any]) -> list[str]:
    if not sis:
        return []
    L = ["\n## A second stand-in for the alignment update (Exp 3 again)\n",
         "The chain's Delta_S is one full fine-tune; `workbench weightspace stand-in` trains another safety update on "
         "the same safety prompts with another method and applies the same Exp 3 rule with it as Delta_S "
         "(`safety-full` = the chain's own). Refusal and utility on the chain's evaluation sets (95 % intervals):\n",
         "| model | training | loss | harm refusal (phrase) | mean refusal logit | utility (unit tests) |",
         "|---|---|---|---|---|---|"]

    def row(label: str, how: str, loss: str, m: dict[str, Any]) -> str:
        return (f"| {label} | {how} | {loss} | {_f(m.get('harm_refusal_rate_phrase'), 2)} "
                f"{_ci([m.get('harm_refusal_rate_phrase_lo'), m.get('harm_refusal_rate_phrase_hi')], 2)} | "
                f"{_f(m.get('harm_refusal_logit_mean'), 2)} "
                f"{_ci([m.get('harm_refusal_logit_mean_lo'), m.get('harm_refusal_logit_mean_hi')], 2)} | "
                f"{_f(m.get('utility_accuracy'), 2)} "
                f"{_ci([m.get('utility_accuracy_lo'), m.get('utility_accuracy_hi')], 2)} |")

    if base.get("aligned"):
        L.append(row("aligned", "-", "-", base["aligned"]))
    for si in sis:
        ft, sc = si.get("finetune") or {}, si.get("scores") or {}
        loss = f"{_f(ft.get('initial_loss'), 2)} -> {_f(ft.get('final_loss'), 2)}"
        how = f"{si['method']}" + (f" rank {si['lora_rank']}" if si.get("lora_rank") else "") + f", lr {si.get('lr')}"
        if "safety-full" in sc:
            L.append(row("safety (chain's)", si.get("chain_method", "full"), "-", sc["safety-full"]))
        if "safety" in sc:
            L.append(row(f"safety ({si['method']} stand-in)", how, loss, sc["safety"]))
    L += ["", "| Delta_S | Exp 3 statistic [95 % CI] | non-inferiority | useful~harmful / baseline | "
          "safety~harmful / baseline | verdict |", "|---|---|---|---|---|---|"]
    for si in sis:
        for label, v in (("chain's " + str(si.get("chain_method")), si.get("chain_exp3")),
                         (f"{si['method']} stand-in", si.get("exp3"))):
            v = v or {}
            pr = v.get("pairs") or {}
            L.append(f"| {label} | {_f(v.get('value'), 4)} {_ci(v.get('ci'), 4)} | {v.get('noninferiority')} | "
                     f"{_f((pr.get('useful~harmful') or {}).get('value'), 2)} | "
                     f"{_f((pr.get('safety~harmful') or {}).get('value'), 2)} | **{v.get('verdict')}** |")
        a = si.get("agreement") or {}
        L.append(f"\nThe two stand-ins' own overlap (MSO(safety~safety-full) / baseline, eta {si.get('eta')}): "
                 f"{_f(a.get('value'), 2)} {_ci(a.get('ci'), 2)} -> {a.get('verdict')}.")
    return L


def _render_sensitivity(sens: dict[str, Any] | None) -> list[str]:
    if not sens:
        return []
    L = ["\n## Sensitivity (descriptive; the verdicts above are the pre-registered ones)\n",
         "From `workbench weightspace sensitivity` (no model: the chain's own per-tensor and per-prompt rows).\n",
         "**Exp 3 at every eta** (whole rule):\n",
         "| eta | MSO(u~h) - MSO(s~h) [95 % CI] | non-inferiority | u~h / baseline | s~h / baseline | verdict |",
         "|---|---|---|---|---|---|"]
    for r in sens.get("exp3_by_eta") or []:
        L.append(f"| {r['eta']} | {_f(r['value'], 4)} {_ci(r['ci'], 4)} | {r.get('noninferiority')} | "
                 f"{_f(r.get('useful~harmful_over_baseline'), 2)} | {_f(r.get('safety~harmful_over_baseline'), 2)} | "
                 f"{r['verdict']} |")
    L += [f"\n**Exp 3 by aggregation** (eta {sens.get('plot_eta')}, non-inferiority part):\n",
          "| aggregation | units | difference [95 % CI] | non-inferiority |", "|---|---|---|---|"]
    for r in sens.get("exp3_by_aggregation") or []:
        L.append(f"| {r['aggregation']} | {r['n_units']} | {_f(r['value'], 4)} {_ci(r['ci'], 4)} | {r['verdict']} |")
    L += [f"\n**Exp 3 by module type** (eta {sens.get('plot_eta')}):\n",
          "| module | tensors | MSO u~h | MSO s~h | difference [95 % CI] | non-inferiority |", "|---|---|---|---|---|---|"]
    for r in sens.get("exp3_by_module") or []:
        L.append(f"| {r['module']} | {r['n_tensors']} | {_f(r['mso_useful_harmful'])} | {_f(r['mso_safety_harmful'])} "
                 f"| {_f(r['difference'], 4)} {_ci(r['ci'], 4)} | {r['noninferiority']} |")
    lay = sens.get("exp3_by_layer") or []
    if lay:
        c: dict[str, int] = {}
        for r in lay:
            c[r["noninferiority"]] = c.get(r["noninferiority"], 0) + 1
        L.append("\n**Exp 3 by layer**: non-inferiority per layer group: "
                 + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) + " (plot `sensitivity.png`, table "
                 "`exp3_by_layer.csv`).")
    if sens.get("exp2_by_rho"):
        L += ["\n**Exp 2 at each rho** (rates; the verdict averages the grid):\n",
              "| rho | selectivity advantage [95 % CI] | utility lost beyond Random | harm removed beyond Random | "
              "verdict |", "|---|---|---|---|---|"]
        for r in sens["exp2_by_rho"]:
            L.append(f"| {r['rho']} | {_f(r['value'], 4)} {_ci(r['ci'], 4)} | {_f(r.get('utility_lost_beyond_random'), 4)} "
                     f"| {_f(r.get('harm_removed_beyond_random'), 4)} | {r['verdict']} |")
    if sens.get("exp1_energy_parity_by_rho"):
        L += ["\n**Exp 1 energy parity at each rho** (the rule is per rho):\n",
              "| rho | E_k useful | E_k harmful | gap [95 % CI] | verdict |", "|---|---|---|---|---|"]
        for r in sens["exp1_energy_parity_by_rho"]:
            L.append(f"| {r['rho']} | {_f(r.get('ek_useful'))} | {_f(r.get('ek_harmful'))} | {_f(r.get('gap'), 4)} "
                     f"{_ci(r.get('ci'), 4)} | {r.get('verdict')} |")
    return L


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chain", required=True, help="a finished chain folder (chain_report.json)")
    p.add_argument("--exp4", action="append", default=[], metavar="LABEL=FOLDER",
                   help="an experiment-4 run folder (`workbench overlap`), repeat for several models")
    p.add_argument("--exp4-protocol", default="study", help="protocol whose slice verdict enters the verdict table")
    p.add_argument("--controls", default=None,
                   help="a `workbench weightspace controls` folder (controls.json); default: run them fresh")
    p.add_argument("--sensitivity", default=None,
                   help="a `workbench weightspace sensitivity` folder (sensitivity.json): eta / rho / aggregation tables")
    p.add_argument("--stand-in", action="append", default=[], dest="stand_in", metavar="FOLDER",
                   help="a `workbench weightspace stand-in` folder (stand_in.json): Exp 3 with a second Delta_S; "
                        "repeat for several")
    p.add_argument("--reading", default=None, help="markdown file with a hand-written reading of the results")
    p.add_argument("--command", action="append", default=[], dest="commands", help="a command line to print in the report (repeat)")
    p.add_argument("--images", default=None,
                   help="folder to copy the chain's and Exp 4's plots into (linked from the report)")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.md and PREFIX.json")


def cmd_report(args: argparse.Namespace) -> int:
    import tempfile

    from workbench.io import write_json, write_text

    exp4: dict[str, str] = {}
    for item in args.exp4:
        if "=" not in item:
            raise WorkbenchError(f"--exp4 {item!r}: expected LABEL=FOLDER")
        lab, folder = item.split("=", 1)
        exp4[lab.strip()] = folder.strip()
    if args.controls:
        cp = Path(args.controls) / "controls.json"
        if not cp.is_file():
            raise WorkbenchError(f"--controls {args.controls}: no controls.json there (run `workbench weightspace "
                                 f"controls --out {args.controls}`)")
        controls = _read(cp)
    else:
        from weightspace.controls import planted_controls

        with tempfile.TemporaryDirectory(prefix="wb-controls-") as tmp:
            controls = planted_controls(tmp)
    data = collect(args.chain, exp4, controls, exp4_protocol=args.exp4_protocol, sensitivity=args.sensitivity,
                   stand_ins=args.stand_in)
    out = Path(args.out)
    image_map: dict[str, str] = {}
    if args.images:
        img = Path(args.images)
        img.mkdir(parents=True, exist_ok=True)
        wanted = [Path(p) for p in data.get("plots") or []
                  if Path(p).name in REPORT_PLOTS or Path(p).name.startswith("pairs_eta")]
        for lab, f in exp4.items():
            wanted += [Path(f) / "overlap_protocols.png"]
        if args.sensitivity:
            wanted += [Path(args.sensitivity) / "sensitivity.png"]
        for src in wanted:
            if src.is_file():
                name = (src.parent.name + "_" + src.name) if src.parent.name not in ("", ".") else src.name
                dst = img / name
                shutil.copyfile(src, dst)
                image_map[str(src)] = str(dst.relative_to(out.parent)) if dst.is_relative_to(out.parent) else str(dst)
    summary_p = Path(args.chain) / "chain_summary.md"
    reading = Path(args.reading).read_text(encoding="utf-8") if args.reading else ""
    md = render(data, chain_summary=summary_p.read_text(encoding="utf-8") if summary_p.is_file() else "",
                reading=reading, commands=args.commands, image_map=image_map)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), data)
    write_text(out.with_suffix(".md"), md)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}; verdicts: "
          + ", ".join(f"{k}={v.get('verdict')}" for k, v in data["verdicts"].items()))
    return 0
