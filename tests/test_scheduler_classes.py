"""Whole request classes and gangs settled when their priority level starts.

A class (shape, priority) whose shape fit nowhere at a higher level, with no
open victim below its priority, can get nothing in the pass; a gang alike to
one that could not start (and with no task of its own running) cannot start
either.  The pass marks them before the level is queued, so their tasks never
go through the queue.  These tests hold that shortcut to the pass without it:
the same plans, and far less work per task.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import Allocation, NodeView, Plan, Policy, TaskRequest
from scheduler.core import _Pass
from scheduler.fairshare import Backlog, Unit
from scheduler.types import DEFAULT_POLICY
from tests.test_scheduler_properties import assert_valid, clusters
from tests.test_scheduler_support import GIB, alloc, gang, node, task


class Counting(_Pass):
    """The pass as it is, counting the gangs it tries and the single tasks it
    tries past the in-line best fit (which places the ones that fit)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.singles = 0
        self.gangs = 0

    def _single(self, t: TaskRequest, shape: object) -> None:
        self.singles += 1
        super()._single(t, shape)  # type: ignore[arg-type]

    def _gang(self, unit: Unit) -> None:
        self.gangs += 1
        super()._gang(unit)


class WithoutSettling(Counting):
    """The pass with nothing settled up front: every class's first task and
    every gang go through the queue and are tried."""

    def _settle_level(self, backlog: Backlog, prio: int, dead_gangs: list[bool]) -> None:
        pass


def plans(
    nodes: Sequence[NodeView],
    allocs: Sequence[Allocation],
    pending: Sequence[TaskRequest],
    policy: Policy = DEFAULT_POLICY,
) -> tuple[Plan, Plan, Counting, Counting]:
    fast, slow = Counting(nodes, allocs, policy), WithoutSettling(nodes, allocs, policy)
    return fast.run(pending), slow.run(pending), fast, slow


@st.composite
def crowded(draw: st.DrawFn) -> list[TaskRequest]:
    """Many tasks drawn from a few request specs at several priorities, so
    that shapes run out of room at one level and come back at lower ones."""
    specs = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "gpus": st.sampled_from([0, 1, 2, 4, 8]),
                    "cpus": st.sampled_from([0.0, 1.0, 8.0]),
                    "mem_bytes": st.sampled_from([0, 16 * GIB]),
                    "gpu_type": st.sampled_from([None, "h100", "A100"]),
                    "constraints": st.sampled_from([{}, {"zone": "a"}]),
                    "spread": st.booleans() if draw(st.booleans()) else st.just(False),
                }
            ),
            min_size=1,
            max_size=3,
        )
    )
    out: list[TaskRequest] = []
    for j in range(draw(st.integers(1, 40))):
        spec = draw(st.sampled_from(specs))
        who = {
            "user": draw(st.sampled_from(["u0", "u1", "u2"])),
            "priority": draw(st.integers(0, 2)),
            "at": float(draw(st.integers(0, 5))),
        }
        size = draw(st.sampled_from([1, 1, 1, 1, 2, 3]))
        if size == 1:
            out.append(task(f"t{j}", job=f"j{j}", **who, **spec))
        else:
            out += gang(f"g{j}", size, **who, **spec)
    return out


@settings(max_examples=120, deadline=None)
@given(clusters(), crowded(), st.booleans())
def test_settling_classes_and_gangs_changes_no_plan(
    cluster: tuple[list[NodeView], list[Allocation]], pending: list[TaskRequest], preempt: bool
) -> None:
    nodes, allocs = cluster
    fast, slow, _, _ = plans(nodes, allocs, pending, Policy(preemption=preempt))
    assert fast == slow
    assert_valid(nodes, allocs, pending, fast)


@settings(max_examples=80, deadline=None)
@given(clusters(), crowded())
def test_with_quotas_the_same_tasks_start_and_the_rest_keep_a_reason(
    cluster: tuple[list[NodeView], list[Allocation]], pending: list[TaskRequest]
) -> None:
    """Quotas of settled tasks are read at the end of the pass (as for every
    task skipped in the queue), so a reason may name the quota where the pass
    without settling names the shortage, or the other way round."""
    nodes, allocs = cluster
    policy = Policy(quotas={"u1": 4, "u2": 0})
    fast, slow, _, _ = plans(nodes, allocs, pending, policy)
    assert (fast.placements, fast.preemptions, fast.reserved) == (
        slow.placements,
        slow.preemptions,
        slow.reserved,
    )
    assert set(fast.reasons) == set(slow.reasons)
    assert_valid(nodes, allocs, pending, fast)


def test_a_level_that_cannot_start_costs_no_work_per_task() -> None:
    nodes = [node("h0"), node("h1")]
    # 17 one-GPU tasks at priority 1 for 16 GPUs: the last one finds no room.
    pending = [task(f"hi{k}", priority=1, at=float(k), cpus=1.0) for k in range(17)]
    # Then 5,000 alike at priority 0, from 500 users: nothing runs below
    # priority 0, so there is nothing to evict for them either.
    pending += [
        task(f"lo{k}", priority=0, user=f"user{k % 500}", at=float(k), cpus=1.0)
        for k in range(5000)
    ]
    fast, slow, counted, uncounted = plans(nodes, [], pending)
    assert fast == slow
    assert len(fast.placements) == 16
    assert counted.singles == 1  # the 17th; none of the 5,000
    assert uncounted.singles == 1 + 500  # and one per user queue without settling
    reasons = {fast.reasons[f"lo{k}"] for k in range(5000)}
    assert reasons == {fast.reasons["hi16"]}


def test_gangs_alike_to_one_that_could_not_start_are_not_tried_again() -> None:
    nodes = [node("h0"), node("h1")]
    pending = gang("big", 3, priority=1)  # three 8-GPU nodes, two exist
    for k in range(300):
        pending += gang(f"g{k}", 3, priority=0, at=float(k + 1))
    fast, slow, counted, uncounted = plans(nodes, [], pending)
    assert fast == slow
    assert fast.placements == ()
    assert counted.gangs == 1
    assert uncounted.gangs == 301
    assert len({fast.reasons[t.task_id] for t in pending}) == 1


def test_a_class_that_can_still_evict_below_is_not_settled() -> None:
    """An 8-GPU shape fits nowhere, but each level has lower-priority work
    to evict: the priority-1 task preempts too, after the priority-2 one."""
    nodes = [node("h0"), node("h1")]
    allocs = [alloc("low0", "h0", range(8), priority=0), alloc("low1", "h1", range(8), priority=0)]
    pending = [task("top", gpus=8, priority=2), task("mid", gpus=8, priority=1, at=1.0)]
    fast, slow, _, _ = plans(nodes, allocs, pending)
    assert fast == slow
    assert {p.for_task for p in fast.preemptions} == {"top", "mid"}


def test_a_gang_with_a_task_running_is_not_settled_by_an_alike_one() -> None:
    """Gang "other" (three 4-GPU tasks) cannot start; gang "big" asks for the
    same but already runs on h0, which it must avoid: it is tried, and its
    reason counts the nodes it could use, not the ones "other" could."""
    nodes = [node("h0"), node("h1"), node("h2")]
    allocs = [
        alloc("big-0", "h0", range(4), job="big", priority=0),
        alloc("full", "h2", range(8), priority=5, preemptible=False),
    ]
    pending = gang("other", 3, gpus=4, priority=1)
    pending += [task(f"big-{r}", gpus=4, job="big", gang_size=4, rank=r, at=1.0) for r in (1, 2, 3)]
    fast, slow, counted, _ = plans(nodes, allocs, pending, Policy(backfill=False))
    assert fast == slow
    assert counted.gangs == 2
    assert fast.reasons["other-0"] == "gang of 3 nodes; only 2 nodes can host a task now"
    assert fast.reasons["big-1"] == "gang of 3 nodes; only 1 node can host a task now"
