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
from dataclasses import dataclass

import numpy as np

from .cluster import EPS, Cluster, Shape, gpu_matches
from .types import Allocation, Policy

# Stop examining candidate nodes once this many workable ones were found; the
# first feasible node is enough for correctness, a few more buy a better choice.
MAX_FEASIBLE_NODES = 4


@dataclass(frozen=True)
class Eviction:
    node: int
    victims: tuple[int, ...]  # indices into Preemptor.allocs
    gpus: tuple[int, ...]  # the GPUs the preemptor will get
    extra_gpus: tuple[int, ...]  # of those, the ones that are free today
    extra_cpus: float  # free CPUs/memory it needs besides the victims'
    extra_mem: int


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
        self.allocs = [a for a in allocations if a.node_id in cl.index_of]
        self.node = np.array([cl.index_of[a.node_id] for a in self.allocs], dtype=np.int64)
        self.ngpus = np.array([len(a.gpus) for a in self.allocs], dtype=np.float64)
        self.prio = np.array([a.priority for a in self.allocs], dtype=np.int64)
        self.open = np.array([a.preemptible or a.user not in safe for a in self.allocs], dtype=bool)
        self.is_open = self.open.tolist()
        self.prio_l = [a.priority for a in self.allocs]
        # Eviction order: lowest priority first, then the most recently started.
        self.order_key = [(a.priority, -a.started_at, a.task_id) for a in self.allocs]
        self.on_node: dict[int, list[int]] = {}
        for k, a in enumerate(self.allocs):
            self.on_node.setdefault(cl.index_of[a.node_id], []).append(k)
        # Per victim priority level L (ascending), over the open allocations
        # with priority <= L: per node, how many there are and how many GPUs
        # they hold.  Kept current by take(), so find() does not rebuild them.
        n = len(cl.nodes)
        self.levels: list[int] = sorted(set(self.prio_l))
        self.open_at: dict[int, int] = {}  # priority -> open allocations at it
        self.count_upto: list[np.ndarray] = []
        self.gpus_upto: list[np.ndarray] = []
        for level in self.levels:
            mask = self.open & (self.prio <= level)
            self.open_at[level] = int((self.open & (self.prio == level)).sum())
            self.count_upto.append(np.bincount(self.node[mask], minlength=n))
            self.gpus_upto.append(
                np.bincount(self.node[mask], weights=self.ngpus[mask], minlength=n)
            )
        self._shape_nodes: dict[Shape, np.ndarray] = {}

    def take(self, ev: Eviction) -> None:
        for k in ev.victims:
            self.open[k] = False
            self.is_open[k] = False
            p = self.prio_l[k]
            self.open_at[p] -= 1
            i = int(self.node[k])
            for j, level in enumerate(self.levels):
                if level >= p:
                    self.count_upto[j][i] -= 1
                    self.gpus_upto[j][i] -= self.ngpus[k]

    def _nodes_for(self, shape: Shape) -> np.ndarray:
        """Node mask: nodes whose pool could ever host the shape."""
        hit = self._shape_nodes.get(shape)
        if hit is None:
            cl = self.cl
            whole, mixed = cl.shape_pools(shape)
            ok = np.zeros(len(cl.nodes), dtype=bool)
            for pid in (*whole, *mixed):
                ok[cl.pools[pid].nodes] = True
            hit = self._shape_nodes[shape] = ok
        return hit

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
        whole, mixed = cl.shape_pools(shape)
        if not whole and not mixed:
            return None
        whole_set = set(whole)
        hosts = self._nodes_for(shape)
        for j, level in levels:
            # Upper bound on GPUs each node could offer: free plus every candidate's.
            cand = np.flatnonzero(
                hosts & (self.count_upto[j] > 0) & (self.gpus_upto[j] + cl.nfree >= shape[0])
            )
            best: tuple[tuple[int, int, int], Eviction] | None = None
            feasible = 0
            for i in cand.tolist():
                ev = self._evict_on(i, shape, level + 1, cl.pool_of[i] in whole_set)
                if ev is None:
                    continue
                vs = [self.allocs[k] for k in ev.victims]
                key = (len(vs), sum(len(a.gpus) for a in vs), i)
                if best is None or key < best[0]:
                    best = (key, ev)
                feasible += 1
                if feasible >= MAX_FEASIBLE_NODES:
                    break
            if best is not None:
                return best[1]
        return None

    def _evict_on(self, i: int, shape: Shape, priority: int, all_match: bool) -> Eviction | None:
        cl = self.cl
        g, cpus, mem = shape[0], shape[1], shape[2]
        allocs = self.allocs
        victims = [
            k for k in self.on_node.get(i, ()) if self.is_open[k] and self.prio_l[k] < priority
        ]
        if not victims:
            return None
        info = cl.gpu_info[i]
        if all_match:
            usable = {k: allocs[k].gpus for k in victims}
        else:
            usable = {
                k: tuple(
                    x
                    for x in allocs[k].gpus
                    if x in info and gpu_matches(info[x].model.lower(), info[x].mem_bytes, shape)
                )
                for k in victims
            }
        free_gpus = cl.matching_free(i, shape)
        have = [len(free_gpus), cl.free_cpu[i], cl.free_mem[i]]

        def ok(h: list[float]) -> bool:
            return h[0] >= g and h[1] + EPS >= cpus and h[2] >= mem

        def add(h: list[float], k: int, sign: int) -> list[float]:
            a = allocs[k]
            return [h[0] + sign * len(usable[k]), h[1] + sign * a.cpus, h[2] + sign * a.mem_bytes]

        everything = have
        for k in victims:
            everything = add(everything, k, 1)
        if not ok(everything):
            return None  # even evicting every candidate would not do
        victims.sort(key=self.order_key.__getitem__)
        chosen: list[int] = []
        for k in victims:
            if ok(have):
                break
            chosen.append(k)
            have = add(have, k, 1)
        # Greedy by priority can overshoot; drop whoever turns out unnecessary,
        # most valuable (highest priority, oldest) first.
        for k in reversed(list(chosen)):
            without = add(have, k, -1)
            if len(chosen) > 1 and ok(without):
                chosen.remove(k)
                have = without
        pool = sorted({*free_gpus, *(x for k in chosen for x in usable[k])})
        gpus = cl.pick_gpus(i, shape, pool)
        free_set = set(free_gpus)
        freed_cpu = sum(allocs[k].cpus for k in chosen)
        freed_mem = sum(allocs[k].mem_bytes for k in chosen)
        return Eviction(
            node=i,
            victims=tuple(sorted(chosen)),
            gpus=gpus,
            extra_gpus=tuple(x for x in gpus if x in free_set),
            extra_cpus=max(0.0, cpus - freed_cpu),
            extra_mem=max(0, mem - freed_mem),
        )
