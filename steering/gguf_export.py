"""Export directions as a llama.cpp control vector (GGUF, architecture ``controlvector``).

llama.cpp reads tensors ``direction.{il}`` (one per layer): ``direction.il`` is added to the output of
block ``il`` (0-based, ``l_out``), i.e. our ``resid_post`` of layer ``il`` == ``resid_pre`` of layer
``il + 1``. ``il = 0`` is rejected by llama.cpp (block 0's output is never steered). The file also
carries ``controlvector.model_hint`` and ``controlvector.layer_count``.

>>> import torch, tempfile
>>> from workbench.vectors import Direction
>>> d = Direction(torch.ones(8), layer=2, method="mean_diff", model_id="m", model_checksum="c", d_model=8)
>>> p = export_control_vector([d], tempfile.mkdtemp() + "/cv.gguf", model_hint="llama")
>>> p.suffix
'.gguf'
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from workbench.errors import WorkbenchError
from workbench.io import _atomic
from workbench.vectors import Direction


def export_control_vector(directions: Sequence[Direction], path: str | Path, *, model_hint: str,
                          alpha: float = 1.0) -> Path:
    """Write one vector per layer (resid_post of layer l -> ``direction.l``; resid_pre of layer l is the
    output of block l-1 -> ``direction.{l-1}``)."""
    import gguf

    if not directions:
        raise WorkbenchError("no directions to export")
    per_layer: dict[int, np.ndarray] = {}
    for d in directions:
        il = d.layer if d.component == "resid_post" else d.layer - 1  # resid_pre of l == output of block l-1
        if il < 1:
            raise WorkbenchError(f"a {d.component} direction at layer {d.layer} maps to llama.cpp block output {il}; "
                                 "llama.cpp only applies control vectors to the outputs of blocks 1 and above")
        if il in per_layer:
            raise WorkbenchError(f"two directions map to llama.cpp layer {il}; export one per layer")
        per_layer[il] = (d.vector.numpy() * alpha).astype(np.float32)

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, "controlvector")
        w.add_string("controlvector.model_hint", model_hint)
        w.add_uint32("controlvector.layer_count", len(per_layer))
        for il, v in sorted(per_layer.items()):
            w.add_tensor(f"direction.{il}", v)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    path = Path(path)
    _atomic(path, write)
    return path
