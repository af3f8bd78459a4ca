"""Simulated agents on the disconnect fast path (DESIGN §5, agent/lease.py).

A killed agent's connection ends with an end-of-stream: the leader suspects
its node at once and declares it down after the confirm window and margin,
long before the heartbeat TTL, and the runs there are killed first, when
their supervisors see the agent gone. A restart within the window keeps the
tasks; a paused agent closes nothing; a planned stop hands the tasks over to
the next agent, however long it takes to come back (within the lease).

Each scenario drives one small world by hand (no storm, no people but the
one submit), with every invariant checked after each step.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest

from leptond.sim.node import SimNode
from leptond.sim.world import SimConfig, World

CFG = SimConfig()
HANG = {"argv": ["sim-task", "hang", "0", "1"], "gpus": 4, "cpus": 1.0, "mem_bytes": 0}
DOWN_AFTER_S = 1.0 + 0.5  # MasterConfig's disconnect confirm window and margin


@pytest.fixture(autouse=True)
def seeded_backoff() -> Iterator[None]:
    """The agents' backoff jitter comes from the global generator, seeded
    as a run seeds it (leptond.sim.run), so each scenario repeats exactly."""
    saved = random.getstate()
    random.seed("disconnect:global")
    yield
    random.setstate(saved)


def advance(world: World, seconds: float, until: Callable[[], bool] | None = None) -> bool:
    """Run the world `seconds` on, checking every invariant after each step;
    stop early once `until()` holds (whether it did)."""
    end = world.clock.monotonic() + seconds
    while world.clock.monotonic() < end - 1e-9:
        now = world.clock.monotonic() + CFG.step_s
        world.loop.run_until(now)
        why = world.checker.step(now)
        assert why is None and not world.problems, why or world.problems
        if until is not None and until():
            return True
    return until is None


def node_state(world: World, node: SimNode) -> str:
    return world.raft.oracle.freeze().nodes[node.host.node_id].state


def run_of(node: SimNode, job_id: str) -> str | None:
    """The live run of the job's task on the node, if any."""
    return next((rid for rid in node.host.live if rid.startswith(job_id)), None)


def started(seed: int) -> tuple[World, SimNode, str]:
    """A world whose agents joined, with a task that never ends by itself
    running on one of the hosts: that host, and the run."""
    world = World(seed, CFG, keep_trace=True)
    world.boot()
    advance(world, 5.0)
    job = world.people.submit_spec("alice", HANG)

    def running() -> bool:
        return any(
            (rid := run_of(n, job)) is not None and n.host.live[rid].state == "running"
            for n in world.nodes
        )

    assert advance(world, 20.0, running), "the task never ran"
    node = next(n for n in world.nodes if run_of(n, job) is not None)
    rid = run_of(node, job)
    assert rid is not None
    return world, node, rid


def test_a_killed_agent_has_its_node_declared_down_within_the_window_not_the_ttl() -> None:
    world, node, rid = started(1)
    try:
        node.crash()
        assert advance(world, DOWN_AFTER_S + 2.0, lambda: node_state(world, node) == "down")
        assert CFG.ttl_s > DOWN_AFTER_S + 2.0  # so only the fast path could have done it
        proc = node.host.procs[rid]
        assert proc.exit is not None and "lease" in proc.exit["message"], proc.exit
        # The run was killed before the node was declared down.
        trace = world.trace.lines or []
        exit_at = next(i for i, ln in enumerate(trace) if f"exit {rid}" in ln)
        down_at = next(i for i, ln in enumerate(trace) if f"node_down {node.host.node_id}" in ln)
        assert exit_at < down_at
    finally:
        world.close()


def test_an_agent_restarted_within_the_window_keeps_its_tasks() -> None:
    world, node, rid = started(2)
    try:
        node.crash()
        advance(world, 0.3)
        node.start()
        advance(world, 8.0)
        assert node.host.live.get(rid) is not None and node.host.live[rid].state == "running"
        assert node_state(world, node) == "ready"
    finally:
        world.close()


def test_a_paused_agent_closes_nothing_and_keeps_its_node_for_the_ttl() -> None:
    world, node, rid = started(3)
    try:
        node.pause()
        advance(world, 4.0)
        assert node_state(world, node) == "ready"
        assert node.host.live.get(rid) is not None
        node.resume()
        advance(world, 4.0)
        assert node_state(world, node) == "ready" and node.host.live.get(rid) is not None
    finally:
        world.close()


def test_a_planned_stop_hands_the_tasks_over_past_the_window() -> None:
    world, node, rid = started(4)
    try:
        node.stop(restart_in_s=3.0)  # the next agent comes back after the window
        assert advance(world, 2.0, lambda: not node.up), "the agent did not stop"
        assert node.host.lease_handover
        advance(world, 8.0)
        assert node.up
        assert node.host.live.get(rid) is not None and node.host.live[rid].state == "running"
        assert node_state(world, node) == "ready"
    finally:
        world.close()
