"""What a scheduling pass is given (leptond/views.scheduler_inputs), and the
cache that keeps it from one pass to the next while the records are unchanged.

Each view is frozen from a real ClusterState after real commands; the cached
inputs must always equal inputs made afresh from the same view.
"""

from __future__ import annotations

from leptond.views import InputCache, scheduler_inputs
from scheduler import Allocation, NodeView, TaskRequest
from tests.test_state_support import Harness

Inputs = tuple[list[NodeView], list[Allocation], list[TaskRequest]]


def same_as_fresh(
    h: Harness, cache: InputCache, cached: dict[str, frozenset[str]] | None = None
) -> Inputs:
    s = h.state.freeze()
    got = scheduler_inputs(s, cached, cache=cache)
    assert got == scheduler_inputs(s, cached)
    return got


def test_cached_inputs_follow_every_change() -> None:
    h = Harness()
    h.register("n1", gpus=4)
    h.register("n2", gpus=2)
    h.submit("a", gpus=2)
    h.submit("b", gpus=1, priority=5)
    h.submit("c", gpus=1, preemptible=False)
    cache = InputCache()
    same_as_fresh(h, cache)
    h.run("a.0", "n1", [0, 1])
    nodes, allocs, pending = same_as_fresh(h, cache)
    assert [a.task_id for a in allocs] == ["a.0"] and {r.task_id for r in pending} == {"b.0", "c.0"}
    h.plan([("c.0", "n2", [0])])
    h.ok("node_state", {"node_id": "n2", "state": "draining", "reason": "maintenance"})
    nodes, allocs, pending = same_as_fresh(h, cache)
    assert [n.schedulable for n in nodes] == [True, False]
    assert {a.task_id: a.preemptible for a in allocs} == {"a.0": True, "c.0": False}
    h.plan(preemptions=["a.0"])  # a's stop makes it no victim any more
    _, allocs, _ = same_as_fresh(h, cache)
    assert {a.task_id: a.preemptible for a in allocs}["a.0"] is False
    h.ok("cancel_job", {"job_id": "b", "user": "alice"})
    _, _, pending = same_as_fresh(h, cache)
    assert [r.task_id for r in pending] == []
    # Blocks a node's cache holds are part of its view.
    nodes, _, _ = same_as_fresh(h, cache, cached={"n1": frozenset({"blk"})})
    assert nodes[0].cached_blocks == frozenset({"blk"})
    nodes, _, _ = same_as_fresh(h, cache)
    assert nodes[0].cached_blocks == frozenset()


def test_unchanged_records_give_the_same_inputs_again() -> None:
    h = Harness()
    h.register("n1", gpus=4)
    h.submit("a", gpus=2)
    h.submit("b", gpus=1)
    h.run("a.0", "n1", [0, 1])
    cache = InputCache()
    n1, a1, p1 = scheduler_inputs(h.state.freeze(), cache=cache)
    h.submit("c", gpus=1)  # a new job: the others' records are untouched
    n2, a2, p2 = scheduler_inputs(h.state.freeze(), cache=cache)
    assert n2[0] is n1[0] and a2[0] is a1[0] and p2[0] is p1[0]
    assert [r.task_id for r in p2] == ["b.0", "c.0"]
