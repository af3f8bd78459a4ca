"""Why a task is still pending, in words a person can act on.

Reasons are worked out once per request shape against the state at the end of
the pass (resources only shrink during a pass, so what failed earlier still
fails then).  Checks run from the most permanent cause (no such label, no such
GPU model) to the most passing one (GPUs busy right now).
"""

from __future__ import annotations

import numpy as np

from .cluster import EPS, Cluster, Shape, gpu_matches, labels_ok
from .types import TaskRequest

GIB = 1 << 30


def fmt_bytes(n: int) -> str:
    return f"{n / GIB:g} GiB"


def _gpu_words(task: TaskRequest, n: int) -> str:
    model = f"{task.gpu_type} " if task.gpu_type else ""
    return f"{n} {model}GPU" + ("" if n == 1 else "s")


def _static_reason(cl: Cluster, task: TaskRequest, shape: Shape) -> str | None:
    """A reason no amount of waiting fixes, or None."""
    g, cpus, mem, gpu_type, mem_min, cons = shape
    labelled = [nd for nd in cl.nodes if labels_ok(nd.labels, cons)]
    if not labelled:
        for k, v in cons:
            if not any(nd.labels.get(k) == v for nd in cl.nodes):
                return f"no node has label {k}={v}"
        return "no node has all of the labels " + ", ".join(f"{k}={v}" for k, v in cons)
    live = [nd for nd in labelled if nd.schedulable]
    if not live:
        return "every node that could host it is draining or down"
    if g > 0:
        if gpu_type is not None and not any(
            gpu_type in x.model.lower() for nd in live for x in nd.gpus
        ):
            return f"no node has GPU model {task.gpu_type}"
        if mem_min and not any(
            gpu_matches(x.model.lower(), x.mem_bytes, shape) for nd in live for x in nd.gpus
        ):
            model = f"{task.gpu_type} " if task.gpu_type else ""
            return f"no node has {model}GPUs with at least {fmt_bytes(mem_min)} memory"
        most = max(
            sum(gpu_matches(x.model.lower(), x.mem_bytes, shape) for x in nd.gpus) for nd in live
        )
        if most < g:
            return f"needs {_gpu_words(task, g)} on one node; the largest node has {most}"
    hosts = [nd for nd in live if nd.cpus + EPS >= cpus and nd.mem_bytes >= mem]
    if not hosts:
        biggest = max(nd.cpus for nd in live)
        if biggest + EPS < cpus:
            return f"needs {cpus:g} CPUs on one node; the largest node has {biggest:g}"
        return (
            f"needs {fmt_bytes(mem)} memory on one node; the largest node has "
            f"{fmt_bytes(max(nd.mem_bytes for nd in live))}"
        )
    return None


def _fits_with_claims_back(cl: Cluster, i: int, shape: Shape) -> bool:
    claims = cl.claims.get(i, [])
    g = len(cl.matching_free(i, shape)) + sum(
        1
        for c in claims
        for x in c.gpus
        if gpu_matches(cl.gpu_info[i][x].model.lower(), cl.gpu_info[i][x].mem_bytes, shape)
    )
    cpus = cl.free_cpu[i] + sum(c.cpus for c in claims)
    mem = cl.free_mem[i] + sum(c.mem_bytes for c in claims)
    return g >= shape[0] and cpus + EPS >= shape[1] and mem >= shape[2]


def explain_shape(cl: Cluster, task: TaskRequest, shape: Shape) -> str:
    static = _static_reason(cl, task, shape)
    if static is not None:
        return static
    g = shape[0]
    whole, mixed = cl.shape_pools(shape)
    ok_pools = set(whole) | set(mixed)
    for i in sorted(cl.claims):
        if cl.pool_of[i] in ok_pools and _fits_with_claims_back(cl, i, shape):
            return f"reserved for {cl.claims[i][0].owner}"
    if g > 0:
        best_n, best_i = -1, -1
        for pid in whole:
            idx = np.asarray(cl.pools[pid].nodes, dtype=np.int64)
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
