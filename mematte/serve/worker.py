"""The model's one thread: jobs wait in a bounded queue; each time the model is free it
takes the oldest job together with the waiting jobs of the same size and options (up to
:data:`MAX_BATCH`, and as many as the free memory covers) and mattes them in one forward
pass, which is 1.3× faster than one at a time on a 2-core CPU (docs/serving.md). A job
whose client gave up or ran out of time is dropped: before it starts, or between two
steps of the forward pass when every job of its batch is dropped."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import api, progress, trimap

MAX_BATCH = 4


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
    output: str  # alpha | rgba | composite
    bits: int
    max_tokens: int | None
    size: tuple[int, int] = (0, 0)  # (height, width) from the header
    need: int = 0  # predicted peak bytes
    dropped: threading.Event = field(default_factory=threading.Event)
    result: Future = field(default_factory=Future)

    @property
    def batch_key(self) -> tuple:
        return self.size, self.max_tokens


class Matter:
    """Runs :class:`Job` s on one thread with at most ``queue`` of them waiting."""

    def __init__(self, model, *, queue: int, tile: bool, max_pixels: int | None, free_memory=None, on_batch=None):
        self.model, self.queue, self.tile, self.max_pixels = model, queue, tile, max_pixels
        self.free_memory = free_memory or (lambda: 0)
        self.on_batch = on_batch or (lambda size: None)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mematte-model")
        self.backlog: list[Job] = []  # admitted, not yet taken by the model's thread
        self.lock = threading.Lock()
        self.pending = 0  # waiting or running; touched only on the event loop
        self.recent_seconds = 1.0  # duration of the last batch, for Retry-After

    @property
    def waiting(self) -> int:
        return max(self.pending - 1, 0)

    async def run(self, job: Job, *, deadline: float, gone) -> bytes:
        """The PNG bytes of ``job``; raises QueueFull, Cancelled (``gone()`` became true),
        TimeoutError (past ``deadline``, monotonic seconds), or what matting raised."""
        if self.pending > self.queue:
            raise QueueFull(max(1, round(self.recent_seconds * self.pending)))
        self.pending += 1
        with self.lock:
            self.backlog.append(job)
        self.executor.submit(self._take)  # one call per job: each takes what is waiting
        future = asyncio.wrap_future(job.result)
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
            job.dropped.set()  # stops its batch between two steps once every job is dropped
            with self.lock:  # or takes it out of the queue if it has not started
                if job in self.backlog:
                    self.backlog.remove(job)
            raise
        finally:
            self.pending -= 1

    def _take(self) -> None:
        with self.lock:
            if not self.backlog:  # an earlier call took this job into its batch
                return
            batch = [self.backlog.pop(0)]
            free = self.free_memory() - batch[0].need
            for job in list(self.backlog):
                if len(batch) == MAX_BATCH:
                    break
                if job.batch_key == batch[0].batch_key and job.need <= free:
                    self.backlog.remove(job)
                    batch.append(job)
                    free -= job.need
        start = time.monotonic()
        try:
            self._matte(batch)
        finally:
            self.recent_seconds = time.monotonic() - start
            for job in batch:
                if not job.result.done():
                    job.result.set_exception(Cancelled())

    def _matte(self, batch: list[Job]) -> None:
        read = []
        for job in batch:  # each job's inputs; one that cannot be read fails alone
            try:
                image, guide = api.read_pair(
                    job.image, job.trimap, mask_path=job.mask, band=job.band, max_pixels=self.max_pixels
                )
                trimap.warn_if_degenerate(guide, name="trimap")
                background = api.background_array(job.background) if job.background else None
                read.append((job, image, guide, background))
            except Exception as e:
                job.result.set_exception(e)
        if not read:
            return
        self.on_batch(len(read))

        def check(*_):
            if all(job.dropped.is_set() for job, *_ in read):
                raise Cancelled

        model, max_tokens = self.model, read[0][0].max_tokens
        saved = getattr(model, "max_tokens", None)
        try:
            if max_tokens is not None:
                model.max_tokens = max_tokens
            with progress.reporting(check):
                alphas = api.matte_batch(
                    model, [image for _, image, _, _ in read], [guide for _, _, guide, _ in read], tile=self.tile
                )
        except Exception as e:
            for job, *_ in read:
                job.result.set_exception(e)
            return
        finally:
            if max_tokens is not None:
                model.max_tokens = saved
        device = model.pixel_mean.device
        for (job, image, guide, background), (alpha, routing) in zip(read, alphas):
            try:
                done = api.finish_matte(
                    job.image,
                    image,
                    guide,
                    alpha,
                    routing,
                    device=device,
                    out_dir=job.folder / "out",
                    rgba=job.output == "rgba",
                    background=background,
                    bits=job.bits,
                )
                job.result.set_result(done.written[job.output].read_bytes())
            except Exception as e:
                job.result.set_exception(e)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
