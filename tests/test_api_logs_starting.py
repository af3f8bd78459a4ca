"""`logs` of a task that is placed but that its agent has not started yet.

The leader relays a task's output from the agent it was placed on. Between
the placement's commit and the agent's start of the run (the start is pushed,
and a working directory may have to be fetched first) the agent has no run
of it and answers `not_found`; a follower (`leptonctl logs -f`, the SDK's
`logs(follow=True)`) must hear "not started yet" and wait, not an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from leptond import api
from leptond.apictx import RelaySlots
from leptond.wire.errors import RpcError
from tests.test_state_support import Harness


class Agent:
    """The placed task's agent, as the leader's NodeChannel reaches it."""

    def __init__(self, answer: list[dict[str, Any]] | RpcError) -> None:
        self.answer = answer
        self.asked: list[dict[str, Any]] = []

    def is_connected(self, node_id: str) -> bool:
        return True

    async def stream(self, node_id: str, method: str, args: dict[str, Any]) -> AsyncIterator[Any]:
        self.asked.append(args)
        if isinstance(self.answer, RpcError):
            raise self.answer
        for item in self.answer:
            yield item


def leader(h: Harness, agent: Agent) -> Any:
    return SimpleNamespace(
        ensure_leader=lambda: None,
        view=h.state.freeze,
        channel=agent,
        relays=RelaySlots(),
    )


def placed() -> Harness:
    h = Harness()
    h.register("n1")
    h.submit("j-000000000001", gpus=1)
    h.plan([("j-000000000001.0", "n1", [0])])
    assert h.task("j-000000000001.0").state == "assigned"
    return h


def read(m: Any) -> list[Any]:
    conn = SimpleNamespace(context={"user": "alice", "role": "submit"})

    async def go() -> list[Any]:
        gen = await api.logs(m, conn, {"job_id": "j-000000000001", "follow": True})
        return [item async for item in gen]

    return asyncio.run(go())


def test_an_assigned_task_the_agent_has_not_started_is_not_started_yet() -> None:
    h = placed()
    agent = Agent(RpcError("not_found", "no output for task j-000000000001.0 on this host"))
    m = leader(h, agent)
    with pytest.raises(RpcError) as exc:
        read(m)
    assert exc.value.code == "not_started", exc.value.message
    assert exc.value.extra.get("job_state") == "running"  # not final: a follower waits
    assert agent.asked and agent.asked[0]["task_id"] == "j-000000000001.0"
    assert m.relays.open == {}  # the relay slot came back


def test_an_assigned_task_already_started_streams_its_output() -> None:
    agent = Agent([{"data": b"hello\n", "offset": 6}])
    assert read(leader(placed(), agent)) == [{"data": b"hello\n", "offset": 6}]


def test_a_running_task_whose_agent_has_no_run_is_still_not_found() -> None:
    # Reported running, so its agent had it: its output is gone, not coming.
    h = placed()
    h.event("j-000000000001.0", "running")
    agent = Agent(RpcError("not_found", "no output for task j-000000000001.0 on this host"))
    with pytest.raises(RpcError) as exc:
        read(leader(h, agent))
    assert exc.value.code == "not_found"
