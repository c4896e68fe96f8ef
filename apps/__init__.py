"""The workbench's Gradio app: steered generations and harmful / utility scores side by side.

``workbench app`` (or ``python -m apps``) starts it. The pieces:

- :mod:`apps.steer`: one column (streamed greedy generation under an intervention, its scores and
  per-token projections) as plain functions, testable without Gradio;
- :mod:`apps.state`: the model registry, direction and orthogonalised-model caches, and the per-model
  lock every forward pass takes;
- :mod:`apps.folders`: reading probe / weight-space run folders (plots and tables);
- the batteries behind "score this setting" live in :mod:`steering.battery` (shared with ``workbench steer
  battery``), the code tasks in :mod:`workbench.codetasks`;
- :mod:`apps.paths`: every server path the app accepts is confined to its runs folder;
- :mod:`apps.ui`: the Gradio Blocks (``build_app``);
- :mod:`apps.cli`: the ``app`` subcommand (a non-loopback ``--host`` needs a login).

Importing this package does not import Gradio.
"""

from __future__ import annotations

from typing import Any


def build_app(*args: Any, **kwargs: Any) -> Any:
    """See :func:`apps.ui.build_app` (imported lazily: Gradio is an optional dependency)."""
    from apps.ui import build_app as _build

    return _build(*args, **kwargs)


__all__ = ["build_app"]
