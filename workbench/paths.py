"""Where the workbench keeps its caches.

The root is ``$WORKBENCH_CACHE`` when set, else ``$XDG_CACHE_HOME/safety-workbench`` or
``~/.cache/safety-workbench``.

>>> from workbench.paths import cache_root
>>> cache_root().name in {"safety-workbench"} or True
True
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Return (and create) the workbench cache folder."""
    env = os.environ.get("WORKBENCH_CACHE")
    if env:
        root = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "safety-workbench"
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_cache() -> Path:
    """Folder holding the safetensors conversions of zoo models."""
    p = cache_root() / "models"
    p.mkdir(parents=True, exist_ok=True)
    return p


def activations_cache() -> Path:
    """Folder holding the content-addressed activation cache."""
    p = cache_root() / "activations"
    p.mkdir(parents=True, exist_ok=True)
    return p
