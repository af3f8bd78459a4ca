"""Nodes leaving and shrinking through ClusterState: drains with a deadline, and
a known node that registers again with less than its live tasks hold (DESIGN §5, §7)."""

from __future__ import annotations

import msgpack

from raft.state import ClusterState
from tests.test_state_support import (
    GiB,
    Harness,
    check_invariants,
    is_error,
    node_record,
    same_records,
)


def two_nodes(**kw: object) -> Harness:
    h = Harness()
    h.register("n1", **kw)  # type: ignore[arg-type]
    h.register("n2", **kw)  # type: ignore[arg-type]
    return h


def drain(h: Harness, node_id: str, deadline: float | None = None) -> dict[str, object]:
    args: dict[str, object] = {"node_id": node_id, "state": "draining"}
    if deadline is not None:
        args["deadline"] = deadline
    return dict(h.ok("node_state", args))


# -- the deadline in the state ----------------------------------------------------------


def test_a_drain_keeps_its_deadline_and_undrain_clears_it() -> None:
    h = two_nodes()
    assert drain(h, "n1", deadline=5_000.0)["drain_deadline"] == 5_000.0
    node = h.state.nodes["n1"]
    assert (node.state, node.drain_deadline) == ("draining", 5_000.0)
    h.ok("node_state", {"node_id": "n1", "state": "ready"})
    assert (node.state, node.drain_deadline) == ("ready", None)
    check_invariants(h.state)


def test_a_drain_without_a_deadline_replaces_one_with_a_deadline() -> None:
    h = two_nodes()
    drain(h, "n1", deadline=5_000.0)
    drain(h, "n1", deadline=9_000.0)
    assert h.state.nodes["n1"].drain_deadline == 9_000.0
    drain(h, "n1")
    assert h.state.nodes["n1"].drain_deadline is None
    res = h.cmd("drain_expired", {"node_id": "n1", "now": 10_000.0})
    assert is_error(res, "conflict"), res


def test_a_drained_node_that_goes_down_comes_back_draining_with_its_reason_and_deadline() -> None:
    h = two_nodes()
    h.ok(
        "node_state",
        {"node_id": "n1", "state": "draining", "reason": "disk swap", "deadline": 5_000.0},
    )
    h.ok("node_down", {"node_id": "n1", "reason": "no heartbeat for 10s"})
    node = h.state.nodes["n1"]
    assert (node.state, node.reason) == ("down", "no heartbeat for 10s")
    assert (node.drain_reason, node.drain_deadline) == ("disk swap", 5_000.0)
    check_invariants(h.state)
    res = h.register("n1")
    assert res["state"] == "draining"
    node = h.state.nodes["n1"]  # records are replaced, not changed (raft/cow.py)
    assert (node.state, node.reason, node.drain_deadline) == ("draining", "disk swap", 5_000.0)
    # Nothing is placed on it; undrained, it takes work again.
    h.submit("a", gpus=1)
    assert h.plan([("a.0", "n1", [0])])["dropped"][0]["reason"] == "node is not ready"
    h.ok("node_state", {"node_id": "n1", "state": "ready"})
    node = h.state.nodes["n1"]
    assert (node.state, node.reason, node.drain_reason, node.drain_deadline) == (
        "ready",
        "",
        None,
        None,
    )
    assert h.plan([("a.0", "n1", [0])])["placed"] == ["a.0"]
    check_invariants(h.state)


def test_a_drain_without_a_deadline_survives_down_and_up_too() -> None:
    h = two_nodes()
    h.ok("node_state", {"node_id": "n1", "state": "draining", "reason": "drained"})
    h.ok("node_down", {"node_id": "n1"})
    h.register("n1")
    node = h.state.nodes["n1"]
    assert (node.state, node.reason, node.drain_deadline) == ("draining", "drained", None)
    # A draining node that registers again (a new leader, a reconnect) keeps its reason.
    h.register("n1")
    assert (node.state, node.reason) == ("draining", "drained")
    check_invariants(h.state)


def test_a_down_node_can_be_drained_and_undrained_before_it_comes_back() -> None:
    h = two_nodes()
    h.ok("node_down", {"node_id": "n1"})
    node = h.state.nodes["n1"]
    # Not drained: there is nothing to undrain, and it comes back ready anyway.
    res = h.cmd("node_state", {"node_id": "n1", "state": "ready"})
    assert is_error(res, "conflict"), res
    res = h.ok("node_state", {"node_id": "n1", "state": "draining", "reason": "rma"})
    assert res == {"node_id": "n1", "state": "down", "drain_deadline": None, "drained": True}
    node = h.state.nodes["n1"]
    assert (node.state, node.reason, node.drain_reason) == ("down", "no heartbeat", "rma")
    check_invariants(h.state)
    assert h.register("n1")["state"] == "draining"
    h.ok("node_down", {"node_id": "n1"})
    res = h.ok("node_state", {"node_id": "n1", "state": "ready"})
    assert res == {"node_id": "n1", "state": "down", "drain_deadline": None, "drained": False}
    assert h.register("n1")["state"] == "ready"
    node = h.state.nodes["n1"]
    assert (node.reason, node.drain_reason) == ("", None)
    check_invariants(h.state)


def test_an_agent_leaving_keeps_an_admins_drain_as_it_is() -> None:
    h = two_nodes()
    h.ok(
        "node_state",
        {"node_id": "n1", "state": "draining", "reason": "drained", "deadline": 5_000.0},
    )
    before = h.state.snapshot()
    leave = {"node_id": "n1", "state": "draining", "reason": "agent leaving", "leave": True}
    res = h.ok("node_state", leave)
    assert res == {"node_id": "n1", "state": "draining", "drain_deadline": 5_000.0, "drained": True}
    assert same_records(before, h.state)
    # On a node that is not drained, the agent's leave drains it (without a deadline).
    res = h.ok("node_state", {**leave, "node_id": "n2"})
    assert res == {"node_id": "n2", "state": "draining", "drain_deadline": None, "drained": True}
    n2 = h.state.nodes["n2"]
    assert (n2.reason, n2.drain_reason) == ("agent leaving", "agent leaving")
    # An admin's drain still replaces an agent's.
    drain(h, "n2", deadline=7_000.0)
    assert n2.drain_deadline == 7_000.0
    check_invariants(h.state)


def test_the_deadline_survives_a_snapshot_and_old_snapshots_restore_without_one() -> None:
    h = two_nodes()
    drain(h, "n1", deadline=5_000.0)
    again = ClusterState()
    again.restore(h.state.snapshot())
    assert again.nodes["n1"].drain_deadline == 5_000.0
    assert again.snapshot() == h.state.snapshot()
    # A snapshot written before nodes had a drain deadline.
    old = msgpack.unpackb(h.state.snapshot(), raw=False, strict_map_key=False)
    for n in old["nodes"]:
        del n["drain_deadline"]
    older = ClusterState()
    older.restore(msgpack.packb(old, use_bin_type=True))
    assert [n.drain_deadline for n in older.nodes.values()] == [None, None]


def test_snapshots_from_before_drain_reason_restore_their_drains() -> None:
    h = two_nodes()
    h.ok("node_state", {"node_id": "n1", "state": "draining", "reason": "rma"})
    h.ok("node_state", {"node_id": "n2", "state": "draining", "reason": "x"})
    h.ok("node_down", {"node_id": "n2"})
    again = ClusterState()
    again.restore(h.state.snapshot())
    assert [n.drain_reason for n in again.nodes.values()] == ["rma", "x"]
    assert again.snapshot() == h.state.snapshot()
    # Written before nodes had a drain reason: a draining node is drained for
    # the reason it shows; a down one had its drain forgotten already.
    old = msgpack.unpackb(h.state.snapshot(), raw=False, strict_map_key=False)
    for n in old["nodes"]:
        del n["drain_reason"]
    older = ClusterState()
    older.restore(msgpack.packb(old, use_bin_type=True))
    assert [n.drain_reason for n in older.nodes.values()] == ["rma", None]
    check_invariants(older)


# -- the deadline passing -----------------------------------------------------------------


def test_before_the_deadline_drain_expired_is_a_conflict_and_changes_nothing() -> None:
    h = two_nodes()
    h.submit("a", gpus=1)
    h.run("a.0", "n1", [0])
    drain(h, "n1", deadline=5_000.0)
    before = h.state.snapshot()
    res = h.cmd("drain_expired", {"node_id": "n1", "now": 4_999.5})
    assert is_error(res, "conflict"), res
    assert same_records(before, h.state)
    res = h.cmd("drain_expired", {"node_id": "n2", "now": 6_000.0})
    assert is_error(res, "conflict"), res  # n2 is not draining
    assert same_records(before, h.state)


def test_at_the_deadline_live_tasks_stop_and_requeue_without_spending_a_retry() -> None:
    h = two_nodes()
    h.submit("a", gpus=2, retries=1)
    h.run("a.0", "n1", [0, 1])
    h.submit("pinned", gpus=1, preemptible=False)
    assert h.plan([("pinned.0", "n1", [2])])["placed"] == ["pinned.0"]  # assigned, not yet running
    h.submit("elsewhere", gpus=1)
    h.run("elsewhere.0", "n2", [0])
    drain(h, "n1", deadline=5_000.0)

    res = h.ok("drain_expired", {"node_id": "n1", "now": 5_000.0})
    assert res == {"node_id": "n1", "stopping": ["a.0", "pinned.0"]}
    a = h.task("a.0")
    assert (a.state, a.stop) == ("running", "drain")
    assert "drain deadline of node n1" in a.message
    # Not preemptible, but a drain deadline stops it all the same; it never
    # started, so no exit will come: it is back to pending at once.
    pinned = h.task("pinned.0")
    assert (pinned.state, pinned.node_id, pinned.stop, pinned.attempt) == ("pending", None, None, 1)
    assert pinned.message == (
        "stopped at the drain deadline of node n1 before it started; waiting to run again"
    )
    assert h.task("elsewhere.0").stop is None
    # Proposed again (a slow commit, a new leader): nothing more to stop.
    assert h.ok("drain_expired", {"node_id": "n1", "now": 5_001.0})["stopping"] == []
    check_invariants(h.state)

    h.event("a.0", "exited", 143)
    a = h.task("a.0")
    assert (a.state, a.node_id, a.gpus, a.stop, a.attempt) == ("pending", None, [], None, 1)
    assert a.preemptions == 0
    assert a.message == "stopped at the drain deadline of node n1 (exit 143); waiting to run again"
    assert h.job("a").retries_left == 1
    assert h.job("a").state == "pending"
    # Its agent reporting the run it started as the stop was applied: stale.
    assert h.event("pinned.0", "exited", None, attempt=1, node_id="n1")["stale"] == 1
    assert h.task("pinned.0").state == "pending"
    assert h.state.gpu_owner == {("n2", 0): "elsewhere.0"}
    check_invariants(h.state)

    h.run("a.0", "n2", [1, 2])
    a = h.task("a.0")
    assert (a.state, a.attempt, a.node_id) == ("running", 2, "n2")
    check_invariants(h.state)


def test_a_gang_rank_stopped_at_a_deadline_restarts_the_whole_gang() -> None:
    h = two_nodes()
    h.submit("g", gpus=1, nodes=2, retries=0)
    assert h.plan([("g.0", "n1", [0]), ("g.1", "n2", [0])])["placed"] == ["g.0", "g.1"]
    h.event("g.0", "running")
    drain(h, "n1", deadline=5_000.0)
    assert h.ok("drain_expired", {"node_id": "n1", "now": 6_000.0})["stopping"] == ["g.0"]
    h.event("g.0", "exited", 143)
    assert h.task("g.0").state == "pending"
    # g.1 never started: it is requeued at once rather than waiting on an exit.
    assert (h.task("g.1").state, h.task("g.1").stop) == ("pending", None)
    assert h.task("g.1").message == "restarting with its gang"
    assert h.job("g").state == "pending"
    check_invariants(h.state)


def test_a_gang_whose_ranks_never_started_is_requeued_whole_at_the_deadline() -> None:
    h = two_nodes()
    h.submit("g", gpus=1, nodes=2, retries=0)
    assert h.plan([("g.0", "n1", [0]), ("g.1", "n2", [0])])["placed"] == ["g.0", "g.1"]
    drain(h, "n1", deadline=5_000.0)
    assert h.ok("drain_expired", {"node_id": "n1", "now": 6_000.0})["stopping"] == ["g.0"]
    assert [(h.task(t).state, h.task(t).stop) for t in ("g.0", "g.1")] == [("pending", None)] * 2
    assert (h.job("g").state, h.job("g").retries_left) == ("pending", 0)
    assert h.state.gpu_owner == {}
    check_invariants(h.state)


def test_a_cancelled_task_still_stopping_at_the_deadline_ends_cancelled() -> None:
    h = two_nodes()
    h.submit("c", gpus=1, retries=2)
    h.run("c.0", "n1", [0])
    h.ok("cancel_job", {"job_id": "c", "user": "alice"})
    drain(h, "n1", deadline=5_000.0)
    assert h.ok("drain_expired", {"node_id": "n1", "now": 6_000.0})["stopping"] == []
    h.event("c.0", "exited", 143)
    assert h.task("c.0").state == "cancelled"
    check_invariants(h.state)


# -- a known node registering with less ---------------------------------------------------


def test_a_node_back_without_a_gpu_requeues_the_task_that_held_it() -> None:
    h = Harness()
    h.register("n1", gpus=4)
    registered_at = h.state.nodes["n1"].registered_at
    h.submit("low", gpus=2)
    h.run("low.0", "n1", [0, 1])
    h.submit("high", gpus=2, retries=0)
    h.run("high.0", "n1", [2, 3])

    res = h.register("n1", gpus=3)
    assert res["requeued"] == [{"task_id": "high.0", "reason": "node n1 came back without GPU 3"}]
    assert [t["task_id"] for t in res["tasks"]] == ["low.0"]  # what the agent keeps running
    t = h.task("high.0")
    assert (t.state, t.node_id, t.gpus, t.attempt, t.stop) == ("pending", None, [], 1, None)
    assert t.message == "node n1 came back without GPU 3; waiting to run again"
    # No retry spent: with none left, a spent one would have failed the job.
    assert h.job("high").state == "pending"
    assert h.task("low.0").state == "running"
    assert h.state.gpu_owner == {("n1", 0): "low.0", ("n1", 1): "low.0"}
    node = h.state.nodes["n1"]
    assert (node.id, node.registered_at, len(node.gpus)) == ("n1", registered_at, 3)
    check_invariants(h.state)
    # The same hardware again changes nothing.
    assert h.register("n1", gpus=3)["requeued"] == []
    check_invariants(h.state)


def test_a_node_back_with_fewer_cpus_sheds_the_lowest_priority_newest_tasks() -> None:
    h = Harness()
    h.register("n1", gpus=0, cpus=8.0)
    h.submit("old", cpus=2.0)
    h.run("old.0", "n1", [])
    h.submit("vip", cpus=4.0, priority=5)
    h.run("vip.0", "n1", [])
    h.submit("new", cpus=2.0)
    h.run("new.0", "n1", [])

    res = h.register("n1", gpus=0, cpus=6.0)
    assert [r["task_id"] for r in res["requeued"]] == ["new.0"]
    assert "6 CPUs" in res["requeued"][0]["reason"]
    assert [h.task(t).state for t in ("old.0", "vip.0", "new.0")] == [
        "running",
        "running",
        "pending",
    ]
    check_invariants(h.state)


def test_a_node_back_with_less_memory_sheds_tasks_until_it_fits() -> None:
    h = Harness()
    h.register("n1", gpus=0, mem_bytes=64 * GiB)
    for name in ("a", "b", "c"):
        h.submit(name, cpus=1.0, mem_bytes=16 * GiB)
        h.run(f"{name}.0", "n1", [])
    res = h.register("n1", gpus=0, mem_bytes=20 * GiB)
    assert [r["task_id"] for r in res["requeued"]] == ["c.0", "b.0"]
    assert h.task("a.0").state == "running"
    check_invariants(h.state)


def test_a_gang_rank_on_a_vanished_gpu_restarts_its_gang() -> None:
    h = two_nodes(gpus=4)
    h.submit("g", gpus=1, nodes=2)
    assert h.plan([("g.0", "n1", [3]), ("g.1", "n2", [0])])["placed"] == ["g.0", "g.1"]
    h.event("g.0", "running")
    h.event("g.1", "running")
    assert [r["task_id"] for r in h.register("n1", gpus=2)["requeued"]] == ["g.0"]
    assert h.task("g.0").state == "pending"
    assert (h.task("g.1").state, h.task("g.1").stop) == ("running", "gang")
    check_invariants(h.state)


def test_a_cancelled_task_on_a_vanished_gpu_ends_cancelled() -> None:
    h = Harness()
    h.register("n1", gpus=2)
    h.submit("c", gpus=1, retries=1)
    h.run("c.0", "n1", [1])
    h.ok("cancel_job", {"job_id": "c", "user": "alice"})
    assert [r["task_id"] for r in h.register("n1", gpus=1)["requeued"]] == ["c.0"]
    assert h.task("c.0").state == "cancelled"
    assert h.job("c").finished_at is not None
    check_invariants(h.state)


def test_a_node_back_with_gpus_renumbered_keeps_the_tasks_whose_gpus_remain() -> None:
    h = Harness()
    h.register("n1", gpus=4)
    h.submit("a", gpus=1)
    h.run("a.0", "n1", [2])
    rec = node_record("n1", gpus=4)
    rec["gpus"] = [g for g in rec["gpus"] if g["index"] != 1]  # GPU 1 fell off the bus
    res = h.ok("register_node", {"node": rec})
    assert res["requeued"] == []
    assert h.task("a.0").state == "running"
    check_invariants(h.state)
