"""A job's output: `leptonctl logs` and what `submit --wait` shows.

Following (`-f`) ends when the job has ended, at once for a job that ended
or never started; while the job waits to be placed it says why, once, on
stderr. A task that runs again (a retry, a preemption) is followed into its
new attempt. With several ranks each line says whose it is (`[r1] `).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from leptond.client import calls as api
from leptond.clock import REAL as clock
from leptond.wire.client import ClusterClient
from leptond.wire.errors import RpcError

from .output import say, stamp

FINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})
LIVE_TASK_STATES = frozenset({"assigned", "running"})
POLL_S = 0.5
# While a task waits to be placed there is nothing to hurry for.
PENDING_POLL_S = 1.0
# Worth waiting out while following: the host or the leader may come back.
TRANSIENT = frozenset({"unavailable", "timeout", "not_leader", "no_quorum", "not_found"})


@dataclass(frozen=True)
class Options:
    ranks: Sequence[int] | None  # None: every rank
    follow: bool = False
    stream: str = "output"
    tail: int | None = None
    timestamps: bool = False
    hint_ranks: bool = True  # say so when other ranks exist
    index: int | None = None  # one task of a job array (ranks is then [0])


class Lines:
    """One rank's output on `out`, each line prefixed with its tag and time.

    With several ranks at once only whole lines are written, so that lines
    of different ranks never mix; an unfinished last line is ended at close.
    """

    def __init__(self, out: BinaryIO, tag: str, timestamps: bool, whole_lines: bool) -> None:
        self.out = out
        self.tag = tag.encode()
        self.timestamps = timestamps
        self.whole = whole_lines
        self.at_start = True
        self.buf = b""
        self.last: tuple[int, float] | None = None  # the newest time record seen

    def feed(self, item: dict[str, Any]) -> None:
        data = item["data"]
        if not self.tag and not self.timestamps:
            self.out.write(data)
            self.out.flush()
            return
        start = int(item["offset"]) - len(data)
        records = [(int(o), float(t)) for o, t in item.get("times") or []]
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            piece = data[pos:] if nl < 0 else data[pos : nl + 1]
            if self.at_start:
                self.buf += self._prefix(start + pos, records)
            self.buf += piece
            self.at_start = nl >= 0
            if self.at_start or not self.whole:
                self.out.write(self.buf)
                self.buf = b""
            pos += len(piece)
        if records:
            self.last = records[-1]
        self.out.flush()

    def _prefix(self, offset: int, records: list[tuple[int, float]]) -> bytes:
        out = self.tag
        if self.timestamps:
            when = self.last[1] if self.last and self.last[0] <= offset else None
            for off, t in records:
                if off <= offset:
                    when = t
            out += stamp(when).encode() + b" "
        return out

    def close(self) -> None:
        if self.buf:
            self.out.write(self.buf + b"\n")
            self.buf = b""
            self.out.flush()


class Follower:
    """Shows the output of some ranks of one job (see the module's docstring)."""

    def __init__(self, c: ClusterClient, job_id: str, opts: Options, timeout_s: float) -> None:
        self.c = c
        self.job_id = job_id
        self.opts = opts
        self.timeout_s = timeout_s
        self.out: BinaryIO = sys.stdout.buffer
        self.said_pending = False
        self.said: set[str] = set()
        self.failed = False

    def note(self, text: str, once: str | None = None) -> None:
        if once is not None:
            if once in self.said:
                return
            self.said.add(once)
        say(f"leptonctl: {text}", file=sys.stderr, flush=True)

    async def status(self) -> dict[str, Any]:
        return await api.status(
            self.c, self.job_id, timeout_s=self.timeout_s, brief=True, index=self.opts.index
        )

    def what(self, rank: int) -> str:
        """How notes name the task whose output this is."""
        return f"rank {rank}" if self.opts.index is None else f"index {self.opts.index}"

    async def run(self) -> int:
        st = await self.status()
        if st.get("array") is not None and self.opts.index is None:
            raise RpcError(
                "bad_request",
                f"job {self.job_id} is an array of {st['array_tasks']} tasks "
                f"({st['array']}): give --index I for one task's output",
            )
        n = len(st["tasks"])
        ranks = list(range(n)) if self.opts.ranks is None else list(self.opts.ranks)
        for r in ranks:
            if not 0 <= r < n:
                raise RpcError("bad_request", f"job {self.job_id} has ranks 0-{n - 1}")
        if self.opts.ranks is not None and n > 1 and self.opts.hint_ranks:
            self.note(
                f"job {self.job_id} has {n} ranks; showing rank {ranks[0]} "
                "(--rank R for another, --all for every one)"
            )
        tagged = self.opts.ranks is None and n > 1
        writers = {
            r: Lines(self.out, f"[r{r}] " if tagged else "", self.opts.timestamps, tagged)
            for r in ranks
        }
        try:
            if self.opts.follow:
                await asyncio.gather(*(self.follow(r, writers[r]) for r in ranks))
            else:
                for r in ranks:
                    await self.once(r, writers[r])
        finally:
            for w in writers.values():
                w.close()
        return 1 if self.failed else 0

    async def once(self, rank: int, w: Lines) -> None:
        try:
            async for item in self.stream(rank, 0, self.opts.tail):
                w.feed(item)
        except RpcError as exc:
            if exc.code != "not_started":
                raise
            state = exc.extra.get("job_state")
            if state in FINAL_JOB_STATES:
                self.note(
                    f"{self.what(rank)} of {self.job_id} never started (the job {state}); no output"
                )
            else:
                self.note(f"{exc.message}: no output yet (-f waits for it)")
                await self.say_why_pending()

    def stream(self, rank: int, offset: int, tail: int | None) -> Any:
        return api.logs(
            self.c,
            self.job_id,
            rank,
            index=self.opts.index,
            follow=self.opts.follow,
            offset=offset,
            stream=self.opts.stream,
            tail_lines=tail,
            timestamps=self.opts.timestamps,
        )

    async def follow(self, rank: int, w: Lines) -> None:
        offset, tail, attempt = 0, self.opts.tail, None
        while True:
            st = await self.status()
            t = st["tasks"][rank]
            if attempt and t["attempt"] != attempt:
                offset, tail = 0, None  # a new attempt: its output from the start
                self.note(f"{self.what(rank)} of {self.job_id} runs again (attempt {t['attempt']})")
            attempt = t["attempt"]
            ended = st["state"] in FINAL_JOB_STATES and t["state"] not in LIVE_TASK_STATES
            if ended and (t["node"] is None or attempt == 0):
                return  # it never started: nothing to show, now or later
            try:
                async for item in self.stream(rank, offset, tail):
                    w.feed(item)
                    offset = int(item["offset"])
                tail = None
            except RpcError as exc:
                if exc.code == "not_started":
                    if exc.extra.get("job_state") in FINAL_JOB_STATES:
                        return
                    await self.say_why_pending()
                    await clock.sleep(PENDING_POLL_S - POLL_S)
                elif exc.code in TRANSIENT:
                    st = await self.status()
                    if st["state"] in FINAL_JOB_STATES and (
                        st["tasks"][rank]["state"] not in LIVE_TASK_STATES
                    ):
                        # Nothing will change by waiting: say so and stop.
                        self.note(f"{self.what(rank)}: {exc.message}")
                        self.failed = True
                        return
                    self.note(
                        f"{self.what(rank)}: {exc.message}; waiting", once=f"{rank}:{exc.code}"
                    )
                else:
                    raise
                await clock.sleep(POLL_S)
                continue
            # The stream ended: this attempt exited. Done once the job is.
            st = await self.status()
            t = st["tasks"][rank]
            if st["state"] in FINAL_JOB_STATES and t["state"] not in LIVE_TASK_STATES:
                return
            await clock.sleep(POLL_S)

    async def say_why_pending(self) -> None:
        """The reason a pending job waits, once per job (when one is known)."""
        if self.said_pending:
            return
        st = await self.status()
        if st["state"] != "pending":
            return
        reason = st.get("reason") or next((t["reason"] for t in st["tasks"] if t.get("reason")), "")
        if reason:
            self.said_pending = True
            self.note(f"job {self.job_id} is pending: {reason}")
