"""Queue order: priority first, then Dominant Resource Fairness between users.

Within one priority level the next unit of work always comes from the user
with the smallest dominant share (share of cluster GPUs, CPUs or memory,
whichever is largest), and shares move as the plan assigns, so two users with
equal demand end up with equal allocations.  Ties go to the older unit, then
to the smaller task id: nothing depends on hash seeds or dict order.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Mapping, Sequence
from operator import attrgetter, is_
from types import MappingProxyType
from typing import NamedTuple

from .cluster import Frame, Shape, shape_of
from .types import DEFAULT_POLICY, Allocation, NodeView, Policy, TaskRequest, UserShare


class Unit(NamedTuple):
    """What is placed as one: a single task or a whole gang.  `schedule`
    makes these for gangs only (single tasks are queued as `Entry` tuples);
    `first_fit` makes one per task.  (A NamedTuple, not a dataclass: that can
    be 100,000 of them.)"""

    tasks: tuple[TaskRequest, ...]  # gangs sorted by rank
    shapes: tuple[Shape, ...]
    priority: int
    user: str
    job_id: str
    key: tuple[float, str]  # (submitted_at, task_id) of the oldest task
    gpus: int
    is_gang: bool
    cls: int  # request class (shape, priority) of a single task, -1 for a gang
    spread: bool = False  # a gang: any of its tasks spreads


def build_units(
    pending: Sequence[TaskRequest], classes: dict[tuple[Shape, int], int] | None = None
) -> list[Unit]:
    """Group pending tasks into units.  Single tasks are numbered by request
    class (shape, priority) in `classes`, which the caller may pre-seed."""
    if classes is None:
        classes = {}
    gangs: dict[str, list[TaskRequest]] = {}
    units: list[Unit] = []
    new = tuple.__new__  # NamedTuple's own __new__ is Python code: too slow for 100,000
    for t in pending:
        if t.gang_size > 1:
            gangs.setdefault(t.job_id, []).append(t)
        else:
            shape = shape_of(t)
            cls = classes.get((shape, t.priority))
            if cls is None:
                cls = classes[shape, t.priority] = len(classes)
            units.append(
                new(
                    Unit,
                    (
                        (t,),
                        (shape,),
                        t.priority,
                        t.user,
                        t.job_id,
                        (t.submitted_at, t.task_id),
                        t.gpus,
                        False,
                        cls,
                        t.spread,
                    ),
                )
            )
    units.extend(_gang_units(gangs))
    return units


_rank_key = attrgetter("rank", "task_id")
_age_key = attrgetter("submitted_at", "task_id")
_priority = attrgetter("priority")


def _gang_units(
    gangs: dict[str, list[TaskRequest]], shape_of_raw: dict[tuple[object, ...], Shape] | None = None
) -> Iterator[Unit]:
    """One unit per gang job.  `shape_of_raw` remembers shapes by the raw
    request fields (gang tasks of one job usually ask for the same)."""
    if shape_of_raw is None:
        shape_of_raw = {}
    for job_id, ts in gangs.items():
        yield _gang_unit(job_id, ts, shape_of_raw)


def _gang_unit(
    job_id: str, ts: list[TaskRequest], shape_of_raw: dict[tuple[object, ...], Shape]
) -> Unit:
    """The unit of one gang job (sorts `ts` by rank)."""
    ts.sort(key=_rank_key)
    oldest = min(map(_age_key, ts))
    # A gang runs at the priority of its most important member, owned by rank 0's user.
    prio = max(map(_priority, ts))
    shapes: list[Shape] = []
    gpus = 0
    spread = False
    for t in ts:
        raw: tuple[object, ...] = (t.gpus, t.cpus, t.mem_bytes, t.gpu_type, t.gpu_mem_min)
        c = t.constraints
        if c:
            raw = (*raw, *sorted(c.items()))
        shape = shape_of_raw.get(raw)
        if shape is None:
            shape = shape_of_raw[raw] = shape_of(t)
        shapes.append(shape)
        gpus += t.gpus
        if t.spread:
            spread = True
    return Unit(tuple(ts), tuple(shapes), prio, ts[0].user, job_id, oldest, gpus, True, -1, spread)


# One queued unit of work: (submitted_at, task_id, seq, cls).  For a single
# task seq is its index in `pending` and cls its request class; for a gang
# (oldest member's time and id) seq is len(pending) + its index in
# Backlog.gangs and cls is -1.  Sorting entries sorts by age, then task id,
# then input order with single tasks before gangs, as a stable sort of the
# units would.  Plain tuples: a pass queues 100,000 of them.
Entry = tuple[float, str, int, int]


# Gang units made by earlier passes, by job, with the requests they were made
# of, in the order the pass met them: a gang waits through many passes, and
# a unit depends on its (immutable) requests alone. Bounded: cleared whole
# when full.
_GANGS: dict[str, tuple[tuple[TaskRequest, ...], Unit]] = {}
_MAX_GANGS = 4096


class Backlog(NamedTuple):
    """Pending work grouped by request class; queues per user are made one
    priority level at a time, when the pass reaches it (FairShare.order)."""

    members: list[dict[str, list[Entry]]]  # request class -> user -> its entries
    levels: dict[int, list[int]]  # priority -> its request classes
    # priority -> (user, entry, index in gangs) per gang
    gang_entries: dict[int, list[tuple[str, Entry, int]]]
    gangs: list[Unit]
    classes: dict[tuple[Shape, int], int]  # (shape, priority) -> request class
    shapes: list[Shape]  # request class -> shape
    # Jobs whose nodes the pass must track: gangs and jobs with spread tasks.
    watched: set[str]


def build_backlog(pending: Sequence[TaskRequest]) -> Backlog:
    """Queue pending single tasks by request class and user, gangs by job.
    Tasks asking for the same thing share a class, found by one dictionary
    look-up on their raw fields.  This loop runs once per pending task:
    attributes are read in line (an attrgetter call costs twice as much)."""
    members: list[dict[str, list[Entry]]] = []
    levels: dict[int, list[int]] = {}
    classes: dict[tuple[Shape, int], int] = {}
    shapes: list[Shape] = []
    raw_class: dict[tuple[object, ...], int] = {}
    gang_tasks: dict[str, list[TaskRequest]] = {}
    watched: set[str] = set()
    for seq, t in enumerate(pending):
        if t.gang_size > 1:
            gang_tasks.setdefault(t.job_id, []).append(t)
            continue
        # Every field a request class depends on; constraints are a Mapping.
        raw: tuple[object, ...] = (
            t.gpus,
            t.cpus,
            t.mem_bytes,
            t.gpu_type,
            t.gpu_mem_min,
            t.priority,
        )
        c = t.constraints
        if c:
            raw = (*raw, *sorted(c.items()))
        if t.spread:
            watched.add(t.job_id)
        cls = raw_class.get(raw)
        if cls is None:
            shape = shape_of(t)
            prio = t.priority
            cls = classes.get((shape, prio))
            if cls is None:
                cls = classes[shape, prio] = len(shapes)
                shapes.append(shape)
                members.append({})
                levels.setdefault(prio, []).append(cls)
            raw_class[raw] = cls
        by_user = members[cls]
        q = by_user.get(t.user)
        if q is None:
            q = by_user[t.user] = []
        q.append((t.submitted_at, t.task_id, seq, cls))
    gangs: list[Unit] = []
    gang_entries: dict[int, list[tuple[str, Entry, int]]] = {}
    n = len(pending)
    shape_of_raw: dict[tuple[object, ...], Shape] = {}
    for job_id, ts in gang_tasks.items():
        kept = _GANGS.get(job_id)
        if kept is not None and len(kept[0]) == len(ts) and all(map(is_, kept[0], ts)):
            unit = kept[1]
        else:
            asked = tuple(ts)
            unit = _gang_unit(job_id, ts, shape_of_raw)
            if len(_GANGS) >= _MAX_GANGS:
                _GANGS.clear()
            _GANGS[job_id] = (asked, unit)
        levels.setdefault(unit.priority, [])
        gang_entries.setdefault(unit.priority, []).append(
            (unit.user, (*unit.key, n + len(gangs), -1), len(gangs))
        )
        gangs.append(unit)
    watched.update(gang_tasks)
    return Backlog(members, levels, gang_entries, gangs, classes, shapes, watched)


class Held:
    """What one user holds (running, placed or waiting on preemptions)."""

    __slots__ = ("cpus", "gpus", "mem_bytes")  # read and written once per grant

    def __init__(self) -> None:
        self.gpus = 0
        self.cpus = 0.0
        self.mem_bytes = 0


_NOTHING_HELD = Held()
_MAX_TOTALS = 64  # per frame (cleared whole when full)


def _in_use(nodes: Sequence[NodeView], holding: set[str]) -> tuple[float, float, float]:
    """GPUs, CPUs and memory of the nodes that take work or hold some."""
    live = [nd for nd in nodes if nd.schedulable or nd.node_id in holding]
    return (
        float(sum(len(nd.gpus) for nd in live)),
        float(sum(nd.cpus for nd in live)),
        float(sum(nd.mem_bytes for nd in live)),
    )


_NO_PAST: Mapping[str, float] = MappingProxyType({})


class FairShare:
    def __init__(
        self,
        nodes: Sequence[NodeView],
        allocations: Sequence[Allocation],
        policy: Policy,
        *,
        past: bool = True,
        frame: Frame | None = None,
    ) -> None:
        """`frame`: the nodes' frame (Cluster.frame), which keeps the totals
        for later passes over the same nodes."""
        # Shares are of what the cluster has in use: the nodes that take work
        # and those whose live tasks are counted (a draining node's). Counting
        # only the first would put users with work on a draining node over
        # 100% of the cluster.
        if frame is None:
            self.total = _in_use(nodes, {a.node_id for a in allocations})
        else:
            # The same sums, kept with the nodes' frame by the unschedulable
            # nodes that hold work (most passes: none, or the same ones).
            unsched, ids = frame.unschedulable, frame.node_ids
            if unsched:
                holding = {a.node_id for a in allocations}
                key = tuple([i for i in unsched if ids[i] in holding])
            else:
                holding, key = set(), ()
            totals = frame.totals
            total = totals.get(key)
            if total is None:
                if len(totals) >= _MAX_TOTALS:
                    totals.clear()
                total = totals[key] = _in_use(frame.nodes, holding)
            self.total = total
        # 1/total, or 0 for a resource the cluster lacks (it then counts for nobody).
        self.inverse = tuple(1.0 / t if t > 0 else 0.0 for t in self.total)
        self.quotas: Mapping[str, int] = policy.quotas
        # Without `past`: shares of what is held now only (the policy's
        # past usage left out, as queue_report shows them).
        self.past: Mapping[str, float] = policy.past_shares if past else _NO_PAST
        self.held: dict[str, Held] = {}
        self.shares: dict[str, float] = {}  # dominant share, kept current by charge()
        for a in allocations:
            self.charge(a.user, len(a.gpus), a.cpus, a.mem_bytes)

    def charge(self, user: str, gpus: int, cpus: float, mem: int) -> None:
        h = self.held.get(user)
        if h is None:
            h = self.held[user] = Held()
        g = h.gpus = h.gpus + gpus
        c = h.cpus = h.cpus + cpus
        m = h.mem_bytes = h.mem_bytes + mem
        ig, ic, im = self.inverse
        # max() of the three, without the builtin call (this runs per grant);
        # ties keep the first, as max() does.
        share = g * ig
        cs, ms = c * ic, m * im
        if cs > share:
            share = cs
        if ms > share:
            share = ms
        if self.past:
            share += self.past.get(user, 0.0)
        self.shares[user] = share

    def holds(self, user: str) -> Held:
        return self.held.get(user, _NOTHING_HELD)

    def share(self, user: str) -> float:
        """The dominant share, plus the user's decayed past usage if any."""
        return self.shares.get(user, self.past.get(user, 0.0) if self.past else 0.0)

    def within_quota(self, user: str) -> bool:
        q = self.quotas.get(user)
        return q is None or self.holds(user).gpus <= q

    def quota_blocks(self, user: str, gpus: int) -> int | None:
        """The user's quota when granting `gpus` more would break it, else None.
        A user already over quota gets nothing more, not even CPU-only work."""
        q = self.quotas.get(user)
        if q is None:
            return None
        held = self.holds(user).gpus
        if held > q or held + gpus > q:
            return q
        return None

    def order(
        self,
        backlog: Backlog,
        dead: Sequence[bool] = (),
        skipped: list[Entry] | None = None,
        settle: Callable[[int], object] | None = None,
        dead_classes: list[int] | None = None,
        dead_gangs: Sequence[bool] = (),
        dead_gang_list: list[int] | None = None,
    ) -> Iterator[Entry]:
        """Yield the backlog's entries in scheduling order.  The caller charges
        what it grants before asking for the next entry; shares are read when
        a user is queued again, so grants steer the rest of the pass.

        `dead[cls]` says a request class can get nothing more in this pass
        (the caller found it fits nowhere and evicts nothing).  Its entries
        are not yielded but appended to `skipped`, without a trip through the
        heap: they change no share, so the order of the live entries is the
        same as without the shortcut.

        Before a priority level is queued, `settle(priority)` lets the caller
        mark the level's classes that are dead already (what fit nowhere
        higher up and can evict nothing at this level).  Their tasks are never
        queued at all: the class goes to `dead_classes` whole, so a level of
        tens of thousands of tasks that cannot start costs no work per task.
        Likewise a gang marked in `dead_gangs` (by its index in
        `backlog.gangs`) goes to `dead_gang_list` instead of the queue."""
        members = backlog.members
        for prio in sorted(backlog.levels, reverse=True):
            if settle is not None:
                settle(prio)
            queues: dict[str, list[Entry]] = {}
            for cls in backlog.levels[prio]:
                if dead and dead[cls] and dead_classes is not None:
                    dead_classes.append(cls)
                    continue
                for user, entries in members[cls].items():
                    q = queues.get(user)
                    if q is None:
                        queues[user] = entries[:]
                    else:
                        q += entries
            for user, entry, gang in backlog.gang_entries.get(prio, ()):
                if dead_gangs and dead_gangs[gang] and dead_gang_list is not None:
                    dead_gang_list.append(gang)
                    continue
                q = queues.get(user)
                if q is None:
                    q = queues[user] = []
                q.append(entry)
            past = self.past
            heap: list[tuple[float, float, str, str]] = []
            pos: dict[str, int] = {}
            for user, q in queues.items():
                q.sort()  # (submitted_at, task_id, seq): seq makes every entry distinct
                pos[user] = 0
                heap.append((self.share(user), q[0][0], q[0][1], user))
            heapq.heapify(heap)
            shares = self.shares
            while heap:
                # The user stays at the top while its entry is out: the caller
                # charges the grant, then the user is re-queued at its new
                # share with one sift (heapreplace) instead of a pop and a push.
                # Keys are distinct (one per user), so the order is the same.
                user = heap[0][3]
                q = queues[user]
                k = pos[user]
                yield q[k]
                k += 1
                n = len(q)
                while k < n:
                    cls = q[k][3]
                    if cls < 0 or not dead[cls]:
                        break
                    if skipped is not None:
                        skipped.append(q[k])
                    k += 1
                pos[user] = k
                if k < n:
                    e = q[k]
                    heapq.heapreplace(
                        heap, (shares.get(user, past.get(user, 0.0)), e[0], e[1], user)
                    )
                else:
                    heapq.heappop(heap)


def queue_report(
    nodes: Sequence[NodeView],
    allocations: Sequence[Allocation],
    pending: Sequence[TaskRequest],
    policy: Policy = DEFAULT_POLICY,
) -> list[UserShare]:
    """Per-user holdings and demand for `leptonctl queue`, largest share first.
    `dominant_share` is what the user holds now; `past_share` the decayed
    usage the scheduler adds to it (policy.past_shares)."""
    fair = FairShare(nodes, allocations, policy, past=False)
    waiting: dict[str, tuple[int, int]] = {}
    for t in pending:
        n, g = waiting.get(t.user, (0, 0))
        waiting[t.user] = (n + 1, g + t.gpus)
    users = sorted(set(fair.held) | set(waiting) | set(policy.past_shares))
    rows = []
    for u in users:
        held = fair.holds(u)
        tasks, gpus = waiting.get(u, (0, 0))
        rows.append(
            UserShare(
                user=u,
                gpus=held.gpus,
                cpus=held.cpus,
                mem_bytes=held.mem_bytes,
                dominant_share=fair.share(u),
                pending_tasks=tasks,
                pending_gpus=gpus,
                quota_gpus=policy.quotas.get(u),
                past_share=policy.past_shares.get(u, 0.0),
            )
        )
    rows.sort(key=lambda r: (-r.dominant_share, r.user))
    return rows
