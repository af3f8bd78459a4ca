"""Choosing what to evict for a task that fits nowhere.

Rules: evict on ONE node only; only allocations of strictly lower priority;
prefer the lowest priorities, then the fewest tasks, then the most recently
started (they lose the least work).  A --no-preempt allocation is protected,
under `no_preempt_only_within_quota` only while its owner is within quota.

Evicted tasks keep their resources until they stop, so nothing is handed back
to the free pool here: the victims are marked taken (no second preemptor may
count on them) and the caller holds whatever free resources the preemptor will
also need.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from .cluster import EPS, Cluster, Shape, gpu_matches
from .types import Allocation, Policy

# Stop examining candidate nodes once this many workable ones were found; the
# first feasible node is enough for correctness, a few more buy a better choice.
MAX_FEASIBLE_NODES = 4


class Eviction(NamedTuple):  # (not a dataclass: a pass weighs thousands of these)
    node: int
    victims: tuple[int, ...]  # indices into Preemptor.allocs
    gpus: tuple[int, ...]  # the GPUs the preemptor will get
    extra_gpus: tuple[int, ...]  # of those, the ones that are free today
    extra_cpus: float  # free CPUs/memory it needs besides the victims'
    extra_mem: int
    victim_gpus: int  # GPUs the victims hold in all (what the eviction costs)


def protected_users(allocations: Sequence[Allocation], policy: Policy) -> set[str]:
    """Users whose --no-preempt allocations are protected right now."""
    held: dict[str, int] = {}
    for a in allocations:
        held[a.user] = held.get(a.user, 0) + len(a.gpus)
    users = set(held)
    if not policy.no_preempt_only_within_quota:
        return users
    return {u for u in users if u not in policy.quotas or held[u] <= policy.quotas[u]}


class Preemptor:
    def __init__(self, cl: Cluster, allocations: Sequence[Allocation], policy: Policy) -> None:
        self.cl = cl
        safe = protected_users(allocations, policy)
        index_of = cl.index_of
        self.allocs = [a for a in allocations if a.node_id in index_of]
        self.is_open = [a.preemptible or a.user not in safe for a in self.allocs]
        self.prio_l = [a.priority for a in self.allocs]
        self.levels: list[int] = sorted(set(self.prio_l))  # victim priority levels, ascending
        self.open_at: dict[int, int] = dict.fromkeys(self.levels, 0)  # priority -> open
        for p, is_open in zip(self.prio_l, self.is_open, strict=True):
            if is_open:
                self.open_at[p] += 1
        # The rest is read only by a search with open victims below the
        # task's priority, which most passes never make (what fits nowhere
        # usually has nothing below it to evict): worked out at the first
        # one (_index), from the allocations, which do not change in a pass.
        self._indexed = False
        self.node_l: list[int] = []
        self.order_key: list[tuple[int, float, str]] = []
        self.on_node: dict[int, list[int]] = {}
        self.alloc_nodes: list[int] = []
        self.count_upto: list[list[int]] = []
        self.gpus_upto: list[list[int]] = []
        # (shape, level index) -> the nodes of alloc_nodes, in node order, that
        # might still make the shape fit at that level in this pass.  Free
        # resources and open victims only shrink during a pass, so a node that
        # fails once fails for good: it is dropped from the list and no later
        # search looks at it again.
        self._alive: dict[tuple[Shape, int], list[int]] = {}
        # usable pools -> alloc_nodes in those pools: many shapes share them.
        self._alive_base: dict[frozenset[int], list[int]] = {}
        # (shape, level index) -> node -> (node state it was worked out on, eviction)
        self._seen: dict[
            tuple[Shape, int], dict[int, tuple[tuple[object, ...], Eviction | None]]
        ] = {}

    def _index(self) -> None:
        """Where each allocation runs, the eviction order and, per victim
        priority level L (ascending), over the open allocations with priority
        <= L: per node, how many there are and how many GPUs they hold (kept
        current by take())."""
        self._indexed = True
        cl = self.cl
        index_of = cl.index_of
        self.node_l = [index_of[a.node_id] for a in self.allocs]
        # Eviction order: lowest priority first, then the most recently started.
        self.order_key = [(a.priority, -a.started_at, a.task_id) for a in self.allocs]
        for k, i in enumerate(self.node_l):
            self.on_node.setdefault(i, []).append(k)
        self.alloc_nodes = sorted(self.on_node)  # nodes with any allocation, in node order
        n = len(cl.nodes)
        self.count_upto = [[0] * n for _ in self.levels]
        self.gpus_upto = [[0] * n for _ in self.levels]
        for k, is_open in enumerate(self.is_open):
            if is_open:
                self._count(k, 1)

    def _count(self, k: int, sign: int) -> None:
        i, p, g = self.node_l[k], self.prio_l[k], len(self.allocs[k].gpus)
        for j, level in enumerate(self.levels):
            if level >= p:
                self.count_upto[j][i] += sign
                self.gpus_upto[j][i] += sign * g

    def take(self, ev: Eviction) -> None:
        if not self._indexed:
            self._index()
        for k in ev.victims:
            self.is_open[k] = False
            self.open_at[self.prio_l[k]] -= 1
            self._count(k, -1)

    def victims_below(self, priority: int) -> bool:
        """Whether any open allocation has a priority below `priority`."""
        return any(n > 0 for lv, n in self.open_at.items() if lv < priority)

    def find(self, shape: Shape, priority: int) -> Eviction | None:
        """The eviction that makes `shape` fit, or None when none does.

        Victim priority levels are tried from the bottom up: only when evicting
        everything up to level L fits nowhere is level L+1 touched.  Inside a
        level, the first few workable nodes (in node order) are compared."""
        cl = self.cl
        levels = [
            (j, lv) for j, lv in enumerate(self.levels) if lv < priority and self.open_at[lv] > 0
        ]
        if not levels:
            return None
        if not self._indexed:
            self._index()
        whole, mixed = cl.shape_pools(shape)
        if not whole and not mixed:
            return None
        whole_set = cl.whole_pools(shape)
        usable = cl.usable_pools(shape)
        g = shape[0]
        nfree = cl.nfree_l
        for j, level in levels:
            count, pot = self.count_upto[j], self.gpus_upto[j]
            key = (shape, j)
            alive = self._alive.get(key)
            if alive is None:
                base = self._alive_base.get(usable)
                if base is None:
                    pool_of = cl.pool_of
                    base = self._alive_base[usable] = [
                        i for i in self.alloc_nodes if pool_of[i] in usable
                    ]
                alive = self._alive[key] = base[:]
            seen_on = self._seen.get(key)
            if seen_on is None:
                seen_on = self._seen[key] = {}
            best: tuple[tuple[int, int, int], Eviction] | None = None
            feasible = 0
            kept: list[int] = []  # the nodes looked at that stay alive
            seen_upto = len(alive)
            for q, i in enumerate(alive):
                # Upper bound on GPUs the node could offer: free plus every candidate's.
                if count[i] <= 0 or pot[i] + nfree[i] < g:
                    continue
                # An eviction depends on the node's free resources and its
                # open victims only (count[i] names those: victims only ever
                # close): reuse it while they are unchanged.
                stamp = (cl.free[i], cl.free_cpu[i], cl.free_mem[i], count[i])
                seen = seen_on.get(i)
                if seen is not None and seen[0] == stamp:
                    ev = seen[1]
                else:
                    ev = self._evict_on(i, shape, level + 1, cl.pool_of[i] in whole_set)
                    seen_on[i] = (stamp, ev)
                if ev is None:
                    continue
                kept.append(i)
                rank = (len(ev.victims), ev.victim_gpus, i)
                if best is None or rank < best[0]:
                    best = (rank, ev)
                feasible += 1
                if feasible >= MAX_FEASIBLE_NODES:
                    seen_upto = q + 1
                    break
            alive[:seen_upto] = kept
            if best is not None:
                return best[1]
        return None

    def _evict_on(self, i: int, shape: Shape, priority: int, all_match: bool) -> Eviction | None:
        cl = self.cl
        g, cpus, mem = shape[0], shape[1], shape[2]
        allocs, is_open, prio_l = self.allocs, self.is_open, self.prio_l
        victims = [k for k in self.on_node.get(i, ()) if is_open[k] and prio_l[k] < priority]
        if not victims:
            return None
        info = cl.gpu_info[i]
        if all_match and len(victims) == 1:
            usable = {victims[0]: allocs[victims[0]].gpus}  # the common case: no comprehension
        elif all_match:
            usable = {k: allocs[k].gpus for k in victims}
        else:
            usable = {
                k: tuple(
                    x
                    for x in allocs[k].gpus
                    if x in info and gpu_matches(info[x][0], info[x][1], shape)
                )
                for k in victims
            }
        free_gpus = cl.matching_free(i, shape)
        # What the node would have free: GPUs, CPUs, memory.  Sums are formed
        # in the same order on every path so that float CPU totals compare the
        # same way wherever they are computed.
        have_g, have_c, have_m = len(free_gpus), cl.free_cpu[i], cl.free_mem[i]
        all_g, all_c, all_m = have_g, have_c, have_m
        for k in victims:
            a = allocs[k]
            all_g, all_c, all_m = all_g + len(usable[k]), all_c + a.cpus, all_m + a.mem_bytes
        if not (all_g >= g and all_c + EPS >= cpus and all_m >= mem):
            return None  # even evicting every candidate would not do
        if len(victims) > 1:
            victims.sort(key=self.order_key.__getitem__)
        chosen: list[int] = []
        for k in victims:
            if have_g >= g and have_c + EPS >= cpus and have_m >= mem:
                break
            chosen.append(k)
            a = allocs[k]
            have_g, have_c, have_m = have_g + len(usable[k]), have_c + a.cpus, have_m + a.mem_bytes
        # Greedy by priority can overshoot; drop whoever turns out unnecessary,
        # most valuable (highest priority, oldest) first.
        for k in reversed(list(chosen)) if len(chosen) > 1 else ():
            a = allocs[k]
            w_g, w_c, w_m = have_g - len(usable[k]), have_c - a.cpus, have_m - a.mem_bytes
            if len(chosen) > 1 and w_g >= g and w_c + EPS >= cpus and w_m >= mem:
                chosen.remove(k)
                have_g, have_c, have_m = w_g, w_c, w_m
        if len(chosen) == 1:  # the common case, without generators (same sums)
            k = chosen[0]
            a = allocs[k]
            pool = sorted({*free_gpus, *usable[k]})
            freed_cpu, freed_mem, victim_gpus = 0 + a.cpus, 0 + a.mem_bytes, len(a.gpus)
        else:
            pool = sorted({*free_gpus, *(x for k in chosen for x in usable[k])})
            freed_cpu = sum(allocs[k].cpus for k in chosen)
            freed_mem = sum(allocs[k].mem_bytes for k in chosen)
            victim_gpus = sum(len(allocs[k].gpus) for k in chosen)
        gpus = cl.pick_gpus(i, shape, pool, presorted=True)
        free_set = set(free_gpus)
        return Eviction(
            i,
            tuple(sorted(chosen)),
            gpus,
            tuple([x for x in gpus if x in free_set]),
            max(0.0, cpus - freed_cpu),
            max(0, mem - freed_mem),
            victim_gpus,
        )
