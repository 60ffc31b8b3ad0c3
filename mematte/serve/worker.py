"""The model's one thread: jobs wait in a bounded queue and run one at a time (batching
same-size images does not pay on a CPU, see docs/serving.md); a job whose client gave up
or ran out of time is dropped, before it starts or between two steps of its forward."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import api, progress


class QueueFull(Exception):
    """No room in the queue; ``retry_after`` is a guess of the seconds until there is."""

    def __init__(self, retry_after: int):
        super().__init__("the server is busy: the queue is full")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The job was dropped (timeout or disconnect) before it finished."""


@dataclass
class Job:
    """One request's work: files already on disk in ``folder``, and what to return."""

    folder: Path
    image: Path
    trimap: Path | None
    mask: Path | None
    background: Path | None
    band: int
    output: str           # alpha | rgba | composite
    bits: int
    max_tokens: int | None
    dropped: threading.Event = field(default_factory=threading.Event)

    def check(self, *_) -> None:
        if self.dropped.is_set():
            raise Cancelled


class Matter:
    """Runs :class:`Job` s on one thread with at most ``queue`` of them waiting."""

    def __init__(self, model, *, queue: int, tile: bool, max_pixels: int | None):
        self.model, self.queue, self.tile, self.max_pixels = model, queue, tile, max_pixels
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mematte-model")
        self.pending = 0          # waiting or running; touched only on the event loop
        self.recent_seconds = 1.0  # duration of the last job, for Retry-After

    @property
    def waiting(self) -> int:
        return max(self.pending - 1, 0)

    async def run(self, job: Job, *, deadline: float, gone) -> bytes:
        """The PNG bytes of ``job``; raises QueueFull, Cancelled (``gone()`` became true),
        TimeoutError (past ``deadline``, monotonic seconds), or what matting raised."""
        if self.pending > self.queue:
            raise QueueFull(max(1, round(self.recent_seconds * self.pending)))
        self.pending += 1
        future = asyncio.get_running_loop().run_in_executor(self.executor, self._matte, job)
        try:
            while not future.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                await asyncio.wait({future}, timeout=min(left, 0.25))
                if not future.done() and await gone():
                    raise Cancelled
            return future.result()
        except BaseException:
            job.dropped.set()   # stops it between two steps if it already runs
            future.cancel()     # removes it from the queue if it does not
            raise
        finally:
            self.pending -= 1

    def _matte(self, job: Job) -> bytes:
        job.check()
        start = time.monotonic()
        model = self.model
        saved = getattr(model, "max_tokens", None)
        try:
            if job.max_tokens is not None:
                model.max_tokens = job.max_tokens
            with progress.reporting(job.check):
                result = api.predict_file(
                    job.image, job.trimap, mask_path=job.mask, band=job.band, model=model,
                    out_dir=job.folder / "out", rgba=job.output == "rgba", background=job.background,
                    bits=job.bits, tile=self.tile, max_pixels=self.max_pixels,
                )
        finally:
            if job.max_tokens is not None:
                model.max_tokens = saved
            self.recent_seconds = time.monotonic() - start
        return result.written[job.output].read_bytes()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
