"""Hooking backends, selectable by name.

>>> from workbench.backends import BACKENDS
>>> BACKENDS
('native', 'transformer_lens', 'nnsight')
"""

from __future__ import annotations

from workbench.backends.base import Backend, RunOutput
from workbench.errors import WorkbenchError
from workbench.loading import LoadedModel

BACKENDS = ("native", "transformer_lens", "nnsight")


def get_backend(name: str, lm: LoadedModel) -> Backend:
    """Build a backend by name over a loaded model."""
    if name == "native":
        from workbench.backends.native import NativeBackend

        return NativeBackend(lm)
    if name in ("transformer_lens", "tl"):
        from workbench.backends.tlens import TransformerLensBackend

        return TransformerLensBackend(lm)
    if name == "nnsight":
        from workbench.backends.nnsight_backend import NNsightBackend

        return NNsightBackend(lm)
    raise WorkbenchError(f"unknown backend '{name}'. Valid: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "RunOutput", "get_backend"]
