"""Faster CPU kernels for a block of inference forwards: oneDNN for float32 linear layers, sdpa attention.

Two switches, both exact to float rounding (a different summation order, ~1e-6 relative per matmul):

- **linear = "onednn"**: every float32 ``torch.nn.functional.linear`` on the CPU without autograd runs through
  oneDNN (``torch.ops.mkldnn._linear_pointwise``) instead of the BLAS PyTorch links (MKL). On this project's
  AMD EPYC machines MKL's sgemm reaches a fraction of the cores' AVX-512 throughput; oneDNN runs the same
  float32 matmuls of the default model 1.8-3.2x faster at every batch size, a whole decoding step 2.2x and a
  prefill 1.9-2.0x, with the same greedy tokens (``benchmarks/kernels.py``, ``benchmarks/results/kernels.json``).
  It is a
  :class:`torch.overrides.TorchFunctionMode`, so it applies to the current thread only, to no tensor that
  needs gradients, and to nothing outside the block.
- **attention = "sdpa"**: the model's attention implementation, switched on entry and restored on exit.
  Models load with eager attention so that the hooking backends agree; the switch is a change of the shared
  model, so :class:`KernelsHeld` makes it only while it holds the model's lock (every other forward of a
  shared model, e.g. the app's other users, runs under the same lock and so never sees it).

>>> import torch
>>> lin = torch.nn.Linear(8, 3)
>>> x = torch.randn(2, 8)
>>> with OneDNNLinear() as mode, torch.no_grad():
...     y = lin(x)
>>> bool(torch.allclose(y, lin(x), atol=1e-5)), mode.routed == (1 if onednn_linear_available() else 0)
(True, True)
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["LINEAR", "ATTENTION", "OneDNNLinear", "onednn_linear_available", "KernelsHeld"]

#: the linear-layer kernels a caller may ask for: the default BLAS, or oneDNN
LINEAR = ("onednn", "default")
#: the attention implementations a caller may ask for
ATTENTION = ("sdpa", "eager")


@lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """Whether this PyTorch has oneDNN's linear for float32 CPU tensors (and it agrees with the default one)."""
    try:
        if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            return False
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(3, 5, 16, generator=g), torch.randn(7, 16, generator=g), torch.randn(7, generator=g)
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return bool(torch.allclose(y, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4))
    except Exception:  # noqa: BLE001 - any failure means: not available here
        return False


class OneDNNLinear(TorchFunctionMode):
    """Routes float32 CPU linear layers without autograd to oneDNN (see the module docstring); everything
    else runs unchanged. ``routed`` counts the calls it took."""

    def __init__(self) -> None:
        super().__init__()
        self.routed = 0
        self.on = onednn_linear_available()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.on and func is torch.nn.functional.linear and not torch.is_grad_enabled():
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype == torch.float32
                    and w.dtype == torch.float32 and w.dim() == 2 and w.is_contiguous() and x.dim() >= 2
                    and (b is None or (b.dtype == torch.float32 and b.dim() == 1))):
                self.routed += 1
                return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return func(*args, **kwargs)


class KernelsHeld:
    """A context manager that holds ``lock`` (any context manager, e.g. the app's per-model lock) and, while
    it is held, runs ``model`` with the attention implementation ``attention`` (None: unchanged) and its
    float32 CPU linear layers on oneDNN when ``linear == "onednn"`` (see the module docstring), restoring the
    model's own attention afterwards. Where the model cannot switch attention it runs unchanged, and where
    oneDNN is missing the linear layers run as usual: :attr:`attention` and :meth:`linear_used` say what ran.

    >>> from contextlib import nullcontext
    >>> from workbench.tiny import build_tiny
    >>> model, _ = build_tiny("llama", n_layers=1)
    >>> held = KernelsHeld(nullcontext(), model, "sdpa", "onednn")
    >>> with held, torch.no_grad():
    ...     inside = model.config._attn_implementation
    ...     _ = model(input_ids=torch.tensor([[1, 2, 3]]))
    >>> inside, model.config._attn_implementation, held.linear_used() == ("onednn" if onednn_linear_available() else "default")
    ('sdpa', 'eager', True)
    """

    def __init__(self, lock: Any, model: Any, attention: str | None = None, linear: str = "default") -> None:
        self.lock, self.model, self.linear = lock, model, linear
        self.own = getattr(model.config, "_attn_implementation", None)
        self.attention = attention if attention is not None else self.own
        self.routed = 0
        self._mode: OneDNNLinear | None = None

    def linear_used(self) -> str:
        """``"onednn"`` once a linear layer ran on oneDNN inside this context, else ``"default"``."""
        return "onednn" if self.routed else "default"

    def __enter__(self) -> "KernelsHeld":
        self.lock.__enter__()
        try:
            if self.attention != self.own:
                try:  # switch only while the lock is held, so no other caller of the model sees it
                    self.model.set_attn_implementation(self.attention)
                except Exception:  # noqa: BLE001 - this model cannot switch: it runs unchanged from now on
                    self.attention = self.own
                    if getattr(self.model.config, "_attn_implementation", None) != self.own:
                        self.model.set_attn_implementation(self.own)
            if self.linear == "onednn":
                self._mode = OneDNNLinear()
                self._mode.__enter__()
        except BaseException:
            self._restore()
            self.lock.__exit__(None, None, None)
            raise
        return self

    def _restore(self) -> None:
        try:
            if self._mode is not None:
                mode, self._mode = self._mode, None
                self.routed += mode.routed
                mode.__exit__(None, None, None)
        finally:
            if getattr(self.model.config, "_attn_implementation", None) != self.own:
                self.model.set_attn_implementation(self.own)

    def __exit__(self, *exc: Any) -> bool:
        try:
            self._restore()
        finally:
            self.lock.__exit__(*exc)
        return False
