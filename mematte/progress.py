"""Progress inside one forward pass, for callers that show it (the command line does).

    with mematte.progress.reporting(lambda stage, done, total: ...):
        model.predict(image, trimap)

The callback gets the stage (``"backbone"``: blocks, ``"decoder"``: batches of tiles) and
how many of its steps are done out of how many. Nothing is reported outside ``reporting``,
and the model never prints.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Callback = Callable[[str, int, int], None]

_callback: contextvars.ContextVar[Callback | None] = contextvars.ContextVar("mematte_progress", default=None)


@contextmanager
def reporting(callback: Callback | None) -> Iterator[None]:
    token = _callback.set(callback)
    try:
        yield
    finally:
        _callback.reset(token)


def report(stage: str, done: int, total: int) -> None:
    callback = _callback.get()
    if callback is not None:
        callback(stage, done, total)


class BlockHook:
    """A forward hook that reports block ``index`` (1-based) of ``total`` as done."""

    def __init__(self, index: int, total: int):
        self.index, self.total = index, total

    def __call__(self, module, args, output) -> None:
        report("backbone", self.index, self.total)
