"""An exit the agent reports as lost (its shim killed the task when the
node's lease ran out on the host, agent/lease.py) ends the attempt `lost`,
as a node declared down does, from command version 5 on; an older command
applies it as a failure, as it always did."""

from __future__ import annotations

from typing import Any

import msgpack

from raft.tasks import LOST_SINCE_VERSION
from tests.test_state_support import Harness, check_invariants


def lease_ran_out(h: Harness, task_id: str, version: int | None = None) -> Any:
    t = h.state.tasks[task_id]
    ev = {
        "task_id": task_id,
        "attempt": t.attempt,
        "node_id": t.node_id,
        "state": "exited",
        "exit_code": None,
        "message": "killed: this node's lease from the leader ran out",
        "lost": True,
        "at": h.now,
    }
    if version is None:
        return h.ok("task_events", {"events": [ev]})
    h.now += 1.0
    args = {"now": h.now, "events": [ev]}
    cmd = {"op": "task_events", "v": version, "rid": f"r-{h.now}", "args": args}
    return h.raw(msgpack.packb(cmd, use_bin_type=True))


def one_node() -> Harness:
    h = Harness()
    h.register("n1", gpus=2)
    return h


def test_a_task_killed_for_its_lease_is_lost_and_runs_again_while_retries_remain() -> None:
    h = one_node()
    h.submit("j1", gpus=1, retries=1)
    h.run("j1.0", "n1", [0])
    lease_ran_out(h, "j1.0")
    t = h.task("j1.0")
    assert t.state == "pending" and t.message.startswith("lost: killed: this node's lease"), t
    h.run("j1.0", "n1", [0])
    lease_ran_out(h, "j1.0")
    assert h.task("j1.0").state == "lost"
    assert h.job("j1").state == "failed"
    check_invariants(h.state)


def test_an_older_command_applies_it_as_a_failure() -> None:
    h = one_node()
    h.submit("j1", gpus=1)
    h.run("j1.0", "n1", [0])
    lease_ran_out(h, "j1.0", version=LOST_SINCE_VERSION - 1)
    assert h.task("j1.0").state == "failed"
    check_invariants(h.state)
