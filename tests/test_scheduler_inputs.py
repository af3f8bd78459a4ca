"""What a scheduling pass is given (leptond/views.scheduler_inputs), and the
cache that keeps it from one pass to the next while the records are unchanged.

Each view is frozen from a real ClusterState after real commands; the cached
inputs must always equal inputs made afresh from the same view.
"""

from __future__ import annotations

from typing import Any

from leptond.views import InputCache, scheduler_inputs
from scheduler import Allocation, NodeView, TaskRequest
from tests.test_state_support import GiB, Harness, node_record

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


class CountingTasks(dict[str, Any]):
    """A view's task table that counts which tasks a pass looked up."""

    def __init__(self, tasks: Any) -> None:
        super().__init__(tasks.items())
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


def incremental(s: Any, cache: InputCache, skip: set[str]) -> tuple[Inputs, dict[str, str]]:
    held: dict[str, str] = {}
    got = scheduler_inputs(s, skip=skip, cache=cache, held=held)
    fresh_held: dict[str, str] = {}
    assert got == scheduler_inputs(s, skip=skip, held=fresh_held)
    assert held == fresh_held
    return got, held


def test_an_incremental_pass_reads_only_new_and_limited_tasks() -> None:
    # A leader under a stream of submits runs a pass per batch; the tasks that
    # did not fit before (skip) must cost it nothing, or each pass is
    # O(pending). Tasks of an array with --max-running are still counted, in
    # order, so the limit holds the same tasks back as a fresh pass would.
    h = Harness()
    h.register("n1", gpus=1)
    for i in range(50):
        h.submit(f"big{i}", gpus=8)  # fits nowhere
    h.submit("arr", gpus=8, array=[[0, 3, 1]], max_running=2)
    cache = InputCache()
    s = h.state.freeze()
    (_, _, pending), _ = incremental(s, cache, set())
    skip = {r.task_id for r in pending}  # none of them fits on n1
    assert len(skip) == 52  # 50 jobs and the two array tasks under the limit
    h.submit("new", gpus=1)
    s = h.state.freeze()
    tasks = CountingTasks(s.tasks)
    s.tasks = tasks
    held: dict[str, str] = {}
    got = scheduler_inputs(s, skip=skip, cache=cache, held=held)
    looked_up = tasks.read - {"new.0"}
    assert [r.task_id for r in got[2]] == ["new.0"]
    assert set(held) == {"arr.2", "arr.3"}
    assert "--max-running 2" in held["arr.2"]
    fresh_held: dict[str, str] = {}  # the same as a pass without the cache
    assert got == scheduler_inputs(s, skip=skip, held=fresh_held) and held == fresh_held
    assert looked_up == {f"arr.{i}" for i in range(4)}, sorted(looked_up)[:10]


def test_a_host_registered_again_with_other_gpus_is_seen_with_the_new_ones() -> None:
    """GPUs are shared between views by what they are made of: a host that
    comes back with other GPUs at the same indices (another model, memory or
    NVLink domain) is seen with those, cached or not."""
    h = Harness()
    h.register("n1", gpus=2)
    cache = InputCache()
    nodes, _, _ = same_as_fresh(h, cache)
    assert [(g.model, g.mem_bytes, g.domain) for g in nodes[0].gpus] == [("H100", 80 * GiB, -1)] * 2
    gpus = [
        {"index": i, "uuid": f"GPU-n1-{i}", "model": "A100", "mem_bytes": 40 * GiB, "domain": i}
        for i in range(2)
    ]
    h.ok("register_node", {"node": {**node_record("n1"), "gpus": gpus}})
    nodes, _, _ = same_as_fresh(h, cache)
    assert [(g.index, g.model, g.mem_bytes, g.domain) for g in nodes[0].gpus] == [
        (0, "A100", 40 * GiB, 0),
        (1, "A100", 40 * GiB, 1),
    ]
