"""Usage reports and the decayed fair share, from state views (leptond/usage.py)
and in the scheduler's order (scheduler/fairshare.py)."""

from __future__ import annotations

import pytest

from leptond import usage
from raft.accounting import DAY_S
from scheduler import Allocation, Gpu, NodeView, Policy, TaskRequest, queue_report, schedule
from tests.test_state_support import Harness


def ran(
    h: Harness, job: str, user: str, gpus: int, start: float, end: float, cpus: float = 2.0
) -> None:
    """A job of one task that ran from `start` to `end` on node n1."""
    h.now = start - 2
    h.submit(job, user=user, gpus=gpus, cpus=cpus)
    h.run(f"{job}.0", "n1", list(range(gpus)))
    h.now = end
    h.event(f"{job}.0", "exited", exit_code=0)


def test_usage_by_user_counts_whole_days_and_what_runs_now() -> None:
    h = Harness()
    h.register("n1", gpus=8)
    day = 20_000 * DAY_S
    ran(h, "old", "alice", 2, day - 10 * DAY_S, day - 10 * DAY_S + 3600)  # 10 days ago
    ran(h, "new", "alice", 2, day + 1000, day + 1000 + 1800)
    ran(h, "bob1", "bob", 1, day + 100, day + 100 + 7200)
    h.now = day + 20_000
    h.submit("live", user="bob", gpus=4, cpus=1.0)
    h.run("live.0", "n1", [4, 5, 6, 7])
    started = h.task("live.0").started_at
    view = h.state.freeze()
    now = started + 3600
    rows = {r["user"]: r for r in usage.by_user(view, now, 7 * DAY_S)}
    assert rows["alice"]["gpu_hours"] == 1.0  # the run 10 days ago is out of the window
    assert rows["alice"]["jobs"]["succeeded"] == 1
    assert rows["bob"]["gpu_hours"] == pytest.approx(2.0 + 4.0)  # 2 h of 1 GPU, 1 h of 4
    assert rows["bob"]["running_tasks"] == 1
    assert [r["user"] for r in usage.by_user(view, now, 7 * DAY_S)] == ["bob", "alice"]
    rows = {r["user"]: r for r in usage.by_user(view, now, 30 * DAY_S)}
    assert rows["alice"]["gpu_hours"] == 3.0 and rows["alice"]["jobs"]["succeeded"] == 2
    jobs = {r["job"]: r for r in usage.by_job(view, now, 30 * DAY_S)}
    assert jobs["new"]["gpu_hours"] == 1.0 and jobs["live"]["state"] == "running"
    assert jobs["live"]["gpu_hours"] == pytest.approx(4.0)


def test_decayed_usage_halves_every_half_life() -> None:
    h = Harness()
    h.register("n1", gpus=8)
    day = 20_000 * DAY_S
    # Yesterday 4 GPU-hours; the day before, 4 too (and CPUs in the same proportion).
    ran(h, "a", "alice", 4, day - DAY_S + 100, day - DAY_S + 3700, cpus=1.0)
    ran(h, "b", "bob", 2, day - 2 * DAY_S + 100, day - 2 * DAY_S + 7300, cpus=0.5)
    view = h.state.freeze()
    now = day + DAY_S / 2  # midday today: yesterday is 1 day old, the day before 2
    shares = usage.past_shares(view, now, DAY_S)
    # Equal use, but bob's is a half-life older: weights 1/2 and 1/4.
    assert shares["alice"] == pytest.approx(2 / 3)
    assert shares["bob"] == pytest.approx(1 / 3)
    # A long half-life forgets little.
    shares = usage.past_shares(view, now, 1000 * DAY_S)
    assert shares["alice"] == pytest.approx(0.5, abs=1e-3)


def node(name: str, gpus: int) -> NodeView:
    return NodeView(
        node_id=name,
        name=name,
        cpus=32.0,
        mem_bytes=1 << 40,
        gpus=tuple(Gpu(i, f"{name}-{i}", "H100", 80 << 30, 0) for i in range(gpus)),
        labels={},
        schedulable=True,
    )


def request(task: str, user: str, at: float) -> TaskRequest:
    return TaskRequest(
        task_id=task, job_id=task, user=user, priority=0, submitted_at=at, gpus=2, cpus=1.0,
        mem_bytes=0,
    )  # fmt: skip


def test_a_user_who_used_a_lot_lately_yields_to_one_who_did_not() -> None:
    nodes = [node("n1", 2)]
    pending = [request("a.0", "alice", 1.0), request("b.0", "bob", 2.0)]
    # Without past usage, the older request goes first.
    assert [p.task_id for p in schedule(nodes, [], pending, Policy()).placements] == ["a.0"]
    policy = Policy(past_shares={"alice": 0.9})
    plan = schedule(nodes, [], pending, policy)
    assert [p.task_id for p in plan.placements] == ["b.0"]
    # The queue report keeps what is held now apart from the past.
    held = [Allocation("x", "x", "alice", "n1", (0,), 1.0, 0, 0, 0.0, True)]
    rows = {r.user: r for r in queue_report([node("n1", 4)], held, [], policy)}
    assert rows["alice"].dominant_share == 0.25 and rows["alice"].past_share == 0.9
