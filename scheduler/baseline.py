"""First fit: the plain baseline the benchmark compares against.

Tasks in priority then age order; each goes on the first node, in the order
given, that fits it, on its lowest free GPU indices.  Gangs are still all or
nothing on distinct nodes, so the comparison is about packing, not features.
No fair share, quotas, preemption, reservations or topology.
"""

from __future__ import annotations

from collections.abc import Sequence

from .cluster import Cluster, Shape, shape_of
from .fairshare import build_units
from .types import Allocation, NodeView, Placement, Plan, TaskRequest

BASELINE_REASON = "does not fit on any node now"


def first_fit(
    nodes: Sequence[NodeView], allocations: Sequence[Allocation], pending: Sequence[TaskRequest]
) -> Plan:
    cl = Cluster(nodes, allocations)
    n = len(cl.nodes)
    # The first node that might fit a shape only moves forward during a pass
    # (resources only shrink), so each shape scans the node list once overall.
    cursor: dict[Shape, int] = {}
    placements: list[Placement] = []
    reasons: dict[str, str] = {}
    job_nodes: dict[str, set[int]] = {}
    for a in allocations:
        if a.node_id in cl.index_of:
            job_nodes.setdefault(a.job_id, set()).add(cl.index_of[a.node_id])
    units = sorted(build_units(pending), key=lambda u: (-u.priority, u.key))

    def fits(i: int, shape: Shape, ok_pools: set[int]) -> bool:
        if cl.pool_of[i] not in ok_pools or not cl.fits_cpu_mem(i, shape):
            return False
        return shape[0] == 0 or len(cl.matching_free(i, shape)) >= shape[0]

    for unit in units:
        gang = unit.is_gang
        exclude = set(job_nodes.get(unit.job_id, ())) if gang else set()
        chosen: list[tuple[TaskRequest, int, list[int]]] = []
        for t in unit.tasks:
            shape = shape_of(t)
            whole, mixed = cl.shape_pools(shape)
            ok = {*whole, *mixed}
            i = cursor.get(shape, 0)
            advancing = not gang  # a gang's rollback would undo what the cursor saw
            while i < n:
                if fits(i, shape, ok):
                    if i not in exclude:
                        break
                    advancing = False
                elif advancing:
                    cursor[shape] = i + 1
                i += 1
            if i >= n:
                break
            gpus = cl.matching_free(i, shape)[: shape[0]]
            cl.take(i, gpus, t.cpus, t.mem_bytes)
            chosen.append((t, i, gpus))
            exclude.add(i)
        if len(chosen) == len(unit.tasks):
            for t, i, gpus in chosen:
                placements.append(Placement(t.task_id, cl.nodes[i].node_id, tuple(gpus)))
                job_nodes.setdefault(t.job_id, set()).add(i)
        else:
            for t, i, gpus in reversed(chosen):
                cl.give(i, gpus, t.cpus, t.mem_bytes)
            for t in unit.tasks:
                reasons[t.task_id] = BASELINE_REASON
    return Plan(tuple(placements), (), reasons, {})
