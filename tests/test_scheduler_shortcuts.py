"""Work a pass leaves out, or takes from an earlier pass, changes no plan.

A leader plans every time a commit may have freed or asked for something,
mostly over the same nodes and much the same work. Each shortcut here skips
what cannot change the answer; each test holds the pass to one that does the
work, and checks that the work is in fact skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import (
    Allocation,
    NodeView,
    Plan,
    Policy,
    TaskRequest,
    core,
    explain,
    fairshare,
    schedule,
)
from scheduler.cluster import Cluster, Shape
from scheduler.core import _Pass
from scheduler.fairshare import FairShare, build_backlog
from scheduler.types import DEFAULT_POLICY
from tests.test_scheduler_classes import crowded
from tests.test_scheduler_properties import assert_valid, clusters
from tests.test_scheduler_support import alloc, gang, node, task


class AlwaysAsksThePreemptor(_Pass):
    """The pass with its Preemptor made up front and asked about every shape
    that fits nowhere, whatever runs below the task's priority."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        if self.preemption:
            self._preemptor()

    def _may_evict(self, priority: int) -> bool:
        return self.preemption


def both(
    nodes: Sequence[NodeView],
    allocs: Sequence[Allocation],
    pending: Sequence[TaskRequest],
    policy: Policy,
) -> tuple[Plan, Plan, _Pass]:
    fast = _Pass(nodes, allocs, policy)
    slow = AlwaysAsksThePreemptor(nodes, allocs, policy)
    return fast.run(pending), slow.run(pending), fast


@settings(max_examples=120, deadline=None)
@given(clusters(), crowded(), st.booleans())
def test_a_pass_that_skips_the_preemptor_plans_the_same(
    cluster: tuple[list[NodeView], list[Allocation]], pending: list[TaskRequest], preempt: bool
) -> None:
    nodes, allocs = cluster
    fast, slow, _ = both(nodes, allocs, pending, Policy(preemption=preempt))
    assert fast == slow
    assert list(fast.reasons.items()) == list(slow.reasons.items())
    assert_valid(nodes, allocs, pending, fast)


def test_no_preemptor_when_nothing_runs_below_the_waiting_work() -> None:
    nodes = [node("h0")]
    allocs = [alloc("run", "h0", range(8), priority=1)]
    pending = [task("a", gpus=8, priority=1), task("b", gpus=2, priority=0)]
    fast, slow, p = both(nodes, allocs, pending, Policy())
    assert fast == slow
    assert fast.placements == () and set(fast.reasons) == {"a", "b"}
    assert p._pre is None
    # One task above what runs: now there is something to evict.
    pending.append(task("c", gpus=8, priority=2))
    fast, slow, p = both(nodes, allocs, pending, Policy())
    assert fast == slow
    assert [(x.task_id, x.for_task) for x in fast.preemptions] == [("run", "c")]
    assert p._pre is not None


@settings(max_examples=100, deadline=None)
@given(clusters(), st.data())
def test_the_totals_a_frame_keeps_are_those_of_the_allocations_at_hand(
    cluster: tuple[list[NodeView], list[Allocation]], data: st.DataObject
) -> None:
    """Shares are of the nodes that take work and of the unschedulable nodes
    that hold some: passes over the same nodes with other work running on
    them get their own totals from the frame, not the first pass's."""
    nodes, allocs = cluster
    frame = Cluster(nodes, allocs).frame
    for some in (allocs, data.draw(st.lists(st.sampled_from(allocs))) if allocs else [], allocs):
        kept = FairShare(nodes, some, DEFAULT_POLICY, frame=frame)
        assert kept.total == FairShare(nodes, some, DEFAULT_POLICY).total
        assert kept.shares == FairShare(nodes, some, DEFAULT_POLICY).shares


def test_a_draining_node_counts_only_while_it_holds_work() -> None:
    nodes = [node("h0"), node("h1", schedulable=False)]
    busy = [alloc("run", "h1", range(4))]
    frame = Cluster(nodes, busy).frame
    assert FairShare(nodes, busy, DEFAULT_POLICY, frame=frame).total[0] == 16.0
    assert FairShare(nodes, [], DEFAULT_POLICY, frame=frame).total[0] == 8.0
    assert FairShare(nodes, busy, DEFAULT_POLICY, frame=frame).total[0] == 16.0


class TriesEveryGang(_Pass):
    """The pass trying every gang task by task, as if no count came first."""

    def _hosts_first(self, shapes: tuple[Shape, ...], busy: set[int]) -> int | None:
        return None


@settings(max_examples=120, deadline=None)
@given(clusters(), crowded(), st.booleans())
def test_a_gang_counted_short_of_hosts_plans_as_one_tried(
    cluster: tuple[list[NodeView], list[Allocation]], pending: list[TaskRequest], backfill: bool
) -> None:
    nodes, allocs = cluster
    policy = Policy(backfill=backfill)
    fast = _Pass(nodes, allocs, policy).run(pending)
    slow = TriesEveryGang(nodes, allocs, policy).run(pending)
    assert fast == slow
    assert list(fast.reasons.items()) == list(slow.reasons.items())
    assert fast.reserved == slow.reserved
    assert_valid(nodes, allocs, pending, fast)


def test_a_gang_of_one_shape_with_too_few_hosts_is_not_tried() -> None:
    """Three 4-GPU tasks, one node with room for one: no task of the gang is
    placed for a trial and taken back; it holds the nodes closest to fitting."""
    nodes = [node("h0"), node("h1"), node("h2")]
    allocs = [alloc("a", "h0", range(5)), alloc("b", "h1", range(4)), alloc("c", "h2", range(6))]
    pending = gang("big", 3, gpus=4)
    p = _Pass(nodes, allocs, DEFAULT_POLICY)
    tried: list[Shape] = []
    fit_and_take = p.cl.fit_and_take

    def counted(shape: Shape, *args: Any) -> Any:
        tried.append(shape)
        return fit_and_take(shape, *args)

    p.cl.fit_and_take = counted  # type: ignore[method-assign]
    plan = p.run(pending)
    assert plan.reasons["big-0"] == "gang of 3 nodes; only 1 node can host a task now"
    assert plan.placements == ()
    assert plan.reserved == {"h0": (5, 6, 7), "h1": (4, 5, 6, 7), "h2": (6, 7)}
    assert tried == []
    assert plan == TriesEveryGang(nodes, allocs, DEFAULT_POLICY).run(pending)


def test_the_very_inputs_of_the_last_pass_get_its_plan_without_a_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A leader woken by a commit that changed nothing the scheduler reads
    asks with the same objects again: the same plan, with no pass; an equal
    but new object anywhere is a new question."""
    passes: list[_Pass] = []

    class Counted(_Pass):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            passes.append(self)

    monkeypatch.setattr(core, "_Pass", Counted)
    nodes = [node("h0"), node("h1", gpus=4)]
    allocs = [alloc("run", "h0", range(6))]
    pending = [task("a", gpus=4), task("b", gpus=4, at=1.0), task("c", gpus=2, at=2.0)]
    policy = Policy()
    first = schedule(nodes, allocs, pending, policy)
    assert len(passes) == 1
    assert [(p.task_id, p.node_id) for p in first.placements] == [("a", "h1"), ("c", "h0")]
    assert set(first.reasons) == {"b"}
    again = schedule(list(nodes), list(allocs), list(pending), policy)
    assert len(passes) == 1
    assert again == first == schedule(nodes, allocs, pending, Policy())
    assert len(passes) == 2  # an equal policy, not the same object
    for changed in (
        ([*nodes[:1], replace(nodes[1])], allocs, pending),
        (nodes, [replace(allocs[0])], pending),
        (nodes, allocs, [*pending[:2], replace(pending[2])]),
        (nodes, allocs, pending[:2]),
    ):
        schedule(*changed, policy)
    assert len(passes) == 6


def test_reasons_no_waiting_fixes_follow_the_kinds_of_node_they_were_found_on() -> None:
    """Such reasons are kept by the kinds of node (pools, and the nodes that
    are draining or down), so a new list of views with the same kinds reuses
    them; a down node with other labels is another kind."""
    wants_b = [task("t", constraints={"zone": "b"})]
    up = node("h0", labels={"zone": "a"})
    for down_zone, why in (
        ("b", "every node that could host it is draining or down"),
        ("c", "no node has label zone=b"),
        ("b", "every node that could host it is draining or down"),
    ):
        # New view objects each time, as a leader makes after a record changed.
        nodes = [replace(up), node("h1", labels={"zone": down_zone}, schedulable=False)]
        assert schedule(nodes, [], wants_b).reasons == {"t": why}


@settings(max_examples=100, deadline=None)
@given(clusters(), crowded(), st.lists(st.booleans(), min_size=5, max_size=5))
def test_reasons_over_views_alike_to_earlier_ones_are_those_worked_out_afresh(
    cluster: tuple[list[NodeView], list[Allocation]], pending: list[TaskRequest], flip: list[bool]
) -> None:
    nodes, allocs = cluster
    later = [replace(n, schedulable=n.schedulable != f) for n, f in zip(nodes, flip, strict=False)]
    for views in (nodes, later, [replace(n) for n in nodes]):
        kept = _Pass(views, allocs, DEFAULT_POLICY).run(pending)
        explain._STATIC.clear()
        afresh = _Pass([replace(n) for n in views], allocs, DEFAULT_POLICY).run(pending)
        assert list(kept.reasons.items()) == list(afresh.reasons.items())


def test_a_waiting_gang_keeps_its_unit_while_its_requests_are_the_same() -> None:
    pending = gang("g", 3, gpus=2)
    first = build_backlog(pending).gangs[0]
    assert build_backlog(list(pending)).gangs[0] is first
    # Another order of the same requests (a pass meets them as the state
    # lists them) is made again, and is the same unit.
    assert build_backlog(pending[::-1]).gangs[0] == first
    # A request made again (its job's priority changed) is another question.
    raised = [*pending[:2], replace(pending[2], priority=7)]
    unit = build_backlog(raised).gangs[0]
    assert unit.priority == 7 and unit.tasks[2] is raised[2]
    assert build_backlog(pending[:2]).gangs[0].tasks == tuple(pending[:2])


@settings(max_examples=100, deadline=None)
@given(crowded(), st.data())
def test_backlogs_with_kept_gangs_are_those_made_afresh(
    pending: list[TaskRequest], data: st.DataObject
) -> None:
    build_backlog(pending)
    later = data.draw(st.permutations(pending))
    later = [replace(t, priority=t.priority + 1) if data.draw(st.booleans()) else t for t in later]
    later = later[: data.draw(st.integers(0, len(later)))]
    kept = build_backlog(later)
    fairshare._GANGS.clear()
    assert kept == build_backlog(later)
