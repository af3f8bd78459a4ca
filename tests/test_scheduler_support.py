"""Builders shared by the scheduler tests (no tests here)."""

from __future__ import annotations

from collections.abc import Sequence

from scheduler import Allocation, Gpu, NodeView, Plan, TaskRequest

GIB = 1 << 30


def node(
    name: str,
    gpus: int = 8,
    model: str = "NVIDIA H100 80GB HBM3",
    gpu_mem: int = 80 * GIB,
    cpus: float = 64.0,
    mem: int = 512 * GIB,
    domains: Sequence[int] | None = None,
    labels: dict[str, str] | None = None,
    schedulable: bool = True,
    cached: Sequence[str] = (),
) -> NodeView:
    doms = list(domains) if domains is not None else [-1] * gpus
    return NodeView(
        node_id=name,
        name=name,
        cpus=cpus,
        mem_bytes=mem,
        gpus=tuple(Gpu(k, f"GPU-{name}-{k}", model, gpu_mem, doms[k]) for k in range(gpus)),
        labels=labels or {},
        schedulable=schedulable,
        cached_blocks=frozenset(cached),
    )


def task(
    task_id: str,
    gpus: int = 1,
    user: str = "alice",
    priority: int = 0,
    at: float = 0.0,
    job: str | None = None,
    **kw: object,
) -> TaskRequest:
    return TaskRequest(
        task_id=task_id,
        job_id=job or f"job-{task_id}",
        user=user,
        priority=priority,
        submitted_at=at,
        gpus=gpus,
        **kw,  # type: ignore[arg-type]
    )


def gang(job: str, size: int, gpus: int = 8, at: float = 0.0, **kw: object) -> list[TaskRequest]:
    return [
        task(f"{job}-{r}", gpus=gpus, job=job, at=at, gang_size=size, rank=r, **kw)
        for r in range(size)
    ]


def alloc(
    task_id: str,
    node_id: str,
    gpus: Sequence[int],
    user: str = "bob",
    priority: int = 0,
    started: float = 0.0,
    cpus: float = 1.0,
    mem: int = 0,
    preemptible: bool = True,
    job: str | None = None,
) -> Allocation:
    return Allocation(
        task_id=task_id,
        job_id=job or f"job-{task_id}",
        user=user,
        node_id=node_id,
        gpus=tuple(gpus),
        cpus=cpus,
        mem_bytes=mem,
        priority=priority,
        started_at=started,
        preemptible=preemptible,
    )


def where(plan: Plan) -> dict[str, tuple[str, tuple[int, ...]]]:
    """task id -> (node id, GPUs) for every placement of a plan."""
    return {p.task_id: (p.node_id, p.gpus) for p in plan.placements}
