"""The leader's controllers (leptond/controllers.py) on a real ClusterState.

Commands are applied as soon as they are proposed; the agents' side only
records what it is told. The passes run on the simulation's virtual clock
(leptond/sim/vtime.py): a pass that waits for a wake-up that never comes
times out at once, in virtual time, as an idle pass does after seconds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

from leptond.config import MasterConfig
from leptond.controllers import Controllers
from leptond.liveness import NodeLiveness
from leptond.sim.vtime import SimClock, VirtualLoop
from raft.commands import encode
from raft.view import Publisher
from tests.test_state_support import Harness


class Proposer:
    def __init__(self, h: Harness, wakeup: asyncio.Event) -> None:
        self.h = h
        self.wakeup = wakeup

    async def propose(
        self,
        op: str,
        args: dict[str, Any],
        rid: str | None = None,
        timeout_s: float | None = None,
        wake: bool = False,
    ) -> dict[str, Any]:
        res: dict[str, Any] = self.h.raw(encode(op, args, rid))
        if wake:
            self.wakeup.set()
        return res


class Channel:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.stops: list[tuple[str, list[str]]] = []

    def push_start(self, node_id: str, specs: list[dict[str, Any]]) -> None:
        self.started += [s["task_id"] for s in specs]

    def push_stop(
        self, node_id: str, task_ids: list[str], warned: dict[str, float] | None = None
    ) -> None:
        self.stops.append((node_id, task_ids))

    def push_warn(self, node_id: str, task_ids: list[str]) -> None:
        raise AssertionError("no warning signals here")

    def push_input(self, node_id: str, args: dict[str, Any]) -> bool:
        raise AssertionError("no interactive sessions here")

    def is_connected(self, node_id: str) -> bool:
        return True

    async def stream(self, node_id: str, method: str, args: dict[str, Any]) -> AsyncIterator[Any]:
        raise AssertionError("no streams here")
        yield


class NoBlocks:
    def cached_sets(self) -> dict[str, frozenset[str]]:
        return {}

    def block_sets(self, view: Any) -> dict[str, frozenset[str]]:
        return {}


class Leader:
    """The state, and the controllers of the master that leads it."""

    def __init__(self, tmp: Path) -> None:
        self.loop = VirtualLoop()
        self.clock = SimClock(self.loop)
        self.h = Harness()
        self.wakeup = asyncio.Event()
        self.reader = Publisher(self.h.state, threading.RLock())
        self.channel = Channel()
        cfg = MasterConfig(data_dir=tmp, secret_file=tmp / "secret", admin_token_file=tmp / "admin")
        self.c = Controllers(
            cfg,
            Proposer(self.h, self.wakeup),
            self.reader,
            self.channel,
            NodeLiveness(self.clock),
            NoBlocks(),
            self.wakeup,
            self.clock,
        )

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        self.loop.run_until_complete(coro)

    def scheduling_pass(self) -> None:
        """A pass woken at once, as after a commit that asked for one."""
        self.wakeup.set()
        self.run(self.c.scheduling_pass())

    def idle_pass(self) -> None:
        """A pass nothing woke: it looks at everything."""
        self.wakeup.clear()
        self.run(self.c.scheduling_pass())

    def close(self) -> None:
        self.loop.close()

    def task(self, tid: str) -> Any:
        return self.reader.view().tasks[tid]
