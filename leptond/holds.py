"""Room held for preemptors: what a preemption was for, kept for its preemptor.

A plan that preempts tasks for task P names the node and GPUs P is to get
(scheduler.Preemption.gpus). The victims take a while to stop, and until P
is placed every scheduling pass could give that room to someone else: to a
victim that had not started (it ends, pending again, as the plan commits),
to free GPUs' next taker, to work of P's own priority that comes first in
the fair-share order. P then finds too little and preempts again, elsewhere
or the same victim: a ping-pong that burns runs and keeps P waiting.

So, like Kubernetes' nominated node: while P's victims stop, what P is to
get and nobody holds is held for it (an allocation no pass places on or
preempts); once they are gone, P is placed there before the pass places
anyone else. Holds live in the leader's memory only: a new leader starts
without them (Controllers.reset). It learns from the state which victims
each preemptor still waits for, so the preemptor waits rather than preempts
again, but not which free GPUs it had counted on.
"""

from __future__ import annotations

import scheduler as sch
from raft.model import Task
from raft.view import StateView

# Above every task's priority: no preemptor may count on what is held.
HELD_PRIORITY = 1 << 62


class Holds:
    def __init__(self) -> None:
        # Pending task waiting on its victims -> the node and GPUs it is to get.
        self.room: dict[str, tuple[str, tuple[int, ...]]] = {}

    def reset(self) -> None:
        self.room = {}

    def record(self, plan: sch.Plan) -> None:
        for pr in plan.preemptions:
            if pr.gpus:
                self.room[pr.for_task] = (pr.node_id, pr.gpus)

    def prepare(
        self,
        s: StateView,
        waiting: dict[str, set[str]],
        allocs: list[sch.Allocation],
        pending: list[sch.TaskRequest],
    ) -> tuple[list[sch.Placement], list[sch.TaskRequest]]:
        """Before a pass: `waiting` maps each preemptor whose victims still
        stop to those victims. Adds to `allocs` what is held; returns the
        placements of preemptors whose victims are gone, made here, and the
        pending tasks left for the pass."""
        placed: list[sch.Placement] = []
        room, self.room = self.room, {}
        for tid, (node_id, gpus) in sorted(room.items()):
            t = s.tasks.get(tid)
            node = s.nodes.get(node_id)
            if t is None or tid not in s.pending or node is None or node.state != "ready":
                continue  # placed, cancelled, or the node went: nothing to hold
            busy = [g for g in gpus if (node_id, g) in s.gpu_owner]
            if tid in waiting:
                self.room[tid] = (node_id, gpus)
                victims = [s.tasks[v] for v in waiting[tid] if v in s.tasks]
                victims = [v for v in victims if v.node_id == node_id]
                allocs.append(
                    _held(
                        s,
                        tid,
                        node_id,
                        tuple(g for g in gpus if g not in busy),
                        max(0.0, t.cpus - sum(v.cpus for v in victims)),
                        max(0, t.mem_bytes - sum(v.mem_bytes for v in victims)),
                    )
                )
            elif not busy and _fits(node_id, node.cpus, node.mem_bytes, t, allocs):
                placed.append(sch.Placement(tid, node_id, gpus))
                allocs.append(_held(s, tid, node_id, gpus, t.cpus, t.mem_bytes))
            # Else the room went after all (apply is the judge; the pass
            # looks at the task afresh, and may preempt again).
        if placed:
            mine = {p.task_id for p in placed}
            pending = [r for r in pending if r.task_id not in mine]
        return placed, pending


def _held(
    s: StateView, tid: str, node_id: str, gpus: tuple[int, ...], cpus: float, mem: int
) -> sch.Allocation:
    t = s.tasks[tid]
    return sch.Allocation(
        task_id=tid,
        job_id=t.job_id,
        user=s.jobs[t.job_id].user,
        node_id=node_id,
        gpus=gpus,
        cpus=cpus,
        mem_bytes=mem,
        priority=HELD_PRIORITY,
        started_at=0.0,
        preemptible=False,
    )


def _fits(node_id: str, cpus: float, mem: int, t: Task, allocs: list[sch.Allocation]) -> bool:
    """Whether `t` fits in what the node has besides `allocs` (GPUs aside)."""
    used_c = sum(a.cpus for a in allocs if a.node_id == node_id)
    used_m = sum(a.mem_bytes for a in allocs if a.node_id == node_id)
    return used_c + t.cpus <= cpus + 1e-6 and used_m + t.mem_bytes <= mem
