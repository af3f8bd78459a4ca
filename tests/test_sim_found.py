"""Bugs the simulator found: each one's seed, pinned, and the rule its fix keeps.

Every seed here broke an invariant before the fix named beside it (the run
stopped at the step given, with the violation quoted) and runs clean since.
Each runs only as far as that step: `python -m leptond.sim --seed S --steps N
--trace` shows the whole story (docs/simulator.md).
"""

from __future__ import annotations

import pytest

from leptond.controllers import _gang_waits
from raft.commands import encode
from scheduler import Allocation, NodeView
from scheduler.fairshare import FairShare
from scheduler.types import DEFAULT_POLICY, Gpu
from tests.test_sim import sim
from tests.test_state_support import Harness

FOUND = [
    # (seed, steps, what broke, the fix)
    (
        2,
        732,
        "63 entries committed within a second: a hot loop (a gang rank placed "
        "alone, dropped at apply, placed again)",
        "a gang rank waits while its other ranks still stop",
    ),
    (
        48,
        2610,
        "m2: pending task j-1f330ae77871.0 has no reason after a pass",
        "a placement dropped at apply gives its task a reason",
    ),
    (
        1,
        992,
        "job j-461306c2e2f2 finished at ... by its record, +377.5s from the commit "
        "that finished it (a host clock far behind)",
        "jobs finish by the leader's clock, not a host's",
    ),
    (
        9,
        1082,
        "queue: carol's dominant share is 1.5 (work on a draining node)",
        "fair shares are of the nodes in use, draining ones too",
    ),
    (
        20,
        618,
        "GPU 6 of n2 used by runs j-0d023e10417d.0_a1 and j-d3a9f897d074.0_a1 at once",
        "a run does not start on GPUs another run on its host still uses",
    ),
    # The three preemption ping-pong seeds below were found before simulated
    # agents took the disconnect fast path, which changed every trace with a
    # crash in it; they run clean, but whether each still reaches its bug
    # without its fix has not been shown again.
    (
        30,
        1328,
        "task j-6cf43cff45e4.0, preempted for j-fa44a827017b.0, placed again on GPUs "
        "[2, 3] of node-2 ... a preemption ping-pong (a victim that had not started)",
        "a preemptor is placed on the room it preempted for before anyone else",
    ),
    (
        10,
        856,
        "task j-d75560b92563.0, preempted for j-cfbc1cae772a.0, placed again on GPUs "
        "[4, 5] of node-2 ... a preemption ping-pong (while its other victims stopped)",
        "the room a preemptor preempted for is held while its victims stop",
    ),
    (
        146,
        3708,
        "task j-60f04d1ac487.0, preempted for j-408c2b8ecdcd.0, placed again on GPUs "
        "[7] of node-2 ... a preemption ping-pong",
        "a preemption's room stays its preemptor's",
    ),
    # Shown again under the new traces: with no room held for preemptors at
    # all (leptond/holds.py doing nothing), 25 of seeds 0-60 break
    # this; 11 pinned for the three room rules above together.
    (
        11,
        604,
        "task j-ebe675608a39.0, preempted for j-dbfa0a0947ab.0, placed again on GPUs "
        "[1] of node-0 at commit 57 while j-dbfa0a0947ab.0 still waits: a preemption ping-pong",
        "what a preemption frees is held for its preemptor",
    ),
    # Shown again under the new traces: with the preemptions under way not
    # learned from the state, 30 of seeds 0-199 break this; 38 and 47 pinned.
    (
        38,
        786,
        "j-2c8dedf2e21d.0 preempted j-a8b83c09b527.0 at commit 84 while j-82a9fe430d69.0, "
        "preempted for it before, still stop (the first pass of a new leader)",
        "a new leader learns the preemptions under way from the state",
    ),
    (
        47,
        576,
        "j-37eaace52788.0 preempted j-e702f08c8b20.0 at commit 40 while j-4e8182560a6b.0, "
        "preempted for it before, still stop (a leader deposed)",
        "a new leader's preemptors wait for their victims",
    ),
]


@pytest.mark.parametrize(("seed", "steps", "broke", "fix"), FOUND, ids=[f[3] for f in FOUND])
def test_the_seed_that_found_it_runs_clean(seed: int, steps: int, broke: str, fix: str) -> None:
    out = sim("--seed", str(seed), "--steps", str(steps))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert f"seed {seed}: {steps} steps, " in out.stdout and ", ok (" in out.stdout


# -- the rules the fixes keep, on small states ------------------------------------


def test_a_job_finishes_by_the_proposers_clock_and_its_task_by_its_hosts() -> None:
    h = Harness()
    h.register("n1", gpus=1)
    h.submit("a", gpus=1)
    h.run("a.0", "n1", [0])
    leader, host = 5000.0, 5000.0 - 3600.0  # the host's clock is an hour slow
    ev = {"task_id": "a.0", "attempt": 1, "node_id": "n1", "state": "exited"}
    ev.update(exit_code=0, at=host)
    h.ok("task_events", {"events": [ev], "now": leader})
    assert h.job("a").state == "succeeded" and h.job("a").finished_at == leader
    assert h.task("a.0").finished_at == host
    # A command from before `now` applies as it did: all times from the event.
    h2 = Harness()
    h2.register("n1", gpus=1)
    h2.submit("a", gpus=1)
    h2.run("a.0", "n1", [0])
    h2.raw(encode("task_events", {"events": [ev]}))
    assert h2.job("a").finished_at == host


def test_no_user_holds_more_than_the_nodes_in_use() -> None:
    gpus = tuple(Gpu(i, f"g{i}", "H100", 80 << 30) for i in range(4))
    nodes = [
        NodeView("a", "a", 8.0, 64 << 30, gpus),
        NodeView("b", "b", 8.0, 64 << 30, gpus, schedulable=False),  # draining
    ]
    allocs = [
        Allocation(f"t{i}", f"j{i}", "alice", node, (i % 4,), 1.0, 1 << 30, 0, 0.0)
        for i, node in enumerate(["a", "a", "a", "a", "b", "b"])
    ]
    fair = FairShare(nodes, allocs, DEFAULT_POLICY)
    assert fair.share("alice") == pytest.approx(6 / 8)


def test_gang_ranks_wait_while_another_rank_still_runs() -> None:
    h = Harness()
    for n in ("n1", "n2"):
        h.register(n, gpus=1)
    h.submit("g", gpus=1, nodes=2)
    h.plan([("g.0", "n1", [0]), ("g.1", "n2", [0])])
    h.event("g.0", "running")
    h.event("g.1", "running")
    h.plan(preemptions=["g.1"])  # rank 1 stops, and rank 0 with it (gang)
    h.event("g.1", "exited", exit_code=143)
    s = h.state.freeze()
    assert "g.1" in s.pending and s.tasks["g.0"].stop == "gang"
    from leptond.views import scheduler_inputs

    _, _, pending = scheduler_inputs(s)
    assert _gang_waits(s, pending) == {"g.1": "waiting for 1 other task(s) of its gang to stop"}
    h.event("g.0", "exited", exit_code=143)
    s = h.state.freeze()
    _, _, pending = scheduler_inputs(s)
    assert {r.task_id for r in pending} == {"g.0", "g.1"} and not _gang_waits(s, pending)
