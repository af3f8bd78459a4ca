"""Leadership in one place (leptond/leadership.py): gaining leadership starts
every leader-only activity, losing it stops them all, and the RPC side asks
the gate whether this master leads.

The loops and the agents' side are stand-ins that record what they are asked
to do: Leadership sees them only through their ports, as a simulation will.
The state, its views and the clock are the real ones.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from leptond.clock import REAL
from leptond.config import MasterConfig
from leptond.leadership import LeaderGate, Leadership
from leptond.wire.errors import RpcError
from raft.view import Publisher
from tests.test_state_support import Harness

pytestmark = pytest.mark.timeout(60)


class Raft:
    def __init__(self) -> None:
        self.leading = False

    def is_leader(self) -> bool:
        return self.leading

    def leader(self) -> str | None:
        return "127.0.0.1:7442" if self.leading else "10.0.0.2:7442"

    def reachable(self) -> tuple[int, int]:
        return 3, 3

    def status(self) -> dict[str, Any]:
        return {}


class Agents:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def lead(self, node_ids: list[str]) -> None:
        self.calls.append(("lead", sorted(node_ids)))

    async def step_down(self) -> None:
        self.calls.append(("step_down",))


class Loops:
    """Counts passes; the drain loop fails on its first pass."""

    def __init__(self) -> None:
        self.passes: dict[str, int] = {}
        self.resets = self.wakes = 0

    def reset(self) -> None:
        self.resets += 1

    def wake(self) -> None:
        self.wakes += 1

    async def _pass(self, name: str) -> None:
        self.passes[name] = self.passes.get(name, 0) + 1
        if name == "drains" and self.passes[name] == 1:
            raise RuntimeError("a bug in one pass")
        await REAL.sleep(0.01)

    async def liveness_pass(self) -> None:
        await self._pass("liveness")

    async def drain_pass(self) -> None:
        await self._pass("drains")

    async def scheduling_pass(self) -> None:
        await self._pass("scheduler")

    async def members_pass(self) -> None:
        await self._pass("members")


async def until(pred: Any, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_leadership_starts_and_stops_every_leader_only_activity() -> None:
    h = Harness()
    h.register("n1")
    h.register("n2")
    reader = Publisher(h.state, threading.RLock())
    raft = Raft()
    cfg = MasterConfig(Path("."), Path("."), Path("."), bind="127.0.0.1", rpc_port=7441)
    gate = LeaderGate(cfg, raft, reader)
    agents, loops = Agents(), Loops()
    leadership = Leadership(gate, reader, agents, loops, REAL)
    events: asyncio.Queue[bool] = asyncio.Queue()
    follower = asyncio.create_task(leadership.follow(events))
    try:
        # Raft may say "leader" before the leader-only work runs: not yet leading.
        raft.leading = True
        assert not gate.is_leader()
        with pytest.raises(RpcError) as exc:
            gate.ensure_leader()
        assert exc.value.code == "not_leader"

        events.put_nowait(True)
        await until(lambda: all(loops.passes.get(n, 0) >= 3 for n in ("liveness", "drains", "scheduler", "members")), "every loop running")  # fmt: skip
        assert gate.is_leader()
        assert agents.calls == [("lead", ["n1", "n2"])]
        assert (loops.resets, loops.wakes) == (1, 1)
        assert leadership.errors == 1  # the failed pass was logged, counted, and retried

        events.put_nowait(False)
        await until(lambda: agents.calls[-1] == ("step_down",), "the agents' side stopped")
        assert not gate.is_leader()
        counted = dict(loops.passes)
        await asyncio.sleep(0.1)
        assert loops.passes == counted, "a leader-only loop ran after leadership was lost"

        raft.leading = False
        with pytest.raises(RpcError) as exc:
            gate.ensure_leader()
        assert exc.value.code == "not_leader"
    finally:
        follower.cancel()
        await leadership.revoke()


async def test_a_failure_to_take_up_leadership_is_tried_again_until_it_takes() -> None:
    # A bug in taking up a duty must not end the task that follows Raft: a
    # master elected would then never lead.
    h = Harness()
    h.register("n1")
    reader = Publisher(h.state, threading.RLock())
    raft = Raft()
    raft.leading = True
    cfg = MasterConfig(Path("."), Path("."), Path("."), bind="127.0.0.1", rpc_port=7441)
    gate = LeaderGate(cfg, raft, reader)

    class Flaky(Agents):
        def lead(self, node_ids: list[str]) -> None:
            super().lead(node_ids)
            if len(self.calls) == 1:
                raise RuntimeError("a bug in taking up the agents")

    agents, loops = Flaky(), Loops()
    leadership = Leadership(gate, reader, agents, loops, REAL)
    events: asyncio.Queue[bool] = asyncio.Queue()
    follower = asyncio.create_task(leadership.follow(events))
    try:
        events.put_nowait(True)
        await until(lambda: loops.passes.get("scheduler", 0) >= 1, "the loops running")
        assert gate.is_leader() and not follower.done()
        assert agents.calls == [("lead", ["n1"]), ("lead", ["n1"])]
        assert loops.resets == 1  # the failed try got no further than the agents

        events.put_nowait(False)
        await until(lambda: agents.calls[-1] == ("step_down",), "the agents' side stopped")
        assert not gate.is_leader() and not follower.done()
    finally:
        follower.cancel()
        await leadership.revoke()
