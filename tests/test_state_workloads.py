"""Job arrays and dependencies through ClusterState and the scheduler's
inputs: one job of many tasks, per-task retries and cancels, --max-running,
jobs that wait for others (raft/workloads.py, leptond/views.py)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from leptond import views
from raft import arrays
from raft.arrays import ArrayError, parse_array
from raft.commands import encode
from raft.state import ClusterState
from tests.test_state_support import Harness, check_invariants, is_error


def cluster(gpus: int = 8) -> Harness:
    h = Harness()
    h.register("n1", gpus=gpus)
    return h


def submit(h: Harness, job_id: str, **spec: Any) -> Any:
    spec.setdefault("argv", ["python", "sweep.py"])
    job = {"id": job_id, "user": "alice", "spec": spec, "submitted_at": h.now}
    return h.cmd("submit_jobs", {"jobs": [job]})["results"][0]


def offered(h: Harness) -> tuple[list[str], dict[str, str]]:
    """The pending tasks the scheduler would see, and the reasons of the rest."""
    held: dict[str, str] = {}
    _, _, pending = views.scheduler_inputs(h.state.freeze(), held=held)
    return [r.task_id for r in pending], held


def finish(h: Harness, task_id: str, code: int) -> None:
    gpus = h.job(h.task(task_id).job_id).spec["gpus"]
    h.run(task_id, "n1", list(range(gpus)))
    h.event(task_id, "exited", code)


# -- the --array syntax ------------------------------------------------------------


def test_array_syntax_ranges_steps_and_lists() -> None:
    assert parse_array("0-999") == [[0, 999, 1]]
    assert parse_array("0-999:10") == [[0, 999, 10]]
    assert parse_array("1,5,9") == [[1, 1, 1], [5, 5, 1], [9, 9, 1]]
    assert list(arrays.indexes(parse_array("0-20:10,3"))) == [0, 10, 20, 3]
    assert arrays.describe(parse_array("0-999:10,3")) == "0-999:10,3"


@pytest.mark.parametrize(
    "text",
    ["", "a-b", "5-1", "1,,2", "1:2", "0-9:0", "-1", "1-2-3", "٣", "1,1", "0-200000", "9" * 400],
)
def test_bad_array_syntax_is_one_line(text: str) -> None:
    with pytest.raises(ArrayError) as exc:
        parse_array(text)
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 200


# -- arrays in the state -------------------------------------------------------------


def test_array_is_one_job_of_small_tasks_and_one_small_entry() -> None:
    h = cluster()
    spec = {"argv": ["python", "sweep.py"], "env": {"SEED": "1"}, "array": [[0, 9999, 1]]}
    entry = encode("submit_jobs", {"jobs": [{"id": "a", "user": "u", "spec": spec}]})
    assert len(entry) < 512  # the spec once, not 10,000 times
    assert submit(h, "a", **spec) == {"id": "a"}
    job = h.job("a")
    assert len(job.tasks) == 10_000 and len(h.state.pending) == 10_000
    t = h.task("a.17")
    assert (t.rank, t.job_id, t.state) == (17, "a", "pending")
    # A task holds no copy of the command or env.
    packed = msgpack.packb(t.to_wire())
    assert b"sweep.py" not in packed and b"SEED" not in packed
    check_invariants(h.state)


def test_array_task_env_has_its_index() -> None:
    h = cluster()
    submit(h, "a", array=[[5, 9, 2]])
    h.run("a.7", "n1", [])
    env = views.launch_spec(h.state.freeze(), h.task("a.7"))["env"]
    assert env["LEPTON_ARRAY_INDEX"] == "7"
    assert env["LEPTON_ARRAY_TASK_COUNT"] == "3"
    assert env["LEPTON_TASK_RANK"] == "0" and env["LEPTON_NNODES"] == "1"


def test_one_failed_task_does_not_stop_the_others_and_the_array_fails_at_the_end() -> None:
    h = cluster()
    submit(h, "a", array=[[0, 2, 1]], gpus=1)
    finish(h, "a.1", 3)
    assert h.task("a.1").state == "failed"
    assert h.job("a").state == "running"
    assert [h.task(f"a.{i}").state for i in (0, 2)] == ["pending", "pending"]
    finish(h, "a.0", 0)
    finish(h, "a.2", 0)
    job = h.job("a")
    assert job.state == "failed" and job.finished_at is not None
    assert job.message.startswith("1 of 3 tasks failed (1)")
    check_invariants(h.state)


def test_array_succeeds_when_every_task_does() -> None:
    h = cluster()
    submit(h, "a", array=[[0, 1, 1]])
    finish(h, "a.0", 0)
    assert h.job("a").state == "running"
    finish(h, "a.1", 0)
    assert h.job("a").state == "succeeded"


def test_retries_are_per_task() -> None:
    h = cluster()
    submit(h, "a", array=[[0, 1, 1]], retries=1)
    finish(h, "a.0", 1)
    assert h.task("a.0").state == "pending" and h.task("a.0").retries_used == 1
    finish(h, "a.1", 1)  # its own retry, not one already spent by index 0
    assert h.task("a.1").state == "pending"
    finish(h, "a.0", 1)
    assert h.task("a.0").state == "failed"
    finish(h, "a.1", 0)
    assert h.task("a.1").state == "succeeded"
    assert h.job("a").state == "failed"
    check_invariants(h.state)


def test_cancel_one_index_leaves_the_rest() -> None:
    h = cluster()
    submit(h, "a", array=[[0, 2, 1]], gpus=1)
    h.run("a.0", "n1", [0])
    out = h.cmd("cancel_job", {"job_id": "a", "user": "alice", "index": 2})
    assert out == {"id": "a", "index": 2, "state": "cancelled"}
    assert "a.2" not in h.state.pending
    h.ok("cancel_job", {"job_id": "a", "user": "alice", "index": 0})
    assert h.task("a.0").stop == "cancel"
    h.event("a.0", "exited", 143)
    assert h.task("a.0").state == "cancelled"
    assert h.task("a.1").state == "pending" and h.job("a").state == "running"
    assert is_error(h.cmd("cancel_job", {"job_id": "a", "user": "alice", "index": 7}), "not_found")
    assert is_error(h.cmd("cancel_job", {"job_id": "a", "user": "alice", "index": 2}), "conflict")
    assert is_error(h.cmd("cancel_job", {"job_id": "a", "user": "bob", "index": 1}), "forbidden")
    finish(h, "a.1", 0)
    assert h.job("a").state == "cancelled"
    check_invariants(h.state)


def test_max_running_holds_tasks_back_with_its_reason() -> None:
    h = cluster()
    submit(h, "a", array=[[0, 5, 1]], max_running=2)
    ids, held = offered(h)
    assert ids == ["a.0", "a.1"]
    assert held["a.2"] == "array limit: 0 of its tasks are running (--max-running 2)"
    h.run("a.0", "n1", [])
    ids, held = offered(h)
    assert ids == ["a.1"]
    assert held["a.3"] == "array limit: 1 of its tasks are running (--max-running 2)"
    h.run("a.1", "n1", [])
    assert offered(h)[0] == []
    # Apply keeps to the limit too, whatever a plan says.
    out = h.plan([("a.2", "n1", [])])
    assert out["placed"] == [] and "--max-running 2" in out["dropped"][0]["reason"]
    h.event("a.0", "exited", 0)
    assert offered(h)[0] == ["a.2"]


def test_old_command_formats_know_no_arrays() -> None:
    h = cluster()
    job = {"id": "a", "user": "u", "spec": {"argv": ["x"], "array": [[0, 1, 1]]}}
    data = msgpack.unpackb(encode("submit_jobs", {"jobs": [job]}))
    data["v"] = 3
    res = h.raw(msgpack.packb(data))["results"][0]
    assert is_error(res, "bad_request") and "array" in res["error"]["message"]
    assert "a" not in h.state.jobs


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"array": [[0, 200_000, 1]]}, "at most 100000 tasks"),
        ({"array": [[0, 1, 1]], "nodes": 2}, "takes no --nodes"),
        ({"max_running": 2}, "give --array too"),
        ({"array": [[0, 1, 1]], "max_running": 0}, "max_running"),
        ({"array": "0-9"}, "ranges"),
        ({"array": [[0, 3, 1], [2, 2, 1]]}, "index 2 is given twice"),
        ({"after_ok": ["x" * 100]}, "is not a job id"),
        ({"after_ok": ["j1"], "after_any": ["j1"]}, "named twice"),
    ],
)
def test_bad_array_or_dependency_fields_change_nothing(spec: dict[str, Any], words: str) -> None:
    h = cluster()
    before = h.state.snapshot()
    res = submit(h, "a", **spec)
    assert is_error(res, "bad_request") and words in res["error"]["message"], res
    assert "a" not in h.state.jobs and h.state.snapshot() != b"" and before


# -- dependencies -------------------------------------------------------------------------


def test_unknown_or_own_id_is_refused_at_submit() -> None:
    h = cluster()
    res = submit(h, "b", after_ok=["nope"])
    assert is_error(res, "not_found") and res["error"]["message"] == "no job nope to wait for"
    res = submit(h, "b", after_any=["b"])
    assert is_error(res, "bad_request") and "cannot wait for itself" in res["error"]["message"]
    assert "b" not in h.state.jobs and not h.state.dependents


def test_after_ok_waits_then_runs() -> None:
    h = cluster()
    submit(h, "a")
    submit(h, "b", after_ok=["a"])
    assert h.job("b").waiting_on == ["a"]
    ids, held = offered(h)
    assert ids == ["a.0"] and held == {"b.0": "waiting for job a to succeed"}
    finish(h, "a.0", 0)
    assert h.job("b").waiting_on == []
    assert offered(h)[0] == ["b.0"]
    check_invariants(h.state)


def test_after_ok_failure_fails_the_chain_with_its_reason() -> None:
    h = cluster()
    submit(h, "a")
    submit(h, "b", after_ok=["a"])
    submit(h, "c", after_any=["b"])
    submit(h, "d", after_ok=["b"])
    finish(h, "a.0", 1)
    b, c, d = h.job("b"), h.job("c"), h.job("d")
    assert (b.state, b.message) == ("failed", "dependency a failed")
    assert h.task("b.0").state == "cancelled" and "b.0" not in h.state.pending
    assert (d.state, d.message) == ("failed", "dependency b failed")
    # after_any: b ended, so c runs.
    assert c.state == "pending" and c.waiting_on == []
    assert offered(h)[0] == ["c.0"]
    check_invariants(h.state)


def test_after_any_runs_after_a_failure_or_cancel() -> None:
    h = cluster()
    submit(h, "a")
    submit(h, "b", after_any=["a"])
    h.ok("cancel_job", {"job_id": "a", "user": "alice"})
    assert h.job("b").waiting_on == [] and offered(h)[0] == ["b.0"]


def test_waiting_for_a_cancelled_job_still_stopping_until_it_stopped() -> None:
    h = cluster()
    submit(h, "a", gpus=1)
    h.run("a.0", "n1", [0])
    submit(h, "b", after_any=["a"])
    h.ok("cancel_job", {"job_id": "a", "user": "alice"})
    assert h.job("b").waiting_on == ["a"]  # a's task still holds its GPU
    h.event("a.0", "exited", 143)
    assert h.job("b").waiting_on == []


def test_after_ok_on_a_job_that_already_failed_is_refused() -> None:
    h = cluster()
    submit(h, "a")
    finish(h, "a.0", 1)
    res = submit(h, "b", after_ok=["a"])
    assert is_error(res, "conflict") and "--after-ok a would never start" in res["error"]["message"]
    assert submit(h, "c", after_any=["a"]) == {"id": "c"}
    assert h.job("c").waiting_on == []


def test_array_dependency_means_every_task() -> None:
    h = cluster()
    submit(h, "a", array=[[0, 1, 1]])
    submit(h, "b", after_ok=["a"])
    finish(h, "a.0", 0)
    assert h.job("b").waiting_on == ["a"]
    finish(h, "a.1", 0)
    assert h.job("b").waiting_on == []


def test_dependencies_survive_a_snapshot_and_restore() -> None:
    h = cluster()
    submit(h, "a")
    submit(h, "b", after_ok=["a"])
    other = ClusterState()
    other.restore(h.state.snapshot())
    assert other.dependents == {"a": {"b"}}
    h.state = other
    finish(h, "a.0", 1)
    assert h.job("b").state == "failed"
    check_invariants(h.state)


# -- requeue after a warning or on exit 85 -----------------------------------------------------


def exited(h: Harness, task_id: str, code: int, warned: bool = False, v: int | None = None) -> Any:
    t = h.task(task_id)
    ev: dict[str, Any] = {
        "task_id": task_id,
        "attempt": t.attempt,
        "node_id": t.node_id,
        "state": "exited",
        "exit_code": code,
        "at": h.now,
    }
    if warned:
        ev["warned"] = True
    data = msgpack.unpackb(encode("task_events", {"events": [ev]}))
    if v is not None:
        data["v"] = v
    return h.raw(msgpack.packb(data))


def test_exit_85_runs_again_without_spending_a_retry() -> None:
    h = cluster()
    submit(h, "a", retries=0)
    h.run("a.0", "n1", [])
    exited(h, "a.0", 85)
    t = h.task("a.0")
    assert (t.state, t.restarts, t.retries_used) == ("pending", 1, 0)
    assert h.job("a").retries_left == 0 and h.job("a").state == "pending"
    h.run("a.0", "n1", [])
    env = views.launch_spec(h.state.freeze(), h.task("a.0"))["env"]
    assert env["LEPTON_RESTART_COUNT"] == "1" and env["LEPTON_REQUEUE_EXIT"] == "85"
    exited(h, "a.0", 0)
    assert h.job("a").state == "succeeded"
    check_invariants(h.state)


def test_exit_0_after_the_warning_runs_again_and_without_it_succeeds() -> None:
    h = cluster()
    submit(h, "a", signal="USR1", signal_before_s=120)
    h.run("a.0", "n1", [])
    exited(h, "a.0", 0, warned=True)
    assert (h.task("a.0").state, h.task("a.0").restarts) == ("pending", 1)
    h.run("a.0", "n1", [])
    exited(h, "a.0", 0)
    assert h.job("a").state == "succeeded"


def test_exit_85_of_an_old_command_format_is_a_failure() -> None:
    h = cluster()
    submit(h, "a")
    h.run("a.0", "n1", [])
    exited(h, "a.0", 85, v=3)
    assert h.task("a.0").state == "failed"


def test_a_cancel_wins_over_a_requeue() -> None:
    h = cluster()
    submit(h, "a")
    h.run("a.0", "n1", [])
    h.ok("cancel_job", {"job_id": "a", "user": "alice"})
    exited(h, "a.0", 85)
    assert h.task("a.0").state == "cancelled"


def test_requeues_are_bounded() -> None:
    from raft.tasks import MAX_RESTARTS

    h = cluster()
    submit(h, "a")
    h.run("a.0", "n1", [])
    h.state.tasks.writable("a.0").restarts = MAX_RESTARTS
    exited(h, "a.0", 85)
    assert h.task("a.0").state == "failed"


def test_a_preemption_counts_as_a_restart() -> None:
    h = cluster()
    submit(h, "a")
    h.run("a.0", "n1", [])
    h.plan(preemptions=["a.0"])
    exited(h, "a.0", 0, warned=True)
    assert (h.task("a.0").state, h.task("a.0").restarts) == ("pending", 1)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"signal": "KILL", "signal_before_s": 5}, "signal must be one of"),
        ({"signal": "USR1"}, "needs a time before the end"),
        ({"signal_before_s": 5}, "needs a signal"),
        ({"signal": "USR1", "signal_before_s": 0}, "signal_before_s"),
        ({"preempt_grace_s": -1}, "preempt_grace_s"),
    ],
)
def test_bad_signal_fields_are_refused(spec: dict[str, Any], words: str) -> None:
    h = cluster()
    res = submit(h, "a", **spec)
    assert is_error(res, "bad_request") and words in res["error"]["message"], res


def test_the_task_cap_counts_every_task_of_an_array() -> None:
    h = cluster()
    caps = [0, 0, 15]

    def with_caps(job_id: str, **spec: Any) -> Any:
        spec.setdefault("argv", ["true"])
        job = {"id": job_id, "user": "alice", "spec": spec, "submitted_at": h.now, "caps": caps}
        return h.cmd("submit_jobs", {"jobs": [job]})["results"][0]

    assert with_caps("a", array=[[0, 9, 1]]) == {"id": "a"}
    res = with_caps("b", array=[[0, 9, 1]])
    assert is_error(res, "pending_limit") and "has 10 tasks waiting" in res["error"]["message"]
    assert "b" not in h.state.jobs
    assert with_caps("c", nodes=2) == {"id": "c"}  # 12 of 15
    finish(h, "a.0", 0)  # one started: room for one more
    assert h.state.user_pending_tasks == {"alice": 11}
    h.ok("cancel_job", {"job_id": "a", "user": "alice"})
    assert h.state.user_pending_tasks == {"alice": 2}
    assert with_caps("d", array=[[0, 12, 1]]) == {"id": "d"}
    check_invariants(h.state)
