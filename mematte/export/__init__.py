"""Exporting the models for runtimes without this package's Python code.

``export_onnx(model, path)``: one ONNX file, right at every input size
(:mod:`mematte.export.onnx_graph`). ``atomic_output(path)``: the write-then-rename every
exporter here uses, so that a failed or interrupted export leaves no partial file.

Nothing here imports onnx until an export runs.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; once the block succeeds, the file written
    there replaces ``path`` in one rename. On any failure the temporary file is removed and
    ``path`` is left as it was."""
    path = pathlib.Path(path)
    # The suffix stays last: some writers insist on theirs (.pt2 packages).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # as a plain open() would create it, not mkstemp's 0600
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_onnx(model, path: str | os.PathLike, *, dtype=None, opset: int | None = None, max_tokens=18500) -> pathlib.Path:
    """Write ``model`` (FastMEMatte or FastViTMatte) as an ONNX file at ``path``; see
    :func:`mematte.export.onnx_graph.export_onnx`."""
    from .onnx_graph import export_onnx as export

    return export(model, path, dtype=dtype, opset=opset, max_tokens=max_tokens)


__all__ = ["atomic_output", "export_onnx"]
