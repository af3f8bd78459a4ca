"""Whether a job could ever run on the nodes the cluster knows.

Asked once, at submit: a job that no known node could host however idle it
were (too many GPUs on one node, a GPU model or label nobody has, a gang
wider than the nodes that fit one rank) would wait forever, so it is refused
with the reason, as Slurm refuses a job no partition can hold. A node's
state does not matter here: a draining or down node may come back.
"""

from __future__ import annotations

from collections.abc import Sequence

from .explain import fmt_bytes
from .types import NodeView, TaskRequest

EPS = 1e-9


def _gpus_that_match(n: NodeView, req: TaskRequest) -> int:
    want = req.gpu_type.lower() if req.gpu_type else None
    return sum(
        1
        for g in n.gpus
        if (want is None or want in g.model.lower()) and g.mem_bytes >= req.gpu_mem_min
    )


def _s(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def never_fits(nodes: Sequence[NodeView], req: TaskRequest) -> str | None:
    """Why no known node could ever host one task of `req` (or its gang), in
    words; None when some could. No known node at all is not judged (None):
    the cluster may simply not have met its hosts yet."""
    if not nodes:
        return None
    cands = [n for n in nodes if all(n.labels.get(k) == v for k, v in req.constraints.items())]
    if not cands:
        missing = [f"{k}={v}" for k, v in sorted(req.constraints.items())]
        for item in missing:
            k, _, v = item.partition("=")
            if not any(n.labels.get(k) == v for n in nodes):
                return f"no node has the label {item}"
        return "no node has all of the labels " + ", ".join(missing)
    if req.gpus > 0:
        model = f"{req.gpu_type} " if req.gpu_type else ""
        if req.gpu_type and not any(
            req.gpu_type.lower() in g.model.lower() for n in cands for g in n.gpus
        ):
            return f"no node has GPU model {req.gpu_type}"
        if req.gpu_mem_min and not any(_gpus_that_match(n, req) for n in cands):
            return f"no node has {model}GPUs with at least {fmt_bytes(req.gpu_mem_min)} memory"
        most = max(_gpus_that_match(n, req) for n in cands)
        if most < req.gpus:
            return (
                f"needs {_s(req.gpus, model + 'GPU')} on one node (--gpus is per node); "
                f"the largest node has {most}"
            )
        cands = [n for n in cands if _gpus_that_match(n, req) >= req.gpus]
    if not any(n.cpus + EPS >= req.cpus for n in cands):
        return (
            f"needs {req.cpus:g} CPUs on one node; the largest node has "
            f"{max(n.cpus for n in cands):g}"
        )
    cands = [n for n in cands if n.cpus + EPS >= req.cpus]
    if not any(n.mem_bytes >= req.mem_bytes for n in cands):
        return (
            f"needs {fmt_bytes(req.mem_bytes)} memory on one node; the largest node has "
            f"{fmt_bytes(max(n.mem_bytes for n in cands))}"
        )
    fitting = sum(1 for n in cands if n.mem_bytes >= req.mem_bytes)
    if fitting < req.gang_size:
        return (
            f"a gang of {req.gang_size} needs {req.gang_size} distinct nodes that each fit "
            f"one task; {'only ' if fitting else ''}{_s(fitting, 'node')} "
            f"{'does' if fitting == 1 else 'do'}"
        )
    return None
