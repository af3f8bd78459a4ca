"""Counters, the submit-to-start histogram, usage by user and day, and faulty
GPUs, as apply keeps them (raft/accounting.py, raft/gpuhealth.py)."""

from __future__ import annotations

import msgpack

from leptond.views import node_view
from raft import accounting as acct
from raft.commands import encode
from raft.state import ClusterState
from tests.test_state_support import Harness, is_error, records

DAY = 86400.0


def counters(h: Harness) -> dict[str, float]:
    return dict(h.state.counters)


def test_submit_to_start_is_observed_once_per_task_and_starts_are_counted() -> None:
    h = Harness()
    h.register("n1", gpus=4)
    h.now = 10_000.0
    h.submit("j1", gpus=1)  # submitted at 10001
    h.now = 10_003.5
    h.run("j1.0", "n1", [0])  # running at about 10005.5: 4.5 s after the submit
    c = counters(h)
    assert c[acct.START_COUNT] == 1 and c[acct.TASKS_STARTED] == 1
    five = acct.START_BUCKETS_S.index(5.0)
    assert c[acct.bucket_key(five)] == 1
    assert 4 < c[acct.START_SUM] < 5
    # Preempted and run again: a second start, but the task is observed once.
    h.plan(preemptions=["j1.0"])
    h.event("j1.0", "exited", exit_code=143)
    assert h.task("j1.0").state == "pending"
    h.run("j1.0", "n1", [1])
    c = counters(h)
    assert c[acct.TASKS_STARTED] == 2 and c[acct.START_COUNT] == 1
    assert c[acct.PREEMPTIONS] == 1 and c[acct.RESCHEDULES] == 1
    assert c[acct.ended_key("preempted")] == 1


def test_every_end_is_counted_by_its_reason() -> None:
    h = Harness()
    h.register("n1", gpus=8)
    h.register("n2", gpus=8)
    for jid in ("ok", "bad", "oom", "gone", "stop", "drained"):
        h.submit(jid, gpus=1, retries=0)
    h.run("ok.0", "n1", [0])
    h.run("bad.0", "n1", [1])
    h.run("oom.0", "n1", [2])
    h.run("gone.0", "n2", [0])
    h.run("stop.0", "n1", [3])
    h.run("drained.0", "n1", [4])
    h.event("ok.0", "exited", exit_code=0)
    h.event("bad.0", "exited", exit_code=1)
    ev = {
        "task_id": "oom.0",
        "attempt": 1,
        "node_id": "n1",
        "state": "exited",
        "exit_code": 137,
        "message": "out of memory (limit 100.0 MiB)",
        "at": h.now,
    }
    h.ok("task_events", {"events": [ev]})
    h.ok("node_down", {"node_id": "n2"})
    h.ok("cancel_job", {"job_id": "stop", "user": "alice"})
    h.event("stop.0", "exited", exit_code=143)
    h.ok("node_state", {"node_id": "n1", "state": "draining", "deadline": h.now})
    h.ok("drain_expired", {"node_id": "n1"})
    h.event("drained.0", "exited", exit_code=143)
    c = counters(h)
    for reason in ("succeeded", "failed", "oom", "lost", "cancelled", "evicted"):
        assert c[acct.ended_key(reason)] == 1, (reason, c)
    assert c[acct.JOBS_SUBMITTED] == 6
    for state, n in (("succeeded", 1), ("failed", 3), ("cancelled", 1)):
        assert c[acct.job_ended_key(state)] == n, (state, c)
    assert h.job("drained").state == "pending"  # requeued, not ended


def test_usage_is_split_by_day_and_outlives_the_job() -> None:
    h = Harness()
    h.register("n1", gpus=4)
    midnight = 20_000 * DAY
    h.now = midnight - 1800.0 - 2  # so that the task runs from half an hour before midnight
    h.submit("j1", user="bob", gpus=2, cpus=3.0)
    h.run("j1.0", "n1", [0, 1])
    start = h.task("j1.0").started_at
    assert start == midnight - 1800.0
    h.now = midnight + 3600.0  # the exit event says an hour after midnight
    h.event("j1.0", "exited", exit_code=0)
    usage = h.state.usage
    before, after = usage[("bob", 19_999)], usage[("bob", 20_000)]
    assert before.gpu_s == 2 * 1800 and after.gpu_s == 2 * 3600
    assert before.cpu_s == 3 * 1800 and after.cpu_s == 3 * 3600
    assert after.jobs == {"succeeded": 1} and before.jobs == {}
    assert h.job("j1").gpu_s == 2 * 5400
    assert h.state.counters[acct.GPU_SECONDS] == 2 * 5400
    # The job is forgotten after its retention; its usage is not.
    h.ok("gc_jobs", {"before": h.now + 1})
    assert "j1" not in h.state.jobs
    assert ("bob", 19_999) in h.state.usage
    # Usage goes only after its own retention.
    res = h.ok("gc_jobs", {"before": h.now, "usage_before": midnight})
    assert res["usage_days_removed"] == 1
    assert set(h.state.usage) == {("bob", 20_000)}


def test_a_run_is_charged_from_its_placement_whatever_the_agent_clock_says() -> None:
    h = Harness()
    h.register("n1", gpus=1)
    h.now = 50_000.0
    h.submit("j1", gpus=1)
    assert h.plan([("j1.0", "n1", [0])])["placed"] == ["j1.0"]
    placed = h.task("j1.0").assigned_at
    ev = {"task_id": "j1.0", "attempt": 1, "node_id": "n1", "state": "running", "at": 5.0}
    h.ok("task_events", {"events": [ev]})  # an agent whose clock is far behind
    h.now = placed + 99
    h.event("j1.0", "exited", exit_code=0)
    assert h.job("j1").gpu_s == 99.0  # from its placement, not from 5.0


def test_an_event_time_that_is_not_finite_changes_nothing() -> None:
    h = Harness()
    h.register("n1", gpus=1)
    h.submit("j1", gpus=1)
    assert h.plan([("j1.0", "n1", [0])])["placed"] == ["j1.0"]
    before = records(h.state)
    for at in (float("inf"), float("nan")):
        ev = {"task_id": "j1.0", "attempt": 1, "node_id": "n1", "state": "running", "at": at}
        assert is_error(h.cmd("task_events", {"events": [ev]}), "bad_command")
    assert records(h.state) == before


def test_a_faulty_gpu_stops_its_task_which_runs_again_without_spending_a_retry() -> None:
    h = Harness()
    h.register("n1", gpus=4)
    h.submit("j1", gpus=2, retries=1)
    h.run("j1.0", "n1", [1, 2])
    res = h.ok(
        "gpu_health",
        {"node_id": "n1", "unhealthy": [{"index": 2, "reason": "Xid 79: fell off the bus"}]},
    )
    assert res["marked"] == [2] and res["stopping"] == ["j1.0"]
    assert h.task("j1.0").stop == "gpu"
    assert h.state.nodes["n1"].gpu_faults[0]["reason"] == "Xid 79: fell off the bus"
    # Nothing is placed on it, whatever the plan says.
    h.submit("j2", gpus=1)
    res = h.plan([("j2.0", "n1", [2])])
    assert res["placed"] == [] and "unhealthy" in res["dropped"][0]["reason"]
    # The scheduler does not see it at all.
    assert [g.index for g in node_view(h.state.nodes["n1"]).gpus] == [0, 1, 3]
    assert len(node_view(h.state.nodes["n1"], with_faulty=True).gpus) == 4
    # The task's exit sends it back to pending with its retry intact.
    h.event("j1.0", "exited", exit_code=143)
    t = h.task("j1.0")
    assert t.state == "pending" and h.job("j1").retries_left == 1
    assert "became unhealthy" in t.message and "waiting to run again" in t.message
    assert h.state.counters[acct.ended_key("evicted")] == 1
    # A re-registration keeps the fault; a reset clears it.
    h.register("n1", gpus=4)
    assert [f["index"] for f in h.state.nodes["n1"].gpu_faults] == [2]
    res = h.ok("gpu_health", {"node_id": "n1", "healthy": [2]})
    assert res["cleared"] == [2] and h.state.nodes["n1"].gpu_faults == []
    assert h.plan([("j2.0", "n1", [2])])["placed"] == ["j2.0"]


def test_an_assigned_task_on_a_faulty_gpu_is_requeued_at_once() -> None:
    h = Harness()
    h.register("n1", gpus=2)
    h.submit("j1", gpus=1)
    assert h.plan([("j1.0", "n1", [0])])["placed"] == ["j1.0"]
    h.ok("gpu_health", {"node_id": "n1", "unhealthy": [{"index": 0, "reason": "ECC"}]})
    t = h.task("j1.0")
    assert t.state == "pending" and t.stop is None


def test_bad_gpu_health_commands_change_nothing() -> None:
    h = Harness()
    h.register("n1", gpus=2)
    before = records(h.state)
    for args in (
        {"node_id": "n1", "unhealthy": [{"index": 7, "reason": "x"}]},
        {"node_id": "n1", "unhealthy": [{"index": -1}]},
        {"node_id": "n1", "unhealthy": [{"index": True}]},
        {"node_id": "n1", "unhealthy": "all"},
        {"node_id": "n1", "healthy": ["0"]},
        {"node_id": "nope", "healthy": [0]},
    ):
        assert is_error(h.cmd("gpu_health", args)), args
    assert records(h.state) == before


def test_a_snapshot_from_before_accounting_still_loads() -> None:
    h = Harness()
    h.register("n1", gpus=1)
    h.submit("j1", gpus=1)
    obj = msgpack.unpackb(h.state.snapshot(), raw=False, strict_map_key=False)
    del obj["counters"], obj["usage"]
    old = ClusterState()
    old.restore(msgpack.packb(obj, use_bin_type=True))
    assert "j1" in old.jobs and dict(old.counters) == {} and dict(old.usage) == {}
    # And it goes on counting from there.
    old.apply(encode("noop", {}), 99)
    assert old.snapshot()  # packs


# -- arrays, requeues and dependencies (raft/workloads.py) ---------------------------
def test_an_array_counts_each_attempt_once_and_observes_each_task_once() -> None:
    h = Harness()
    h.register("n1", gpus=8)
    h.submit("a", gpus=1, retries=1, array=[[0, 2, 1]])
    h.run("a.0", "n1", [0])
    h.event("a.0", "exited", exit_code=0)
    h.run("a.1", "n1", [1])
    h.event("a.1", "exited", exit_code=1)  # spends a.1's own retry
    assert h.task("a.1").state == "pending" and h.task("a.1").retries_used == 1
    h.run("a.1", "n1", [1])
    h.event("a.1", "exited", exit_code=0)
    h.run("a.2", "n1", [2])
    h.event("a.2", "exited", exit_code=85)  # asks to run again from its checkpoint
    t = h.task("a.2")
    assert (t.state, t.restarts, t.retries_used) == ("pending", 1, 0)
    h.run("a.2", "n1", [5])
    h.ok("gpu_health", {"node_id": "n1", "unhealthy": [{"index": 5, "reason": "Xid 48"}]})
    h.event("a.2", "exited", exit_code=143)  # stopped for its faulty GPU: no retry spent
    t = h.task("a.2")
    assert (t.state, t.restarts, t.retries_used) == ("pending", 2, 0)
    h.run("a.2", "n1", [6])
    h.event("a.2", "exited", exit_code=0)
    assert h.job("a").state == "succeeded"
    c = counters(h)
    assert c[acct.TASKS_STARTED] == 6 and c[acct.START_COUNT] == 3
    assert c[acct.ended_key("succeeded")] == 3
    for reason in ("failed", "requeued", "evicted"):
        assert c[acct.ended_key(reason)] == 1, (reason, c)
    assert c[acct.RESCHEDULES] == 3
    assert c[acct.JOBS_SUBMITTED] == 1 and c[acct.job_ended_key("succeeded")] == 1
    assert [u.jobs for u in h.state.usage.values()] == [{"succeeded": 1}]
    assert {k: n for k, n in h.state.job_counts["a"].items() if n} == {"succeeded": 3}
    assert h.state.user_pending_tasks.get("alice", 0) == 0


def test_a_job_failed_by_its_dependency_ends_once_in_the_counters_and_usage() -> None:
    h = Harness()
    h.register("n1", gpus=8)
    h.submit("a", gpus=1, retries=0)
    h.submit("b", gpus=1, after_ok=["a"])
    h.run("a.0", "n1", [0])
    h.event("a.0", "exited", exit_code=1)
    assert h.job("b").state == "failed"
    c = counters(h)
    assert c[acct.job_ended_key("failed")] == 2
    assert c[acct.ended_key("failed")] == 1  # b's task never ran: no attempt ended
    assert [u.jobs for u in h.state.usage.values()] == [{"failed": 2}]


def test_a_snapshot_carries_both_arrays_and_accounting() -> None:
    """Every field and key either side added survives a snapshot: counters and
    usage, a GPU fault, an array's per-task retries and restarts, a job's
    dependencies and charged seconds; and what restore derives (counts per
    job and per user, dependents) is what apply had kept."""
    h = Harness()
    h.register("n1", gpus=4)
    h.submit("a", gpus=1, retries=2, array=[[0, 3, 1]], max_running=3)
    h.submit("b", gpus=1, after_ok=["a"])
    h.run("a.0", "n1", [0])
    h.event("a.0", "exited", exit_code=1)
    h.run("a.1", "n1", [1])
    h.event("a.1", "exited", exit_code=85)
    h.run("a.2", "n1", [2])
    h.ok("gpu_health", {"node_id": "n1", "unhealthy": [{"index": 3, "reason": "Xid 79"}]})
    other = ClusterState()
    other.restore(h.state.snapshot())
    assert other.snapshot() == h.state.snapshot()
    assert (other.tasks["a.0"].retries_used, other.tasks["a.1"].restarts) == (1, 1)
    assert other.tasks["a.2"].first_started_at == h.task("a.2").first_started_at is not None
    assert other.jobs["b"].waiting_on == ["a"] and other.dependents == {"a": {"b"}}
    assert other.jobs["a"].gpu_s == h.job("a").gpu_s > 0
    assert dict(other.counters) == dict(h.state.counters)
    assert dict(other.usage) == dict(h.state.usage) != {}
    assert other.nodes["n1"].gpu_faults == h.state.nodes["n1"].gpu_faults != []

    def nonzero(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        return {j: {st: n for st, n in c.items() if n} for j, c in counts.items()}

    assert nonzero(other.job_counts) == nonzero(h.state.job_counts)
    assert other.user_pending_tasks == h.state.user_pending_tasks
    view = other.freeze()
    assert dict(view.counters) == dict(h.state.counters) and len(view.usage) == len(h.state.usage)
