"""Stops of tasks that never started: a task in state assigned (placed, not yet
reported running by its agent) ends when a cancel, a preemption, a drain
deadline or its gang stops it, instead of waiting for an exit that no agent
will report. A run its agent starts anyway is stale from then on."""

from __future__ import annotations

from tests.test_state_support import Harness, check_invariants, same_records


def placed(h: Harness, job_id: str, node_id: str, gpus: list[int], **spec: object) -> str:
    h.submit(job_id, gpus=len(gpus), **spec)  # type: ignore[arg-type]
    tid = f"{job_id}.0"
    assert h.plan([(tid, node_id, gpus)])["placed"] == [tid]
    assert h.task(tid).state == "assigned"
    return tid


def late_events(h: Harness, tid: str, node_id: str, attempt: int) -> None:
    """What an agent that started the run just as the stop applied reports."""
    before = h.state.snapshot()
    for state, code in (("running", None), ("exited", 143)):
        ev = {"task_id": tid, "attempt": attempt, "node_id": node_id, "state": state, "at": h.now}
        if state == "exited":
            ev["exit_code"] = code
        res = h.ok("task_events", {"events": [ev]})
        assert res["applied"] == 0, res
    assert same_records(before, h.state)


def test_a_cancelled_task_that_never_started_is_cancelled_at_once() -> None:
    h = Harness()
    h.register("n1")
    tid = placed(h, "c", "n1", [0, 1], retries=2)
    h.ok("cancel_job", {"job_id": "c", "user": "alice"})
    t = h.task(tid)
    assert (t.state, t.message, t.exit_code) == ("cancelled", "cancelled before it started", None)
    assert h.job("c").state == "cancelled" and h.job("c").finished_at is not None
    assert h.state.gpu_owner == {}
    # Its agent is not asked to run it (a register answer lists what to keep).
    assert h.state.node_assignments("n1") == []
    late_events(h, tid, "n1", 1)
    check_invariants(h.state)


def test_a_cancel_still_waits_for_a_running_task_to_exit() -> None:
    h = Harness()
    h.register("n1")
    tid = placed(h, "c", "n1", [0])
    h.event(tid, "running")
    h.ok("cancel_job", {"job_id": "c", "user": "alice"})
    assert (h.task(tid).state, h.task(tid).stop) == ("running", "cancel")
    assert h.state.gpu_owner == {("n1", 0): tid}
    h.event(tid, "exited", 143)
    assert h.task(tid).state == "cancelled"
    check_invariants(h.state)


def test_a_preempted_task_that_never_started_is_pending_at_once_without_spending_a_retry() -> None:
    h = Harness()
    h.register("n1", gpus=2)
    victim = placed(h, "low", "n1", [0, 1], retries=0)
    h.submit("high", gpus=2, priority=5)
    res = h.plan(preemptions=[victim])
    assert res["preempting"] == [victim]
    t = h.task(victim)
    assert (t.state, t.node_id, t.gpus, t.stop, t.attempt) == ("pending", None, [], None, 1)
    assert (t.preemptions, t.message) == (1, "preempted before it started; waiting to run again")
    assert (h.job("low").state, h.job("low").retries_left) == ("pending", 0)
    # The preemptor gets the GPUs at once.
    assert h.plan([("high.0", "n1", [0, 1])])["placed"] == ["high.0"]
    late_events(h, victim, "n1", 1)
    check_invariants(h.state)


def test_a_task_requeued_before_it_started_runs_again_as_a_new_attempt() -> None:
    """Placed on the same node again, the node is told to run attempt 2 only:
    a run of attempt 1 that its agent started late is stopped by reconcile."""
    h = Harness()
    h.register("n1", gpus=2)
    tid = placed(h, "low", "n1", [0])
    h.plan(preemptions=[tid])
    assert h.plan([(tid, "n1", [1])])["placed"] == [tid]
    assert h.state.node_assignments("n1") == [{"task_id": tid, "attempt": 2, "stop": None}]
    before = h.state.snapshot()
    assert h.event(tid, "running", attempt=1)["stale"] == 1
    assert same_records(before, h.state)
    h.event(tid, "running")
    assert (h.task(tid).state, h.task(tid).attempt) == ("running", 2)
    check_invariants(h.state)


def test_a_gang_rank_failing_for_good_cancels_the_ranks_that_never_started() -> None:
    h = Harness()
    h.register("n1")
    h.register("n2")
    h.submit("g", gpus=1, nodes=2, retries=0)
    assert h.plan([("g.0", "n1", [0]), ("g.1", "n2", [0])])["placed"] == ["g.0", "g.1"]
    h.event("g.0", "running")
    h.event("g.0", "exited", 1)
    g1 = h.task("g.1")
    assert (g1.state, g1.message) == ("cancelled", "gang member 0 failed")
    assert h.job("g").state == "failed" and h.job("g").finished_at is not None
    assert h.state.gpu_owner == {}
    check_invariants(h.state)


def test_a_gang_rank_retrying_requeues_the_ranks_that_never_started() -> None:
    h = Harness()
    h.register("n1")
    h.register("n2")
    h.submit("g", gpus=1, nodes=2, retries=1)
    assert h.plan([("g.0", "n1", [0]), ("g.1", "n2", [0])])["placed"] == ["g.0", "g.1"]
    h.event("g.0", "running")
    h.event("g.0", "exited", 1)
    assert [(h.task(t).state, h.task(t).stop) for t in ("g.0", "g.1")] == [("pending", None)] * 2
    assert (h.job("g").state, h.job("g").retries_left) == ("pending", 0)
    # The whole gang can be placed again.
    assert h.plan([("g.0", "n2", [1]), ("g.1", "n1", [1])])["placed"] == ["g.0", "g.1"]
    check_invariants(h.state)


def test_a_cancelled_task_that_exits_carries_no_stop() -> None:
    """`status` showed `cancelled (stopping)` forever: the stop outlived the exit."""
    h = Harness()
    h.register("n1")
    tid = placed(h, "c", "n1", [0])
    h.event(tid, "running")
    h.ok("cancel_job", {"job_id": "c", "user": "alice"})
    assert h.task(tid).stop == "cancel"  # still live: it is stopping
    h.event(tid, "exited", 143)
    t = h.task(tid)
    assert (t.state, t.stop, t.exit_code) == ("cancelled", None, 143)
    assert h.job("c").finished_at is not None
    check_invariants(h.state)


def test_the_surviving_rank_of_a_failed_gang_ends_without_a_stop() -> None:
    h = Harness()
    h.register("n1")
    h.register("n2")
    h.submit("g", gpus=1, nodes=2, retries=0)
    assert h.plan([("g.0", "n1", [0]), ("g.1", "n2", [0])])["placed"] == ["g.0", "g.1"]
    h.event("g.0", "running")
    h.event("g.1", "running")
    h.event("g.0", "exited", 1)
    assert (h.task("g.1").state, h.task("g.1").stop) == ("running", "cancel")
    h.event("g.1", "exited", 143)
    assert [(h.task(t).state, h.task(t).stop) for t in ("g.0", "g.1")] == [
        ("failed", None),
        ("cancelled", None),
    ]
    check_invariants(h.state)


def test_a_snapshot_whose_ended_tasks_carry_a_stop_restores_without_them() -> None:
    """Snapshots written before ended tasks dropped their stop."""
    import msgpack

    from raft.state import ClusterState

    h = Harness()
    h.register("n1")
    tid = placed(h, "c", "n1", [0])
    h.event(tid, "running")
    h.ok("cancel_job", {"job_id": "c", "user": "alice"})
    h.event(tid, "exited", 143)
    obj = msgpack.unpackb(h.state.snapshot(), raw=False, strict_map_key=False)
    for t in obj["tasks"]:
        t["stop"] = "cancel"  # as an older release left it
    fresh = ClusterState()
    fresh.restore(msgpack.packb(obj, use_bin_type=True))
    assert fresh.tasks[tid].stop is None
    check_invariants(fresh)
