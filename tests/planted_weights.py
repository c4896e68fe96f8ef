"""Planted checkpoints with hand-computable projections (shared by test_breakage.py and test_projection_details.py).

A tiny Llama (d_model 64, 2 layers) saved three times: ``base``, ``aligned`` and ``ft``. With r, n, a orthonormal
in the residual space (64), w, w1, w2 orthonormal inputs of ``o_proj`` (64) and u, u1, u2 orthonormal inputs of
``down_proj`` (128)::

    aligned - base      (the reference update):  O0: 2 r w1^T             DN: 2 a u1^T
    finetuned - aligned (the update D):          O0: 3 r w^T + 4 n w2^T   DN: 2 a u^T + 1 r u2^T

Nothing else changes. ``||D_O0||^2 = 25``, ``||D_DN||^2 = 5``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from workbench.tiny import build_tiny

O0 = "model.layers.0.self_attn.o_proj.weight"  # [64, 64]: writes the residual stream
DN = "model.layers.1.mlp.down_proj.weight"  # [64, 128]: writes the residual stream


def orthonormal(d: int, k: int, seed: int) -> list[torch.Tensor]:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return [q[:, i] for i in range(k)]


def planted_vectors() -> dict[str, torch.Tensor]:
    r, n, a = orthonormal(64, 3, seed=11)
    w, w1, w2 = orthonormal(64, 3, seed=12)
    u, u1, u2 = orthonormal(128, 3, seed=13)
    return dict(r=r, n=n, a=a, w=w, w1=w1, w2=w2, u=u, u1=u1, u2=u2)


def planted_updates() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(reference update aligned - base, update D = ft - aligned)`` by tensor name."""
    v = planted_vectors()
    ref = {O0: 2 * torch.outer(v["r"], v["w1"]), DN: 2 * torch.outer(v["a"], v["u1"])}
    upd = {O0: 3 * torch.outer(v["r"], v["w"]) + 4 * torch.outer(v["n"], v["w2"]),
           DN: 2 * torch.outer(v["a"], v["u"]) + torch.outer(v["r"], v["u2"])}
    return ref, upd


def build_planted(root: Path, dtype: torch.dtype = torch.float32, extra: dict[str, dict] | None = None) -> dict:
    """Save base / aligned / ft (and ``extra`` checkpoints ``name -> updates on top of aligned``) under ``root``."""
    ref, upd = planted_updates()
    model, tok = build_tiny("llama", seed=0)
    paths: dict[str, Path] = {}

    def save(name: str) -> None:
        paths[name] = root / name
        model.to(dtype).save_pretrained(str(paths[name]))
        tok.save_pretrained(str(paths[name]))
        model.to(torch.float32)

    def add(updates: dict[str, torch.Tensor], sign: float = 1.0) -> None:
        sd = model.state_dict()
        with torch.no_grad():
            for k, v in updates.items():
                sd[k].add_(sign * v.to(sd[k].dtype))

    save("base")
    add(ref)
    save("aligned")
    for name, ups in (extra or {}).items():
        add(ups)
        save(name)
        add(ups, -1.0)
    add(upd)
    save("ft")
    return dict(paths=paths, ref=ref, upd=upd, **planted_vectors())


def weights(planted: dict, name: str) -> dict[str, torch.Tensor]:
    """A saved checkpoint's tensors in float64."""
    return {k: v.double() for k, v in load_file(str(planted["paths"][name] / "model.safetensors")).items()}
