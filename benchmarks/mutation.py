"""A small mutation-testing runner (``ast`` based): does the fast test subset of a module notice when the module's
code is changed a little?

    nice -n 10 .venv/bin/python benchmarks/mutation.py --module capture            # one module
    nice -n 10 .venv/bin/python benchmarks/mutation.py --module all --max-mutants 60 --seed 0
    .venv/bin/python benchmarks/mutation.py --module steering --list               # the mutants, nothing run

Mutations, one per mutant: comparison swaps (``==``/``!=``, ``<``/``>=``, ``>``/``<=``, ``is``/``is not``,
``in``/``not in``), arithmetic swaps (``+``/``-``, ``*``/``/``, ``//`` -> ``/``, ``**`` -> ``*``, also in
``+=`` etc.), ``and``/``or``, ``not x`` -> ``x``, ``-x`` -> ``x``, constant tweaks (``True``/``False``, an int
``c`` -> ``c + 1``, a float ``c`` -> ``2 c`` (``0.0`` -> ``1.0``)), a dropped keyword argument of a call and
``return x`` -> ``return None``. Not mutated (changes nobody could test, or cosmetic by design): annotations,
docstrings and other strings, f-strings, ``raise`` statements (error messages), decorators, and the keyword
arguments ``desc``/``unit``/``total``/``leave``/``stacklevel``/``help``/``flush`` with their values (progress
bars, warnings), and matplotlib calls on ``plt``/``fig``/``ax``/``axes`` (plot styling: sizes, markers, labels).

Each mutant is written into a temporary copy of the sources (``benchmarks/_overlay.py``; the working tree is
never touched) and the module's SELECTED fast tests run with ``-x -q -p no:cacheprovider`` and a per-mutant
timeout (a timeout counts as killed). With more candidate mutants than ``--max-mutants``, a seeded random
sample is run (the report says so). A survivor listed in ``EQUIVALENT`` (read, with the reason its behaviour
is the same written next to it) counts as "equivalent"; the survival rate is survived / (run - equivalent) and
the raw rate, equivalents counted as survivors, is reported next to it. Results: a table on stdout and ``benchmarks/results/mutation_<module>.json``
(every mutant, survivors with their line).
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _overlay import ROOT, Overlay  # noqa: E402

FAST = ("-m", "not real_model and not slow")

# module -> files, optional functions (only code inside them is mutated), the fast tests that should notice
MODULES: dict[str, dict[str, Any]] = {
    "subspace": {"files": ["workbench/subspace.py"],
                 "tests": ["tests/test_subspace.py", "tests/test_overlap.py", "tests/test_subspace_details.py"]},
    "capture": {"files": ["workbench/capture.py"],
                "tests": ["tests/test_capture.py", "tests/test_cache_key.py", "tests/test_capture_details.py"]},
    "interventions": {"files": ["workbench/interventions.py"],
                      "tests": ["tests/test_interventions.py", "tests/test_intervention_details.py",
                                "tests/test_native_backend.py", "tests/test_generation_ablation.py",
                                "tests/test_kernel.py"]},
    "steering": {"files": ["steering/directions.py", "steering/evaluate.py", "steering/interventions.py",
                           "steering/orthogonalize.py", "steering/selection.py", "steering/sweep.py",
                           "steering/gguf_export.py", "steering/kernel.py", "steering/optimize.py"],
                 "tests": ["tests/test_steering.py", "tests/test_steering_details.py", "tests/test_orthogonalize.py",
                           "tests/test_generation_ablation.py", "tests/test_screening.py", "tests/test_kernel.py",
                           "tests/test_optimize.py", "-k", "not console_script"]},
    "projection": {"files": ["weightspace/projection.py"],
                   "tests": ["tests/test_breakage.py", "tests/test_projection_details.py", "tests/test_weightspace.py", "-k",
                             "projection or project or safelora or unselected or fraction or right_side or layer_range "
                             "or direction_reference or conv1d or existing_output"]},
    # the paired TopK-vs-Random verdicts of the chain report (moved from weightspace/chain.py to chain_report.py)
    # the study's verdict rules (claim, statistic, interval, rule -> verdict) and the planted positive controls
    "verdicts": {"files": ["weightspace/verdicts.py", "workbench/verdict_rules.py"],
                 "tests": ["tests/test_verdicts.py", "tests/test_weightspace_defects.py", "tests/test_verdict_rules.py",
                           "tests/test_exp4_verdict.py"]},
    # the sweep's per-item metrics: bootstrap intervals of item means and paired TopK-vs-control comparisons
    "metrics": {"files": ["weightspace/metrics.py"], "tests": ["tests/test_weightspace_metrics.py"]},
    # experiment 4's interval: subsampling without replacement, and the overlap module that uses it
    "subsampling": {"files": ["workbench/subsampling.py"],
                    "tests": ["tests/test_exp4_verdict.py", "tests/test_overlap.py"]},
    "chain-verdicts": {"files": ["weightspace/chain_report.py"], "functions": ["_paired", "_per_prompt", "_se"],
                       "tests": ["tests/test_breakage.py", "-k", "paired or standard_error"]},
}

# Reviewed equivalent mutants: (file, text the mutated line contains, mutation detail, why no test can tell the
# mutant from the original). A listed mutant still runs: when a test kills it, it counts as killed; when it
# survives, it counts as "equivalent" instead of "survived", and the survival rate is survived / (run - equivalent)
# (the standard mutation score; the raw rate with the equivalents counted as survivors is reported next to it).
# Only add a mutant here after reading it and writing down why its behaviour is the same.
EQUIVALENT: list[tuple[str, str, str, str]] = [
    ("*", "device=", "drop keyword device=",
     "device placement: every tensor is on the CPU in the test process (tests/test_cuda.py covers a GPU where present)"),
    ("*", "Generator(device=\"cpu\")", "drop keyword device=", "torch.Generator() is a CPU generator by default"),
    ("*", "full_matrices=False", "drop keyword full_matrices=",
     "the full SVD's extra columns are never read (sliced off / not returned): only the cost changes"),
    ("*", "full_matrices=False", "False -> True",
     "the full SVD's extra columns are never read (sliced off / not returned): only the cost changes"),
    ("workbench/subspace.py", 'method="exact"', "drop keyword method=", 'svd_spectrum\'s default method is "exact"'),
    ("workbench/subspace.py", "torch.eye(X.shape[1], dtype=X.dtype", "drop keyword dtype=",
     "an identity of 0/1 is exact in any float dtype; the difference is promoted to X's dtype"),
    ("workbench/subspace.py", "X.mean(dim=0, keepdim=True)", "True -> False",
     "X - mean broadcasts the same with a [d] or a [1, d] mean"),
    ("workbench/subspace.py", '_as_matrix(X, name="X", dtype=dtype)', "drop keyword dtype=",
     "centres in float64 before basis_by_energy casts to dtype: the same basis, computed more precisely"),
    ("steering/evaluate.py", "np.asarray(flags, dtype=float)", "drop keyword dtype=",
     "the mean and bootstrap of a bool array equal those of its 0/1 float array"),
    ("steering/optimize.py", "params.get(k, r[0])", "0 -> 1",
     "a parameter is absent from a trial only when its range is fixed (low == high), so r[0] == r[1]"),
    ("steering/optimize.py", "seed: int = 0, storage: Any = None", "0 -> 1",
     "the default seed of the optimiser: any fixed default is equally reproducible"),
    ("steering/evaluate.py", "seed + 2", "2 -> 3",
     "the KL interval's bootstrap seed offset: another seed gives another, equally valid interval"),
    ("steering/evaluate.py", "seed + 3", "3 -> 4",
     "the task-accuracy bootstrap's seed offset: another seed gives another, equally valid interval"),
    ("steering/selection.py", 'int(p[3:]) if p.startswith("pos") else 0', "0 -> 1",
     "row order of the selection heat map only (a named position sorts before or beside pos-1)"),
    ("*", "shutil.rmtree(tmp, ignore_errors=True)", "drop keyword ignore_errors=",
     "removal of a temporary folder that exists: differs only when the removal itself fails"),
    ("workbench/interventions.py", "(t0 + p) * torch.ones_like(pads)", "* -> /",
     "(t0 + p) / ones equals (t0 + p) * ones; the position comparison is the same for the float result"),
    ("workbench/interventions.py", "(self.weight * (act @ r)).unsqueeze(-1)", "1 -> 2",
     "activations reaching an intervention are [B, T, d]: unsqueeze(-1) and unsqueeze(2) are the same axis"),
    ("workbench/capture.py", "batch_size: int = 16", "16 -> 17",
     "the default batch size only changes the batching; batched equals one-by-one is tested (test_capture)"),
    ("workbench/capture.py", "(10**9)", "10 -> 11",
     "sort key multiplier: any value above the longest prompt gives the same order"),
    ("workbench/capture.py", "(10**9)", "9 -> 10",
     "sort key multiplier: any value above the longest prompt gives the same order"),
    ("weightspace/verdicts.py", "du = np.asarray(utility_high, dtype=np.float64) - np.asarray(utility_low, dtype=np.float64)",
     "drop keyword dtype=", "the other operand of the subtraction stays float64, so numpy promotes this one (bool, int, "
     "float32) to float64 before subtracting, exactly as the cast would: the same float64 differences (numbers only, "
     "as typed: None or numeric strings, which the cast turns into nan / floats, are outside Sequence[float])"),
    ("weightspace/verdicts.py", "dh = np.asarray(harm_high, dtype=np.float64) - np.asarray(harm_low, dtype=np.float64)",
     "drop keyword dtype=", "the other operand of the subtraction stays float64, so numpy promotes this one (bool, int, "
     "float32) to float64 before subtracting, exactly as the cast would: the same float64 differences (numbers only, "
     "as typed: None or numeric strings, which the cast turns into nan / floats, are outside Sequence[float])"),
    ("weightspace/verdicts.py", 'mu, ms = np.asarray(uh["mso"], dtype=np.float64), np.asarray(sh["mso"], dtype=np.float64)',
     "drop keyword dtype=", "mu / ms are read only through mu - ms (the other one stays float64: promoted exactly as the "
     "cast would), .size and .shape (dtype-free); separability and bootstrap_ci cast their own inputs (numbers only, "
     "as typed: None or numeric strings are outside Sequence[float])"),
    ("workbench/verdict_rules.py", "bu, bh = np.asarray(u_h_draws, dtype=np.float64), np.asarray(h1_h2_draws, dtype=np.float64)",
     "drop keyword dtype=", "bu / bh are read only through bu - bh (the other one stays float64: promoted exactly as the "
     "cast would), .shape / .size (dtype-free) and subsample_ci, which casts its draws to float64 itself (numbers "
     "only, as typed: None or numeric strings are outside Sequence[float])"),
]


def equivalent_reason(m: "Mutant", source_line: str) -> str | None:
    """The reviewed reason a surviving mutant is equivalent, or None."""
    for file, text, detail, why in EQUIVALENT:
        if file not in ("*", m.file) or text not in source_line:
            continue
        if detail and detail != m.detail:
            continue
        return why
    return None


CMP_SWAP = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE,
            ast.LtE: ast.Gt, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
            ast.Pow: ast.Mult}
SYMBOL = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.GtE: ">=", ast.Gt: ">", ast.LtE: "<=", ast.Is: "is",
          ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
          ast.Div: "/", ast.FloorDiv: "//", ast.Pow: "**"}
COSMETIC_KEYWORDS = {"desc", "unit", "total", "leave", "stacklevel", "help", "flush"}
PLOT_OBJECTS = {"plt", "ax", "axes", "fig"}  # matplotlib styling calls: ``ax.scatter(..., marker="x", s=20)`` etc.
# (also ``ax1``, ``ax2``, ...)


@dataclass
class Mutant:
    file: str
    index: int  # position of the node in ast.walk order of a fresh parse
    kind: str
    detail: str  # what changes, e.g. "== -> !=" or "drop keyword dim="
    line: int
    arg: int = 0  # which operator of a chained comparison / which keyword

    @property
    def label(self) -> str:
        return f"{self.file}:{self.line} {self.kind}: {self.detail}"


def _skipped_subtrees(tree: ast.AST, functions: list[str] | None) -> tuple[set[int], set[int] | None]:
    """ids of nodes not to mutate, and (with ``functions``) the ids of the nodes inside those functions."""
    skip: set[int] = set()
    inside: set[int] | None = set() if functions else None

    def mark(node: ast.AST | None, into: set[int]) -> None:
        if node is not None:
            for n in ast.walk(node):
                into.add(id(n))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            mark(node.returns, skip)
            for d in node.decorator_list:
                mark(d, skip)
            for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                mark(a.annotation, skip)
            if inside is not None and node.name in functions:
                mark(node, inside)
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                mark(body[0], skip)  # docstring
        elif isinstance(node, ast.ClassDef):
            for d in node.decorator_list:
                mark(d, skip)
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation, skip)
        elif isinstance(node, (ast.Raise, ast.JoinedStr)):
            mark(node, skip)
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (
                    f.value.id in PLOT_OBJECTS or re.fullmatch(r"ax\d+", f.value.id)):
                mark(node, skip)
            for kw in node.keywords:
                if kw.arg in COSMETIC_KEYWORDS:
                    mark(kw.value, skip)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            mark(node, skip)
    return skip, inside


def _path_join(node: ast.AST) -> bool:
    """``folder / "name"`` (or an f-string): a path join, not arithmetic; swapping it only raises TypeError."""
    if not isinstance(node, ast.BinOp) or not isinstance(node.op, ast.Div):
        return False
    return any(isinstance(x, ast.JoinedStr) or (isinstance(x, ast.Constant) and isinstance(x.value, str))
               for x in (node.left, node.right))


def enumerate_mutants(file: str, source: str, functions: list[str] | None = None) -> list[Mutant]:
    tree = ast.parse(source)
    skip, inside = _skipped_subtrees(tree, functions)
    out: list[Mutant] = []
    for i, node in enumerate(ast.walk(tree)):
        if id(node) in skip or (inside is not None and id(node) not in inside):
            continue
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in CMP_SWAP:
                    out.append(Mutant(file, i, "compare", f"{SYMBOL[type(op)]} -> {SYMBOL[CMP_SWAP[type(op)]]}", line, k))
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BIN_SWAP and not _path_join(node):
            out.append(Mutant(file, i, "arith", f"{SYMBOL[type(node.op)]} -> {SYMBOL[BIN_SWAP[type(node.op)]]}", line))
        elif isinstance(node, ast.BoolOp):
            out.append(Mutant(file, i, "boolop", "and -> or" if isinstance(node.op, ast.And) else "or -> and", line))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            out.append(Mutant(file, i, "unary", "drop not" if isinstance(node.op, ast.Not) else "drop unary -", line))
        elif isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool):
                out.append(Mutant(file, i, "constant", f"{v} -> {not v}", line))
            elif isinstance(v, int):
                out.append(Mutant(file, i, "constant", f"{v} -> {v + 1}", line))
            elif isinstance(v, float):
                out.append(Mutant(file, i, "constant", f"{v!r} -> {(2 * v if v else 1.0)!r}", line))
        elif isinstance(node, ast.Call):
            for k, kw in enumerate(node.keywords):
                if kw.arg is not None and kw.arg not in COSMETIC_KEYWORDS:
                    out.append(Mutant(file, i, "keyword", f"drop keyword {kw.arg}=", line, k))
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            out.append(Mutant(file, i, "return", "return ... -> return None", line))
    return out


class _Unwrap(ast.NodeTransformer):
    """Replace one node (by identity) with another."""

    def __init__(self, target: ast.AST, replacement: ast.AST) -> None:
        self.target, self.replacement = target, replacement

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if node is self.target:
            return self.replacement
        return super().generic_visit(node)


def apply(source: str, m: Mutant) -> str:
    tree = ast.parse(source)
    node = next(n for i, n in enumerate(ast.walk(tree)) if i == m.index)
    if m.kind == "compare":
        node.ops[m.arg] = CMP_SWAP[type(node.ops[m.arg])]()
    elif m.kind == "arith":
        node.op = BIN_SWAP[type(node.op)]()
    elif m.kind == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif m.kind == "unary":
        tree = _Unwrap(node, node.operand).visit(tree)
    elif m.kind == "constant":
        v = node.value
        node.value = (not v) if isinstance(v, bool) else (v + 1) if isinstance(v, int) else (2 * v if v else 1.0)
    elif m.kind == "keyword":
        del node.keywords[m.arg]
    elif m.kind == "return":
        node.value = ast.Constant(None)
    ast.fix_missing_locations(tree)
    text = ast.unparse(tree)
    compile(text, m.file, "exec")
    return text + "\n"


def run_module(name: str, max_mutants: int, seed: int, timeout: float | None, listing: bool) -> dict[str, Any]:
    spec = MODULES[name]
    tests = list(spec["tests"])
    with Overlay() as ov:
        mutants: list[Mutant] = []
        for f in spec["files"]:
            mutants += enumerate_mutants(f, ov.source(f), spec.get("functions"))
        total = len(mutants)
        if total > max_mutants:
            mutants = random.Random(seed).sample(mutants, max_mutants)
        mutants.sort(key=lambda m: (m.file, m.line, m.index, m.arg))
        header = {"module": name, "files": spec["files"], "functions": spec.get("functions"), "tests": tests,
                  "candidates": total, "sampled": len(mutants), "seed": seed}
        if listing:
            for m in mutants:
                print(m.label)
            return header | {"listed": True}
        mod = spec["files"][0][:-3].replace("/", ".")
        ov.check(mod)
        base = ov.run(tests, timeout=600, extra=("-x", "-q", *FAST))
        if not base.passed:
            raise SystemExit(f"{name}: the test subset fails on the unmutated code:\n{base.tail}")
        limit = timeout or max(30.0, 3 * base.seconds + 20)
        print(f"== {name}: {len(mutants)} of {total} mutants (seed {seed}); tests {' '.join(tests)}; baseline "
              f"{base.seconds:.1f} s, timeout {limit:.0f} s", flush=True)
        rows = []
        t0 = time.perf_counter()
        for k, m in enumerate(mutants, 1):
            try:
                text = apply(ov.source(m.file), m)
            except (SyntaxError, ValueError, TypeError) as e:
                rows.append(asdict(m) | {"status": "invalid", "error": str(e)})
                continue
            ov.replace(m.file, text)
            try:
                r = ov.run(tests, timeout=limit, extra=("-x", "-q", *FAST))
            finally:
                ov.restore(m.file)
            status = "timeout" if r.timed_out else "survived" if r.passed else "error" if r.rc == 5 else "killed"
            src_line = ov.source(m.file).splitlines()[m.line - 1].strip() if m.line else ""
            row = asdict(m) | {"status": status, "seconds": round(r.seconds, 1), "source": src_line}
            why = equivalent_reason(m, src_line) if status == "survived" else None
            if why:
                row.update(status="equivalent", reason=why)
                status = "equivalent"
            rows.append(row)
            print(f"  [{k:3}/{len(mutants)}] {status:8} {m.label}  | {src_line[:90]}", flush=True)
        counts = {s: sum(r["status"] == s for r in rows)
                  for s in ("killed", "timeout", "survived", "equivalent", "error", "invalid")}
        run = len(rows) - counts["invalid"]
        survived = counts["survived"]
        scored = run - counts["equivalent"]
        summary = header | {"run": run, **counts, "killed_total": counts["killed"] + counts["timeout"],
                            "survival_rate": round(survived / scored, 3) if scored else None,
                            "raw_survival_rate": round((survived + counts["equivalent"]) / run, 3) if run else None,
                            "baseline_seconds": round(base.seconds, 1), "timeout_seconds": round(limit),
                            "minutes": round((time.perf_counter() - t0) / 60, 1),
                            "survivors": [r for r in rows if r["status"] == "survived"],
                            "equivalents": [r for r in rows if r["status"] == "equivalent"], "mutants": rows}
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", nargs="+", default=["all"], help=f"one or more of {', '.join(MODULES)}, or all")
    ap.add_argument("--max-mutants", type=int, default=60, help="seeded random sample above this many (per module)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=None, help="per mutant (default: 3 x baseline + 20 s)")
    ap.add_argument("--list", action="store_true", help="list the (sampled) mutants, run nothing")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    names = list(MODULES) if args.module == ["all"] else args.module
    for n in names:
        if n not in MODULES:
            ap.error(f"unknown module {n!r}; valid: {', '.join(MODULES)}, all")
    lines = []
    for n in names:
        s = run_module(n, args.max_mutants, args.seed, args.timeout, args.list)
        if args.list:
            print(f"{n}: {s['sampled']} of {s['candidates']} candidate mutants")
            continue
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"mutation_{n}.json").write_text(json.dumps(s, indent=2) + "\n")
        lines.append(f"{n:15} {s['sampled']:>4}/{s['candidates']:<4} run {s['run']:>3}  killed {s['killed_total']:>3}  "
                     f"equivalent {s['equivalent']:>2}  survived {s['survived']:>3}  "
                     f"({100 * (s['survival_rate'] or 0):.1f} %; raw {100 * (s['raw_survival_rate'] or 0):.1f} %)  "
                     f"{s['minutes']} min")
        for r in s["survivors"]:
            lines.append(f"    survived: {r['file']}:{r['line']} {r['kind']}: {r['detail']}  | {r['source'][:80]}")
    if lines:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
