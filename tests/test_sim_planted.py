"""A violation planted in the middle of a run is reported at the step it happens.

The checker looks at the log's state again only when a map it reads changed,
and at the hosts' leases only when one moved or the time passed the first
one's end (leptond/sim/checks.py); these plant each kind of damage inside
one step of a real run (what a bug in apply, or a supervisor that stopped
looking at its lease, would do) and want it reported at the end of that
very step, not at a later one.
"""

from __future__ import annotations

from collections.abc import Callable

from leptond.sim.world import SimConfig, World
from raft.model import FINAL_TASK_STATES, LIVE_TASK_STATES
from raft.state import ClusterState

SEED = 5
PLANT_FROM_S = 40.01  # in the first storm, inside a step (40.0 < t <= 40.05)
STEPS = 1400  # to the end of the first storm and a little more


def run_with(plant: Callable[[World], bool]) -> tuple[World, int]:
    """Run SEED, calling `plant` inside one step after another from
    PLANT_FROM_S until it finds what it damages (it says whether it did);
    the world after the run, and the step it was planted in."""
    world = World(SEED, SimConfig())
    planted: list[int] = []

    def attempt() -> None:
        if plant(world):
            planted.append(world.step_no)
        else:
            world.clock.call_later(world.cfg.step_s, attempt)

    try:
        world.boot()
        world.clock.call_later(PLANT_FROM_S, attempt)
        world.run(STEPS)
    finally:
        world.close()
    assert planted, f"nothing to damage in {STEPS} steps: {world.problems}"
    return world, planted[0]


def applied(state: ClusterState) -> None:
    """As apply ends: readers compare generations."""
    state.generation += 1


def test_a_job_record_damaged_alone_is_reported_at_its_step() -> None:
    # Only the jobs map changes: the checks that read tasks alone are not
    # run again, the agreement of jobs with their tasks is.
    damaged: list[str] = []

    def plant(world: World) -> bool:
        state = world.raft.oracle
        job = next(
            (
                j
                for j in state.jobs.values()
                if any(state.tasks[t].state in LIVE_TASK_STATES for t in j.tasks)
            ),
            None,
        )
        if job is None:
            return False
        state.jobs.writable(job.id).state = "pending"
        damaged.append(job.id)
        applied(state)
        return True

    world, step = run_with(plant)
    assert world.problems, "the damaged job went unreported"
    assert world.problems[0].startswith(f"job {damaged[0]} is pending")
    assert "not every task is pending" in world.problems[0]
    assert world.step_no == step


def test_an_ended_task_given_a_stop_is_reported_at_its_step() -> None:
    # Only the tasks map changes.
    damaged: list[str] = []

    def plant(world: World) -> bool:
        state = world.raft.oracle
        task = next((t for t in state.tasks.values() if t.state in FINAL_TASK_STATES), None)
        if task is None:
            return False
        state.tasks.writable(task.id).stop = "cancel"
        damaged.append(task.id)
        applied(state)
        return True

    world, step = run_with(plant)
    assert world.problems, "the damaged task went unreported"
    assert world.problems[0].startswith(f"task {damaged[0]} is ")
    assert world.problems[0].endswith("and still has a stop (cancel)")
    assert world.step_no == step


def test_a_gpu_owner_index_damaged_alone_is_reported_at_its_step() -> None:
    # Only the GPU owner index changes: no task record does.
    def plant(world: World) -> bool:
        state = world.raft.oracle
        free = next(
            (
                (n.id, g["index"])
                for n in state.nodes.values()
                for g in n.gpus
                if (n.id, g["index"]) not in state.gpu_owner
            ),
            None,
        )
        if free is None:
            return False
        state.gpu_owner[free] = "nobody"
        applied(state)
        return True

    world, step = run_with(plant)
    assert world.problems, "the damaged index went unreported"
    assert "owner index names nobody, which does not hold it" in world.problems[0]
    assert world.step_no == step


def test_a_run_outliving_its_lease_is_reported_at_the_first_step_past_it() -> None:
    # A host whose supervisors stop looking at the lease and whose agent can
    # no longer renew it (as a full disk would): its lease is cut short to
    # now, and nothing else about the host changes after that.
    cut: list[float] = []

    def plant(world: World) -> bool:
        now = world.clock.monotonic()
        host = next(
            (
                n.host
                for n in world.nodes
                if any(p.state == "running" for p in n.host.live.values())
                and n.host.cap(now)  # cut short to now (only a lease that ran past it)
            ),
            None,
        )
        if host is None:
            return False
        host._lease_timer.cancel()  # set again by cap
        host._lease_check = lambda: None  # type: ignore[method-assign]
        host.write = lambda *a, **k: None  # type: ignore[method-assign]
        cut.append(now)
        return True

    world, step = run_with(plant)
    assert world.problems, "the run past its lease went unreported"
    assert "past its lease" in world.problems[0]
    step_s, slack_s = world.cfg.step_s, world.checker.lease_slack_s
    # The checker looks at the end of each step, at (step + 1) * step_s.
    first = next(k for k in range(step, STEPS) if (k + 1) * step_s > cut[0] + slack_s)
    assert world.step_no == first > step
