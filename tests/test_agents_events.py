"""What an agent's task events wake on the leader (leptond/agents.py): the
scheduling pass for an end, which frees room, and not for a start."""

from __future__ import annotations

from typing import Any

import pytest

from leptond.agents import AgentRegistry
from tests.controllers_support import Leader, Proposer

pytestmark = pytest.mark.timeout(60)


class Leading:
    """The LeaderStatus of a master that leads."""

    def ensure_leader(self) -> None:
        pass


class Conn:
    def __init__(self, node_id: str) -> None:
        self.context: dict[str, Any] = {"role": "node", "node_id": node_id}


async def _woke(ld: Leader, reg: AgentRegistry, *events: dict[str, Any]) -> bool:
    """Report `events` from n1 as its agent does; whether the pass was woken."""
    ld.wakeup.clear()
    await reg.task_events(Conn("n1"), {"events": list(events)})  # type: ignore[arg-type]
    return ld.wakeup.is_set()


def test_a_start_does_not_wake_the_scheduling_pass_and_an_exit_does(ld: Leader) -> None:
    h = ld.h
    h.register("n1", gpus=2)
    h.submit("a", gpus=1)
    h.submit("b", gpus=1)
    h.ok("plan", {"placements": [{"task_id": "a.0", "node_id": "n1", "gpus": [0]}]})
    h.ok("plan", {"placements": [{"task_id": "b.0", "node_id": "n1", "gpus": [1]}]})
    reg = AgentRegistry(
        ld.c._cfg,
        Proposer(h, ld.wakeup),
        ld.reader,
        Leading(),  # type: ignore[arg-type]
        ld.c._liveness,
        lambda window_s: True,
        ld.clock,
    )
    started = {"node_id": "n1", "attempt": 1, "state": "running", "at": 1.0}
    exited = {"node_id": "n1", "task_id": "a.0", "attempt": 1, "state": "exited", "at": 2.0}
    woke: list[bool] = []

    async def scenario() -> None:
        reg.lead(["n1"])
        try:
            woke.append(
                await _woke(ld, reg, {**started, "task_id": "a.0"}, {**started, "task_id": "b.0"})
            )
            woke.append(await _woke(ld, reg, {**exited, "exit_code": 0}))
        finally:
            assert reg.events is not None
            await reg.events.close()

    ld.run(scenario())
    # Both starts committed, and woke nothing; the exit committed and woke the pass.
    assert woke == [False, True]
    assert ld.task("b.0").state == "running" and ld.task("a.0").state == "succeeded"
