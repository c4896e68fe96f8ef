"""The saved-vector format shared by probes and steering: directions with provenance.

One ``.safetensors`` file holds one or more directions (``dir.0``, ``dir.1``, ...) and, in its
metadata, a JSON list of their records. Loading never executes code.

>>> import torch, tempfile
>>> d = Direction(torch.ones(4), layer=2, method="mean_diff", model_id="m", model_checksum="c", d_model=4)
>>> p = save_directions(tempfile.mkdtemp() + "/v.safetensors", [d])
>>> load_directions(p)[0].layer
2
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.io import _atomic

FORMAT = "workbench-directions/1"


@dataclass
class Direction:
    """A direction in a model's residual stream, with where it came from."""

    vector: torch.Tensor
    layer: int
    method: str
    model_id: str
    model_checksum: str
    d_model: int
    position: str = "last"
    component: str = "resid_post"
    dtype: str = "float32"
    prompt_set_hashes: dict[str, str] = field(default_factory=dict)
    template_hash: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = torch.as_tensor(self.vector).detach().reshape(-1).to(torch.float32).cpu()
        if v.numel() != self.d_model:
            raise WorkbenchError(f"direction has {v.numel()} values but d_model is {self.d_model}")
        if not torch.isfinite(v).all():
            raise WorkbenchError("direction has non-finite values")
        self.vector = v

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    @property
    def unit(self) -> torch.Tensor:
        n = self.vector.norm()
        if n == 0:
            raise WorkbenchError("direction is the zero vector")
        return self.vector / n

    def record(self) -> dict[str, Any]:
        r = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "vector"}
        r["norm"] = self.norm
        return r

    def check_compatible(self, lm: Any, *, force: bool = False) -> None:
        """Refuse to apply to a model of another width (always) or another id/checksum (unless forced)."""
        if lm.d_model != self.d_model:
            raise WorkbenchError(
                f"this direction has size {self.d_model} but model '{lm.model_id}' has d_model {lm.d_model}"
            )
        if not force and lm.checksum != self.model_checksum:
            raise WorkbenchError(
                f"this direction was computed on model '{self.model_id}' (checksum {self.model_checksum[:12]}) "
                f"but is being applied to '{lm.model_id}' (checksum {lm.checksum[:12]}); pass force=True / --force "
                f"if that is intended"
            )
        if not 0 <= self.layer < lm.n_layers and not force:
            raise WorkbenchError(f"direction layer {self.layer} is outside the model's 0..{lm.n_layers - 1}")


def save_directions(path: str | Path, directions: Sequence[Direction]) -> Path:
    """Write directions to one safetensors file (atomic)."""
    from safetensors.torch import save_file

    if not directions:
        raise WorkbenchError("no directions to save")
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    tensors = {f"dir.{i}": d.vector.contiguous() for i, d in enumerate(directions)}
    meta = {"format": FORMAT, "records": json.dumps([d.record() for d in directions])}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def load_directions(path: str | Path) -> list[Direction]:
    """Read directions written by :func:`save_directions`."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.exists():
        raise WorkbenchError(f"no such vector file: {path}")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.safetensors") if p.is_file())
        hint = (f"; it holds {', '.join(found[:6])}{' ...' if len(found) > 6 else ''}" if found else "")
        raise WorkbenchError(f"{path} is a folder, not a direction file: give the .safetensors file written by "
                             f"'steer extract' (directions.safetensors), 'steer select' (selected_direction.safetensors) "
                             f"or 'probe' (probe_directions.safetensors){hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise WorkbenchError(f"{path} is not a workbench direction file (format {meta.get('format')!r})")
            records = json.loads(meta["records"])
            out = []
            for i, r in enumerate(records):
                r = dict(r)
                r.pop("norm", None)
                out.append(Direction(vector=f.get_tensor(f"dir.{i}"), **r))
    except WorkbenchError:
        raise
    except Exception as e:
        raise WorkbenchError(f"could not read {path} as a safetensors direction file ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}); give a file "
                             f"written by 'steer extract', 'steer select' or 'probe'") from e
    if not out:
        raise WorkbenchError(f"{path} holds no directions")
    return out


@dataclass(frozen=True)
class ModelIdentity:
    """What :meth:`Direction.check_compatible` needs of a model, for checks before (or without) loading it.

    >>> ModelIdentity("m", "c", d_model=4, n_layers=2).d_model
    4
    """

    model_id: str
    checksum: str
    d_model: int
    n_layers: int


def pick(directions: Sequence[Direction], layer: int | None = None, method: str | None = None) -> Direction:
    """Select one direction by layer / method, or explain what is available."""
    c = [d for d in directions if (layer is None or d.layer == layer) and (method is None or d.method == method)]
    if not c:
        have = ", ".join(sorted({f"{d.method}@{d.layer}" for d in directions}))
        raise WorkbenchError(f"no direction with layer={layer} method={method}; available: {have}")
    return c[0]


__all__ = ["Direction", "ModelIdentity", "save_directions", "load_directions", "pick", "asdict"]
