"""Project a fine-tuning update onto / away from a reference subspace and write the projected checkpoint.

Modes (``P`` from :mod:`weightspace.reference`, ``D = W_FT - W_A``):

* ``parallel``:   ``W_A + P D``
* ``orthogonal``: ``W_A + (I - P) D``
* ``opposite``:   ``W_A - P D``

Tensors outside the :class:`~weightspace.plan.Selection` (layer range, module types) or not covered by
the reference keep the fine-tuned weights (``unselected="finetuned"``, default) or go back to the aligned
ones (``unselected="aligned"``). The checkpoint is written tensor by tensor in each tensor's original
dtype with the aligned model's config and tokenizer files, so it loads with plain ``transformers``
(``write_dtype="float32"`` writes float32 instead).

Energy kept is measured on what is written: ``W_new`` is computed in float32, rounded to the written dtype,
and ``E_k = sum ||round(W_new) - W_A||^2 / sum ||D||^2`` for every mode (parallel: the kept part ``P D``;
orthogonal: ``(I - P) D``; opposite: ``-P D``). The unrounded value (``||update||^2`` before rounding) is
reported beside it, and a warning goes to the report and stderr when the two differ by more than
``ROUNDING_WARN`` (absolute).

Example::

    >>> cfg = ProjectionConfig(mode="orthogonal", rho=0.25, kind="topk")
    >>> cfg.describe()["mode"]
    'orthogonal'
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from workbench.errors import WorkbenchError
from workbench.io import sha256_file
from workbench.runs import RunFolder
from workbench.subspace import CosineAccumulator

from weightspace.checkpoints import Checkpoint
from weightspace.deltas import DeltaSpec, delta_blocks, load_delta, load_f32, to_stored
from weightspace.grouping import CosineTable, EnergyTable
from weightspace.plan import Selection, TensorInfo, TensorPlan, match_checkpoints
from weightspace.reference import OPERATORS, DeltaReference, DirectionReference, Reference, TensorOperator
from weightspace.spectral import KINDS, check_fraction
from weightspace.writer import TensorEntry, copy_model_files, stream_safetensors

__all__ = ["MODES", "UNSELECTED", "WRITE_DTYPES", "ROUNDING_WARN", "ProjectionConfig", "TensorRecord", "combine",
           "unique_checkpoints", "validate_reference", "projected_tensors", "ProjectionResult", "project_checkpoint",
           "rounding_check"]

MODES = ("parallel", "orthogonal", "opposite")
UNSELECTED = ("finetuned", "aligned")
WRITE_DTYPES = ("stored", "float32")
ROUNDING_WARN = 0.01  # |E_k(written) - E_k(unrounded)| above this is reported as a warning


@dataclass(frozen=True)
class ProjectionConfig:
    """One projection: mode, subspace (rho, kind, operator), which tensors, and the seed.

    ``rho`` is ignored by direction references and by the SafeLoRA operator. ``safelora_threshold``
    (SafeLoRA's layer selection) projects a tensor only when ``cos(D, P D) < threshold``; other tensors keep
    the full update.
    """

    mode: str = "parallel"
    rho: float | None = 0.25
    kind: str = "topk"
    operator: str = "projector"
    safelora_threshold: float | None = None
    selection: Selection | None = None
    unselected: str = "finetuned"
    seed: int = 0
    write_dtype: str = "stored"  # "stored": each tensor's stored dtype; "float32"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise WorkbenchError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.kind not in KINDS:
            raise WorkbenchError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.operator not in OPERATORS:
            raise WorkbenchError(f"operator must be one of {', '.join(OPERATORS)}, got {self.operator!r}")
        if self.unselected not in UNSELECTED:
            raise WorkbenchError(f"unselected must be one of {', '.join(UNSELECTED)}, got {self.unselected!r}")
        if self.write_dtype not in WRITE_DTYPES:
            raise WorkbenchError(f"write_dtype must be one of {', '.join(WRITE_DTYPES)}, got {self.write_dtype!r}")
        if self.rho is not None:
            check_fraction(self.rho, "rho")
        if self.safelora_threshold is not None and self.operator != "safelora":
            raise WorkbenchError("safelora_threshold needs operator='safelora'")

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["selection"] = self.selection.describe() if self.selection else "all"
        return d


@dataclass
class TensorRecord:
    """What happened to one tensor."""

    name: str
    layer: str
    module: str
    shape: str
    selected: bool
    operator: str  # basis / rank1 / safelora / zero / unselected
    k: int
    d: int
    ref_energy: float  # share of the reference update's energy in the subspace
    kept: float  # ||round(W_new) - W_A||^2: the energy of the update actually written (every mode)
    total: float  # ||D||^2
    energy_kept: float  # kept / total
    energy_random: float  # its expectation for a random subspace: k / d (orthogonal: 1 - k / d)
    cos_update_projected: float = float("nan")  # cos(D, P D): SafeLoRA's selection statistic
    applied: bool = True
    kept_unrounded: float = float("nan")  # ||W_new - W_A||^2 before rounding to the written dtype (exact)
    energy_kept_unrounded: float = float("nan")
    n_update: int = 0  # entries the unrounded update changes
    n_update_zeroed: int = 0  # ... of which rounding to the written dtype leaves W_A unchanged


def combine(w_a: torch.Tensor, delta: torch.Tensor, p_delta: torch.Tensor, mode: str) -> torch.Tensor:
    """The projected weight for ``mode`` (modifies and returns ``w_a``).

    Example::

        >>> w, d, p = torch.zeros(2), torch.tensor([1., 2.]), torch.tensor([1., 0.])
        >>> [combine(w.clone(), d, p, m).tolist() for m in MODES]
        [[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]
    """
    if mode == "parallel":
        return w_a.add_(p_delta)
    if mode == "orthogonal":
        return w_a.add_(delta).sub_(p_delta)
    if mode == "opposite":
        return w_a.sub_(p_delta)
    raise WorkbenchError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def unique_checkpoints(*items: tuple[str, Checkpoint | None]) -> dict[str, Checkpoint]:
    """Labelled checkpoints for :func:`match_checkpoints`, the same files counted once.

    Example::

        >>> unique_checkpoints(("aligned", None))
        {}
    """
    out: dict[str, Checkpoint] = {}
    seen: set[tuple] = set()
    for label, ck in items:
        if ck is None:
            continue
        key = tuple(str(f.resolve()) for f in ck.files)
        if key in seen or any(v is ck for v in out.values()):
            continue
        seen.add(key)
        unique, i = label, 2
        while unique in out:  # two different checkpoints under one label: keep both
            unique, i = f"{label}#{i}", i + 1
        out[unique] = ck
    return out


def validate_reference(reference: Reference, plan: TensorPlan, tensors: list[TensorInfo]) -> None:
    """Fail before any work when a direction reference fits no tensor (width vs d_model)."""
    if isinstance(reference, DirectionReference):
        if plan.d_model is not None and plan.d_model != reference.d_model:
            raise WorkbenchError(f"the directions have width {reference.d_model} but the model's d_model is "
                                 f"{plan.d_model}")
        if not any(reference.covers(t) for t in tensors):
            raise WorkbenchError(f"no selected tensor has an {'output' if reference.side == 'left' else 'input'} "
                                 f"width of {reference.d_model}: the directions cover nothing")


def _sq(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2


def _intended(delta: torch.Tensor, p_delta: torch.Tensor, mode: str, applied: bool) -> float:
    """``||W_new - W_A||^2`` of the exact (unrounded) update, in float64."""
    if not applied:
        return _sq(delta)
    if mode == "orthogonal":
        return _sq(delta.double() - p_delta.double())
    return _sq(p_delta)


def rounding_check(written: float, unrounded: float, *, where: str = "") -> str | None:
    """A warning text when ``|written - unrounded| > ROUNDING_WARN`` (energy-kept ratios), else ``None``.

    Example::

        >>> rounding_check(0.030, 0.120) is not None, rounding_check(0.5, 0.505)
        (True, None)
    """
    if written is None or unrounded is None or math.isnan(written) or math.isnan(unrounded):
        return None
    if abs(written - unrounded) <= ROUNDING_WARN:
        return None
    return (f"{where}energy kept of the written weights {written:.4f} differs from the unrounded value "
            f"{unrounded:.4f} by {abs(written - unrounded):.4f} (> {ROUNDING_WARN}): rounding to the stored dtype "
            f"changes the update; consider write_dtype='float32'")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    acc = CosineAccumulator()
    acc.add(a, b)
    return acc.value


def projected_tensors(plan: TensorPlan, tensors: list[TensorInfo], aligned: Checkpoint, finetuned: Checkpoint,
                      reference: Reference, cfg: ProjectionConfig, *,
                      prepared: dict[str, Any] | None = None) -> Iterator[tuple[TensorInfo, torch.Tensor, TensorRecord]]:
    """Yield ``(info, W_new float32 in the analysis layout, record)`` for every tensor of ``tensors``.

    ``prepared`` maps tensor names to the reference's per-tensor state, reused across calls (the sweep passes
    its :class:`weightspace.basis_cache.BasisCache`: each SVD computed once, read from disk one tensor at a
    time); a tensor not in it has its state computed and dropped here.
    """
    spec = DeltaSpec("update", finetuned, aligned)
    selection = cfg.selection
    for info in tensors:
        sel = (selection is None or selection.accepts(info)) and reference.covers(info)
        if not sel:
            w = load_f32(finetuned if cfg.unselected == "finetuned" else aligned, info)
            yield info, w, TensorRecord(info.name, info.role.layer_key, info.module, "x".join(map(str, info.shape)),
                                        False, "unselected", 0, 0, float("nan"), 0.0, 0.0, float("nan"),
                                        float("nan"), applied=False)
            continue
        w_a = load_f32(aligned, info)
        delta = load_delta(spec, info)
        if prepared is not None and info.name in prepared:
            prep = prepared[info.name]
        else:
            prep = reference.prepare(info, operator=cfg.operator, kinds=(cfg.kind,), max_rho=cfg.rho or 1.0)
        op: TensorOperator = reference.operator(info, prep, cfg.rho, cfg.kind, cfg.seed, cfg.operator)
        del prep
        p_delta = op.apply(delta)
        total = _sq(delta)
        cos = _cos(delta, p_delta) if op.kind == "safelora" else float("nan")
        applied = not (cfg.safelora_threshold is not None and not math.isnan(cos) and cos >= cfg.safelora_threshold)
        unrounded = _intended(delta, p_delta, cfg.mode, applied)
        # W_new in float32, rounded to the dtype it is written in; E_k is measured on round(W_new) - W_A
        w = combine(w_a.clone(), delta, p_delta, cfg.mode) if applied else w_a.clone().add_(delta)
        del delta, p_delta
        dt = aligned.dtype(info.name) if cfg.write_dtype == "stored" else torch.float32
        w_r = w.to(dt).to(torch.float32)
        changed = w != w_a
        n_update, n_zeroed = int(changed.sum()), int((changed & (w_r == w_a)).sum())
        del w, changed
        kept = _sq(w_r - w_a)
        expected = op.random_expectation
        if cfg.mode == "orthogonal" and applied and not math.isnan(expected):
            expected = 1.0 - expected
        elif not applied:
            expected = float("nan")
        ratio = (lambda x: x / total if total > 0 else float("nan"))
        rec = TensorRecord(info.name, info.role.layer_key, info.module, "x".join(map(str, info.shape)), True, op.kind,
                           op.k, op.d, op.ref_energy, kept, total, ratio(kept), expected, cos, applied,
                           kept_unrounded=unrounded, energy_kept_unrounded=ratio(unrounded), n_update=n_update,
                           n_update_zeroed=n_zeroed)
        del w_a
        yield info, w_r, rec


@dataclass
class ProjectionResult:
    """Where the projection went and what it kept."""

    path: Path
    model_path: Path
    energy: EnergyTable
    records: list[TensorRecord]
    report: dict[str, Any] = field(default_factory=dict)


def _progress(enabled: bool, desc: str) -> Callable:
    if not enabled:
        return lambda it: it
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, unit="tensor")


def _update_cosines(plan: TensorPlan, tensors: list[TensorInfo], update: DeltaSpec, ref: DeltaSpec) -> CosineTable:
    table = CosineTable()
    for info in tensors:
        acc = CosineAccumulator()
        for a, b in delta_blocks([update, ref], info):
            acc.add(a, b)
        table.add(f"{update.label}~{ref.label}", info.role, acc)
    return table


def project_checkpoint(aligned: Checkpoint, finetuned: Checkpoint, reference: Reference, cfg: ProjectionConfig,
                       out: str | Path, *, overwrite: bool = False, progress: bool = True,
                       run_config: dict[str, Any] | None = None) -> ProjectionResult:
    """Write ``out/model`` (the projected checkpoint) and ``out/report.json`` + CSVs + PNGs.

    Everything that can be checked is checked before the output folder is touched: matching names and
    shapes of all checkpoints, rho, kinds, the reference's width. Memory: a few tensors at a time.

    Example::

        >>> res = project_checkpoint(aligned, ft, DeltaReference(DeltaSpec("alignment", aligned, base)),
        ...                          ProjectionConfig("parallel", rho=0.25), "runs/proj")   # doctest: +SKIP
        >>> res.energy.summary()["energy_kept"]                                             # doctest: +SKIP
        0.41
    """
    t0 = time.perf_counter()
    cks = unique_checkpoints(("aligned", aligned), ("finetuned", finetuned), *reference.checkpoints().items())
    plan = match_checkpoints(cks)
    tensors = plan.tensors
    validate_reference(reference, plan, plan.select(cfg.selection))
    reference.check_kind(cfg.kind)
    if not (aligned.folder / "config.json").exists():
        raise WorkbenchError(f"the aligned checkpoint's folder {aligned.folder} has no config.json: the projected "
                             "checkpoint would not load with transformers")
    if reference.uses_rho and cfg.operator == "projector" and cfg.rho is None:
        raise WorkbenchError("rho is required for a projection on a reference update")
    run = RunFolder(out, config=(run_config or {}) | {"command": "weightspace project", **cfg.describe()},
                    overwrite=overwrite, inputs=[f for c in cks.values() for f in c.files])
    try:
        model_dir = run.sub("model")
        copied = copy_model_files(aligned.folder, model_dir)
        energy = EnergyTable()
        energy_unrounded = EnergyTable()
        records: dict[str, TensorRecord] = {}
        by_name = {t.name: t for t in tensors}

        def out_dtype(name: str) -> torch.dtype:
            return aligned.dtype(name) if cfg.write_dtype == "stored" else torch.float32

        gen = projected_tensors(plan, tensors, aligned, finetuned, reference, cfg)
        pending: dict[str, torch.Tensor] = {}

        def produce(name: str) -> torch.Tensor:
            info = by_name.get(name)
            if info is None:  # a tied head only the aligned checkpoint stores: passed through unchanged
                return aligned.read(name)
            while name not in pending:  # the writer asks in its own order; the generator is in plan order
                i, w, rec = next(gen)
                records[i.name] = rec
                if rec.selected:
                    energy.add(i.role, kept=rec.kept, total=rec.total, expected=rec.energy_random)
                    energy_unrounded.add(i.role, kept=rec.kept_unrounded, total=rec.total, expected=rec.energy_random)
                pending[i.name] = to_stored(w, i, out_dtype(i.name))
            return pending.pop(name)

        # Ask for tensors in plan order (the writer only reorders by item size), so `pending` stays small.
        entries = [TensorEntry(t.name, out_dtype(t.name), t.stored_shape) for t in tensors]
        entries += [TensorEntry(s["name"], aligned.dtype(s["name"]), aligned.shape(s["name"]))
                    for s in plan.skipped if s["name"] in aligned.index]
        stream_safetensors(model_dir / "model.safetensors", entries, produce,
                           metadata={"format": "pt", "producer": "workbench weightspace project", "mode": cfg.mode},
                           progress=_progress(progress, f"project ({cfg.mode})"))
        recs = [records[t.name] for t in tensors if t.name in records]
        rows = energy.all_rows()
        run.write_csv("energy.csv", rows)
        run.write_csv("tensors.csv", [asdict(r) for r in recs])
        cos_rows: list[dict[str, Any]] = []
        if isinstance(reference, DeltaReference):
            sel = [t for t in tensors if records.get(t.name) is not None and records[t.name].selected]
            ct = _update_cosines(plan, sel, DeltaSpec("update", finetuned, aligned), reference.spec)
            cos_rows = ct.all_rows()
            run.write_csv("cosine.csv", cos_rows)
        from weightspace import plots

        run.save_figure("energy_by_layer.png", plots.energy_bars(energy.rows("layer"), "layer",
                                                                 f"energy kept per layer ({cfg.mode}, {cfg.kind})"))
        run.save_figure("energy_by_module.png", plots.energy_bars(energy.rows("module"), "module",
                                                                  f"energy kept per module type ({cfg.mode}, {cfg.kind})"))
        ek_w = energy.summary().get("energy_kept")
        ek_u = energy_unrounded.summary().get("energy_kept")
        warn = rounding_check(ek_w, ek_u)
        warnings = [warn] if warn else []
        if warn:
            print(f"[weightspace project] warning: {warn}", file=sys.stderr)
        n_upd = sum(r.n_update for r in recs if r.selected)
        n_zero = sum(r.n_update_zeroed for r in recs if r.selected)
        report = {
            "config": cfg.describe(),
            "reference": reference.describe(),
            "aligned": aligned.describe(),
            "finetuned": finetuned.describe(),
            "plan": {"n_tensors": len(tensors), "skipped": plan.skipped, "notes": plan.notes, "conv1d": plan.conv1d},
            "n_selected": sum(r.selected for r in recs),
            "n_unselected": sum(not r.selected for r in recs),
            "n_zero_reference": sum(r.operator == "zero" for r in recs),
            "n_not_applied_safelora": sum(r.selected and not r.applied for r in recs),
            "energy_kept": energy.summary(),
            "energy_kept_unrounded": energy_unrounded.summary(),
            "rounding": {"write_dtype": cfg.write_dtype, "energy_kept_written": ek_w, "energy_kept_unrounded": ek_u,
                         "abs_diff": abs(ek_w - ek_u) if ek_w is not None and ek_u is not None else None,
                         "warn_above": ROUNDING_WARN, "n_update_entries": n_upd, "n_update_entries_zeroed": n_zero,
                         "share_update_entries_zeroed": n_zero / n_upd if n_upd else None},
            "warnings": warnings,
            "energy_by_layer": energy.rows("layer"),
            "energy_by_module": energy.rows("module"),
            "cosine_update_reference": next((r for r in cos_rows if r["level"] == "model"), None),
            "model": {"path": str(run.final / "model"), "copied_files": copied,
                      "sha256": sha256_file(model_dir / "model.safetensors")},
            "seconds": round(time.perf_counter() - t0, 2),
        }
        run.write_json("report.json", report)
    except BaseException:
        run.abort()  # the staging folder goes; an earlier result at `out` stays
        raise
    final = run.commit()
    return ProjectionResult(final, final / "model", energy, recs, report)
