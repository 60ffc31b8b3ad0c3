"""The write-then-rename every exporter uses, so that a failed or interrupted export leaves
no partial file."""

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
