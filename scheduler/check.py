"""Invariants a Plan must keep, as a list of violations (empty = ok).

Used by the property tests and by callers that want a cheap sanity check
before committing.  Placements do not carry CPU/memory figures, so those
(and gang, constraint and priority rules) are only checked when the pending
requests are passed too.
"""

from __future__ import annotations

from collections.abc import Sequence

from .cluster import EPS, gpu_matches, labels_ok, shape_of
from .types import Allocation, NodeView, Plan, TaskRequest


def check_plan(
    nodes: Sequence[NodeView],
    allocations: Sequence[Allocation],
    plan: Plan,
    pending: Sequence[TaskRequest] = (),
) -> list[str]:
    errors: list[str] = []
    by_id = {nd.node_id: nd for nd in nodes}
    tasks = {t.task_id: t for t in pending}
    allocs = {a.task_id: a for a in allocations}
    evicted = {p.task_id for p in plan.preemptions}
    used_gpus: dict[str, dict[int, str]] = {nid: {} for nid in by_id}
    used_cpu: dict[str, float] = dict.fromkeys(by_id, 0.0)
    used_mem: dict[str, int] = dict.fromkeys(by_id, 0)

    def use(node_id: str, who: str, gpus: Sequence[int], cpus: float, mem: int) -> None:
        nd = by_id[node_id]
        owned = {g.index for g in nd.gpus}
        for g in gpus:
            if g not in owned:
                errors.append(f"{who}: node {node_id} has no GPU {g}")
            elif g in used_gpus[node_id]:
                errors.append(f"{who}: GPU {g} on {node_id} also held by {used_gpus[node_id][g]}")
            else:
                used_gpus[node_id][g] = who
        used_cpu[node_id] += cpus
        used_mem[node_id] += mem

    for a in allocations:
        if a.task_id not in evicted and a.node_id in by_id:
            use(a.node_id, a.task_id, a.gpus, a.cpus, a.mem_bytes)
    seen: set[str] = set()
    for p in plan.placements:
        if p.task_id in seen:
            errors.append(f"{p.task_id}: placed twice")
        seen.add(p.task_id)
        nd = by_id.get(p.node_id)
        if nd is None:
            errors.append(f"{p.task_id}: unknown node {p.node_id}")
            continue
        if not nd.schedulable:
            errors.append(f"{p.task_id}: placed on unschedulable node {p.node_id}")
        t = tasks.get(p.task_id)
        use(p.node_id, p.task_id, p.gpus, t.cpus if t else 0.0, t.mem_bytes if t else 0)
        for g in plan.reserved.get(p.node_id, ()):
            if g in p.gpus:
                errors.append(f"{p.task_id}: took GPU {g} on {p.node_id}, which the plan reserves")
        if t is not None:
            errors.extend(_check_request(t, nd, p.gpus))
    for nid, nd in by_id.items():
        if used_cpu[nid] > nd.cpus + EPS:
            errors.append(f"node {nid}: {used_cpu[nid]:g} CPUs used of {nd.cpus:g}")
        if used_mem[nid] > nd.mem_bytes:
            errors.append(f"node {nid}: {used_mem[nid]} bytes of memory used of {nd.mem_bytes}")
    for pr in plan.preemptions:
        victim = allocs.get(pr.task_id)
        if victim is None or victim.node_id != pr.node_id:
            errors.append(f"preemption of {pr.task_id}: no such allocation on {pr.node_id}")
            continue
        if pr.for_task in seen:
            errors.append(f"{pr.for_task}: placed in the same plan that preempts for it")
        t = tasks.get(pr.for_task)
        if t is not None and victim.priority >= t.priority:
            errors.append(
                f"{pr.for_task} (priority {t.priority}) preempts {victim.task_id} "
                f"(priority {victim.priority})"
            )
    if tasks:
        errors.extend(_check_gangs(plan, tasks, allocations))
    return errors


def _check_request(t: TaskRequest, nd: NodeView, gpus: tuple[int, ...]) -> list[str]:
    errors = []
    if len(gpus) != t.gpus or len(set(gpus)) != len(gpus):
        errors.append(f"{t.task_id}: asked for {t.gpus} GPUs, got {gpus}")
    if not labels_ok(nd.labels, tuple(t.constraints.items())):
        errors.append(f"{t.task_id}: node {nd.node_id} breaks constraints {dict(t.constraints)}")
    shape = shape_of(t)
    info = {g.index: g for g in nd.gpus}
    for g in gpus:
        x = info.get(g)
        if x is not None and not gpu_matches(x.model.lower(), x.mem_bytes, shape):
            errors.append(f"{t.task_id}: GPU {g} on {nd.node_id} ({x.model}) does not match")
    return errors


def _check_gangs(
    plan: Plan, tasks: dict[str, TaskRequest], allocations: Sequence[Allocation]
) -> list[str]:
    errors = []
    placed = {p.task_id: p.node_id for p in plan.placements}
    gangs: dict[str, list[TaskRequest]] = {}
    for t in tasks.values():
        if t.gang_size > 1:
            gangs.setdefault(t.job_id, []).append(t)
    for job, members in sorted(gangs.items()):
        on = [placed[t.task_id] for t in members if t.task_id in placed]
        if on and len(on) != len(members):
            errors.append(f"gang {job}: {len(on)} of {len(members)} pending tasks placed")
        running = {a.node_id for a in allocations if a.job_id == job}
        if len(set(on)) != len(on) or running & set(on):
            errors.append(f"gang {job}: two tasks on one node ({sorted(on)})")
    return errors
