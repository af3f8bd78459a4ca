"""The asyncio client: submit, watch and cancel jobs from Python.

    async with AsyncClient() as c:          # the same config as leptonctl
        job = await c.submit(["python", "train.py"], gpus=1)
        async for text in job.logs(follow=True):
            print(text, end="")
        info = await job.wait()

Every call goes through calls.py (as every leptonctl command does), follows
the leader and retries; errors are the typed exceptions of errors.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from leptond.clock import REAL, Clock
from leptond.wire.client import ClusterClient, parse_addrs
from raft.arrays import ArrayError, parse_array

from . import calls
from .config import ConfigError, load
from .errors import BadRequest, NotStarted, Timeout, Unavailable
from .types import FINAL_JOB_STATES, JobInfo, NodeInfo, SubmitOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

LIVE_TASK_STATES = frozenset({"assigned", "running"})
# How often wait() and a log follower look at a job again, at most.
POLL_S = 1.0


class AsyncClient:
    """A connection to one cluster. `addr` ("HOST:PORT,...") and `token`
    default to LEPTON_ADDR, LEPTON_TOKEN and the config file, as for
    leptonctl; a token may be "@FILE"."""

    def __init__(
        self,
        addr: str | None = None,
        token: str | None = None,
        *,
        timeout_s: float = calls.DEFAULT_TIMEOUT_S,
        clock: Clock = REAL,
    ) -> None:
        cfg = load(addr, token)
        try:
            addrs = parse_addrs(cfg.addrs)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # The wire client: leptonctl's commands use it directly.
        self.wire = ClusterClient(addrs, key_id=cfg.token.id, psk=cfg.token.psk)
        self.timeout_s = timeout_s
        self.clock = clock

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.wire.close()

    # -- jobs ---------------------------------------------------------------------
    async def submit(self, command: Sequence[str], **options: Unpack[SubmitOptions]) -> AsyncJob:
        """Submit a job (the fields of `leptonctl submit`, SubmitOptions); its handle."""
        if isinstance(command, str):
            raise BadRequest(
                "bad_request", "command is a list of arguments, e.g. ['python', 'x.py']"
            )
        opts: dict[str, Any] = dict(options)
        name = opts.pop("name", None)
        queue_anyway = bool(opts.pop("queue_anyway", False))
        array = opts.pop("array", None)
        # The rest are spec fields by the same names; the masters check them.
        spec: dict[str, Any] = {"argv": list(command), **opts}
        if array is not None:
            try:
                spec["array"] = parse_array(array)
            except ArrayError as exc:
                raise BadRequest("bad_request", str(exc)) from None
        for key in ("after_ok", "after_any"):
            if key in spec:
                spec[key] = list(spec[key])
        res = await calls.submit(
            self.wire, spec, name, queue_anyway=queue_anyway, timeout_s=self.timeout_s
        )
        return AsyncJob(self, str(res["id"]))

    def job(self, job_id: str) -> AsyncJob:
        """A handle on a job that exists (nothing is asked of the cluster)."""
        return AsyncJob(self, job_id)

    async def status(self, job_id: str, index: int | None = None) -> JobInfo:
        """One job in detail; with `index`, with that one task of an array."""
        return JobInfo.from_reply(
            await calls.status(self.wire, job_id, timeout_s=self.timeout_s, index=index)
        )

    async def jobs(
        self,
        *,
        all: bool = False,
        states: Sequence[str] = (),
        user: str | None = None,
        limit: int | None = None,
    ) -> list[JobInfo]:
        rows = await calls.jobs(
            self.wire, all=all, states=states, user=user, limit=limit, timeout_s=self.timeout_s
        )
        return [JobInfo.from_reply(r) for r in rows]

    async def nodes(self) -> list[NodeInfo]:
        return [NodeInfo.from_reply(r) for r in await calls.nodes(self.wire, self.timeout_s)]

    async def cancel(self, job_id: str, index: int | None = None) -> str:
        """Cancel a job (or one task of an array); the state it is in now."""
        res = await calls.cancel(self.wire, job_id, timeout_s=self.timeout_s, index=index)
        return str(res["state"])

    async def wait(
        self, job_id: str, timeout_s: float | None = None, poll_s: float = POLL_S
    ) -> JobInfo:
        """Wait until the job ended; its final state. Timeout after `timeout_s`."""
        end = None if timeout_s is None else self.clock.monotonic() + timeout_s
        delay = 0.1
        while True:
            info = await self.status(job_id)
            if info.done:
                return info
            if end is not None and self.clock.monotonic() >= end:
                raise Timeout("timeout", f"job {job_id} is still {info.state} after {timeout_s:g}s")
            await self.clock.sleep(delay)
            delay = min(delay * 1.5, poll_s)

    async def logs(
        self,
        job_id: str,
        *,
        rank: int = 0,
        index: int | None = None,
        follow: bool = False,
        stream: str = "output",
    ) -> AsyncIterator[str]:
        """A task's output as text, as it comes. `follow`: until the job ended
        (waiting while it is pending; a retry's output from its start)."""
        offset, attempt = 0, None
        while True:
            if follow:
                st = await self.status(job_id, index=index)
                t = st.tasks[0] if index is not None else _rank(st, rank)
                if attempt is not None and t.attempt != attempt:
                    offset = 0  # a new attempt: its output from the start
                attempt = t.attempt
                if st.done and t.state not in LIVE_TASK_STATES and (t.node is None):
                    return
            try:
                async for item in calls.logs(
                    self.wire, job_id, rank, index=index, follow=follow, offset=offset,
                    stream=stream,
                ):  # fmt: skip
                    offset = int(item.get("offset", offset))
                    data = item.get("data") or b""
                    if data:
                        yield bytes(data).decode("utf-8", "replace")
            except NotStarted as exc:
                if not follow or exc.extra.get("job_state") in FINAL_JOB_STATES:
                    return
            except Unavailable:
                if not follow:
                    raise
            if not follow:
                return
            st = await self.status(job_id, index=index)
            t = st.tasks[0] if index is not None else _rank(st, rank)
            if st.done and t.state not in LIVE_TASK_STATES:
                return
            await self.clock.sleep(POLL_S)


def _rank(st: JobInfo, rank: int) -> Any:
    if st.array is not None:
        raise BadRequest("bad_request", f"job {st.id} is an array: give index=I for one task")
    if not 0 <= rank < len(st.tasks):
        raise BadRequest("bad_request", f"job {st.id} has ranks 0-{len(st.tasks) - 1}")
    return st.tasks[rank]


class AsyncJob:
    """A handle on one job."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def status(self, index: int | None = None) -> JobInfo:
        return await self.client.status(self.id, index)

    async def wait(self, timeout_s: float | None = None) -> JobInfo:
        return await self.client.wait(self.id, timeout_s)

    def logs(
        self, *, rank: int = 0, index: int | None = None, follow: bool = False
    ) -> AsyncIterator[str]:
        return self.client.logs(self.id, rank=rank, index=index, follow=follow)

    async def cancel(self, index: int | None = None) -> str:
        return await self.client.cancel(self.id, index)
