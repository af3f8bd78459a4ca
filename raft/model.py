"""Typed records of the replicated state.

Records are plain dataclasses with `to_wire`/`from_wire` so snapshots are
msgpack, never pickle. Field order is part of the snapshot format.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="Record")

NODE_STATES = ("ready", "draining", "down")
JOB_STATES = ("pending", "running", "succeeded", "failed", "cancelled")
TASK_STATES = (
    "pending",
    "assigned",
    "running",
    "succeeded",
    "failed",
    "lost",
    "preempted",
    "cancelled",
)
LIVE_TASK_STATES = frozenset({"assigned", "running"})
FINAL_TASK_STATES = frozenset({"succeeded", "failed", "cancelled", "lost"})
FINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})
ROLES = ("admin", "submit", "read")


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_GETTERS: dict[type, Any] = {}


# Immutable leaf types, returned as they are. Most fields hold one, so they
# are told apart by one set lookup before any isinstance chain or call.
_SCALARS = frozenset({str, int, float, bool, bytes, type(None)})


def _plain(v: Any) -> Any:
    """A copy of a msgpack-able value that shares no list or dict with the record."""
    if type(v) in _SCALARS:
        return v
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    if isinstance(v, Record):
        return v.to_wire()
    return v  # str, bytes, int, float, bool, None: immutable


def _field_names(cls: type) -> tuple[str, ...]:
    """The field names of a record class, in field order."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def _getter(cls: type) -> Any:
    """An attrgetter of every field of a record class, in field order."""
    get = _GETTERS.get(cls)
    if get is None:
        get = _GETTERS[cls] = attrgetter(*(f.name for f in fields(cls)))
    return get


class Record:
    _names: ClassVar[tuple[str, ...]] = ()

    def to_wire(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every leaf value, which made
        # it the largest single cost of applying a batch of submits.
        out: dict[str, Any] = {}
        for k in _field_names(type(self)):
            v = getattr(self, k)
            out[k] = v if type(v) in _SCALARS else _plain(v)
        return out

    def wire_fields(self) -> dict[str, Any]:
        """The fields as `to_wire` maps them, for an encoder to pack at once:
        lists and dicts are the record's own, not copies (msgpack packs them
        to the same bytes), so the map must be neither changed nor kept.
        No field holds a record (records hold only msgpack values), which
        `to_wire` would have turned into a map."""
        cls = type(self)
        return dict(zip(_field_names(cls), _getter(cls)(self), strict=True))

    def clone(self: T) -> T:
        """A shallow copy, for copy-on-write in apply (raft/cow.py). Fields
        holding lists or dicts are replaced, never mutated, by apply, so
        sharing them is safe. (Every record has more than one field, so the
        getter returns a tuple.)"""
        cls = type(self)
        return cls(*_getter(cls)(self))

    @classmethod
    def from_wire(cls: type[T], obj: dict[str, Any]) -> T:
        names = cls._names or tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
        return cls(**{k: obj[k] for k in names if k in obj})


@dataclass(slots=True)
class Node(Record):
    id: str
    name: str
    addr: str
    cpus: float
    mem_bytes: int
    gpus: list[dict[str, Any]]  # {index, uuid, model, mem_bytes, domain}
    labels: dict[str, str] = field(default_factory=dict)
    state: str = "ready"
    registered_at: float = 0.0
    updated_at: float = 0.0
    reason: str = ""
    # Wall-clock time (the proposer's) at which a draining node's remaining
    # tasks are stopped and requeued; None: they run to completion. Set only
    # while a drain holds (drain_reason is not None).
    drain_deadline: float | None = None
    # The reason of the drain that holds on this node; None: not drained. It
    # outlives the node going down: a drained host that goes down and comes
    # back is draining again, with its reason and deadline, so maintenance is
    # not undone by a reboot (as Nomad and Kubernetes keep a drain or cordon).
    # state is "draining" only with a drain, "ready" only without one.
    drain_reason: str | None = None
    # GPUs its agent found faulty (an Xid, a double-bit ECC error, retired
    # pages pending, a GPU off the bus): {index, reason, at}, in index order.
    # Nothing is placed on them; only `leptonctl node gpu reset` (after a
    # burn-in on the host) clears one. It outlives re-registrations.
    gpu_faults: list[dict[str, Any]] = field(default_factory=list)
    # Labels an admin set (`node_label`): they win over the host's own for
    # the same name, and only admins set names under raft.validate's
    # ADMIN_LABEL_PREFIX. They outlive the host registering again.
    admin_labels: dict[str, str] = field(default_factory=dict)

    def effective_labels(self) -> dict[str, str]:
        """The labels placement and listings use: the host's, then the admin's."""
        if not self.admin_labels:
            return self.labels
        return {**self.labels, **self.admin_labels}


@dataclass(slots=True)
class JobSpec(Record):
    argv: list[str]
    gpus: int = 0
    cpus: float = 1.0
    mem_bytes: int = 0
    nodes: int = 1
    priority: int = 0
    retries: int = 0
    env: dict[str, str] = field(default_factory=dict)
    gpu_type: str | None = None
    gpu_mem_min: int = 0
    constraints: dict[str, str] = field(default_factory=dict)
    spread: bool = False
    preemptible: bool = True
    time_limit_s: float | None = None
    workdir: str | None = None  # manifest id
    cwd: str | None = None
    # Command format 4 on (raft/validate.py). A job array: the indexes its
    # tasks take, as [first, last, step] ranges (inclusive), one task per
    # index; the spec is stored once for all of them. None: no array.
    array: list[list[int]] | None = None
    # The most tasks of an array that may be live at once; None: no limit.
    max_running: int | None = None
    # Jobs this one waits for: after_ok until each succeeded (one that fails
    # fails this job), after_any until each ended, whatever its state.
    after_ok: list[str] = field(default_factory=list)
    after_any: list[str] = field(default_factory=list)
    # A warning before an ending: this signal (a name such as USR1) goes to
    # the task signal_before_s before its time limit or a drain deadline,
    # and at a preemption, after which the preemptor waits up to
    # preempt_grace_s (at most the masters' maximum) for it to exit.
    signal: str | None = None
    signal_before_s: float | None = None
    preempt_grace_s: float | None = None
    # An interactive task (`leptonctl run -t`): it runs on a terminal of
    # this size [rows, cols], which the leader's `attach` connects to.
    tty: bool = False
    tty_size: list[int] | None = None


@dataclass(slots=True)
class Job(Record):
    id: str
    name: str
    user: str
    spec: dict[str, Any]
    submitted_at: float
    state: str = "pending"
    finished_at: float | None = None
    tasks: list[str] = field(default_factory=list)
    retries_left: int = 0
    message: str = ""
    # The Unix account its tasks run as on every host: the submitting
    # token's mapping at submit time ("" only in jobs older than mappings).
    unix_user: str = ""
    # Ids of the jobs in its spec's after_ok/after_any that have not ended
    # yet (sorted): its tasks are not offered to the scheduler while any is
    # left. Replaced, never changed in place (views share it).
    waiting_on: list[str] = field(default_factory=list)
    # GPU- and CPU-seconds its tasks' runs used, every attempt that ended
    # (raft/accounting.py); what is running now is not in them yet.
    gpu_s: float = 0.0
    cpu_s: float = 0.0


@dataclass(slots=True)
class Task(Record):
    id: str
    job_id: str
    rank: int
    state: str = "pending"
    node_id: str | None = None
    gpus: list[int] = field(default_factory=list)
    cpus: float = 0.0
    mem_bytes: int = 0
    attempt: int = 0
    exit_code: int | None = None
    message: str = ""
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    # Why the leader wants it stopped: cancel, preempt, gang, drain (a drain
    # deadline passed) or shrink (its node came back without room for it).
    stop: str | None = None
    preemptions: int = 0
    priority: int = 0
    # Retries this task of a job array has spent (an array's retries are per
    # task; other jobs spend the job's retries_left).
    retries_used: int = 0
    # Times it went back to pending through no fault of its own: stopped
    # for a preemption, a drain or a shrink, or ended after a warning signal
    # with exit 0 or at any time with REQUEUE_EXIT (LEPTON_RESTART_COUNT).
    restarts: int = 0
    # When its first attempt started running (the agent's clock): the
    # submit-to-start histogram observes each task once, at that moment.
    first_started_at: float | None = None


@dataclass(slots=True)
class Token(Record):
    id: str
    name: str
    role: str
    sealed: bytes
    created_at: float
    revoked: bool = False
    # The Unix account this token's jobs run as; "" means the same as name.
    unix_user: str = ""


@dataclass(slots=True)
class JoinToken(Record):
    """What an admin hands a new host: traded once per node for a node credential."""

    id: str
    sealed: bytes
    created_at: float
    created_by: str
    # The proposer's wall-clock time after which it admits no node; None: never.
    expires_at: float | None = None
    # How many distinct nodes it may admit; None: any number until it expires.
    max_uses: int | None = None
    # Node ids it was traded for, one use each. Trading again for one of these
    # (an agent that crashed before saving its credential) spends no use.
    nodes: list[str] = field(default_factory=list)
    revoked: bool = False


@dataclass(slots=True)
class NodeCredential(Record):
    """One agent's own key: it may call node RPCs for `node_id` and nothing else."""

    id: str  # the handshake key id
    node_id: str
    sealed: bytes
    issued_at: float
    join_token: str  # the join token it was traded for
    # Whether the node ever registered with it. Until then the trade may be
    # made again (an agent that died before saving its credential); after,
    # never: a join token left on a host must not buy another node's key.
    registered: bool = False


@dataclass(slots=True)
class UsageDay(Record):
    """What one user used on one UTC day (raft/accounting.py): it outlives the
    jobs, which are forgotten after their retention."""

    user: str
    day: int  # days since the epoch, UTC
    gpu_s: float = 0.0
    cpu_s: float = 0.0
    # Jobs that ended that day, by final state.
    jobs: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Member(Record):
    raft_addr: str
    rpc_addr: str
    http_addr: str = ""
