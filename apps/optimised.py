"""The optimised ablation of a ``workbench steer optimize`` run, for the app's "optimised ablation" column.

A ``steer optimize`` run folder (and the main job's ``optimize/`` folder, ``workbench main --optimize-trials N``)
holds ``chosen_ablation.safetensors`` (:func:`steering.kernel.save_kernel_ablation`: the attention and MLP
kernels, the embedding weight and the direction, the chosen trial's numbers in its metadata) and
``optimize.json``. The app lists such folders under its runs folder, newest first; reads one only inside it
(:func:`apps.paths.readable_folder` / :func:`apps.paths.readable_file`: the same message whether a path is
missing or outside); refuses one made on another model (its direction's checksum is not the loaded model's);
and applies it at run time through :meth:`steering.kernel.KernelAblation.interventions`, the path of
``workbench steer removal``.

>>> import tempfile, pathlib, torch
>>> from steering.kernel import AblationProfile, Kernel, KernelAblation, save_kernel_ablation
>>> from workbench.vectors import Direction
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> d = Direction(torch.ones(4), layer=1, method="mean_diff", model_id="m", model_checksum="c0ffee", d_model=4)
>>> ka = KernelAblation(AblationProfile(Kernel(1.0, 1.0, 0.0, 1.0), Kernel.constant(0.5)), d)
>>> _ = save_kernel_ablation(root / "opt" / FILE, ka, meta={"trial": 7, "refusal_score": -2.5, "kl": 0.1,
...                                                          "kl_upper": 0.15, "n_layers": 3})
>>> [p.name for p in find_optimised_runs(root)]
['opt']
>>> run = load_optimised_run("opt", root)
>>> run.trial_line()
'trial 7: refusal score -2.500 (harmful validation), KL 0.1000, KL upper bound 0.1500 (harmless validation)'
>>> for part in run.weights_line().split("; "):
...     print(part)
attention [0.00 1.00 0.00] (peak 1.00 at layer 1.0, width 1.0, floor 0.00)
MLP [0.50 0.50 0.50] (peak 0.50 at layer 0.0, width 1.0, floor 0.50)
embedding 0.00
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apps.folders import find_run_folders
from apps.paths import readable_file, readable_folder, resolve_root
from steering.kernel import KernelAblation, load_kernel_ablation, read_kernel_meta
from workbench.errors import WorkbenchError
from workbench.vectors import Direction

FILE = "chosen_ablation.safetensors"
WHAT = "optimised-ablation run"


def create_command(root: str | Path, model: str | None = None) -> str:
    """The command that makes a run the app can offer for ``model``."""
    m = f" --model {model}" if model else ""
    return f"workbench steer optimize{m} --out {resolve_root(root)}/opt"


@dataclass(frozen=True)
class OptimisedRun:
    """A ``steer optimize`` run's choice: the kernel ablation, the chosen trial's numbers (``meta``, stored with
    the kernel) and the study's summary (``optimize.json``; ``{}`` when it is missing)."""

    folder: Path
    file: Path
    ablation: KernelAblation
    meta: dict[str, Any]
    study: dict[str, Any]

    @property
    def direction(self) -> Direction:
        return self.ablation.direction

    @property
    def n_layers(self) -> int | None:
        """The model's layer count, as the run recorded it (None when it did not)."""
        n = self.meta.get("n_layers")
        if n is None:
            n = len((self.study.get("layer_weights") or {}).get("attn_out") or []) or None
        return int(n) if n else None

    def made_on(self, lm: Any) -> bool:
        return self.direction.model_checksum == lm.checksum

    def check_model(self, lm: Any, name: str | None = None, root: str | Path = "runs") -> None:
        """A one-line refusal when the run was made on another model (checksum) or width."""
        d = self.direction
        if d.d_model != lm.d_model:
            raise WorkbenchError(f"the optimised ablation in {self.folder} has width {d.d_model} but model "
                                 f"'{lm.model_id}' has d_model {lm.d_model}; create one on this model with "
                                 f"`{create_command(root, name)}`")
        if not self.made_on(lm):
            raise WorkbenchError(f"the optimised ablation in {self.folder} was made on model '{d.model_id}' (checksum "
                                 f"{d.model_checksum[:12]}) but this is '{lm.model_id}' (checksum {lm.checksum[:12]}); "
                                 f"create one on this model with `{create_command(root, name)}`")

    def trial_line(self) -> str:
        """The chosen trial's numbers: refusal score, mean KL and its upper bound (when recorded)."""
        m, s = self.meta, self.study

        def num(x: Any) -> float:
            try:
                return float(x)
            except (TypeError, ValueError):
                return math.nan

        parts = [f"trial {m['trial']}" if "trial" in m else "chosen trial"]
        nums = []
        score, base = num(m.get("refusal_score")), num(s.get("baseline_harmful_refusal_score"))
        if math.isfinite(score):
            nums.append(f"refusal score {score:.3f}" + (f" (unmodified {base:.3f})" if math.isfinite(base) else "")
                        + " (harmful validation)")
        kl, up = num(m.get("kl")), num(m.get("kl_upper"))
        kls = []
        if math.isfinite(kl):
            kls.append(f"KL {kl:.4f}")
        if math.isfinite(up):
            kls.append(f"KL upper bound {up:.4f}")
        if kls:
            nums.append(", ".join(kls) + " (harmless validation)")
        if m.get("kl_max") is not None:
            ok = m.get("within_kl_max")
            nums.append(f"KL max {num(m['kl_max']):g} ({m.get('kl_rule', 'upper')} rule)"
                        + ("" if ok is None else ": within" if ok else ": NOT within (no trial was)"))
        if s.get("n_trials"):
            nums.append(f"{s['n_trials']} trials")
        return parts[0] + (": " + ", ".join(nums) if nums else "")

    def weights_line(self, n_layers: int | None = None) -> str:
        """Per-layer weights of the attention and MLP outputs, each kernel's shape, the embedding weight."""
        p = self.ablation.profile
        n = n_layers or self.n_layers
        out = []
        for name, k, comp in (("attention", p.attn, "attn_out"), ("MLP", p.mlp, "mlp_out")):
            ws = " ".join(f"{w:.2f}" for w in k.weights(n)) if n else ""
            out.append(f"{name} {'[' + ws + '] ' if ws else ''}(peak {k.peak:.2f} at layer {k.position:.1f}, "
                       f"width {k.width:.1f}, floor {k.floor:.2f})")
        return "; ".join(out) + f"; embedding {p.embed:.2f}"

    def direction_line(self) -> str:
        d = self.direction
        idx = d.meta.get("direction_index") if isinstance(d.meta, dict) else None
        where = f"layer index {float(idx):.2f}" if idx is not None else f"layer {d.layer}"
        return f"direction {d.method} at {where} ({d.component}, {d.position}), model {d.model_id}"

    def summary(self, n_layers: int | None = None) -> str:
        return (f"`{self.folder}`: {self.trial_line()}. Per-layer weights: {self.weights_line(n_layers)}. "
                f"{self.direction_line()}")


def find_optimised_runs(root: str | Path) -> list[Path]:
    """Folders under the runs root holding a readable ``chosen_ablation.safetensors`` inside it, newest first
    (a symlinked file pointing outside the root is not listed)."""
    r = resolve_root(root)
    out = []
    for folder in find_run_folders([r], (FILE,)):
        try:
            readable_file(Path(folder) / FILE, r, WHAT)
        except WorkbenchError:
            continue
        out.append(Path(folder))
    return out


def load_optimised_run(user_path: str | Path | None, root: str | Path) -> OptimisedRun:
    """The run in folder ``user_path`` (or its ``chosen_ablation.safetensors`` given directly), inside the runs
    root ``root`` (relative paths relative to it); anything missing, unreadable or outside gets one message."""
    r = resolve_root(root)
    text = "" if user_path is None else str(user_path).strip()
    if text.endswith(".safetensors"):
        f = readable_file(text, r, WHAT)
        folder = f.parent
    else:
        folder = readable_folder(text, r, WHAT)
        try:
            f = readable_file(folder / FILE, r, WHAT)
        except WorkbenchError:
            raise WorkbenchError(f"{folder} holds no {FILE}: not a 'steer optimize' run folder; create one with "
                                 f"`{create_command(r)}`") from None
    ka = load_kernel_ablation(f)
    try:
        meta = read_kernel_meta(f)
    except (OSError, ValueError):
        meta = {}
    study: dict[str, Any] = {}
    try:
        from workbench.io import read_json

        obj = read_json(readable_file(folder / "optimize.json", r, "optimize.json"))
        study = obj if isinstance(obj, dict) else {}
    except (WorkbenchError, OSError, ValueError):
        pass
    return OptimisedRun(folder, f, ka, meta if isinstance(meta, dict) else {}, study)


def scan_optimised_runs(root: str | Path) -> list[OptimisedRun]:
    """Every readable run of :func:`find_optimised_runs`, loaded (unreadable ones skipped), newest first."""
    out = []
    for folder in find_optimised_runs(root):
        try:
            out.append(load_optimised_run(folder, root))
        except (WorkbenchError, OSError, ValueError):
            continue
    return out


def no_run_message(root: str | Path, name: str | None, others: list[OptimisedRun]) -> str:
    """Why no optimised ablation is offered for model ``name``, and the command that makes one."""
    why = f"no 'steer optimize' run for model '{name}' under the runs folder {resolve_root(root)}"
    if others:
        models = sorted({o.direction.model_id for o in others})
        why += f" ({len(others)} made on other models: {', '.join(models[:4])})"
    return f"{why}; create one with `{create_command(root, name)}`"


__all__ = ["FILE", "OptimisedRun", "create_command", "find_optimised_runs", "load_optimised_run",
           "scan_optimised_runs", "no_run_message"]
