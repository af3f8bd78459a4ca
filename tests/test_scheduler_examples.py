"""One readable example per scheduling feature."""

from __future__ import annotations

import gc

from scheduler import (
    Placement,
    Plan,
    Policy,
    check_plan,
    first_fit,
    queue_report,
    schedule,
)
from tests.test_scheduler_support import GIB, alloc, gang, node, task, where


def test_best_fit_keeps_a_whole_node_free_for_a_big_task() -> None:
    nodes = [node("h0"), node("h1")]
    allocs = [alloc("busy", "h1", range(5))]
    pending = [task("small", gpus=2, at=1), task("big", gpus=8, at=2)]

    plan = schedule(nodes, allocs, pending)

    assert where(plan) == {"small": ("h1", (5, 6)), "big": ("h0", tuple(range(8)))}
    # First fit drops the small task on the empty node and strands the big one.
    baseline = first_fit(nodes, allocs, pending)
    assert where(baseline) == {"small": ("h0", (0, 1))}


def test_gpus_come_from_the_smallest_domain_that_holds_them() -> None:
    # Domain 0 = GPUs 0-3, domain 1 = GPUs 4-7; GPUs 0 and 1 are busy.
    nodes = [node("h0", domains=[0, 0, 0, 0, 1, 1, 1, 1])]
    allocs = [alloc("busy", "h0", [0, 1])]

    two = schedule(nodes, allocs, [task("two", gpus=2)])
    three = schedule(nodes, allocs, [task("three", gpus=3)])
    four = schedule(nodes, allocs, [task("four", gpus=4)])

    assert where(two)["two"][1] == (2, 3)  # domain 0 has exactly two left
    assert where(three)["three"][1] == (4, 5, 6)  # only domain 1 holds three
    assert where(four)["four"][1] == (4, 5, 6, 7)


def test_a_held_node_stops_small_jobs_from_starving_an_older_gang() -> None:
    nodes = [
        node("h0"),
        node("h1"),
        node("l0", model="NVIDIA L4", gpu_mem=24 * GIB),
    ]
    allocs = [alloc("r0", "h0", range(4)), alloc("r1", "h1", range(4))]
    pending = [
        *gang("train", 2, gpus=8, at=1, gpu_type="H100", user="alice"),
        *[task(f"s{k}", gpus=1, at=10 + k, user="carol") for k in range(12)],
    ]

    plan = schedule(nodes, allocs, pending, Policy(preemption=False))

    placed = where(plan)
    assert {n for n, _ in placed.values()} == {"l0"}  # backfill only off the held nodes
    assert len(placed) == 8
    assert plan.reserved == {"h0": (4, 5, 6, 7), "h1": (4, 5, 6, 7)}
    assert plan.reasons["train-0"] == "gang of 2 nodes; only 0 nodes can host a task now"
    assert plan.reasons["s11"] == "reserved for older gang train"

    # Without backfill holds the small jobs take the GPUs the gang waits for.
    greedy = schedule(nodes, allocs, pending, Policy(preemption=False, backfill=False))
    assert {n for n, _ in where(greedy).values()} == {"h0", "h1", "l0"}


def test_a_user_at_quota_gets_nothing_more() -> None:
    nodes = [node("h0"), node("h1")]
    allocs = [alloc("mine", "h0", range(6), user="alice")]
    pending = [
        task("fits", gpus=2, at=1, user="alice"),
        task("over", gpus=1, at=2, user="alice"),
        task("other", gpus=4, at=3, user="bob"),
    ]

    plan = schedule(nodes, allocs, pending, Policy(quotas={"alice": 8}))

    assert set(where(plan)) == {"fits", "other"}
    assert plan.reasons == {"over": "user alice is at quota (8 GPUs)"}


def test_pending_tasks_say_why_in_words() -> None:
    nodes = [
        node("h0", labels={"zone": "b"}),
        node("h1", labels={"zone": "b"}),
        node("h2", gpus=4, model="NVIDIA A100-SXM4-40GB", gpu_mem=40 * GIB),
    ]
    allocs = [alloc("busy0", "h0", range(2)), alloc("busy1", "h1", range(8))]
    pending = [
        task("zone", gpus=1, constraints={"zone": "a"}),
        task("model", gpus=1, gpu_type="B200"),
        task("vram", gpus=1, gpu_mem_min=96 * GIB),
        task("wide", gpus=8, gpu_type="h100"),
        task("huge", gpus=16),
        task("cpu", gpus=0, cpus=512.0),
        *gang("g", 4, gpus=4, gpu_type="H100"),
    ]

    reasons = schedule(nodes, allocs, pending, Policy(preemption=False)).reasons

    assert reasons["zone"] == "no node has label zone=a"
    assert reasons["model"] == "no node has GPU model B200"
    assert reasons["vram"] == "no node has GPUs with at least 96 GiB memory"
    assert reasons["wide"] == (
        "needs 8 h100 GPUs on one node; the largest free block is 6 GPUs on h0"
    )
    assert reasons["huge"] == "needs 16 GPUs on one node; the largest node has 8"
    assert reasons["cpu"] == "needs 512 CPUs on one node; the largest node has 64"
    assert reasons["g-0"] == "gang of 4 nodes; only 1 node can host a task now"


def test_cached_blocks_break_ties_between_equal_nodes() -> None:
    nodes = [node("h0"), node("h1", cached=["b1", "b2"]), node("h2", cached=["b1"])]

    warm = schedule(nodes, [], [task("t", gpus=1, blocks=frozenset({"b1", "b2"}))])
    cold = schedule(nodes, [], [task("t", gpus=1)])
    # Best fit still wins over the cache: a partly used node beats a warm empty one.
    busy = [alloc("busy", "h0", range(4))]
    packed = schedule(nodes, busy, [task("t", gpus=1, blocks=frozenset({"b1", "b2"}))])

    assert where(warm)["t"][0] == "h1"
    assert where(cold)["t"][0] == "h0"
    assert where(packed)["t"][0] == "h0"


def test_spread_puts_a_jobs_tasks_on_different_least_loaded_nodes() -> None:
    nodes = [node("h0"), node("h1"), node("h2"), node("h3")]
    allocs = [alloc("busy", "h0", range(5))]
    spread = [task(f"w{k}", gpus=1, job="web", at=k, spread=True) for k in range(3)]
    packed = [task(f"w{k}", gpus=1, job="web", at=k) for k in range(3)]

    spread_plan = schedule(nodes, allocs, spread)
    packed_plan = schedule(nodes, allocs, packed)

    assert [n for n, _ in where(spread_plan).values()] == ["h1", "h2", "h3"]
    assert {n for n, _ in where(packed_plan).values()} == {"h0"}


def test_preemption_evicts_the_fewest_newest_lowest_priority_tasks() -> None:
    nodes = [node("h0")]
    allocs = [
        alloc("old-low", "h0", [0, 1], priority=0, started=1),
        alloc("new-low", "h0", [2, 3], priority=0, started=5),
        alloc("mid", "h0", [4, 5], priority=1, started=2),
        alloc("pinned", "h0", [6, 7], priority=0, started=9, preemptible=False),
    ]
    pending = [task("urgent", gpus=2, priority=5), task("later", gpus=1, priority=0)]

    plan = schedule(nodes, allocs, pending)

    assert [(p.task_id, p.for_task) for p in plan.preemptions] == [("new-low", "urgent")]
    assert plan.placements == ()  # the leader places it once new-low has stopped
    assert plan.reserved == {"h0": (2, 3)}
    assert plan.reasons["urgent"] == "waiting for preempted tasks to stop on h0"
    assert check_plan(nodes, allocs, plan, pending) == []


def test_no_preempt_is_only_protected_within_quota() -> None:
    nodes = [node("h0", gpus=4)]
    allocs = [alloc("pinned", "h0", range(4), user="bob", preemptible=False)]
    pending = [task("urgent", gpus=4, priority=5)]

    within = schedule(nodes, allocs, pending, Policy(quotas={"bob": 4}))
    over = schedule(nodes, allocs, pending, Policy(quotas={"bob": 2}))
    always = schedule(
        nodes, allocs, pending, Policy(quotas={"bob": 2}, no_preempt_only_within_quota=False)
    )

    assert within.preemptions == ()
    assert [p.task_id for p in over.preemptions] == ["pinned"]
    assert always.preemptions == ()


def test_drained_nodes_take_no_work() -> None:
    nodes = [node("h0", schedulable=False)]
    plan = schedule(nodes, [], [task("t", gpus=1)])
    assert plan.reasons == {"t": "every node that could host it is draining or down"}


def test_queue_report_shows_shares_and_demand() -> None:
    nodes = [node("h0"), node("h1")]
    allocs = [alloc("a", "h0", range(4), user="alice", cpus=8.0)]
    pending = [task("p", gpus=2, user="bob")]

    rows = queue_report(nodes, allocs, pending, Policy(quotas={"alice": 8}))

    assert [(r.user, r.gpus, r.pending_gpus, r.quota_gpus) for r in rows] == [
        ("alice", 4, 0, 8),
        ("bob", 0, 2, None),
    ]
    assert rows[0].dominant_share == 0.25


def test_check_plan_reports_double_booked_gpus_and_overcommitted_cpus() -> None:
    nodes = [node("h0", gpus=2, cpus=4.0)]
    allocs = [alloc("a", "h0", [0], cpus=3.0)]
    pending = [task("t", gpus=1, cpus=2.0)]
    bad = Plan(placements=(Placement("t", "h0", (0,)),), preemptions=(), reasons={})

    errors = check_plan(nodes, allocs, bad, pending)

    assert any("GPU 0 on h0 also held by a" in e for e in errors)
    assert any("CPUs used of 4" in e for e in errors)


def test_a_smaller_gang_still_starts_after_a_bigger_alike_one_failed() -> None:
    nodes = [node(f"h{i}") for i in range(3)]
    pending = [
        *gang("four", 4, at=1),
        *gang("three", 3, at=2),
        *gang("five", 5, at=3),
    ]

    plan = schedule(nodes, [], pending)

    assert {n for n, _ in where(plan).values()} == {"h0", "h1", "h2"}
    assert set(where(plan)) == {"three-0", "three-1", "three-2"}
    assert plan.reasons["four-0"] == "gang of 4 nodes; only 3 nodes can host a task now"
    assert plan.reasons["five-4"] == "gang of 5 nodes; only 0 nodes can host a task now"


def test_two_preemptors_in_one_pass_never_share_a_victim() -> None:
    nodes = [node("h0"), node("h1"), node("h2")]
    allocs = [alloc(f"low{i}", f"h{i}", range(8), priority=0) for i in range(2)]
    allocs.append(alloc("high", "h2", range(8), priority=5))
    pending = [task(f"urgent{k}", gpus=8, priority=3, at=k) for k in range(3)]

    plan = schedule(nodes, allocs, pending)

    assert {(p.task_id, p.for_task) for p in plan.preemptions} == {
        ("low0", "urgent0"),
        ("low1", "urgent1"),
    }
    assert "urgent2" in plan.reasons
    assert check_plan(nodes, allocs, plan, pending) == []


def test_a_pass_leaves_the_cycle_collector_as_it_found_it() -> None:
    pending = [task("t")]
    was = gc.isenabled()
    try:
        gc.disable()
        schedule([node("h0")], [], pending)
        assert not gc.isenabled()
        gc.enable()
        schedule([node("h0")], [], pending)
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
