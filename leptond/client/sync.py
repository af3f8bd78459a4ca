"""The blocking client: the asyncio one (aio.py) run on a thread of its own.

    with Client() as c:                     # the same config as leptonctl
        job = c.submit(["python", "train.py"], gpus=1)
        for text in job.logs(follow=True):
            print(text, end="")
        print(job.wait().state)

Usable from any thread and from code that has no event loop (scripts,
notebooks); calls from several threads are served one at a time in order.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .aio import AsyncClient
from .types import JobInfo, NodeInfo, SubmitOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

T = TypeVar("T")
# How long close() waits for the client's thread to finish.
CLOSE_TIMEOUT_S = 10.0


class Client:
    """A connection to one cluster; see AsyncClient for `addr` and `token`."""

    def __init__(self, addr: str | None = None, token: str | None = None, **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="lepton-client", daemon=True
        )
        self._thread.start()
        try:
            self._aio = self._run(self._make(addr, token, kw))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _make(addr: str | None, token: str | None, kw: dict[str, Any]) -> AsyncClient:
        return AsyncClient(addr, token, **kw)

    def _run(self, aw: Awaitable[T]) -> T:
        async def go() -> T:
            return await aw

        return asyncio.run_coroutine_threadsafe(go(), self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._aio.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CLOSE_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    # -- jobs -----------------------------------------------------------------------
    def submit(self, command: Sequence[str], **options: Unpack[SubmitOptions]) -> Job:
        """Submit a job (the fields of `leptonctl submit`, SubmitOptions); its handle."""
        job = self._run(self._aio.submit(command, **options))
        return Job(self, job.id)

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)

    def status(self, job_id: str, index: int | None = None) -> JobInfo:
        return self._run(self._aio.status(job_id, index))

    def jobs(self, **filters: Any) -> list[JobInfo]:
        """Jobs; the same filters as AsyncClient.jobs (all, states, user, limit)."""
        return self._run(self._aio.jobs(**filters))

    def nodes(self) -> list[NodeInfo]:
        return self._run(self._aio.nodes())

    def cancel(self, job_id: str, index: int | None = None) -> str:
        return self._run(self._aio.cancel(job_id, index))

    def wait(self, job_id: str, timeout_s: float | None = None) -> JobInfo:
        return self._run(self._aio.wait(job_id, timeout_s))

    def logs(
        self, job_id: str, *, rank: int = 0, index: int | None = None, follow: bool = False
    ) -> Iterator[str]:
        it = self._aio.logs(job_id, rank=rank, index=index, follow=follow)
        try:
            while True:
                try:
                    yield self._run(it.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.is_closed():
                self._run(it.aclose())  # type: ignore[attr-defined]


class Job:
    """A handle on one job."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self, index: int | None = None) -> JobInfo:
        return self.client.status(self.id, index)

    def wait(self, timeout_s: float | None = None) -> JobInfo:
        return self.client.wait(self.id, timeout_s)

    def logs(
        self, *, rank: int = 0, index: int | None = None, follow: bool = False
    ) -> Iterator[str]:
        return self.client.logs(self.id, rank=rank, index=index, follow=follow)

    def cancel(self, index: int | None = None) -> str:
        return self.client.cancel(self.id, index)
