"""Jobs and tasks through ClusterState: placement, exits, retries, cancels,
lost nodes, gangs, preemption, stale events and gc (DESIGN §5-7)."""

from __future__ import annotations

from tests.test_state_support import Harness, check_invariants, is_error, same_records


def one_node(gpus: int = 4, **kw: object) -> Harness:
    h = Harness()
    h.register("n1", gpus=gpus, **kw)  # type: ignore[arg-type]
    return h


# -- the happy path and retries ------------------------------------------------------


def test_submitted_job_runs_and_succeeds_on_exit_0() -> None:
    h = one_node()
    assert h.submit("j1", gpus=2) == {"id": "j1"}
    assert h.job("j1").state == "pending"
    assert list(h.state.pending) == ["j1.0"]

    assert h.plan([("j1.0", "n1", [0, 1])]) == {"placed": ["j1.0"], "dropped": [], "preempting": []}
    assert (h.task("j1.0").state, h.task("j1.0").attempt) == ("assigned", 1)
    assert h.job("j1").state == "running"
    assert h.state.gpu_owner == {("n1", 0): "j1.0", ("n1", 1): "j1.0"}
    assert not h.state.pending

    assert h.event("j1.0", "running") == {"applied": 1, "stale": 0}
    assert h.task("j1.0").state == "running"
    h.event("j1.0", "exited", 0)
    assert h.task("j1.0").state == "succeeded"
    assert h.job("j1").state == "succeeded"
    assert h.job("j1").finished_at is not None
    assert h.state.gpu_owner == {}
    check_invariants(h.state)


def test_failed_exit_with_retries_left_requeues_and_spends_one() -> None:
    h = one_node()
    h.submit("j1", gpus=1, retries=1)
    h.run("j1.0", "n1", [0])
    h.event("j1.0", "exited", 1)
    t = h.task("j1.0")
    assert (t.state, t.node_id, t.gpus, t.exit_code) == ("pending", None, [], 1)
    assert h.job("j1").state == "pending"
    assert h.job("j1").retries_left == 0
    assert list(h.state.pending) == ["j1.0"]
    assert h.state.gpu_owner == {}

    h.run("j1.0", "n1", [0])
    assert h.task("j1.0").attempt == 2
    h.event("j1.0", "exited", 1)
    assert h.task("j1.0").state == "failed"
    assert h.job("j1").state == "failed"
    assert h.job("j1").finished_at is not None
    check_invariants(h.state)


def test_failed_exit_without_retries_fails_the_job() -> None:
    h = one_node()
    h.submit("j1", gpus=1)
    h.run("j1.0", "n1", [0])
    h.event("j1.0", "exited", 3)
    assert (h.task("j1.0").state, h.task("j1.0").exit_code) == ("failed", 3)
    assert h.job("j1").state == "failed"
    assert "task 0 failed" in h.job("j1").message
    assert h.state.gpu_owner == {}
    check_invariants(h.state)


# -- cancel ------------------------------------------------------------------------------


def test_cancel_pending_job_cancels_its_tasks_at_once() -> None:
    h = one_node()
    h.submit("j1", gpus=1)
    assert h.ok("cancel_job", {"job_id": "j1", "user": "alice"}) == {
        "id": "j1",
        "state": "cancelled",
    }
    assert h.task("j1.0").state == "cancelled"
    assert h.job("j1").finished_at is not None
    assert not h.state.pending
    check_invariants(h.state)


def test_cancel_running_job_keeps_the_task_live_until_it_exits() -> None:
    h = one_node(gpus=2)
    h.submit("j1", gpus=2)
    h.run("j1.0", "n1", [0, 1])
    h.ok("cancel_job", {"job_id": "j1", "user": "alice"})
    t = h.task("j1.0")
    assert (h.job("j1").state, t.state, t.stop) == ("cancelled", "running", "cancel")
    assert h.job("j1").finished_at is None
    assert h.state.node_assignments("n1") == [{"task_id": "j1.0", "attempt": 1, "stop": "cancel"}]
    # The GPUs stay held until the process is gone: nothing else lands on them.
    h.submit("j2", gpus=1)
    dropped = h.plan([("j2.0", "n1", [0])])["dropped"]
    assert dropped == [{"task_id": "j2.0", "reason": "GPU 0 on n1 is taken"}]

    h.event("j1.0", "exited", 143)
    assert h.task("j1.0").state == "cancelled"
    assert h.job("j1").finished_at is not None
    assert h.plan([("j2.0", "n1", [0])])["placed"] == ["j2.0"]
    check_invariants(h.state)


def test_cancel_of_a_finished_job_is_an_error_and_changes_nothing() -> None:
    h = one_node()
    h.submit("j1")
    h.run("j1.0", "n1", [])
    h.event("j1.0", "exited", 0)
    before = h.state.snapshot()
    result = h.cmd("cancel_job", {"job_id": "j1", "user": "alice"})
    assert is_error(result, "conflict")
    assert result["error"]["message"] == "job j1 already succeeded"
    assert h.job("j1").state == "succeeded"
    assert same_records(before, h.state)


def test_cancel_of_an_unknown_job_is_not_found() -> None:
    h = one_node()
    assert is_error(h.cmd("cancel_job", {"job_id": "nope", "user": "alice"}), "not_found")


def test_only_the_owner_or_an_admin_can_cancel() -> None:
    h = one_node()
    h.submit("j1", user="alice")
    result = h.cmd("cancel_job", {"job_id": "j1", "user": "mallory"})
    assert is_error(result, "forbidden")
    assert "belongs to alice" in result["error"]["message"]
    assert h.job("j1").state == "pending"
    assert h.ok("cancel_job", {"job_id": "j1", "user": "root", "admin": True})["state"] == (
        "cancelled"
    )


# -- nodes going away --------------------------------------------------------------------


def test_node_down_loses_live_tasks_and_requeues_while_retries_remain() -> None:
    h = Harness()
    h.register("n1")
    h.register("n2")
    h.submit("retry", gpus=1, retries=1)
    h.submit("once", gpus=1)
    h.submit("elsewhere", gpus=1)
    h.run("retry.0", "n1", [0])
    h.run("once.0", "n1", [1])
    h.run("elsewhere.0", "n2", [0])

    result = h.ok("node_down", {"node_id": "n1"})
    assert sorted(result["lost"]) == ["once.0", "retry.0"]
    assert h.state.nodes["n1"].state == "down"
    assert (h.task("retry.0").state, h.job("retry").state) == ("pending", "pending")
    assert h.job("retry").retries_left == 0
    assert (h.task("once.0").state, h.job("once").state) == ("lost", "failed")
    assert h.task("elsewhere.0").state == "running"
    assert all(n == "n2" for n, _ in h.state.gpu_owner)
    # A down node takes no work until its agent registers again.
    assert h.plan([("retry.0", "n1", [0])])["dropped"][0]["reason"] == "node is not ready"
    h.register("n1")
    assert h.state.nodes["n1"].state == "ready"
    assert h.plan([("retry.0", "n1", [0])])["placed"] == ["retry.0"]
    check_invariants(h.state)


def test_remove_node_refuses_while_tasks_run_unless_forced() -> None:
    h = one_node()
    h.submit("j1", gpus=1, retries=1)
    h.run("j1.0", "n1", [0])
    assert is_error(h.cmd("remove_node", {"node_id": "n1"}), "conflict")
    assert h.ok("remove_node", {"node_id": "n1", "force": True}) == {
        "node_id": "n1",
        "removed": True,
    }
    assert "n1" not in h.state.nodes
    assert h.task("j1.0").state == "pending"
    check_invariants(h.state)


def test_node_that_is_removed_and_joins_again_has_consistent_indexes() -> None:
    h = one_node()
    h.submit("j1")
    h.run("j1.0", "n1", [])
    h.event("j1.0", "exited", 0)
    h.ok("remove_node", {"node_id": "n1"})
    h.register("n1")
    check_invariants(h.state)
    assert h.state.node_tasks["n1"] == {"j1.0"}


def test_tasks_of_a_removed_node_gone_by_gc_are_not_its_again_when_it_joins() -> None:
    h = one_node()
    h.submit("j1")
    h.run("j1.0", "n1", [])
    h.event("j1.0", "exited", 0)
    h.ok("remove_node", {"node_id": "n1"})
    assert h.state.removed_node_tasks == {"n1": {"j1.0"}}
    h.ok("gc_jobs", {"before": h.now + 1})
    assert h.state.removed_node_tasks == {}
    h.register("n1")
    assert h.state.node_tasks["n1"] == set()
    check_invariants(h.state)


# -- gangs -------------------------------------------------------------------------------


def gang_cluster(retries: int = 0) -> Harness:
    h = Harness()
    for n in ("n1", "n2", "n3"):
        h.register(n)
    h.submit("g", gpus=2, nodes=2, retries=retries)
    return h


def test_gang_is_placed_whole_or_not_at_all() -> None:
    h = gang_cluster()
    result = h.plan([("g.0", "n1", [0, 1])])
    assert result["placed"] == []
    assert result["dropped"] == [
        {"task_id": "g.0", "reason": "a gang is placed whole or not at all"}
    ]
    assert h.task("g.0").state == "pending"
    # One rank that does not fit drops the other with it.
    h.submit("hog", gpus=4)
    h.run("hog.0", "n2", [0, 1, 2, 3])
    result = h.plan([("g.0", "n1", [0, 1]), ("g.1", "n2", [0, 1])])
    assert result["placed"] == []
    assert [d["task_id"] for d in result["dropped"]] == ["g.0", "g.1"]
    assert result["dropped"][0]["reason"] == "GPU 0 on n2 is taken"
    # Two ranks on one node are not a gang.
    result = h.plan([("g.0", "n1", [0, 1]), ("g.1", "n1", [2, 3])])
    assert result["dropped"][0]["reason"] == "gang tasks need distinct nodes"

    assert h.plan([("g.0", "n1", [0, 1]), ("g.1", "n3", [2, 3])])["placed"] == ["g.0", "g.1"]
    assert h.job("g").state == "running"
    check_invariants(h.state)


def start_gang(h: Harness) -> None:
    assert h.plan([("g.0", "n1", [0, 1]), ("g.1", "n2", [0, 1])])["placed"] == ["g.0", "g.1"]
    h.event("g.0", "running")
    h.event("g.1", "running")


def test_failed_gang_rank_without_retries_stops_the_others_and_fails_the_job() -> None:
    h = gang_cluster()
    start_gang(h)
    h.event("g.1", "exited", 1)
    assert h.job("g").state == "failed"
    assert (h.task("g.0").state, h.task("g.0").stop) == ("running", "cancel")
    h.event("g.0", "exited", 143)
    assert h.task("g.0").state == "cancelled"
    assert h.job("g").state == "failed"
    assert h.job("g").finished_at is not None
    check_invariants(h.state)


def test_failed_gang_rank_with_retries_restarts_the_whole_gang() -> None:
    h = gang_cluster(retries=1)
    start_gang(h)
    h.event("g.1", "exited", 1)
    assert h.task("g.1").state == "pending"
    assert (h.task("g.0").state, h.task("g.0").stop) == ("running", "gang")
    # Until the other rank is gone, the gang cannot be placed again.
    assert h.plan([("g.1", "n3", [0, 1])])["placed"] == []
    h.event("g.0", "exited", 143)
    assert h.task("g.0").state == "pending"
    assert h.job("g").state == "pending"
    assert h.job("g").retries_left == 0
    assert h.plan([("g.0", "n2", [0, 1]), ("g.1", "n3", [0, 1])])["placed"] == ["g.0", "g.1"]
    check_invariants(h.state)


def test_gang_rank_that_already_succeeded_reruns_when_another_rank_retries() -> None:
    h = gang_cluster(retries=1)
    start_gang(h)
    h.event("g.0", "exited", 0)
    h.event("g.1", "exited", 1)
    assert [h.task(t).state for t in ("g.0", "g.1")] == ["pending", "pending"]
    assert h.job("g").state == "pending"
    assert h.plan([("g.0", "n1", [0, 1]), ("g.1", "n2", [0, 1])])["placed"] == ["g.0", "g.1"]
    check_invariants(h.state)


def test_a_finished_rank_of_a_removed_node_that_runs_again_is_not_given_back_to_it() -> None:
    h = gang_cluster(retries=1)
    start_gang(h)
    h.event("g.0", "exited", 0)
    h.ok("remove_node", {"node_id": "n1"})  # g.0 ended there: no drain needed
    h.event("g.1", "exited", 1)  # the gang restarts, g.0 with it
    assert h.task("g.0").state == "pending"
    assert h.plan([("g.0", "n3", [0, 1]), ("g.1", "n2", [0, 1])])["placed"] == ["g.0", "g.1"]
    h.register("n1")
    assert h.state.node_tasks["n1"] == set()
    check_invariants(h.state)
    # Its return loses nothing of g.0's, which runs on n3.
    h.ok("node_down", {"node_id": "n1"})
    assert (h.task("g.0").state, h.task("g.0").node_id) == ("assigned", "n3")
    check_invariants(h.state)


def test_preempting_one_gang_rank_restarts_the_whole_gang() -> None:
    h = gang_cluster()
    start_gang(h)
    h.plan(preemptions=["g.0"])
    h.event("g.0", "exited", 137)
    assert h.task("g.0").state == "pending"
    assert (h.task("g.1").state, h.task("g.1").stop) == ("running", "gang")
    h.event("g.1", "exited", 0)
    assert [h.task(t).state for t in ("g.0", "g.1")] == ["pending", "pending"]
    assert h.job("g").state == "pending"
    check_invariants(h.state)


# -- preemption --------------------------------------------------------------------------


def test_preempted_task_requeues_without_spending_a_retry() -> None:
    h = one_node()
    h.submit("low", gpus=4, retries=2)
    h.run("low.0", "n1", [0, 1, 2, 3])
    assert h.plan(preemptions=["low.0"])["preempting"] == ["low.0"]
    t = h.task("low.0")
    assert (t.state, t.stop) == ("running", "preempt")
    # Asking again is not a second preemption.
    assert h.plan(preemptions=["low.0"])["preempting"] == []
    h.event("low.0", "exited", 137)
    assert (t.state, t.preemptions, t.stop, t.node_id) == ("pending", 1, None, None)
    assert h.job("low").retries_left == 2
    assert h.job("low").state == "pending"
    assert h.state.gpu_owner == {}
    check_invariants(h.state)


def test_non_preemptible_job_is_not_preempted() -> None:
    h = one_node()
    h.submit("keep", gpus=1, preemptible=False)
    h.run("keep.0", "n1", [0])
    assert h.plan(preemptions=["keep.0"])["preempting"] == []
    assert h.task("keep.0").stop is None


# -- stale events ------------------------------------------------------------------------


def test_events_from_an_old_attempt_or_another_node_are_ignored() -> None:
    h = Harness()
    h.register("n1")
    h.register("n2")
    h.submit("j1", gpus=1, retries=1)
    h.run("j1.0", "n1", [0])
    h.event("j1.0", "exited", 1)  # attempt 1 failed; requeued
    h.run("j1.0", "n2", [0])
    assert h.task("j1.0").attempt == 2
    before = h.state.snapshot()

    assert h.event("j1.0", "exited", 1, attempt=1, node_id="n2") == {"applied": 0, "stale": 1}
    assert h.event("j1.0", "exited", 1, node_id="n1") == {"applied": 0, "stale": 1}
    assert h.event("j1.0", "running", attempt=3) == {"applied": 0, "stale": 1}
    result = h.ok(
        "task_events",
        {"events": [{"task_id": "gone", "attempt": 1, "state": "exited", "at": 0}]},
    )
    assert result == {"applied": 0, "stale": 1}
    assert h.task("j1.0").state == "running"
    assert same_records(before, h.state)


# -- plans that no longer fit ----------------------------------------------------------------


def test_plan_that_does_not_fit_is_dropped_with_a_reason() -> None:
    h = Harness()
    h.register("n1", gpus=2, cpus=8.0, mem_bytes=64 << 30)
    h.register("n2")
    h.register("n3")
    h.ok("node_state", {"node_id": "n2", "state": "draining"})
    h.ok("node_down", {"node_id": "n3"})
    h.submit("big_cpu", cpus=16.0)
    h.submit("big_mem", mem_bytes=128 << 30)
    h.submit("two_gpus", gpus=2)
    h.submit("one_gpu", gpus=1)
    h.submit("owner", gpus=1)
    h.run("owner.0", "n1", [1])
    before = h.state.snapshot()
    result = h.plan(
        [
            ("big_cpu.0", "n1", []),
            ("big_mem.0", "n1", []),
            ("two_gpus.0", "n1", [0, 5]),
            ("one_gpu.0", "n1", [1]),
            ("owner.0", "n2", [0]),
            ("nope.0", "n1", [0]),
        ]
    )
    assert result["placed"] == []
    assert result["dropped"] == [
        {"task_id": "nope.0", "reason": "no such task"},
        {"task_id": "big_cpu.0", "reason": "node n1 lacks CPUs or memory"},
        {"task_id": "big_mem.0", "reason": "node n1 lacks CPUs or memory"},
        {"task_id": "two_gpus.0", "reason": "node n1 has no GPU 5"},
        {"task_id": "one_gpu.0", "reason": "GPU 1 on n1 is taken"},
        {"task_id": "owner.0", "reason": "task owner.0 is running"},
    ]
    assert h.plan([("one_gpu.0", "n2", [0])])["dropped"][0]["reason"] == "node is not ready"
    assert h.plan([("one_gpu.0", "n3", [0])])["dropped"][0]["reason"] == "node is not ready"
    assert h.plan([("one_gpu.0", "n1", [0, 0])])["dropped"][0]["reason"] == "wrong GPU list"
    assert same_records(before, h.state)


def test_two_placements_in_one_plan_cannot_share_a_gpu_or_overfill_a_node() -> None:
    h = Harness()
    h.register("n1", gpus=2, cpus=4.0)
    h.submit("a", gpus=1, cpus=3.0)
    h.submit("b", gpus=1, cpus=3.0)
    h.submit("c", gpus=1, cpus=1.0)
    result = h.plan([("a.0", "n1", [0]), ("b.0", "n1", [1]), ("c.0", "n1", [0])])
    assert result["placed"] == ["a.0"]
    assert result["dropped"] == [
        {"task_id": "b.0", "reason": "node n1 lacks CPUs or memory"},
        {"task_id": "c.0", "reason": "GPU 0 on n1 is taken"},
    ]
    check_invariants(h.state)


def test_a_task_listed_twice_in_one_plan_is_placed_at_most_once() -> None:
    h = Harness()
    h.register("n1")
    h.register("n2")
    h.submit("j1", gpus=1)
    result = h.plan([("j1.0", "n1", [0]), ("j1.0", "n2", [0])])
    assert result["placed"] == []
    assert h.task("j1.0").attempt == 0
    check_invariants(h.state)


# -- gc ----------------------------------------------------------------------------------


def test_gc_forgets_finished_jobs_older_than_the_cutoff() -> None:
    h = one_node()
    h.submit("old")
    h.run("old.0", "n1", [])
    h.event("old.0", "exited", 0)
    cutoff = h.now + 0.5
    h.submit("young")
    h.run("young.0", "n1", [])
    h.event("young.0", "exited", 1)
    h.submit("waiting")
    assert h.ok("gc_jobs", {"before": cutoff}) == {"removed": 1}
    assert sorted(h.state.jobs) == ["waiting", "young"]
    assert "old.0" not in h.state.tasks
    assert h.ok("gc_jobs", {"before": h.now + 1}) == {"removed": 1}
    assert sorted(h.state.jobs) == ["waiting"]
    check_invariants(h.state)


def test_gc_keeps_a_cancelled_job_whose_task_still_runs() -> None:
    h = one_node()
    h.submit("j1", gpus=2)
    h.run("j1.0", "n1", [0, 1])
    h.ok("cancel_job", {"job_id": "j1", "user": "alice"})
    assert h.ok("gc_jobs", {"before": h.now + 100}) == {"removed": 0}
    assert h.state.gpu_owner == {("n1", 0): "j1.0", ("n1", 1): "j1.0"}
    h.event("j1.0", "exited", 143)
    assert h.ok("gc_jobs", {"before": h.now + 100}) == {"removed": 1}
    assert h.state.gpu_owner == {}
    check_invariants(h.state)


def test_node_down_judged_before_the_node_registered_again_is_void() -> None:
    """The leader decides from a view; a registration committed after that
    view (the agent came back and its answer renewed its lease) voids it."""
    h = Harness()
    h.register("n1")
    h.submit("j", gpus=1, retries=1)
    h.run("j.0", "n1", [0])
    seen = h.state.nodes["n1"].updated_at
    h.register("n1")  # back before the node_down below was applied
    res = h.ok("node_down", {"node_id": "n1", "if_updated_at": seen})
    assert res == {"node_id": "n1", "lost": [], "stale": True}
    assert h.state.nodes["n1"].state == "ready"
    assert h.task("j.0").state == "running"
    # Judged from the newest view, it applies.
    now_seen = h.state.nodes["n1"].updated_at
    res = h.ok("node_down", {"node_id": "n1", "if_updated_at": now_seen})
    assert res["lost"] == ["j.0"] and h.state.nodes["n1"].state == "down"
    check_invariants(h.state)


def test_the_capacity_epoch_moves_when_a_task_ends_not_when_it_starts() -> None:
    # The leader's pass skips tasks that did not fit while the epoch stands
    # still; a start frees nothing, an exit (or a node going down) does.
    h = Harness()
    h.register("n1", gpus=2)
    h.submit("a", gpus=1)
    h.submit("b", gpus=1)
    assert h.plan([("a.0", "n1", [0]), ("b.0", "n1", [1])])["placed"] == ["a.0", "b.0"]
    epoch = h.state.capacity_epoch
    h.event("a.0", "running")
    h.event("b.0", "running")
    assert h.state.capacity_epoch == epoch
    h.event("a.0", "running")  # again: stale, nothing applied
    h.event("a.0", "exited", exit_code=0)
    assert h.state.capacity_epoch == epoch + 1
    assert h.task("a.0").state == "succeeded"
    h.event("a.0", "exited", exit_code=0)  # a late duplicate frees nothing more
    assert h.state.capacity_epoch == epoch + 1
    h.ok("node_down", {"node_id": "n1", "now": h.now, "reason": "test"})
    assert h.state.capacity_epoch == epoch + 2
