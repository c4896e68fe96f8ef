"""Run folders: every command writes its config, versions, model checksum and all outputs here.

>>> import tempfile
>>> run = RunFolder(tempfile.mkdtemp() + "/run", config={"seed": 0})
>>> run.write_json("result.json", {"x": 1})
>>> sorted(p.name for p in run.path.iterdir())
['config.json', 'environment.json', 'result.json']
"""

from __future__ import annotations

import datetime as _dt
import platform
import random
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.io import save_figure, write_csv, write_json, write_text

_PACKAGES = ("torch", "transformers", "safetensors", "numpy", "scipy", "scikit-learn", "transformer-lens",
             "nnsight", "gradio", "peft", "safety-subspace-workbench")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def environment() -> dict[str, Any]:
    vers: dict[str, str | None] = {}
    for p in _PACKAGES:
        try:
            vers[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            vers[p] = None
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        pass
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": vers,
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


class RunFolder:
    """A folder for one run's artefacts. Refuses an existing non-empty folder unless ``overwrite``."""

    def __init__(self, path: str | Path, *, config: dict[str, Any] | None = None, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise WorkbenchError(
                    f"output folder {self.path} already exists and is not empty; choose another --out or pass --overwrite"
                )
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config = {k: v for k, v in (config or {}).items() if not callable(v)}
        write_json(self.path / "config.json", self.config)
        write_json(self.path / "environment.json", environment())

    def sub(self, name: str) -> Path:
        p = self.path / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, name: str, obj: Any) -> Path:
        write_json(self.path / name, obj)
        return self.path / name

    def write_csv(self, name: str, rows: list[dict[str, Any]]) -> Path:
        write_csv(self.path / name, rows)
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        write_text(self.path / name, text)
        return self.path / name

    def save_figure(self, name: str, fig: Any) -> Path:
        save_figure(fig, self.path / name)
        return self.path / name

    def record_model(self, lm: Any) -> None:
        self.write_json("model.json", lm.describe())
