"""Exporting the models for runtimes without this package's Python code.

``export_onnx(model, path)``: one ONNX file, right at every input size
(:mod:`mematte.export.onnx_graph`). ``atomic_output(path)``: the write-then-rename every
exporter here uses, so that a failed or interrupted export leaves no partial file.

Nothing here imports onnx until an export runs.
"""

from __future__ import annotations

import os
import pathlib

from .atomic import atomic_output


def export_onnx(
    model, path: str | os.PathLike, *, dtype=None, opset: int | None = None, max_tokens=18500
) -> pathlib.Path:
    """Write ``model`` (FastMEMatte or FastViTMatte) as an ONNX file at ``path``; see
    :func:`mematte.export.onnx_graph.export_onnx`."""
    from .onnx_graph import export_onnx as export

    return export(model, path, dtype=dtype, opset=opset, max_tokens=max_tokens)


__all__ = ["atomic_output", "export_onnx"]
