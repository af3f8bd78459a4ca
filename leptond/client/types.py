"""What the SDK returns: frozen dataclasses made from the cluster's replies.

Fields are those people use; `raw` keeps the whole reply, so nothing the
cluster said is lost to a field not listed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

FINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})


class SubmitOptions(TypedDict, total=False):
    """What `submit` takes besides the command: the fields of `leptonctl submit`.
    `array` as --array takes it ("0-999", "0-99:10", "1,5,9")."""

    name: str
    gpus: int
    cpus: float
    mem_bytes: int
    nodes: int
    priority: int
    retries: int
    env: dict[str, str]
    gpu_type: str
    gpu_mem_min: int
    constraints: dict[str, str]
    spread: bool
    preemptible: bool
    time_limit_s: float
    array: str
    max_running: int
    after_ok: Sequence[str]
    after_any: Sequence[str]
    signal: str
    signal_before_s: float
    preempt_grace_s: float
    queue_anyway: bool


def _opt_float(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class TaskInfo:
    id: str
    rank: int  # a gang's rank, or an array task's index
    state: str
    node: str | None
    gpus: tuple[int, ...]
    exit_code: int | None
    attempt: int
    message: str
    restarts: int = 0
    reason: str | None = None  # why it still waits, while it is pending
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> TaskInfo:
        return cls(
            id=str(r["id"]),
            rank=int(r["rank"]),
            state=str(r["state"]),
            node=r.get("node"),
            gpus=tuple(int(g) for g in r.get("gpus") or ()),
            exit_code=r.get("exit_code"),
            attempt=int(r.get("attempt", 0)),
            message=str(r.get("message") or ""),
            restarts=int(r.get("restarts") or 0),
            reason=r.get("reason"),
            raw=r,
        )


@dataclass(frozen=True)
class JobInfo:
    id: str
    name: str
    user: str
    state: str
    message: str
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    gpus: int  # per task
    nodes: int
    priority: int
    # Job arrays: the indexes as --array takes them, the number of tasks and
    # how many are in each state; None/empty for other jobs.
    array: str | None = None
    array_tasks: int | None = None
    task_states: dict[str, int] = field(default_factory=dict)
    # The jobs it waits for that have not ended.
    waiting_on: tuple[str, ...] = ()
    reason: str | None = None  # why it still waits, while it is pending
    # From a status call: every task (an array: its failed ones).
    tasks: tuple[TaskInfo, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.state in FINAL_JOB_STATES

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> JobInfo:
        return cls(
            id=str(r["id"]),
            name=str(r.get("name") or ""),
            user=str(r.get("user") or ""),
            state=str(r["state"]),
            message=str(r.get("message") or ""),
            submitted_at=float(r.get("submitted_at") or 0.0),
            started_at=_opt_float(r.get("started_at")),
            finished_at=_opt_float(r.get("finished_at")),
            gpus=int(r.get("gpus") or 0),
            nodes=int(r.get("nodes") or 1),
            priority=int(r.get("priority") or 0),
            array=r.get("array"),
            array_tasks=r.get("array_tasks"),
            task_states=dict(r.get("task_states") or {}),
            waiting_on=tuple(r.get("waiting_on") or ()),
            reason=r.get("reason"),
            tasks=tuple(TaskInfo.from_reply(t) for t in r.get("tasks") or ()),
            raw=r,
        )


@dataclass(frozen=True)
class NodeInfo:
    id: str
    name: str
    state: str
    gpus_total: int
    gpus_free: int
    gpu_models: tuple[str, ...]
    cpus: float
    cpus_used: float
    mem_bytes: int
    mem_used_bytes: int
    labels: dict[str, str]
    reason: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> NodeInfo:
        return cls(
            id=str(r["id"]),
            name=str(r["name"]),
            state=str(r["state"]),
            gpus_total=int(r.get("gpus_total") or 0),
            gpus_free=int(r.get("gpus_free") or 0),
            gpu_models=tuple(r.get("gpu_models") or ()),
            cpus=float(r.get("cpus") or 0.0),
            cpus_used=float(r.get("cpus_used") or 0.0),
            mem_bytes=int(r.get("mem_bytes") or 0),
            mem_used_bytes=int(r.get("mem_used_bytes") or 0),
            labels=dict(r.get("labels") or {}),
            reason=str(r.get("reason") or ""),
            raw=r,
        )
