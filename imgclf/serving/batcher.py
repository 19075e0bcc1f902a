"""Dynamic batching: single images from many requests gathered into batches for one inference thread."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgclf.serving.settings import DEFAULTS


class QueueFull(Exception):
    """The batcher's bounded queue has no room for this request's images."""


class ShuttingDown(Exception):
    """The batcher stopped taking work because the server is shutting down."""


_STOP = object()
# While small and bulk images both wait, at least every BULK_EVERY-th batch is a bulk one.
BULK_EVERY = 4


@dataclass
class _Item:
    image: np.ndarray
    future: asyncio.Future
    request: int  # which submit() call it came from
    bulk: bool = False  # its request has more than Batcher.share images


class Batcher:
    """Gathers single images from many requests into batches for one inference thread.

    ``predict`` takes a uint8 NHWC array and returns (N, K) probabilities. The queue is bounded
    (``max_queue`` images); :meth:`submit` raises :class:`QueueFull` instead of waiting, so an
    overloaded server answers 503 quickly rather than building an unbounded backlog.

    Fair to small requests. A request of more than a quarter of a batch (:attr:`share`) images is
    *bulk*; the others are *small*. While small images wait, the next batch holds only small
    images (oldest first), so a one-image request queued behind a 64-image one goes in the next
    batch, alone with its peers, and does not pay for bulk images in its own batch. Bulk images
    fill the batches when no small image waits, and at least every :data:`BULK_EVERY`-th batch
    while both wait (so a stream of small requests cannot starve a bulk one). ``bulk_batch``
    caps the images of a bulk batch: a small request that arrives while one runs waits for at
    most that many images' inference (the server sets it; see ``ServeSettings.bulk_batch``).
    Unset, a bulk request alone gets full batches and several share one at :attr:`share` each.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        executor: ThreadPoolExecutor | None = None,
        *,
        max_batch: int = DEFAULTS.max_batch,
        max_wait_ms: float = DEFAULTS.max_wait_ms,
        max_queue: int = DEFAULTS.max_queue,
        on_batch: Callable[[int, float], None] | None = None,
        bulk_batch: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if bulk_batch is not None and bulk_batch < 1:
            raise ValueError(f"bulk_batch must be >= 1, got {bulk_batch}")
        self.predict = predict
        # One thread owns the model, so batches (and anything sent through run_exclusive) never
        # run on it at the same time. Grad-CAM does not come here: it has its own thread and
        # model (imgclf.serving.app), so a slow explain never holds a batch.
        self.executor = executor
        self._own_executor = executor is None
        self.max_batch = max_batch
        self.share = max(1, max_batch // 4)  # more images than this in one request: bulk
        self.bulk_batch = min(bulk_batch, max_batch) if bulk_batch else None
        self._bulk_skipped = 0  # batches in a row that left waiting bulk images behind
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        # Unbounded underneath; the bound is checked in submit() so a multi-image request is
        # admitted whole or not at all (the event loop is single-threaded, so no race).
        self._queue: asyncio.Queue | None = None  # made in start(): it belongs to one event loop
        # Taken off the queue but not yet batched (over a request's share), oldest first.
        self._pending: deque[_Item] = deque()
        self._requests = itertools.count()
        self._task: asyncio.Task | None = None
        self._closing = False
        # Requests that are decoding right now: their images are about to arrive, so waiting up
        # to max_wait for them pays off; with none, waiting would only add latency.
        self.incoming = 0

    @property
    def depth(self) -> int:
        """Images waiting for inference."""
        return (self._queue.qsize() if self._queue is not None else 0) + len(self._pending)

    def start(self) -> None:
        """Start the batching task on the running loop (again after :meth:`close` too)."""
        if self._task is not None:
            return
        self._closing = False
        self._queue = asyncio.Queue()
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgclf-infer")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="imgclf-batcher")

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the inference thread, between batches."""
        if self._closing:
            raise ShuttingDown()
        self.start()
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def submit(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Queue ``images`` and wait for their probability rows (same order)."""
        if self._closing:
            raise ShuttingDown()
        self.start()  # no-op when the app's lifespan already started it
        assert self._queue is not None
        if self.depth + len(images) > self.max_queue:
            raise QueueFull()
        loop = asyncio.get_running_loop()
        req = next(self._requests)
        bulk = len(images) > self.share
        items = [_Item(im, loop.create_future(), req, bulk) for im in images]
        for it in items:
            self._queue.put_nowait(it)
        return list(await asyncio.gather(*(it.future for it in items)))

    async def close(self) -> None:
        """Stop taking new work, finish everything already queued, then stop the task."""
        self._closing = True
        if self._task is not None and self._queue is not None:
            self._queue.put_nowait(_STOP)
            await self._task
            self._task = None
        if self._own_executor and self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None

    def _drain(self) -> bool:
        """Move everything queued now into ``_pending``; True when the stop marker was among it."""
        stop = False
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return stop
            if item is _STOP:
                stop = True
            else:
                self._pending.append(item)

    async def _gather(self) -> tuple[list[_Item], bool]:
        """Wait (up to ``max_wait`` while requests are decoding) for a full batch, then pick one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        stop = self._drain()
        while len(self._pending) < self.max_batch and not stop:
            timeout = deadline - loop.time()
            if timeout <= 0 or self.incoming == 0:
                break
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                break
            if item is _STOP:
                stop = True
            else:
                self._pending.append(item)
                stop = self._drain()
        return self._pick(), stop

    def _pick(self) -> list[_Item]:
        """The next batch from ``_pending``: small images first (see the class docstring)."""
        small = [it for it in self._pending if not it.bulk]
        bulk_waits = len(small) < len(self._pending)
        if bulk_waits and (not small or self._bulk_skipped + 1 >= BULK_EVERY):
            self._bulk_skipped = 0
            batch = self._bulk_batch([it for it in self._pending if it.bulk])
        else:
            self._bulk_skipped = self._bulk_skipped + 1 if bulk_waits else 0
            batch = small[: self.max_batch]
        taken = {id(it) for it in batch}
        self._pending = deque(it for it in self._pending if id(it) not in taken)
        return batch

    def _bulk_batch(self, bulk: list[_Item]) -> list[_Item]:
        """A batch of the waiting bulk images, oldest first: at most ``bulk_batch``; unset, a
        request alone fills the batch and several get at most :attr:`share` each."""
        if self.bulk_batch is not None:
            return bulk[: self.bulk_batch]
        if len({it.request for it in bulk}) == 1:
            return bulk[: self.max_batch]
        batch: list[_Item] = []
        per_request: dict[int, int] = {}
        for it in bulk:
            if len(batch) == self.max_batch:
                break
            if per_request.get(it.request, 0) < self.share:
                per_request[it.request] = per_request.get(it.request, 0) + 1
                batch.append(it)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while True:
            if not self._pending:
                if stopping:
                    return
                first = await self._queue.get()
                if first is _STOP:
                    return
                self._pending.append(first)
            batch, stop = await self._gather()
            stopping = stopping or stop  # finish everything queued before the stop marker
            # Clients that went away (cancelled futures) cost no inference.
            batch = [it for it in batch if not it.future.done()]
            if batch:
                t0 = time.perf_counter()
                try:
                    probs = await loop.run_in_executor(
                        self.executor, self.predict, np.stack([it.image for it in batch])
                    )
                except Exception as e:  # noqa: BLE001 - handed to every waiting request
                    for it in batch:
                        if not it.future.done():
                            it.future.set_exception(e)
                else:
                    for it, row in zip(batch, probs):
                        if not it.future.done():
                            it.future.set_result(row)
                if self.on_batch:
                    self.on_batch(len(batch), time.perf_counter() - t0)
