"""A preemption buys its preemptor the room (leptond/holds.py).

The leader's real scheduling pass (Controllers.scheduling_pass, the real
scheduler) on a real ClusterState, whose commands are applied as soon as
they are proposed; the agents' side only records what it is told. The
simulator found each case (tests/test_sim_found.py); here each is a few
tasks on one or two nodes.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from leptond.clock import REAL
from leptond.config import MasterConfig
from leptond.controllers import Controllers
from leptond.liveness import NodeLiveness
from raft.commands import encode
from raft.view import Publisher
from tests.test_state_support import Harness

pytestmark = pytest.mark.timeout(60)


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

    def push_start(self, node_id: str, specs: list[dict[str, Any]]) -> None:
        self.started += [s["task_id"] for s in specs]

    def push_stop(self, node_id: str, task_ids: list[str]) -> None:
        pass

    def is_connected(self, node_id: str) -> bool:
        return True


class NoBlocks:
    def cached_sets(self) -> dict[str, frozenset[str]]:
        return {}

    def block_sets(self, view: Any) -> dict[str, frozenset[str]]:
        return {}


class Leader:
    """The state, and the controllers of the master that leads it."""

    def __init__(self, tmp: Path) -> None:
        self.h = Harness()
        self.wakeup = asyncio.Event()
        self.reader = Publisher(self.h.state, threading.RLock())
        cfg = MasterConfig(data_dir=tmp, secret_file=tmp / "secret", admin_token_file=tmp / "admin")
        self.c = Controllers(
            cfg,
            Proposer(self.h, self.wakeup),
            self.reader,
            Channel(),  # type: ignore[arg-type]
            NodeLiveness(REAL),
            NoBlocks(),
            self.wakeup,
            REAL,
        )

    async def scheduling_pass(self) -> None:
        self.wakeup.set()  # at once, as after a commit that asked for one
        await self.c.scheduling_pass()

    def task(self, tid: str) -> Any:
        return self.reader.view().tasks[tid]


def test_a_victim_that_had_not_started_does_not_take_its_room_back(tmp_path: Path) -> None:
    async def main() -> None:
        ld = Leader(tmp_path)
        h = ld.h
        h.register("n1", gpus=4)
        h.submit("a", gpus=2)
        h.submit("b", gpus=2)
        h.run("a.0", "n1", [0, 1])
        h.plan([("b.0", "n1", [2, 3])])  # assigned, not started yet
        h.submit("p", gpus=4, priority=10)
        await ld.scheduling_pass()
        # Both are preempted for p: b ends at once, a stops in its own time.
        assert ld.task("a.0").stop == "preempt"
        assert ld.task("b.0").state == "pending"
        await ld.scheduling_pass()
        # b waits: GPUs 2 and 3 are p's, though nobody runs on them.
        assert ld.task("b.0").state == "pending", ld.task("b.0")
        assert ld.c.reasons["b.0"]
        h.event("a.0", "exited", exit_code=143)
        await ld.scheduling_pass()
        p = ld.task("p.0")
        assert (p.state, p.node_id, p.gpus) == ("assigned", "n1", [0, 1, 2, 3])
        assert ld.task("b.0").state == "pending" and ld.task("b.0").preemptions == 1

    asyncio.run(main())


def test_work_of_the_same_priority_does_not_take_a_preemptors_room(tmp_path: Path) -> None:
    async def main() -> None:
        ld = Leader(tmp_path)
        h = ld.h
        h.register("n1", gpus=2)
        h.register("n2", gpus=1)
        h.submit("mine", user="alice", gpus=1)  # alice already has a share: bob comes first
        h.run("mine.0", "n2", [0])
        h.submit("v", user="carol", gpus=2)
        h.run("v.0", "n1", [0, 1])
        h.submit("p", user="alice", gpus=2, priority=10)
        await ld.scheduling_pass()
        assert ld.task("v.0").stop == "preempt"
        h.submit("q", user="bob", gpus=2, priority=10)
        await ld.scheduling_pass()
        h.event("v.0", "exited", exit_code=143)
        await ld.scheduling_pass()
        # The room p preempted for is p's, though bob's q is first in the queue.
        assert (ld.task("p.0").state, ld.task("p.0").node_id) == ("assigned", "n1")
        assert ld.task("q.0").state == "pending"

    asyncio.run(main())


def test_a_new_leader_forgets_the_holds(tmp_path: Path) -> None:
    async def main() -> None:
        ld = Leader(tmp_path)
        h = ld.h
        h.register("n1", gpus=2)
        h.submit("v", gpus=2)
        h.run("v.0", "n1", [0, 1])
        h.submit("p", gpus=2, priority=10)
        await ld.scheduling_pass()
        assert ld.c.holds.room == {"p.0": ("n1", (0, 1))}
        ld.c.reset()
        assert ld.c.holds.room == {}

    asyncio.run(main())
