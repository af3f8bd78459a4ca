"""Faulty GPUs inside apply (DESIGN §7 holds: nothing is placed on them).

An agent that sees a GPU go bad (an Xid that is not the application's fault,
a double-bit ECC error, retired pages pending, a GPU fallen off the bus)
reports it; the leader commits `gpu_health` with the GPU under `unhealthy`.
From then on:

- the scheduler's view of the node leaves the GPU out (leptond/views.py), and
  apply_plan refuses a placement on it whatever the plan says (raft/tasks.py);
- every live task on it is asked to stop with stop "gpu": it goes back to
  pending without spending a retry, as after a drain deadline;
- the fault stays, through the node going down and re-registering, until an
  admin's `leptonctl node gpu reset` has the agent run a burn-in on that GPU
  and commits it under `healthy`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import tasks as tl
from .errors import ArgError
from .model import Node

if TYPE_CHECKING:
    from .state import ClusterState

MAX_REASON_CHARS = 256
MAX_CHANGES = 1024  # GPUs named in one command


def faulty(node: Node) -> set[int]:
    return {int(f["index"]) for f in node.gpu_faults}


def apply_gpu_health(s: ClusterState, node: Node, a: dict[str, Any]) -> dict[str, Any]:
    now = float(a["now"])
    add, clear = a.get("unhealthy") or [], a.get("healthy") or []
    if not isinstance(add, list) or not isinstance(clear, list):
        raise ArgError("bad_request", "unhealthy and healthy must be lists")
    if len(add) + len(clear) > MAX_CHANGES:
        raise ArgError("bad_request", f"at most {MAX_CHANGES} GPUs in one change")
    valid = {g["index"] for g in node.gpus}
    marks: dict[int, str] = {}
    for f in add:
        if not isinstance(f, dict):
            raise ArgError("bad_request", "each unhealthy GPU is a map {index, reason}")
        idx = _index(f.get("index"))
        if idx not in valid:
            raise ArgError("bad_request", f"node {node.name} has no GPU {idx}")
        marks[idx] = str(f.get("reason") or "unhealthy")[:MAX_REASON_CHARS]
    clears = {_index(i) for i in clear}
    # Everything that can fail comes before the first write.
    faults = {int(f["index"]): f for f in node.gpu_faults}
    marked = sorted(i for i in marks if i not in faults and i not in clears)
    cleared = sorted(i for i in clears if i in faults)
    result: dict[str, Any] = {"node_id": node.id, "marked": marked, "cleared": cleared}
    if not marked and not cleared:
        return {**result, "unhealthy": sorted(faults), "stopping": []}
    for i in marked:
        faults[i] = {"index": i, "reason": marks[i], "at": now}
    for i in cleared:
        del faults[i]
    node = s.nodes.writable(node.id)
    node.gpu_faults = [faults[i] for i in sorted(faults)]  # a new list: views share the old
    node.updated_at = now
    stopping = []
    bad = set(marked)
    for t in s.stoppable_tasks(node.id):
        hit = sorted(bad.intersection(t.gpus))
        if hit:
            why = f"GPU {hit[0]} of node {node.name} became unhealthy ({marks[hit[0]]})"
            stopping.append(t.id)
            tl.evict(s, t, "gpu", why, now)
    return {**result, "unhealthy": sorted(faults), "stopping": stopping}


def _index(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 20:
        raise ArgError("bad_request", f"a GPU index is a whole number, got {v!r}")
    return v
