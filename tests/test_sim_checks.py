"""Each invariant of the simulation fails on a state that breaks it.

The checker reads a ClusterState (here one driven by the state tests'
harness, then damaged by hand, as a bug in apply would) and what people
were told; the simulation's own runs never break these (tests/test_sim.py).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from agent.runner import TaskSpec
from leptond.sim.checks import Checker
from leptond.sim.host import SimHost
from leptond.sim.people import Ledger
from leptond.sim.trace import Trace
from leptond.sim.vtime import EPOCH, HostClock, SimClock, VirtualLoop
from raft.commands import encode
from raft.state import ClusterState
from scheduler import Policy
from tests.test_state_support import Harness


def checker(state: ClusterState, ledger: Ledger | None = None) -> Checker:
    raft: Any = SimpleNamespace(oracle=state, log=[])
    master: Any = SimpleNamespace(controllers=SimpleNamespace(policy=Policy()))
    return Checker(raft, [master], [], ledger or Ledger(), 120.0, 8.0, 0.1, 8.0)


def running_pair() -> Harness:
    h = Harness()
    h.register("n1", gpus=4)
    h.submit("a", gpus=2)
    h.submit("b", gpus=2)
    h.run("a.0", "n1", [0, 1])
    h.run("b.0", "n1", [2, 3])
    return h


def test_a_sound_state_passes() -> None:
    assert checker(running_pair().state).step(1.0) is None


def test_an_ended_task_with_a_stop_fails() -> None:
    h = running_pair()
    h.event("a.0", "exited", exit_code=0)
    h.state.tasks.writable("a.0").stop = "cancel"
    assert checker(h.state).step(1.0) == "task a.0 is succeeded and still has a stop (cancel)"


def test_an_assigned_task_with_a_stop_fails() -> None:
    # Placed, never started, then asked to stop: apply ends it at once, so
    # one that still carries the stop would hold its GPUs for good.
    h = Harness()
    h.register("n1", gpus=4)
    h.submit("a", gpus=2)
    h.plan([("a.0", "n1", [0, 1])])
    assert h.task("a.0").state == "assigned"
    assert checker(h.state).step(1.0) is None
    h.state.tasks.writable("a.0").stop = "cancel"
    why = checker(h.state).step(1.0)
    assert why == "task a.0 is assigned, never started, and has a stop (cancel)"


def test_a_gpu_held_by_two_live_tasks_fails() -> None:
    h = running_pair()
    h.state.tasks.writable("b.0").gpus = [1, 2]
    why = checker(h.state).step(1.0)
    assert why is not None and why.startswith("GPU 1 of n1")  # held twice, or so indexed


def test_a_job_whose_state_disagrees_with_its_tasks_fails() -> None:
    h = running_pair()
    h.state.jobs.writable("a").state = "succeeded"
    why = checker(h.state).step(1.0)
    assert why is not None and "not every task succeeded" in why


def test_a_job_whose_task_changes_under_it_later_fails() -> None:
    # The checker looks again only at jobs whose record or tasks' records
    # changed since it last found them right: a task changed alone counts.
    h = running_pair()
    h.event("a.0", "exited", exit_code=0)
    now = h.state.jobs["a"].finished_at - EPOCH  # the masters' clock, as it finished
    c = checker(h.state)
    assert c.step(now) is None
    h.state.tasks.writable("a.0").state = "failed"
    h.state.generation += 1  # as apply moves it
    why = c.step(now + 1)
    assert why is not None and "job a is succeeded" in why and "not every task succeeded" in why
    h.state.tasks.writable("a.0").state = "succeeded"
    h.state.generation += 1
    assert c.step(now + 2) is None
    h.state.jobs.writable("b").state = "pending"
    h.state.generation += 1
    why = c.step(now + 3)
    assert why is not None and "job b is pending" in why


def test_an_acknowledged_job_that_vanishes_fails() -> None:
    h = Harness()
    h.register("n1", gpus=4)
    h.submit("a", gpus=2)
    h.run("a.0", "n1", [0, 1])
    c = checker(h.state, Ledger(acked={"python": "a"}))  # the harness names jobs "python"
    assert c.step(1.0) is None
    del h.state.jobs["a"]
    h.state.generation += 1  # as apply moves it
    assert c.step(2.0) == "acknowledged job python (a) is gone, and was not finished a step ago"


def test_an_acknowledged_job_renamed_or_gone_early_later_fails() -> None:
    # The checker looks again only at acknowledged jobs whose record changed
    # or went since it last found them right, and at those acknowledged since.
    h = Harness()
    h.register("n1", gpus=4)
    h.submit("a", gpus=2)
    ledger = Ledger(acked={"python": "a"})  # the harness names jobs "python"
    c = checker(h.state, ledger)
    assert c.step(1.0) is None
    h.state.jobs.writable("a").name = "other"
    h.state.generation += 1  # as apply moves it
    assert c.step(2.0) == "acknowledged job a is named other, not python"
    h.state.jobs.writable("a").name = "python"
    h.state.generation += 1
    assert c.step(3.0) is None
    ledger.acked["late"] = "a"  # told after the last look, of a job named python
    h.state.generation += 1
    assert c.step(4.0) == "acknowledged job a is named python, not late"


def test_a_job_finished_by_a_clock_far_off_fails() -> None:
    h = running_pair()
    h.event("a.0", "exited", exit_code=0)
    job = h.state.jobs["a"]
    assert job.state == "succeeded" and job.finished_at is not None
    # The harness's clock says 1,000s and some; the masters' says EPOCH + 1s.
    why = checker(h.state).step(job.finished_at - EPOCH + 31.0)
    assert why is not None and "+31.0s from the commit that finished it" in why


def test_a_victim_placed_back_on_its_room_while_its_preemptor_waits_fails() -> None:
    h = Harness()
    h.register("n1", gpus=4)
    h.submit("a", gpus=2)
    h.submit("p", gpus=4, priority=10)
    c = checker(h.state)

    def commit(op: str, args: dict[str, Any]) -> None:
        h.now += 1.0
        data = encode(op, {"now": h.now, **args})
        c.committed(1, h.index + 1, data, h.raw(data))

    def place(tid: str, gpus: list[int]) -> None:
        commit("plan", {"placements": [{"task_id": tid, "node_id": "n1", "gpus": gpus}]})

    place("a.0", [0, 1])
    commit("plan", {"preemptions": [{"task_id": "a.0", "for_task": "p.0"}]})
    assert h.task("a.0").state == "pending"  # it had not started: it ended at once
    place("a.0", [2, 3])  # elsewhere on the node: not what it was preempted from
    assert c.step(1.0) is None
    commit("plan", {"preemptions": [{"task_id": "a.0", "for_task": "p.0"}]})
    place("a.0", [2, 3])
    why = c.step(2.0)
    assert why is not None and why.startswith("task a.0, preempted for p.0, placed again on GPUs")
    assert why.endswith("while p.0 still waits: a preemption ping-pong")


def test_a_victim_placed_back_after_a_new_job_is_not_judged() -> None:
    h = Harness()
    h.register("n1", gpus=4)
    h.submit("a", gpus=2)
    h.submit("p", gpus=4, priority=10)
    c = checker(h.state)

    def commit(op: str, args: dict[str, Any]) -> None:
        h.now += 1.0
        data = encode(op, {"now": h.now, **args})
        c.committed(1, h.index + 1, data, h.raw(data))

    commit("plan", {"placements": [{"task_id": "a.0", "node_id": "n1", "gpus": [0, 1]}]})
    commit("plan", {"preemptions": [{"task_id": "a.0", "for_task": "p.0"}]})
    job = {"id": "q", "user": "bob", "spec": {"argv": ["x"], "gpus": 1}, "submitted_at": h.now}
    commit("submit_jobs", {"jobs": [job]})  # the picture may rightly change
    commit("plan", {"placements": [{"task_id": "a.0", "node_id": "n1", "gpus": [0, 1]}]})
    assert c.step(1.0) is None


def host_world() -> tuple[Any, Any, Checker]:
    """One simulated host with 2 GPUs and the checker watching it."""
    loop = VirtualLoop()
    world = SimClock(loop)
    host = SimHost("h1", "h1", 2, 8.0, 1 << 30, world, HostClock(loop), 1, Trace(world.monotonic))
    raft: Any = SimpleNamespace(oracle=ClusterState(), log=[])
    master: Any = SimpleNamespace(controllers=SimpleNamespace(policy=Policy()))
    node: Any = SimpleNamespace(host=host, name="h1")
    c = Checker(raft, [master], [node], Ledger(), 120.0, 8.0, 0.1, 8.0)

    def start(rid: str, gpus: str) -> None:
        host.start(TaskSpec(rid, ["sim-task", "hang", "60", "1"], {"CUDA_VISIBLE_DEVICES": gpus}))

    host.write(10.0, 10.0)  # the lease runs until t=10
    return loop, start, c


def test_a_gpu_used_by_two_runs_on_a_host_fails() -> None:
    loop, start, c = host_world()
    start("a.0_a1", "0")
    loop.run_until(1.0)  # its supervisor starts it
    assert c.step(1.0) is None
    start("b.0_a1", "0,1")
    loop.run_until(2.0)
    assert c.step(2.0) == "GPU 0 of h1 used by runs a.0_a1 and b.0_a1 at once"
    loop.close()


def test_a_run_past_its_lease_fails_though_nothing_else_changed() -> None:
    loop, start, c = host_world()
    start("a.0_a1", "0")
    loop.run_until(1.0)
    assert c.step(1.0) is None and c.step(10.05) is None  # within the slack
    assert c.step(10.2) == "a.0_a1 runs on h1 past its lease (10.0)"
    loop.close()


def test_a_preemptor_that_stops_more_while_its_victims_still_stop_fails() -> None:
    h = Harness()
    h.register("n1", gpus=2)
    h.register("n2", gpus=2)
    h.submit("a", gpus=2)
    h.submit("b", gpus=2)
    h.submit("p", gpus=2, priority=10)
    h.run("a.0", "n1", [0, 1])
    h.run("b.0", "n2", [0, 1])
    c = checker(h.state)

    def preempt(tid: str) -> None:
        h.now += 1.0
        args = {"now": h.now, "preemptions": [{"task_id": tid, "for_task": "p.0"}]}
        data = encode("plan", args)
        c.committed(2, h.index + 1, data, h.raw(data))

    preempt("a.0")
    assert c.step(1.0) is None
    preempt("b.0")  # a.0 still stops
    assert c.step(2.0) == (
        f"p.0 preempted b.0 at commit {h.index} while a.0, preempted for it before, "
        "still stop: more work stopped than it needs"
    )


def test_the_virtual_loop_runs_callbacks_in_order_and_reports_what_they_raise() -> None:
    # The loop runs callbacks itself (not through Handle._run): ready ones in
    # the order they were made ready, timers by (time, setting), cancelled
    # ones never, and what a callback raises reaches the exception handler
    # in asyncio's words, without stopping the loop.
    loop = VirtualLoop()
    clock = SimClock(loop)
    reported: list[str] = []
    loop.set_exception_handler(lambda _, ctx: reported.append(ctx["message"]))
    ran: list[str] = []

    def boom() -> None:
        ran.append("boom")
        raise ValueError("bad")

    clock.call_later(2.0, ran.append, "t2")
    clock.call_later(1.0, ran.append, "t1a")
    clock.call_later(1.0, boom)
    clock.call_later(1.0, ran.append, "t1b")
    gone = clock.call_later(1.5, ran.append, "cancelled")
    loop.call_soon(ran.append, "soon")
    gone.cancel()
    gone.cancel()  # twice: counted once
    assert loop._timer_cancelled_count == 1
    loop.run_until(1.5)
    assert ran == ["soon", "t1a", "boom", "t1b"] and clock.monotonic() == 1.5
    assert len(reported) == 1 and reported[0].startswith("Exception in callback ")
    assert "boom" in reported[0]
    loop.run_until(3.0)
    assert ran[-1] == "t2" and "cancelled" not in ran
    loop.close()
