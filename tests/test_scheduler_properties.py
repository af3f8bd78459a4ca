"""Properties of the scheduler over random clusters and job mixes.

The checks here are written independently of `check_plan` (which is also
exercised), so a bug shared by both would still show.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import (
    Allocation,
    NodeView,
    Plan,
    Policy,
    TaskRequest,
    check_plan,
    schedule,
)
from tests.test_scheduler_support import GIB, alloc, node, task

MODELS = [("NVIDIA H100 80GB HBM3", 80 * GIB), ("NVIDIA A100-SXM4-40GB", 40 * GIB)]
FEW = settings(max_examples=60, deadline=None)


@st.composite
def clusters(draw: st.DrawFn, roomy: bool = False) -> tuple[list[NodeView], list[Allocation]]:
    """A few nodes with some work already running on them.  `roomy` nodes
    have CPUs and memory to spare, so GPUs are the only scarce resource."""
    nodes: list[NodeView] = []
    allocs: list[Allocation] = []
    for i in range(draw(st.integers(1, 5))):
        n_gpus = draw(st.sampled_from([0, 2, 4, 8]))
        model, gmem = draw(st.sampled_from(MODELS))
        cpus = 1000.0 if roomy else float(draw(st.integers(4, 64)))
        mem = 1000 * GIB if roomy else draw(st.integers(8, 256)) * GIB
        nd = node(
            f"h{i}",
            gpus=n_gpus,
            model=model,
            gpu_mem=gmem,
            cpus=cpus,
            mem=mem,
            domains=draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=n_gpus, max_size=n_gpus)),
            labels={"zone": draw(st.sampled_from("ab"))},
            schedulable=draw(st.booleans()) or draw(st.booleans()),
            cached=draw(st.lists(st.sampled_from(["b1", "b2", "b3"]), max_size=2)),
        )
        nodes.append(nd)
        free = list(range(n_gpus))
        cpu_left, mem_left = cpus, mem
        for k in range(draw(st.integers(0, 3))):
            take = draw(st.integers(0, len(free)))
            c = draw(st.floats(0, cpu_left / 2)) if cpu_left > 0 else 0.0
            m = draw(st.integers(0, mem_left // 2))
            allocs.append(
                alloc(
                    f"a{i}-{k}",
                    nd.node_id,
                    free[:take],
                    user=draw(st.sampled_from(["u0", "u1", "u2"])),
                    priority=draw(st.integers(0, 2)),
                    started=float(draw(st.integers(0, 100))),
                    cpus=c,
                    mem=m,
                    preemptible=draw(st.booleans()) or draw(st.booleans()),
                )
            )
            free, cpu_left, mem_left = free[take:], cpu_left - c, mem_left - m
    return nodes, allocs


@st.composite
def workloads(draw: st.DrawFn, gangs: bool = True, tiny: bool = False) -> list[TaskRequest]:
    """Pending tasks; gang jobs come in whole.  `tiny` tasks ask for no CPU
    or memory worth speaking of."""
    out: list[TaskRequest] = []
    for j in range(draw(st.integers(0, 10))):
        size = draw(st.sampled_from([1, 1, 1, 2, 3])) if gangs else 1
        spec = {
            "gpus": draw(st.sampled_from([0, 1, 1, 2, 4, 8])),
            "user": draw(st.sampled_from(["u0", "u1", "u2"])),
            "priority": draw(st.integers(0, 3)),
            "at": float(draw(st.integers(0, 50))),
            "cpus": 0.0 if tiny else float(draw(st.integers(0, 16))),
            "mem_bytes": 0 if tiny else draw(st.integers(0, 64)) * GIB,
            "gpu_type": draw(st.sampled_from([None, None, "h100", "A100", "V100"])),
            "gpu_mem_min": draw(st.sampled_from([0, 0, 48 * GIB])),
            "constraints": draw(st.sampled_from([{}, {}, {"zone": "a"}, {"zone": "c"}])),
            "spread": draw(st.booleans()),
            "blocks": frozenset(draw(st.lists(st.sampled_from(["b1", "b2", "b3"]), max_size=2))),
        }
        for r in range(size):
            out.append(task(f"t{j}-{r}", job=f"j{j}", gang_size=size, rank=r, **spec))
    return out


def assert_valid(
    nodes: list[NodeView], allocs: list[Allocation], pending: list[TaskRequest], plan: Plan
) -> None:
    by_node = {nd.node_id: nd for nd in nodes}
    req = {t.task_id: t for t in pending}
    evicted = {p.task_id for p in plan.preemptions}
    gpu_owner: dict[tuple[str, int], str] = {}
    cpus: Counter[str] = Counter()
    mem: Counter[str] = Counter()
    live = [
        (a.task_id, a.node_id, a.gpus, a.cpus, a.mem_bytes)
        for a in allocs
        if a.task_id not in evicted
    ]
    for p in plan.placements:
        t = req[p.task_id]
        nd = by_node[p.node_id]
        assert nd.schedulable
        assert len(p.gpus) == t.gpus
        assert all(nd.labels.get(k) == v for k, v in t.constraints.items())
        for g in p.gpus:
            gpu = nd.gpus[g]
            assert t.gpu_type is None or t.gpu_type.lower() in gpu.model.lower()
            assert gpu.mem_bytes >= t.gpu_mem_min
            assert g not in plan.reserved.get(p.node_id, ())
        live.append((p.task_id, p.node_id, p.gpus, t.cpus, t.mem_bytes))
    for tid, nid, gpus, c, m in live:
        for g in gpus:
            assert (nid, g) not in gpu_owner, f"GPU {g} on {nid}: {tid} and {gpu_owner[nid, g]}"
            assert 0 <= g < len(by_node[nid].gpus)
            gpu_owner[nid, g] = tid
        cpus[nid] += c
        mem[nid] += m
    for nid, nd in by_node.items():
        assert cpus[nid] <= nd.cpus + 1e-6
        assert mem[nid] <= nd.mem_bytes
    # Gangs: all pending members or none, each on its own node.
    placed = {p.task_id: p.node_id for p in plan.placements}
    jobs: dict[str, list[TaskRequest]] = {}
    for t in pending:
        jobs.setdefault(t.job_id, []).append(t)
    for members in jobs.values():
        if members[0].gang_size > 1:
            on = [placed[t.task_id] for t in members if t.task_id in placed]
            assert len(on) in (0, len(members))
            assert len(set(on)) == len(on)
    # Every pending task is either placed or has a reason, never both.
    for t in pending:
        assert (t.task_id in placed) != (t.task_id in plan.reasons), t.task_id
        assert t.task_id not in placed or plan.reasons.get(t.task_id) is None


@FEW
@given(clusters(), workloads(), st.booleans())
def test_plans_never_overcommit_and_respect_requests(
    cluster: tuple[list[NodeView], list[Allocation]], pending: list[TaskRequest], preempt: bool
) -> None:
    nodes, allocs = cluster
    plan = schedule(nodes, allocs, pending, Policy(preemption=preempt))
    assert_valid(nodes, allocs, pending, plan)
    assert check_plan(nodes, allocs, plan, pending) == []


@FEW
@given(clusters(), workloads())
def test_same_input_gives_the_same_plan_whatever_the_order(
    cluster: tuple[list[NodeView], list[Allocation]], pending: list[TaskRequest]
) -> None:
    nodes, allocs = cluster
    policy = Policy(quotas={"u1": 6})
    first = schedule(nodes, allocs, pending, policy)
    assert schedule(nodes, allocs, pending, policy) == first
    again = schedule(nodes, allocs[::-1], pending[::-1], policy)
    assert set(again.placements) == set(first.placements)
    assert set(again.preemptions) == set(first.preemptions)
    assert dict(again.reasons) == dict(first.reasons)


@FEW
@given(clusters(roomy=True), workloads(gangs=False, tiny=True))
def test_higher_priority_work_never_waits_behind_evictable_work(
    cluster: tuple[list[NodeView], list[Allocation]], pending: list[TaskRequest]
) -> None:
    """If evicting lower-priority preemptible allocations on some node would
    make a pending task fit, the plan preempts for it (or places it)."""
    nodes, allocs = cluster
    plan = schedule(nodes, allocs, pending, Policy(preemption=True))
    assert_valid(nodes, allocs, pending, plan)
    placed = {p.task_id for p in plan.placements}
    preempting = {p.for_task for p in plan.preemptions}
    evicted = {p.task_id for p in plan.preemptions}
    busy: dict[str, set[int]] = {nd.node_id: set(plan.reserved.get(nd.node_id, ())) for nd in nodes}
    for p in plan.placements:
        busy[p.node_id].update(p.gpus)
    for a in allocs:  # evicted tasks hold their GPUs until they stop
        busy[a.node_id].update(a.gpus)
    for t in pending:
        if t.task_id in placed or t.task_id in preempting:
            continue
        for nd in nodes:
            if not nd.schedulable or any(nd.labels.get(k) != v for k, v in t.constraints.items()):
                continue
            evictable = {
                g
                for a in allocs
                if a.node_id == nd.node_id
                and a.task_id not in evicted
                and a.preemptible
                and a.priority < t.priority
                for g in a.gpus
            }
            usable = [
                g.index
                for g in nd.gpus
                if (g.index not in busy[nd.node_id] or g.index in evictable)
                and (t.gpu_type is None or t.gpu_type.lower() in g.model.lower())
                and g.mem_bytes >= t.gpu_mem_min
            ]
            assert len(usable) < t.gpus, (
                f"{t.task_id} (priority {t.priority}) pending on {nd.node_id}: "
                f"{plan.reasons.get(t.task_id)}"
            )


@FEW
@given(
    n_nodes=st.integers(1, 4),
    gpus_per_task=st.sampled_from([1, 2, 4]),
    extra=st.integers(1, 12),
)
def test_equal_demand_gets_equal_shares(n_nodes: int, gpus_per_task: int, extra: int) -> None:
    nodes = [node(f"h{i}") for i in range(n_nodes)]
    capacity_tasks = n_nodes * 8 // gpus_per_task
    per_user = capacity_tasks // 2 + extra  # together they want more than there is
    # All of bob's tasks are younger than all of alice's: only fair share
    # (not age) can give him his half.
    pending = [
        task(f"{u}-{k}", gpus=gpus_per_task, user=u, at=float(k + offset), cpus=1.0)
        for u, offset in (("alice", 0), ("bob", 1000))
        for k in range(per_user)
    ]

    plan = schedule(nodes, [], pending)

    got = Counter(p.task_id.split("-")[0] for p in plan.placements)
    assert sum(got.values()) == capacity_tasks
    assert abs(got["alice"] - got["bob"]) <= 1
