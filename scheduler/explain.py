"""Why a task is still pending, in words a person can act on.

Reasons are worked out once per request shape against the state at the end of
the pass (resources only shrink during a pass, so what failed earlier still
fails then).  Checks run from the most permanent cause (no such label, no such
GPU model) to the most passing one (GPUs busy right now).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .cluster import EPS, SMALL_CLUSTER, Cluster, Shape, gpu_matches, labels_ok
from .types import TaskRequest

GIB = 1 << 30
_MAX_STATIC = 4096  # static reasons kept per list of nodes (cleared whole when full)


def fmt_bytes(n: int) -> str:
    return f"{n / GIB:g} GiB"


def _gpu_words(task: TaskRequest, n: int) -> str:
    model = f"{task.gpu_type} " if task.gpu_type else ""
    return f"{n} {model}GPU" + ("" if n == 1 else "s")


@dataclass(frozen=True)
class _Kind:
    """Nodes alike for every static question: labels, state, GPU make-up."""

    labels: Mapping[str, str]
    schedulable: bool
    makeup: tuple[tuple[str, int, int], ...]  # (model lower, mem, count)
    cpus: float  # the largest among the nodes of this kind
    mem_bytes: int


# The kinds of node, in values: the pools' layout (Frame.layout: labels,
# GPU make-up, largest CPUs and memory per pool), then per kind of draining
# or down node its labels, make-up and largest CPUs and memory.
KindsKey = tuple[object, tuple[tuple[object, ...], ...]]
# Static reasons by the kinds of node they were worked out on: a list of node
# views made after a node drained, went down or came back often has the kinds
# of an earlier one, and each new list would work every reason out again.
# Bounded: cleared whole when full.
_STATIC: dict[KindsKey, dict[tuple[Shape, str | None], str | None]] = {}
_MAX_KIND_SETS = 16


def _kinds(cl: Cluster) -> tuple[list[_Kind], KindsKey]:
    """The pools (schedulable nodes alike), then the kinds of node that are
    draining or down, and those in values.  Static reasons ask any()/max()
    of these: the order does not matter."""
    kinds = [_Kind(p.labels, True, p.makeup, p.max_cpus, p.max_mem) for p in cl.pools]
    # Per kind of unschedulable node: (labels, largest CPUs, largest memory).
    Key = tuple[tuple[tuple[str, str], ...], tuple[tuple[str, int, int], ...]]
    found: dict[Key, tuple[Mapping[str, str], float, int]] = {}
    for i in cl.unschedulable:
        nd = cl.nodes[i]
        key = (cl.labels_key[i], cl.build[i].makeup)
        old = found.get(key)
        if old is None:
            found[key] = (nd.labels, nd.cpus, nd.mem_bytes)
        elif nd.cpus > old[1] or nd.mem_bytes > old[2]:
            found[key] = (nd.labels, max(nd.cpus, old[1]), max(nd.mem_bytes, old[2]))
    kinds.extend(
        _Kind(labels, False, makeup, cpus, mem)
        for (_, makeup), (labels, cpus, mem) in found.items()
    )
    down = tuple([(lk, makeup, cpus, mem) for (lk, makeup), (_, cpus, mem) in found.items()])
    return kinds, (cl.frame.layout, down)


def _static_reason(kinds: list[_Kind], task: TaskRequest, shape: Shape) -> str | None:
    """A reason no amount of waiting fixes, or None."""
    g, cpus, mem, gpu_type, mem_min, cons = shape
    labelled = [k for k in kinds if labels_ok(k.labels, cons)]
    if not labelled:
        for key, v in cons:
            if not any(k.labels.get(key) == v for k in kinds):
                return f"no node has label {key}={v}"
        return "no node has all of the labels " + ", ".join(f"{k}={v}" for k, v in cons)
    live = [k for k in labelled if k.schedulable]
    if not live:
        return "every node that could host it is draining or down"
    if g > 0:
        if gpu_type is not None and not any(gpu_type in m for k in live for m, _, _ in k.makeup):
            return f"no node has GPU model {task.gpu_type}"
        if mem_min and not any(gpu_matches(m, gm, shape) for k in live for m, gm, _ in k.makeup):
            model = f"{task.gpu_type} " if task.gpu_type else ""
            return f"no node has {model}GPUs with at least {fmt_bytes(mem_min)} memory"
        most = max(sum(c for m, gm, c in k.makeup if gpu_matches(m, gm, shape)) for k in live)
        if most < g:
            return f"needs {_gpu_words(task, g)} on one node; the largest node has {most}"
        live = [
            k for k in live if sum(c for m, gm, c in k.makeup if gpu_matches(m, gm, shape)) >= g
        ]
    if not any(k.cpus + EPS >= cpus and k.mem_bytes >= mem for k in live):
        biggest = max(k.cpus for k in live)
        if biggest + EPS < cpus:
            return f"needs {cpus:g} CPUs on one node; the largest node has {biggest:g}"
        return (
            f"needs {fmt_bytes(mem)} memory on one node; the largest node has "
            f"{fmt_bytes(max(k.mem_bytes for k in live))}"
        )
    return None


# What the claims on one node hold: (node, their GPUs, CPUs, memory).
Claimed = tuple[int, tuple[int, ...], float, int]


def _claimed(cl: Cluster) -> list[Claimed]:
    out: list[Claimed] = []
    for i in sorted(cl.claims):
        claims = cl.claims[i]
        gpus = tuple(x for c in claims for x in c.gpus)
        out.append((i, gpus, sum(c.cpus for c in claims), sum(c.mem_bytes for c in claims)))
    return out


def _fits_with_claims_back(cl: Cluster, held: Claimed, shape: Shape, all_match: bool) -> bool:
    i, gpus, cpus, mem = held
    if all_match:
        g = cl.nfree_l[i] + len(gpus)
    else:
        info = cl.gpu_info[i]
        g = len(cl.matching_free(i, shape)) + sum(
            1 for x in gpus if gpu_matches(info[x][0], info[x][1], shape)
        )
    return (
        g >= shape[0]
        and cl.free_cpu[i] + cpus + EPS >= shape[1]
        and cl.free_mem[i] + mem >= shape[2]
    )


class Explainer:
    """Reasons by shape, against the state at the end of the pass (which no
    longer changes: claims and free resources are read once)."""

    def __init__(self, cl: Cluster) -> None:
        self.cl = cl
        # Read at the first question (a pass that placed everything asks none).
        self.kinds: list[_Kind] | None = None
        self.claimed: list[Claimed] = []
        self.cache: dict[Shape, str] = {}

    def __call__(self, task: TaskRequest, shape: Shape) -> str:
        hit = self.cache.get(shape)
        if hit is None:
            if self.kinds is None:
                # The kinds of node come from the nodes alone: kept with them
                # for later passes (Cluster.frame), as are static reasons.
                frame = self.cl.frame
                if frame.kinds is None:
                    kinds, key = _kinds(self.cl)
                    known = _STATIC.get(key)
                    if known is None:
                        if len(_STATIC) >= _MAX_KIND_SETS:
                            _STATIC.clear()
                        known = _STATIC[key] = {}
                    frame.static_reasons = known
                    frame.kinds = kinds
                self.kinds, self.claimed = frame.kinds, _claimed(self.cl)
            hit = self.cache[shape] = explain_shape(self.cl, self.kinds, self.claimed, task, shape)
        return hit


def explain_shape(
    cl: Cluster, kinds: list[_Kind], claimed: list[Claimed], task: TaskRequest, shape: Shape
) -> str:
    known = cl.frame.static_reasons
    key = (shape, task.gpu_type)
    try:
        # One lookup, not `in` then `[]`: a pass still running in a thread
        # after leadership was lost and regained can share this frame with
        # the next pass, which may clear `known` between the two.
        static = known[key]
    except KeyError:
        static = _static_reason(kinds, task, shape)
        if len(known) >= _MAX_STATIC:
            known.clear()
        known[key] = static
    if static is not None:
        return static
    g = shape[0]
    whole, mixed = cl.shape_pools(shape)
    # (Kept per layout of pools from pass to pass: Cluster.whole_pools.)
    whole_set, usable = cl.whole_pools(shape), cl.usable_pools(shape)
    for held in claimed:
        pid = cl.pool_of[held[0]]
        if pid in usable and _fits_with_claims_back(cl, held, shape, g == 0 or pid in whole_set):
            return f"reserved for {cl.claims[held[0]][0].owner}"
    if g > 0:
        best_n, best_i = -1, -1
        small, nfree = len(cl.nodes) <= SMALL_CLUSTER, cl.nfree_l
        for pid in whole:
            # The pool's first node with the most free GPUs (numpy's fixed
            # cost is most of the work on a few nodes: plain Python there).
            if small:
                members = cl.pools[pid].nodes
                n = max(map(nfree.__getitem__, members))
                i = next(x for x in members if nfree[x] == n)
            else:
                idx = cl.pool_nodes(pid)
                counts = cl.nfree[idx]
                k = int(np.argmax(counts))
                n, i = int(counts[k]), int(idx[k])
            if n > best_n or (n == best_n and i < best_i):
                best_n, best_i = n, i
        for pid in mixed:
            for i in cl.pools[pid].nodes:
                n = len(cl.matching_free(i, shape))
                if n > best_n:
                    best_n, best_i = n, i
        if best_n <= 0:
            return f"needs {_gpu_words(task, g)} on one node; no matching GPU is free"
        if best_n < g:
            return (
                f"needs {_gpu_words(task, g)} on one node; the largest free block is "
                f"{best_n} GPU{'s' if best_n != 1 else ''} on {cl.nodes[best_i].name}"
            )
    beside = f" beside {_gpu_words(task, g)}" if g else ""
    return (
        f"needs {shape[1]:g} CPUs and {fmt_bytes(shape[2])} memory{beside} on one node; "
        "no node has that much free now"
    )


def gang_reason(size: int, can_host: int) -> str:
    nodes = "node" if can_host == 1 else "nodes"
    return f"gang of {size} nodes; only {can_host} {nodes} can host a task now"


def quota_reason(user: str, quota: int) -> str:
    return f"user {user} is at quota ({quota} GPUs)"


def preempting_reason(node_name: str) -> str:
    return f"waiting for preempted tasks to stop on {node_name}"
