"""Read safetensors checkpoints one tensor at a time.

A :class:`Checkpoint` indexes the tensors of a checkpoint from the file headers only (names, shapes,
dtypes). Reading a tensor opens its file, copies that one tensor out and closes the file again, so no
memory map stays open and the process never holds more than the tensors it is working on (a long-lived
``safe_open`` handle would keep every page it ever touched resident).

Accepted sources:

* a zoo key (``qwen2.5-coder-0.5b-instruct``): its converted cache folder (``ensure_zoo_cache``);
* a Hugging Face folder with ``model.safetensors``, sharded ``*.safetensors`` plus an index
  (``model.safetensors.index.json``), or shards without an index;
* a single ``.safetensors`` file, or a ``*.safetensors.index.json`` file.

Example::

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> save_file({"w": torch.ones(2, 3)}, d + "/model.safetensors")
    >>> ck = open_checkpoint(d)
    >>> ck.names, ck.shape("w"), ck.read("w").sum().item()
    (['w'], (2, 3), 6.0)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError

__all__ = ["TensorMeta", "Checkpoint", "open_checkpoint", "WEIGHT_SUFFIXES", "SAFETENSORS_DTYPES"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")

# safetensors dtype code -> torch dtype
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _name)


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives and what it looks like, read from the file header.

    Example::

        >>> TensorMeta("w", (2, 3), "BF16", Path("m.safetensors")).torch_dtype
        torch.bfloat16
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, F16, ...
    file: Path

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in SAFETENSORS_DTYPES:
            raise WorkbenchError(f"tensor {self.name} has unsupported dtype {self.dtype}")
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()


def _read_header(file: Path) -> dict[str, TensorMeta]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = TensorMeta(name, tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype()), file)
    except Exception as e:  # corrupt / not a safetensors file
        raise WorkbenchError(f"could not read the safetensors header of {file}: {e}") from e
    return out


class Checkpoint:
    """A read-only, tensor-by-tensor view of a safetensors checkpoint.

    Attributes:
        label: a short name used in messages and reports.
        source: what the user gave (zoo key or path).
        folder: the folder holding the checkpoint (config, tokenizer files).
        files: the safetensors files, sorted.
        config: the parsed ``config.json`` of the folder, or ``{}`` when there is none.

    Example::

        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file({"a": torch.zeros(4), "b": torch.ones(2, 2)}, d + "/x.safetensors")
        >>> ck = Checkpoint(d + "/x.safetensors", label="demo")
        >>> ck.label, ck.names, ck.read_rows("b", 1, 2).tolist()
        ('demo', ['a', 'b'], [[1.0, 1.0]])
    """

    def __init__(self, source: str | Path, *, label: str | None = None) -> None:
        self.source = str(source)
        path = _resolve(self.source)
        self.files, self.folder = _weight_files(path)
        self.index: dict[str, TensorMeta] = {}
        dupes: list[str] = []
        for file in self.files:
            for name, meta in _read_header(file).items():
                if name in self.index:
                    dupes.append(f"{name} (in {self.index[name].file.name} and {file.name})")
                self.index[name] = meta
        if dupes:
            raise WorkbenchError(
                f"checkpoint {self.source}: tensors stored in more than one shard (add an index file?): "
                + "; ".join(dupes[:10]) + (f" ... and {len(dupes) - 10} more" if len(dupes) > 10 else "")
            )
        if not self.index:
            raise WorkbenchError(f"checkpoint {self.source} holds no tensors")
        cfg = self.folder / "config.json"
        self.config: dict[str, Any] = json.loads(cfg.read_text(encoding="utf-8")) if cfg.exists() else {}
        self.label = label or (self.source if not Path(self.source).exists() else Path(self.source).name)

    # -- header information -------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self.index)

    def meta(self, name: str) -> TensorMeta:
        if name not in self.index:
            raise WorkbenchError(f"checkpoint '{self.label}' has no tensor named {name!r}")
        return self.index[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.meta(name).torch_dtype

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def tie_word_embeddings(self) -> bool | None:
        v = self.config.get("tie_word_embeddings")
        if v is None and isinstance(self.config.get("text_config"), dict):
            v = self.config["text_config"].get("tie_word_embeddings")
        return v

    @property
    def d_model(self) -> int | None:
        """Residual-stream width from the config (``hidden_size``, ``n_embd`` or ``d_model``)."""
        cfgs = [self.config] + ([self.config["text_config"]] if isinstance(self.config.get("text_config"), dict) else [])
        for c in cfgs:
            for key in ("hidden_size", "n_embd", "d_model"):
                if isinstance(c.get(key), int):
                    return int(c[key])
        return None

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.index.values())

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (for run folders)."""
        dtypes: dict[str, int] = {}
        for m in self.index.values():
            dtypes[m.dtype] = dtypes.get(m.dtype, 0) + 1
        return {"label": self.label, "source": self.source, "folder": str(self.folder),
                "files": [f.name for f in self.files], "n_tensors": len(self.index), "bytes": self.nbytes,
                "dtypes": dtypes, "model_type": self.model_type}

    # -- reading -------------------------------------------------------------------------------------

    def read(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype (the file is opened and closed for this call)."""
        from safetensors import safe_open

        meta = self.meta(name)
        with safe_open(str(meta.file), framework="pt") as f:
            return f.get_tensor(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of one tensor, reading only those bytes."""
        from safetensors import safe_open

        meta = self.meta(name)
        if len(meta.shape) == 0:
            return self.read(name)
        with safe_open(str(meta.file), framework="pt") as f:
            return f.get_slice(name)[start:stop]

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, {len(self.index)} tensors, {len(self.files)} file(s))"


def _resolve(source: str) -> Path:
    """A zoo key becomes its cache folder; anything else must be an existing path."""
    p = Path(source).expanduser()
    if p.exists():
        return p
    from workbench.zoo import ZOO

    if source in ZOO:
        from workbench.loading import ensure_zoo_cache

        return ensure_zoo_cache(source)
    raise WorkbenchError(
        f"checkpoint '{source}' not found: give a zoo key ({', '.join(ZOO)}), a Hugging Face folder with "
        f"safetensors weights, a .safetensors file or a .safetensors.index.json file"
    )


def _index_files(index_path: Path) -> list[Path]:
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WorkbenchError(f"{index_path} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
    files = sorted({index_path.parent / f for f in weight_map.values()})
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise WorkbenchError(f"{index_path} names shard(s) that do not exist: {', '.join(missing)}")
    return files


def _weight_files(path: Path) -> tuple[list[Path], Path]:
    """The safetensors files of a path and the folder holding its config."""
    if path.is_file():
        if path.name.endswith(".safetensors.index.json"):
            return _index_files(path), path.parent
        if path.suffix == ".safetensors":
            return [path], path.parent
        raise WorkbenchError(f"{path} is neither a .safetensors file nor a .safetensors.index.json file")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise WorkbenchError(f"{path} has several safetensors index files: {', '.join(p.name for p in indexes)}")
    if indexes:
        return _index_files(indexes[0]), path
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file() and not p.name.startswith("."))
    if not files:
        other = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        hint = (f" (found {', '.join(other)}: only safetensors can be read tensor by tensor; re-save with "
                f"`model.save_pretrained(dir)`)" if other else "")
        raise WorkbenchError(f"no .safetensors weights in {path}{hint}")
    return files, path


def open_checkpoint(source: str | Path | Checkpoint, label: str | None = None) -> Checkpoint:
    """A :class:`Checkpoint` for a zoo key, folder, file or index (an existing one is passed through).

    Example::

        >>> open_checkpoint("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        workbench.errors.WorkbenchError: checkpoint '/no/such/folder' not found: ...
    """
    if isinstance(source, Checkpoint):
        if label:
            source.label = label
        return source
    return Checkpoint(source, label=label)
