"""Many concurrent requests, one Raft command.

Raft commits are the expensive part (a round trip to a majority and an fsync);
a leader that puts every submit waiting at the same moment into one command
gets thousands of jobs per second out of a few hundred commits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("lepton.master")


class Batcher(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[list[R]]],
        max_batch: int = 1000,
        max_in_flight: int = 4,
        size_of: Callable[[T], int] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        """`size_of` and `max_bytes` bound a batch by the encoded size of its
        items too (one Raft entry has a byte limit); an item bigger than
        `max_bytes` by itself goes alone, and the proposer refuses it."""
        self._flush = flush
        self._max_batch = max_batch
        self._size_of = size_of
        self._max_bytes = max_bytes
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for t in list(self._running):
            t.cancel()
        for _, fut in self._queue:
            if not fut.done():
                fut.cancel()
        self._queue.clear()

    async def submit(self, item: T) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await self._slots.acquire()
            # Let the requests that arrive in this loop turn join the batch.
            await asyncio.sleep(0)
            n = self._batch_len()
            batch, self._queue = self._queue[:n], self._queue[n:]
            if not self._queue:
                self._wake.clear()
            if not batch:
                self._slots.release()
                continue
            t = asyncio.get_running_loop().create_task(self._one(batch))
            self._running.add(t)
            t.add_done_callback(self._running.discard)

    def _batch_len(self) -> int:
        """How many queued items the next batch takes (at least one)."""
        n = min(len(self._queue), self._max_batch)
        if self._size_of is None or self._max_bytes is None:
            return n
        total = 0
        for i in range(n):
            total += self._size_of(self._queue[i][0])
            if total > self._max_bytes:
                return max(1, i)
        return n

    async def _one(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
        except BaseException as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(
                        exc if isinstance(exc, Exception) else RuntimeError("cancelled")
                    )
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)
        finally:
            self._slots.release()
