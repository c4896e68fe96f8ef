"""Positive and negative controls for the study's weight-space verdicts: planted checkpoints through the chain.

A negative finding on a real model ("safety is not separable") means nothing unless the same pipeline says
"distinct" when the updates ARE separable. :func:`planted_controls` writes two tiny chain folders whose four
fine-tunes (``ft-safety``, ``ft-useful``, ``ft-harmful``, ``ft-contaminated``) are a tiny llama (built in code,
d_model 64) plus planted low-rank updates on four matrices, then runs the chain's own overlap phase
(:func:`weightspace.chain._run_overlap`) and its Exp 3 verdict (:func:`weightspace.chain_report._exp3_verdict`)
on them, exactly as ``workbench weightspace chain`` does on a real model:

* ``planted_distinct``: the safety update's output space is span(F[:, 0:4]); the useful and harmful updates'
  is span(F[:, 8:12]) (orthogonal to it). Expected: safety~harmful "distinct" (MSO 0), Exp 3 "does not hold".
* ``planted_entangled``: all three updates write into span(F[:, 0:4]). Expected: safety~harmful
  "entangled" (MSO 1, 16x the random baseline 4/64), Exp 3 "holds".

The contaminated update is useful + 0.25 x harmful in both. Each planted update has singular values 4, 3, 2, 1
per matrix, plus dense Gaussian noise (``noise`` x N(0, 1) per entry, default 0.03, a different draw for every
update: real fine-tuning updates are full rank), so the measured MSO is close to, not exactly, 0 or 1.

    workbench weightspace controls --out runs/controls

Example::

    >>> import tempfile
    >>> c = planted_controls(tempfile.mkdtemp())
    >>> c["planted_distinct"], c["planted_entangled"]
    ('distinct', 'entangled')
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

__all__ = ["PLANTED_MATRICES", "CASES", "planted_controls", "cmd_controls", "add_arguments"]

# the planted matrices of the tiny llama (workbench.tiny.build_tiny, d_model 64) and their input sizes
PLANTED_MATRICES = {"model.layers.0.self_attn.q_proj.weight": 64, "model.layers.0.self_attn.o_proj.weight": 64,
                    "model.layers.1.self_attn.q_proj.weight": 64, "model.layers.1.mlp.down_proj.weight": 128}
CASES = {"planted_distinct": (slice(8, 12), "distinct"), "planted_entangled": (slice(0, 4), "entangled")}
_SINGULAR = (4.0, 3.0, 2.0, 1.0)


def _orth(d: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _update(left: torch.Tensor, seed: int, noise: float = 0.0) -> dict[str, torch.Tensor]:
    """Rank-4 update per planted matrix, ``sum_j s_j left_j R_j^T`` (R a random orthonormal input basis), plus
    ``noise`` x N(0, 1) per entry."""
    out = {}
    for i, (name, n) in enumerate(PLANTED_MATRICES.items()):
        r = _orth(n, left.shape[1], seed + i)
        m = sum(s * torch.outer(left[:, j], r[:, j]) for j, s in enumerate(_SINGULAR))
        g = torch.Generator().manual_seed(10_000 + seed + i)
        out[name] = m + noise * torch.randn(m.shape, generator=g, dtype=torch.float64)
    return out


def _write(path: Path, *updates: dict[str, torch.Tensor]) -> Path:
    from workbench.tiny import build_tiny

    model, tok = build_tiny("llama", seed=0)
    sd = model.state_dict()
    with torch.no_grad():
        for upd in updates:
            for name, d in upd.items():
                sd[name].add_(d.to(sd[name].dtype))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def planted_controls(root: str | Path, *, seed: int = 0, eta: float = 0.5, noise: float = 0.03) -> dict[str, Any]:
    """Build both planted chains under ``root`` and return their verdicts.

    Returns ``{"planted_distinct": label, "planted_entangled": label, "expected": {...}, "passed": bool,
    "details": {case: {"separability": ..., "exp3": ..., "mso": {pair: mean MSO}}}}`` where ``label`` is the
    safety~harmful separability verdict ("distinct" / "entangled" / "inconclusive") measured by the chain.
    """
    from weightspace.chain import ChainConfig, _run_overlap
    from weightspace.chain_report import _exp3_verdict
    root = Path(root)
    f = _orth(64, 64, seed)
    cfg = ChainConfig(etas=(eta, 0.99) if eta != 0.99 else (eta,), plot_eta=eta, seed=seed, progress=False,
                      keep_angles=False)
    res: dict[str, Any] = {"expected": {c: want for c, (_, want) in CASES.items()}, "details": {}, "eta": eta,
                           "noise": noise, "seed": seed}
    for case, (cols, _want) in CASES.items():
        out = root / case
        aligned = _write(out / "aligned")
        safety = _update(f[:, 0:4], 10 + seed, noise)
        useful, harmful = _update(f[:, cols], 20 + seed, noise), _update(f[:, cols], 30 + seed, noise)
        _write(out / "ft-safety", safety)
        _write(out / "ft-useful", useful)
        _write(out / "ft-harmful", harmful)
        _write(out / "ft-contaminated", useful, {k: 0.25 * v for k, v in harmful.items()})
        _run_overlap(cfg, out, str(aligned), {"control": case})
        exp3 = _exp3_verdict(cfg, out)
        assert exp3 is not None  # the overlap phase always writes overlap_tensors.csv
        sh = exp3["pairs"]["safety~harmful"]
        res[case] = sh["verdict"]
        res["details"][case] = {"separability_safety_harmful": sh, "exp3": {k: exp3[k] for k in
                                                                           ("verdict", "value", "ci", "rule")},
                                "mso_mean": {p: v["mso_mean"] for p, v in exp3["pairs"].items()}}
    res["passed"] = all(res[c] == want for c, (_, want) in CASES.items()) and \
        res["details"]["planted_distinct"]["exp3"]["verdict"] == "does not hold" and \
        res["details"]["planted_entangled"]["exp3"]["verdict"] == "holds"
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for the two planted chains and controls.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", type=float, default=0.5, help="energy level of the bases (the chain's --plot-eta)")
    p.add_argument("--noise", type=float, default=0.03, help="per-entry std of the dense noise on every update")
    p.add_argument("--overwrite", action="store_true", help="replace an existing controls folder")


def cmd_controls(args: argparse.Namespace) -> int:
    """``workbench weightspace controls``: run both planted controls, write ``controls.json``, print verdicts."""
    from workbench.errors import WorkbenchError
    from workbench.io import write_json
    from workbench.runs import RunFolder

    if not 0.0 < args.eta <= 0.99:
        raise WorkbenchError(f"--eta must be in (0, 0.99], got {args.eta}")
    if not 0.0 <= args.noise < 1.0:
        raise WorkbenchError(f"--noise must be in [0, 1), got {args.noise}")
    with RunFolder(args.out, config={"command": "weightspace controls", "seed": args.seed, "eta": args.eta,
                                     "noise": args.noise}, overwrite=args.overwrite) as run:
        res = planted_controls(run.path, seed=args.seed, eta=args.eta, noise=args.noise)
        write_json(run.path / "controls.json", res)
    for case, (_, want) in CASES.items():
        print(f"{case}: safety~harmful {res[case]} (expected {want}); Exp 3 "
              f"{res['details'][case]['exp3']['verdict']}")
    print("controls " + ("passed" if res["passed"] else "FAILED"))
    return 0 if res["passed"] else 1
