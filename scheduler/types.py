"""Immutable values the scheduler takes and returns.

The scheduler never mutates these; the leader builds a fresh view for every
pass and commits the returned `Plan` only after re-checking it (plan, then
commit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    model: str
    mem_bytes: int
    domain: int = -1  # NVLink/NUMA domain id reported by NVML, -1 unknown


@dataclass(frozen=True)
class NodeView:
    node_id: str
    name: str
    cpus: float
    mem_bytes: int
    gpus: tuple[Gpu, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    schedulable: bool = True  # False when draining/down
    cached_blocks: frozenset[str] = frozenset()  # block hashes the node's cache holds


@dataclass(frozen=True)
class Allocation:
    """A live task already holding resources on a node."""

    task_id: str
    job_id: str
    user: str
    node_id: str
    gpus: tuple[int, ...]
    cpus: float
    mem_bytes: int
    priority: int
    started_at: float
    preemptible: bool = True


@dataclass(frozen=True)
class TaskRequest:
    """A pending task."""

    task_id: str
    job_id: str
    user: str
    priority: int
    submitted_at: float
    gpus: int = 0
    cpus: float = 1.0
    mem_bytes: int = 0
    gpu_type: str | None = None  # substring match on Gpu.model, case-insensitive
    gpu_mem_min: int = 0  # bytes per GPU
    constraints: Mapping[str, str] = field(default_factory=dict)  # label k must equal v
    gang_size: int = 1  # tasks in the job's gang; each gang task on a distinct node
    rank: int = 0
    spread: bool = False  # spread the job's tasks over least-loaded nodes
    preemptible: bool = True  # False = --no-preempt
    blocks: frozenset[str] = frozenset()  # workdir blocks, for the cache-aware tie-break
    time_limit_s: float | None = None


@dataclass(frozen=True)
class Policy:
    preemption: bool = True
    quotas: Mapping[str, int] = field(default_factory=dict)  # user -> max GPUs held at once
    # A --no-preempt task is only protected while its user is within quota.
    no_preempt_only_within_quota: bool = True
    backfill: bool = True
    # Each user's share of recent usage, decayed with a half-life (0 to 1;
    # Slurm's PriorityDecayHalfLife): added to the dominant share, so a user
    # who used a lot lately yields to one who did not. Empty: off.
    past_shares: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    task_id: str
    node_id: str
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class Preemption:
    task_id: str
    node_id: str
    for_task: str


@dataclass(frozen=True)
class Plan:
    placements: tuple[Placement, ...]
    preemptions: tuple[Preemption, ...]
    reasons: Mapping[str, str]  # task_id -> why it is still pending, in words
    # node_id -> GPUs held back (for the oldest waiting gang, or for a task
    # waiting on its preemptions); for display and for the applier.
    reserved: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class UserShare:
    """One line of `leptonctl queue`: what a user holds and waits for."""

    user: str
    gpus: int
    cpus: float
    mem_bytes: int
    dominant_share: float
    pending_tasks: int
    pending_gpus: int
    quota_gpus: int | None
    past_share: float = 0.0  # decayed recent usage (Policy.past_shares)


DEFAULT_POLICY = Policy()
