"""One scheduling pass: immutable view in, Plan out.

Order of work (see fairshare.py): priority levels from the top; inside a
level, Dominant Resource Fairness between users.  Each unit (a task, or a
whole gang) is placed, or failing that may evict lower-priority work on one
node, or stays pending with a reason.  The first gang that cannot start gets
nodes held back for it, so the smaller work that comes after it in the pass is
backfilled around the hold instead of starving it.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from itertools import repeat
from operator import is_, itemgetter

import numpy as np

from .cluster import SMALL_CLUSTER, Claim, Cluster, Shape
from .explain import Explainer, gang_reason, preempting_reason, quota_reason
from .fairshare import Backlog, Entry, FairShare, Unit, build_backlog
from .preempt import Preemptor
from .types import (
    DEFAULT_POLICY,
    Allocation,
    NodeView,
    Placement,
    Plan,
    Policy,
    Preemption,
    TaskRequest,
)

# Until a gang hold needs them, a pass's per-node arrays are these (read only).
_NO_FLOATS = np.zeros(0)
_NO_INTS = np.zeros(0, dtype=np.int64)


class _Pass:
    def __init__(
        self,
        nodes: Sequence[NodeView],
        allocations: Sequence[Allocation],
        policy: Policy,
    ) -> None:
        self.cl = Cluster(nodes, allocations)
        self.node_ids = self.cl.node_ids
        self.policy = policy
        self.fair = FairShare(nodes, allocations, policy, frame=self.cl.frame)
        # Made at the first question for it (_preemptor): many passes ask
        # none, as what fits nowhere has often nothing below it to evict.
        self.preemption = policy.preemption
        self._allocations = allocations
        self._pre: Preemptor | None = None
        self._lowest: int | None = None  # the lowest priority that runs (_may_evict)
        # job -> nodes it runs on; after the allocations, only the jobs in
        # `watched` (gangs and spread tasks, who ask) are kept up to date.
        self.job_nodes: dict[str, set[int]] = {}
        self.watched: set[str] = set()
        for a in allocations:
            i = self.cl.index_of.get(a.node_id)
            if i is not None:
                self.job_nodes.setdefault(a.job_id, set()).add(i)
        self.placements: list[Placement] = []
        self.preemptions: list[Preemption] = []
        self.reasons: dict[str, str] = {}
        self.unexplained: list[tuple[TaskRequest, Shape]] = []
        # Free resources only shrink during a pass, so a shape that fit nowhere
        # (or could evict nothing at a priority) keeps failing: skip the search.
        self.no_fit: set[Shape] = set()
        self.no_evict: set[tuple[Shape, int]] = set()
        self.no_gang: dict[tuple[tuple[Shape, ...], bool], str] = {}
        self.gang_too_big: dict[Shape, int] = {}  # shape -> fewest alike gang tasks that failed
        # Request classes (shape, priority) of single tasks, and which are dead:
        # they fit nowhere and can evict nothing for the rest of the pass.
        self.classes: dict[tuple[Shape, int], int] = {}
        self.classes_of_shape: dict[Shape, list[int]] = {}
        self.dead: list[bool] = []
        self.fitless: list[bool] = []
        self.gang_held = False
        # Filled in by the first hold: per node, when its running work started
        # (inf when idle), and its size.
        # (A list on a small cluster, arrays on a large one.)
        self._started_l: list[float] | None = None
        self._started = self._node_cpus = _NO_FLOATS
        self._node_mem = _NO_INTS

    def run(self, pending: Sequence[TaskRequest]) -> Plan:
        backlog = build_backlog(pending)
        self.watched = backlog.watched
        self.classes = backlog.classes
        shapes = backlog.shapes
        self.dead = [False] * len(shapes)
        self.fitless = [False] * len(shapes)  # per class: its shape is in no_fit
        for (shape, _), c in self.classes.items():
            self.classes_of_shape.setdefault(shape, []).append(c)
        fair, reasons, n = self.fair, self.reasons, len(pending)
        skipped: list[Entry] = []
        dead_classes: list[int] = []
        gangs = backlog.gangs
        dead_gangs = [False] * len(gangs)
        dead_gang_list: list[int] = []

        def settle(prio: int) -> None:
            self._settle_level(backlog, prio, dead_gangs)

        fit_and_take, node_ids = self.cl.fit_and_take, self.node_ids
        placements, charge, watched = self.placements, fair.charge, self.watched
        quotas, fitless = fair.quotas, self.fitless
        order = fair.order(
            backlog, self.dead, skipped, settle, dead_classes, dead_gangs, dead_gang_list
        )
        for _, task_id, seq, cls in order:
            if cls < 0:
                unit = gangs[seq - n]
                quota = fair.quota_blocks(unit.user, unit.gpus)
                if quota is None:
                    self._gang(unit)
                else:
                    for t in unit.tasks:
                        reasons[t.task_id] = quota_reason(unit.user, quota)
                continue
            t = pending[seq]
            if quotas:
                quota = fair.quota_blocks(t.user, t.gpus)
                if quota is not None:
                    reasons[task_id] = quota_reason(t.user, quota)
                    continue
            shape = shapes[cls]
            # Plain best fit, the common case, in line (_grant's work too):
            # one call finds the node, picks the GPUs and takes them.
            if not fitless[cls] and not t.spread and not t.blocks:
                hit = fit_and_take(shape, t.cpus, t.mem_bytes)
                if hit is not None:
                    i, gpus = hit
                    placements.append(Placement(task_id, node_ids[i], gpus))
                    charge(t.user, len(gpus), t.cpus, t.mem_bytes)
                    if t.job_id in watched:
                        self._track(t.job_id, i)
                    continue
                self._fits_nowhere(shape)
            self._single(t, shape)
        explain = Explainer(self.cl)
        for t, shape in self.unexplained:
            reasons[t.task_id] = explain(t, shape)
        # Gangs known not to start; quotas are read at the end of the pass.
        for gang in dead_gang_list:
            unit = gangs[gang]
            quota = fair.quota_blocks(unit.user, unit.gpus)
            if quota is None:
                why = self.no_gang[unit.shapes, unit.spread]
            else:
                why = quota_reason(unit.user, quota)
            for t in unit.tasks:
                reasons[t.task_id] = why
        # Dead classes' tasks, in one sweep.  The explainer's reason depends
        # on the shape only (it caches by shape), so it is looked up once per
        # class here; quotas are read at the end of the pass, as for all
        # skipped work.
        members = backlog.members
        if fair.quotas:
            by_class: list[str | None] = [None] * len(shapes)
            rest = list(skipped)
            for c in dead_classes:
                for entries in members[c].values():
                    rest.extend(entries)
            for _, _, seq, cls in rest:
                t = pending[seq]
                quota = fair.quota_blocks(t.user, t.gpus)
                if quota is not None:
                    reasons[t.task_id] = quota_reason(t.user, quota)
                    continue
                reason = by_class[cls]
                if reason is None:
                    reason = by_class[cls] = explain(t, shapes[cls])
                reasons[t.task_id] = reason
        else:
            # The same, without a quota to check: explain each class's first
            # task, in the order the classes first appear, then fill in
            # tens of thousands of reasons without a Python-level loop.
            cls_of = list(map(itemgetter(3), skipped))
            first = dict(zip(reversed(cls_of), reversed(skipped), strict=True))
            reason_of = {
                cls: explain(pending[first[cls][2]], shapes[cls]) for cls in dict.fromkeys(cls_of)
            }
            reasons.update(
                zip(map(itemgetter(1), skipped), map(reason_of.__getitem__, cls_of), strict=True)
            )
            for c in dead_classes:
                by_user = members[c]
                first_seq = min(e[2] for entries in by_user.values() for e in entries[:1])
                reason = explain(pending[first_seq], shapes[c])
                for entries in by_user.values():
                    reasons.update(zip(map(itemgetter(1), entries), repeat(reason)))
        reserved: dict[str, tuple[int, ...]] = {}
        for i in sorted(self.cl.claims):
            held = sorted({x for c in self.cl.claims[i] for x in c.gpus})
            reserved[self.cl.nodes[i].node_id] = tuple(held)
        return Plan(
            placements=tuple(self.placements),
            preemptions=tuple(self.preemptions),
            reasons=self.reasons,
            reserved=reserved,
        )

    def _settle_level(self, backlog: Backlog, prio: int, dead_gangs: list[bool]) -> None:
        """Before a priority level is queued: mark its classes and gangs that
        can get nothing (FairShare.order then never queues their tasks)."""
        # A shape that fit nowhere higher up fits nowhere now; with no open
        # victim below this priority, it can evict nothing either.
        no_fit, shapes = self.no_fit, backlog.shapes
        unfit = [c for c in backlog.levels[prio] if shapes[c] in no_fit]
        if unfit and not (self._may_evict(prio) and self._preemptor().victims_below(prio)):
            for c in unfit:
                self.dead[c] = True
        # Likewise a gang alike to one that could not start (and with no
        # running task of its own to keep away from).
        if self.no_gang:
            for _, _, gang in backlog.gang_entries.get(prio, ()):
                unit = backlog.gangs[gang]
                if (unit.shapes, unit.spread) in self.no_gang and not self.job_nodes.get(
                    unit.job_id
                ):
                    dead_gangs[gang] = True

    def _preemptor(self) -> Preemptor:
        # What it knows comes from the allocations and the nodes, which do
        # not change in a pass, and from what it took itself: made late, it
        # answers as one made at the start would.
        if self._pre is None:
            self._pre = Preemptor(self.cl, self._allocations, self.policy)
        return self._pre

    def _may_evict(self, priority: int) -> bool:
        """False when work at `priority` can evict nothing: preemption is off,
        or nothing runs at a lower priority (Preemptor.find would find no
        victim; most passes then need no Preemptor at all)."""
        if not self.preemption or not self._allocations:
            return False
        if self._lowest is None:
            self._lowest = min([a.priority for a in self._allocations])
        return priority > self._lowest

    def _fits_nowhere(self, shape: Shape) -> None:
        self.no_fit.add(shape)
        for c in self.classes_of_shape.get(shape, ()):
            self.fitless[c] = True
            if not self.preemption:
                self.dead[c] = True

    def _evicts_nothing(self, shape: Shape, priority: int) -> None:
        self.no_evict.add((shape, priority))
        c = self.classes.get((shape, priority))
        if c is not None and shape in self.no_fit:
            self.dead[c] = True

    def _grant(self, t: TaskRequest, i: int, gpus: tuple[int, ...]) -> None:
        self.placements.append(Placement(t.task_id, self.node_ids[i], gpus))
        self.fair.charge(t.user, len(gpus), t.cpus, t.mem_bytes)
        if t.job_id in self.watched:
            self._track(t.job_id, i)

    def _track(self, job: str, i: int) -> None:
        """Note that `job` now runs on node i (asked by its gangs and spread tasks)."""
        on = self.job_nodes.get(job)
        if on is None:
            self.job_nodes[job] = {i}
        else:
            on.add(i)

    def _single(self, t: TaskRequest, shape: Shape) -> None:
        cl = self.cl
        if not t.spread and not t.blocks:
            # Plain best fit, the common case: one call finds, picks and takes.
            if shape not in self.no_fit:
                hit = cl.fit_and_take(shape, t.cpus, t.mem_bytes)
                if hit is not None:
                    self._grant(t, hit[0], hit[1])
                    return
                self._fits_nowhere(shape)
        else:
            i: int | None = None
            if t.spread and self.job_nodes.get(t.job_id):
                # Spread: a node without this job first, any node as a fallback.
                i = cl.find_node(shape, self.job_nodes[t.job_id], spread=True, blocks=t.blocks)
            if i is None and shape not in self.no_fit:
                i = cl.find_node(shape, spread=t.spread, blocks=t.blocks)
                if i is None:
                    self._fits_nowhere(shape)
            if i is not None:
                gpus = cl.pick_gpus(i, shape)
                cl.take(i, gpus, t.cpus, t.mem_bytes)
                self._grant(t, i, gpus)
                return
        if self.preemption and (shape, t.priority) not in self.no_evict:
            pre = self._preemptor() if self._may_evict(t.priority) else None
            ev = None if pre is None else pre.find(shape, t.priority)
            if ev is None or pre is None:
                self._evicts_nothing(shape, t.priority)
            else:
                pre.take(ev)
                node = cl.nodes[ev.node]
                for k in ev.victims:
                    a = pre.allocs[k]
                    self.preemptions.append(Preemption(a.task_id, node.node_id, t.task_id, ev.gpus))
                # The victims' resources stay busy until they stop; hold the free
                # part of what the task needs too, so nobody else takes it.
                cl.take(ev.node, ev.extra_gpus, ev.extra_cpus, ev.extra_mem)
                cl.claims.setdefault(ev.node, []).append(
                    Claim(
                        f"task {t.task_id}, waiting on preemptions",
                        ev.gpus,
                        ev.extra_cpus,
                        ev.extra_mem,
                    )
                )
                # It will hold these soon: count them against share and quota now.
                self.fair.charge(t.user, t.gpus, t.cpus, t.mem_bytes)
                self.reasons[t.task_id] = preempting_reason(node.name)
                return
        self.unexplained.append((t, shape))

    def _gang(self, unit: Unit) -> None:
        cl = self.cl
        shapes = unit.shapes
        busy = self.job_nodes.get(unit.job_id, set())
        spread = unit.spread
        key = (shapes, spread)
        if not busy:
            known = self.no_gang.get(key)
            if known is not None:
                for t in unit.tasks:
                    self.reasons[t.task_id] = known
                return
        # A gang of n tasks of one shape, with no running tasks to avoid,
        # fits iff n nodes each fit that shape; so once n such tasks failed,
        # n or more keep failing for the rest of the pass.  (A trial would
        # leave the state as it found it: skipping it changes nothing.)
        one_shape = shapes.count(shapes[0]) == len(shapes)
        alike = not busy and one_shape
        too_big = alike and len(shapes) >= self.gang_too_big.get(shapes[0], len(shapes) + 1)
        hosts = self._hosts_first(shapes, busy) if one_shape and not too_big else None
        if hosts is not None and hosts < len(shapes):
            too_big = True
            if alike:
                self.gang_too_big[shapes[0]] = len(shapes)
        if not too_big:
            chosen: list[tuple[TaskRequest, int, tuple[int, ...]]] = []
            exclude = set(busy)
            for t, shape in zip(unit.tasks, shapes, strict=True):
                if shape in self.no_fit:
                    break
                if not spread and not t.blocks:
                    hit = cl.fit_and_take(shape, t.cpus, t.mem_bytes, exclude)
                    if hit is None:
                        break
                    i, gpus = hit
                else:
                    found = cl.find_node(shape, exclude, spread, t.blocks)
                    if found is None:
                        break
                    i, gpus = found, cl.pick_gpus(found, shape)
                    cl.take(i, gpus, t.cpus, t.mem_bytes)
                chosen.append((t, i, gpus))
                exclude.add(i)
            if len(chosen) == len(unit.tasks):
                for t, i, gpus in chosen:
                    self._grant(t, i, gpus)
                return
            for t, i, gpus in reversed(chosen):  # all or nothing
                cl.give(i, gpus, t.cpus, t.mem_bytes)
            if alike:
                self.gang_too_big[shapes[0]] = len(shapes)
        if hosts is None:
            hosts = self._count_hosts(shapes[0], busy)
        reason = gang_reason(len(unit.tasks), hosts)
        if self.policy.backfill and not self.gang_held and self._hold_for_gang(unit, shapes, busy):
            self.gang_held = True
        if not busy:
            self.no_gang[key] = reason
        for t in unit.tasks:
            self.reasons[t.task_id] = reason

    def _hosts_first(self, shapes: tuple[Shape, ...], busy: set[int]) -> int | None:
        """For a gang of n tasks of one shape: the nodes that could host one
        of them now, when that is cheap to ask before a trial (a few nodes),
        else None.  The gang fits iff n nodes it does not run on each fit
        that shape, which is what _count_hosts counts (the count its reason
        gives), so a count under n spares the trial and its rollback.  (On
        many nodes the count costs more than a trial that succeeds.)"""
        if len(self.cl.nodes) > SMALL_CLUSTER:
            return None
        return self._count_hosts(shapes[0], busy)

    def _count_hosts(self, shape: Shape, exclude: set[int]) -> int:
        cl = self.cl
        whole, mixed = cl.shape_pools(shape)
        count = 0
        small, nfree = len(cl.nodes) <= SMALL_CLUSTER, cl.nfree_l
        for pid in whole:
            if small:
                roomy = [i for i in cl.pools[pid].nodes if nfree[i] >= shape[0]]
            else:
                idx = cl.pool_nodes(pid)
                roomy = idx[cl.nfree[idx] >= shape[0]].tolist()
            for i in roomy:
                count += i not in exclude and cl.fits_cpu_mem(i, shape)
        for pid in mixed:
            for i in cl.pools[pid].nodes:
                count += (
                    i not in exclude
                    and cl.fits_cpu_mem(i, shape)
                    and len(cl.matching_free(i, shape)) >= shape[0]
                )
        return count

    def _hold_for_gang(self, unit: Unit, shapes: tuple[Shape, ...], busy: set[int]) -> bool:
        """Hold back, for this gang, the nodes it is closest to fitting on:
        the most matching free GPUs now, then the ones whose running work
        started earliest (likely to end first).  False when it could never fit."""
        cl = self.cl
        if self._started_l is None:
            # Most nodes run nothing: visit only those that do.
            started = [float("inf")] * len(cl.nodes)
            for i, running in enumerate(cl.allocs_on):
                if running:
                    started[i] = min(a.started_at for a in running)
            self._started_l = started
            if len(cl.nodes) > SMALL_CLUSTER:
                self._started = np.array(started, dtype=np.float64)
                self._node_cpus = np.array(cl.node_cpus, dtype=np.float64)
                self._node_mem = np.array(cl.node_mem, dtype=np.int64)
        taken: set[int] = set(busy)
        picks: list[tuple[int, Shape]] = []
        ranked: dict[Shape, list[int]] = {}
        for shape in shapes:
            if shape not in ranked:
                ranked[shape] = self._rank_for_hold(shape)
            best = next((i for i in ranked[shape] if i not in taken), None)
            if best is None:
                return False
            taken.add(best)
            picks.append((best, shape))
        owner = f"older gang {unit.job_id}"
        for i, shape in picks:
            n = min(len(cl.matching_free(i, shape)), shape[0])
            gpus = cl.pick_gpus(i, (n, *shape[1:]))
            cpus = max(0.0, min(cl.free_cpu[i], shape[1]))
            mem = max(0, min(cl.free_mem[i], shape[2]))
            cl.hold(i, Claim(owner, gpus, cpus, mem))
        return True

    def _rank_for_hold(self, shape: Shape) -> list[int]:
        """Nodes big enough for `shape`, best first by the key
        (-min(matching free GPUs, wanted), earliest start of running work, index)."""
        cl = self.cl
        whole, mixed = cl.shape_pools(shape)
        if len(cl.nodes) <= SMALL_CLUSTER:
            return self._rank_few(shape, whole, mixed)
        idx: list[int] = []
        have: list[int] = []
        for pid in whole:
            idx.extend(cl.pools[pid].nodes)
        nodes = np.asarray(idx, dtype=np.int64)
        have_arr = cl.nfree[nodes]
        for pid in mixed:
            for i in cl.pools[pid].nodes:
                idx.append(i)
                have.append(len(cl.matching_free(i, shape)))
        nodes = np.asarray(idx, dtype=np.int64)
        have_arr = np.concatenate([have_arr, np.asarray(have, dtype=np.int64)])
        big = (self._node_cpus[nodes] >= shape[1]) & (self._node_mem[nodes] >= shape[2])
        nodes, have_arr = nodes[big], have_arr[big]
        started = self._started[nodes]
        order = np.lexsort((nodes, started, -np.minimum(have_arr, shape[0])))
        return nodes[order].tolist()

    def _rank_few(self, shape: Shape, whole: list[int], mixed: list[int]) -> list[int]:
        """_rank_for_hold on a cluster of a few nodes, without numpy (whose
        fixed cost per call is most of the work there): the same order."""
        cl, want = self.cl, shape[0]
        cpus, mem, started = cl.node_cpus, cl.node_mem, self._started_l
        assert started is not None
        keyed: list[tuple[int, float, int]] = []
        for pid in whole:
            for i in cl.pools[pid].nodes:
                if cpus[i] >= shape[1] and mem[i] >= shape[2]:
                    keyed.append((-min(cl.nfree_l[i], want), started[i], i))
        for pid in mixed:
            for i in cl.pools[pid].nodes:
                if cpus[i] >= shape[1] and mem[i] >= shape[2]:
                    keyed.append((-min(len(cl.matching_free(i, shape)), want), started[i], i))
        keyed.sort()
        return [i for _, _, i in keyed]


def schedule(
    nodes: Sequence[NodeView],
    allocations: Sequence[Allocation],
    pending: Sequence[TaskRequest],
    policy: Policy = DEFAULT_POLICY,
) -> Plan:
    """Plan placements and preemptions for `pending` on a snapshot.  Pure and
    deterministic: the same arguments always give the same Plan."""
    global _last
    if not pending:
        # Nothing to place and nothing to preempt for: a leader's incremental
        # pass whose tasks all wait as before pays nothing for the cluster.
        return Plan((), (), {})
    last = _last
    if (
        last is not None
        and last[3] is policy
        and _same(last[0], nodes)
        and _same(last[1], allocations)
        and _same(last[2], pending)
    ):
        # The very inputs of the last pass (a leader woken by a commit that
        # changed nothing the scheduler reads): the same plan (immutable, as
        # its inputs are: its maps are read-only Mappings to its callers).
        return last[4]
    # A pass keeps every object it makes until it returns, so the collector
    # reclaims nothing while it runs; but the allocations alone trigger full
    # collections that walk the caller's whole heap (the view: one object per
    # node, GPU and task), a third of the pass at 100,000 tasks.  The pass
    # makes no reference cycles worth collecting early.  (Paused in line: a
    # context manager costs a twentieth of a pass over a dozen tasks.)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        plan = _Pass(nodes, allocations, policy).run(pending)
    finally:
        if was_enabled:
            gc.enable()
    _last = (list(nodes), list(allocations), list(pending), policy, plan)
    return plan


# The last pass's inputs and plan. Views, allocations, requests and policies
# are immutable, and a leader keeps each object while what it was made from
# is unchanged (leptond/views.py InputCache), so the same objects in the same
# order are the same question, and the pass is deterministic.
_last: tuple[list[NodeView], list[Allocation], list[TaskRequest], Policy, Plan] | None = None


def _same(a: Sequence[object], b: Sequence[object]) -> bool:
    return len(a) == len(b) and all(map(is_, a, b))
