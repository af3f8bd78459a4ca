"""A preemption buys its preemptor the room (leptond/holds.py).

The leader's real scheduling pass (Controllers.scheduling_pass, the real
scheduler) on a real ClusterState (tests/controllers_support.py). The
simulator found each case (tests/test_sim_found.py); here each is a few
tasks on one or two nodes.
"""

from __future__ import annotations

import pytest

from tests.controllers_support import Leader

pytestmark = pytest.mark.timeout(60)


def test_a_victim_that_had_not_started_does_not_take_its_room_back(ld: Leader) -> None:
    h = ld.h
    h.register("n1", gpus=4)
    h.submit("a", gpus=2)
    h.submit("b", gpus=2)
    h.run("a.0", "n1", [0, 1])
    h.plan([("b.0", "n1", [2, 3])])  # assigned, not started yet
    h.submit("p", gpus=4, priority=10)
    ld.scheduling_pass()
    # Both are preempted for p: b ends at once, a stops in its own time.
    assert ld.task("a.0").stop == "preempt"
    assert ld.task("b.0").state == "pending"
    ld.scheduling_pass()
    # b waits: GPUs 2 and 3 are p's, though nobody runs on them.
    assert ld.task("b.0").state == "pending", ld.task("b.0")
    assert ld.c.reasons["b.0"]
    h.event("a.0", "exited", exit_code=143)
    ld.scheduling_pass()
    p = ld.task("p.0")
    assert (p.state, p.node_id, p.gpus) == ("assigned", "n1", [0, 1, 2, 3])
    assert ld.task("b.0").state == "pending" and ld.task("b.0").preemptions == 1


def test_work_of_the_same_priority_does_not_take_a_preemptors_room(ld: Leader) -> None:
    h = ld.h
    h.register("n1", gpus=2)
    h.register("n2", gpus=1)
    h.submit("mine", user="alice", gpus=1)  # alice already has a share: bob comes first
    h.run("mine.0", "n2", [0])
    h.submit("v", user="carol", gpus=2)
    h.run("v.0", "n1", [0, 1])
    h.submit("p", user="alice", gpus=2, priority=10)
    ld.scheduling_pass()
    assert ld.task("v.0").stop == "preempt"
    h.submit("q", user="bob", gpus=2, priority=10)
    ld.scheduling_pass()
    h.event("v.0", "exited", exit_code=143)
    ld.scheduling_pass()
    # The room p preempted for is p's, though bob's q is first in the queue.
    assert (ld.task("p.0").state, ld.task("p.0").node_id) == ("assigned", "n1")
    assert ld.task("q.0").state == "pending"


def test_a_new_leader_forgets_the_holds(ld: Leader) -> None:
    h = ld.h
    h.register("n1", gpus=2)
    h.submit("v", gpus=2)
    h.run("v.0", "n1", [0, 1])
    h.submit("p", gpus=2, priority=10)
    ld.scheduling_pass()
    assert ld.c.holds.room == {"p.0": ("n1", (0, 1))}
    ld.c.reset()
    assert ld.c.holds.room == {}


def test_a_new_leader_waits_for_the_victims_an_earlier_one_preempted(ld: Leader) -> None:
    h = ld.h
    h.register("n1", gpus=2)
    h.register("n2", gpus=2)
    h.submit("v", gpus=2)
    h.submit("w", gpus=2)
    h.run("v.0", "n1", [0, 1])
    h.run("w.0", "n2", [0, 1])
    h.submit("p", gpus=2, priority=10)
    ld.scheduling_pass()
    stopping = [t for t in ("v.0", "w.0") if ld.task(t).stop == "preempt"]
    assert len(stopping) == 1
    ld.c.reset()  # leadership moves: the next leader knows only the state
    ld.scheduling_pass()
    assert [t for t in ("v.0", "w.0") if ld.task(t).stop == "preempt"] == stopping
    assert ld.c.reasons["p.0"] == "waiting for 1 preempted task(s) to stop"
    h.event(stopping[0], "exited", exit_code=143)
    ld.scheduling_pass()
    assert ld.task("p.0").state == "assigned"
