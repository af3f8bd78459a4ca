"""Immutable views of the replicated state (hashicorp/raft's FSMSnapshot, Nomad's
memdb snapshots).

`ClusterState.freeze()` publishes a `StateView`: read-only maps that share
their records with the live state, which apply never mutates afterwards
(copy on write, raft/cow.py). A view is consistent as of one applied entry,
costs a shallow copy of the maps written since the previous view, and may be
read from any thread with no lock held: the scheduling loop, API reads,
metrics, `snapshot save`, and the background snapshot writer all do.

Records in a view are shared objects: readers must never mutate them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Set
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from .model import (
    LIVE_TASK_STATES,
    Job,
    JoinToken,
    Member,
    Node,
    NodeCredential,
    Task,
    Token,
    UsageDay,
)

if TYPE_CHECKING:
    from .dedupe import FrozenResults

# Version 2 adds `manifest_owners` (who committed each workdir manifest);
# version 1 snapshots still restore (their manifests have no owners).
SNAPSHOT_VERSION = 2
READABLE_SNAPSHOT_VERSIONS = frozenset({1, 2})
# Records packed per chunk of an encoded snapshot: small enough that the
# encoding thread lets others (the Raft thread) run between chunks.
RECORDS_PER_CHUNK = 512


class StateReads:
    """Read helpers shared by the live state (inside apply) and its views."""

    nodes: Mapping[str, Node]
    jobs: Mapping[str, Job]
    tasks: Mapping[str, Task]
    node_tasks: Mapping[str, Set[str]]
    stopping: Mapping[str, None]

    def node_usage(self, node_id: str) -> tuple[set[int], float, int]:
        """GPUs held, CPUs and memory used by live tasks on a node."""
        gpus: set[int] = set()
        cpus = 0.0
        mem = 0
        # Sorted: a float sum depends on its order, and a set's order on the
        # process's string hash seed, which differs between replicas.
        for tid in sorted(self.node_tasks.get(node_id, ())):
            t = self.tasks[tid]
            if t.state in LIVE_TASK_STATES:
                gpus.update(t.gpus)
                cpus += t.cpus
                mem += t.mem_bytes
        return gpus, cpus, mem

    def node_assignments(self, node_id: str) -> list[dict[str, Any]]:
        """What the node should be running: live tasks placed on it."""
        out = []
        for tid in sorted(self.node_tasks.get(node_id, ())):
            t = self.tasks[tid]
            if t.state in LIVE_TASK_STATES:
                out.append({"task_id": tid, "attempt": t.attempt, "stop": t.stop})
        return out

    def stoppable_tasks(self, node_id: str) -> list[Task]:
        """Live tasks on the node with no stop asked for yet, in id order."""
        tasks = (self.tasks[tid] for tid in sorted(self.node_tasks.get(node_id, ())))
        return [t for t in tasks if t.state in LIVE_TASK_STATES and t.stop is None]

    def stopping_tasks(self) -> list[Task]:
        """Live tasks that carry a stop: O(stops), not O(nodes + tasks)."""
        tasks = self.tasks
        out = [tasks[tid] for tid in self.stopping if tid in tasks]
        return [t for t in out if t.stop is not None and t.state in LIVE_TASK_STATES]

    def live_tasks(self) -> list[Task]:
        """Every live (assigned or running) task, node by node."""
        tasks = self.tasks
        return [
            tasks[tid]
            for tids in self.node_tasks.values()
            for tid in tids
            if tasks[tid].state in LIVE_TASK_STATES
        ]


class StateView(StateReads):
    """The replicated state as of one applied entry; never changes."""

    __slots__ = (
        "applied_index",
        "capacity_epoch",
        "counters",
        "generation",
        "gpu_owner",
        "jobs",
        "join_tokens",
        "manifest_owners",
        "manifests",
        "members",
        "node_cred_of",
        "node_creds",
        "node_tasks",
        "nodes",
        "pending",
        "recent",
        "restoring",
        "stopping",
        "tasks",
        "tokens",
        "usage",
        "user_pending",
    )

    def __init__(
        self,
        *,
        nodes: Mapping[str, Node],
        jobs: Mapping[str, Job],
        tasks: Mapping[str, Task],
        tokens: Mapping[str, Token],
        members: Mapping[str, Member],
        join_tokens: Mapping[str, JoinToken],
        node_creds: Mapping[str, NodeCredential],
        manifests: Mapping[str, dict[str, Any]],
        counters: Mapping[str, float],
        usage: Mapping[tuple[str, int], UsageDay],
        manifest_owners: Mapping[str, tuple[str, ...]],
        user_pending: Mapping[str, tuple[int, int]],
        gpu_owner: Mapping[tuple[str, int], str],
        node_tasks: Mapping[str, Set[str]],
        pending: Mapping[str, None],
        stopping: Mapping[str, None],
        node_cred_of: Mapping[str, str],
        restoring: dict[str, Any] | None,
        applied_index: int,
        capacity_epoch: int,
        generation: int,
        recent: FrozenResults | None,
    ) -> None:
        self.nodes = nodes
        self.jobs = jobs
        self.tasks = tasks
        self.tokens = tokens
        self.members = members
        self.join_tokens = join_tokens
        self.node_creds = node_creds
        self.manifests = manifests
        # Cumulative counters and per-user, per-day usage (raft/accounting.py).
        self.counters = counters
        self.usage = usage
        self.manifest_owners = manifest_owners
        # Derived (not in snapshots): each user's waiting jobs and spec bytes.
        self.user_pending = user_pending
        self.gpu_owner = gpu_owner
        self.node_tasks = node_tasks
        self.pending = pending
        # Tasks carrying a stop (derived, not in snapshots).
        self.stopping = stopping
        self.node_cred_of = node_cred_of
        # Replaced, never mutated, by apply (ClusterState._restore_part).
        self.restoring = restoring
        self.applied_index = applied_index
        self.capacity_epoch = capacity_epoch
        # Local count of applies and restores (not replicated): equal
        # generations mean equal views.
        self.generation = generation
        # The dedupe table, only in views made for snapshots (it changes with
        # almost every command, and only snapshots carry it).
        self.recent = recent

    # -- encoding ------------------------------------------------------------
    def encode_chunks(self) -> Iterator[bytes]:
        """The snapshot encoding, in pieces (`encode` joins them).

        Byte for byte `msgpack.packb` of the snapshot map, packed a few
        records at a time so that a thread encoding 100k jobs holds the GIL
        only briefly at a stretch."""
        if self.recent is None:
            raise ValueError("this view was not made for a snapshot (freeze(for_snapshot=True))")
        p = msgpack.Packer(use_bin_type=True, autoreset=False)
        records: list[tuple[str, Mapping[str, Any]]] = [
            ("nodes", self.nodes),
            ("jobs", self.jobs),
            ("tasks", self.tasks),
            ("tokens", self.tokens),
            ("members", self.members),
            ("join_tokens", self.join_tokens),
            ("node_creds", self.node_creds),
        ]
        # The keys and their order are the snapshot format (SNAPSHOT_VERSION);
        # "counters" and "usage" came last, and snapshots without them load.
        p.pack_map_header(15)
        p.pack("v")
        p.pack(SNAPSHOT_VERSION)
        p.pack("applied_index")
        p.pack(self.applied_index)
        for key, recs in records:
            p.pack(key)
            p.pack_array_header(len(recs))
            for i, rec in enumerate(recs.values(), 1):
                # The same bytes as rec.to_wire(), without copying its lists.
                p.pack(rec.wire_fields())
                if i % RECORDS_PER_CHUNK == 0:
                    yield p.bytes()
                    p.reset()
        p.pack("manifests")
        p.pack(dict(self.manifests))
        p.pack("manifest_owners")
        p.pack({k: list(v) for k, v in self.manifest_owners.items()})
        p.pack("recent")
        p.pack(self.recent.to_wire())
        p.pack("restoring")
        p.pack(self.restoring)
        p.pack("counters")
        p.pack(dict(self.counters))
        p.pack("usage")
        p.pack([u.wire_fields() for u in self.usage.values()])
        yield p.bytes()

    def encode(self) -> bytes:
        return b"".join(self.encode_chunks())


class Freezable(Protocol):
    generation: int

    def freeze(self, for_snapshot: bool = False) -> StateView: ...

    def answered(self, rid: str) -> bool: ...


class Publisher:
    """The StateReader of a live state: the newest view, made on demand.

    `view()` takes the apply lock only to make a new view when something was
    applied since the last one (a shallow copy of the changed maps), never
    while a reader works on it.
    """

    def __init__(self, state: Freezable, lock: Any) -> None:
        self._state = state
        self._lock = lock
        self._view: StateView | None = None

    def view(self) -> StateView:
        v = self._view
        # generation moves at the end of each apply, after its writes: equal
        # means this view already holds every command applied so far.
        if v is not None and v.generation == self._state.generation:
            return v
        with self._lock:
            v = self._view = self._state.freeze()
        return v

    def snapshot_view(self) -> StateView:
        """A view that also carries the dedupe table, for `snapshot save`
        (a copy of its entries is made under the lock; encode it later)."""
        with self._lock:
            return self._state.freeze(for_snapshot=True)

    def answered(self, rid: str) -> bool:
        """Whether a command with this request id was applied recently. The
        dedupe table is in no view (it changes with nearly every command):
        one lookup under the lock."""
        with self._lock:
            return self._state.answered(rid)
