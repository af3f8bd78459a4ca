"""The scheduler's private, mutable working copy of one immutable view.

A pass only ever takes resources away from the free pool (placements, holds
for gangs and for tasks waiting on preemptions).  That monotonicity is what
lets the caller cache "this request shape fits nowhere" for the rest of the
pass.  The only exception is a gang's rollback, which returns exactly what the
same gang took a moment before.

Nodes with the same labels and the same GPU make-up share a *pool*; each pool
keeps one heap of node indices per free-GPU count, so best fit is "the first
non-empty bucket at or above the request", not a scan of every node.  Per
free count, one bit set says which pools have a node with that count: a
request's pools are a bit set too, and one AND per count finds the candidates.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING

import numpy as np

from .types import Allocation, NodeView, TaskRequest

if TYPE_CHECKING:
    from .explain import _Kind

EPS = 1e-9
# Up to this many nodes, whole-cluster questions are asked in plain Python:
# numpy's fixed cost per call is more than the work on a handful of nodes.
# The answers are the same either way.
SMALL_CLUSTER = 64

# (gpus, cpus, mem_bytes, gpu_type lower-cased or None, gpu_mem_min, constraints)
Shape = tuple[int, float, int, str | None, int, tuple[tuple[str, str], ...]]


def shape_of(t: TaskRequest) -> Shape:
    # Called once per pending task: keep it lean.  GPU model and memory only
    # matter to tasks that ask for GPUs.
    c = t.constraints
    cons = tuple(sorted(c.items())) if c else ()
    if t.gpus > 0:
        gt = t.gpu_type
        return (t.gpus, t.cpus, t.mem_bytes, gt.lower() if gt else None, t.gpu_mem_min, cons)
    return (0, t.cpus, t.mem_bytes, None, 0, cons)


def gpu_matches(model_lower: str, mem_bytes: int, shape: Shape) -> bool:
    gpu_type, mem_min = shape[3], shape[4]
    return (gpu_type is None or gpu_type in model_lower) and mem_bytes >= mem_min


def labels_ok(labels: Mapping[str, str], constraints: tuple[tuple[str, str], ...]) -> bool:
    return all(labels.get(k) == v for k, v in constraints)


@dataclass
class Pool:
    labels: Mapping[str, str]
    # GPU make-up shared by every node of the pool: (model lower, mem, count)
    makeup: tuple[tuple[str, int, int], ...]
    nodes: list[int] = field(default_factory=list)
    buckets: list[list[int]] = field(default_factory=list)  # free count -> heap
    # free count -> nodes with that count (Cluster.pools_at has a bit per
    # pool for the counts with at least one node).
    live: list[int] = field(default_factory=list)
    max_cpus: float = 0.0
    max_mem: int = 0


@dataclass
class Claim:
    """Resources held back on a node for someone who is not placed yet."""

    owner: str  # in words: "older gang job-x" / "task t, waiting on preemptions"
    gpus: tuple[int, ...]
    cpus: float
    mem_bytes: int


# What the scheduler needs to know of one GPU: (model lower-cased, memory, domain).
GpuFacts = tuple[str, int, int]


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one per distinct build
class _Build:
    """Facts shared by every node with the same GPUs (same indices, models,
    memory and domains): worked out once per distinct build, not per node."""

    info: Mapping[int, GpuFacts]  # GPU index -> facts
    indices: tuple[int, ...]  # sorted
    multi_domain: bool
    makeup: tuple[tuple[str, int, int], ...]  # (model lower, mem, count)


# One GPU as the scheduler sees it: (index, model, memory, domain).
GpuKey = tuple[int, str, int, int]


# Builds made by earlier passes, by their GPUs: a cluster has a few kinds of
# machine, and a pass every few seconds would work each out again. Bounded:
# cleared whole when a cluster of very many kinds fills it.
_BUILDS: dict[tuple[GpuKey, ...], _Build] = {}
_MAX_BUILDS = 1024


def _build_of(gpus: tuple[GpuKey, ...]) -> _Build:
    b = _BUILDS.get(gpus)
    if b is None:
        if len(_BUILDS) >= _MAX_BUILDS:
            _BUILDS.clear()
        b = _BUILDS[gpus] = _new_build(gpus)
    return b


def _new_build(gpus: tuple[GpuKey, ...]) -> _Build:
    info = {x: (model.lower(), mem, dom) for x, model, mem, dom in gpus}
    counts: dict[tuple[str, int], int] = {}
    for _, model, mem, _ in gpus:
        k = (model.lower(), mem)
        counts[k] = counts.get(k, 0) + 1
    return _Build(
        info=info,
        indices=tuple(sorted(info)),
        multi_domain=len({dom for *_, dom in gpus}) > 1,
        makeup=tuple(sorted((m, mem, c) for (m, mem), c in counts.items())),
    )


class _ByShape:
    """Per shape, what it may use in one layout of pools (Cluster)."""

    __slots__ = ("plain", "roomy", "shape_pools", "usable_sets", "whole_sets")

    def __init__(self) -> None:
        self.shape_pools: dict[Shape, tuple[list[int], list[int]]] = {}
        self.whole_sets: dict[Shape, frozenset[int]] = {}
        self.usable_sets: dict[Shape, frozenset[int]] = {}
        self.roomy: dict[Shape, int] = {}
        self.plain: dict[Shape, tuple[int, bool]] = {}  # (roomy pools as bits, any mixed)


# Kept from pass to pass, bounded (cleared whole when full): per layout of
# pools, the answers per shape; the GPUs picked per (build, free GPUs, count).
PoolLayout = tuple[
    tuple[tuple[tuple[str, str], ...], tuple[tuple[str, int, int], ...], float, int], ...
]
_BY_LAYOUT: dict[PoolLayout, _ByShape] = {}
_MAX_LAYOUTS = 16
_MAX_SHAPES = 1024
PickKey = tuple["_Build", tuple[int, ...], int]
_PICKS: dict[PickKey, tuple[int, ...]] = {}
_PICKS_LEFT: dict[PickKey, tuple[tuple[int, ...], tuple[int, ...]]] = {}
_MAX_PICKS = 4096


_indices = attrgetter("indices")
_makeup = attrgetter("makeup")
_NOTHING: frozenset[int] = frozenset()


@dataclass(eq=False)
class Frame:
    """What a Cluster takes from its nodes alone, whatever runs on them:
    worked out once per list of node views and kept for the passes after it
    (read only), as long as each node's view is the very same object (a
    NodeView is immutable; the leader keeps one per unchanged node record,
    leptond/views.py InputCache)."""

    nodes: list[NodeView]
    node_ids: list[str]
    cpus: list[float]
    mems: list[int]
    build: list[_Build]
    index_of: dict[str, int]
    gpu_info: list[Mapping[int, GpuFacts]]
    multi_domain: list[bool]
    free: list[tuple[int, ...]]  # every GPU, per node
    labels_key: list[tuple[tuple[str, str], ...]]
    unschedulable: list[int]
    pool_of: list[int]
    # Per pool: (labels, GPU make-up, its nodes, GPUs per node, largest CPUs, memory).
    pools: list[tuple[dict[str, str], tuple[tuple[str, int, int], ...], list[int], int, float, int]]
    layout: PoolLayout
    # For scheduler/explain.py, which asks the same of every pass over these
    # nodes: the kinds of node, and the reasons no waiting fixes, by (shape,
    # the GPU model as the request spells it).
    kinds: list[_Kind] | None = None
    static_reasons: dict[tuple[Shape, str | None], str | None] = field(default_factory=dict)
    # What shapes may use in these pools (_BY_LAYOUT's entry for `layout`).
    by_shape: _ByShape | None = None
    # For FairShare: the cluster's GPUs, CPUs and memory in use, by the
    # unschedulable nodes that hold work (those count too).
    totals: dict[tuple[int, ...], tuple[float, float, float]] = field(default_factory=dict)


# Frames of the last few lists of node views, by the ids of the views (a
# frame holds its views, so no other object can have one of those ids while
# it is kept). A leader and its followers' readers make a few lists at most.
_FRAMES: dict[tuple[int, ...], Frame] = {}
_MAX_FRAMES = 8


def _frame_of(nodes: Sequence[NodeView]) -> Frame:
    key = tuple(map(id, nodes))
    f = _FRAMES.get(key)
    if f is None:
        if len(_FRAMES) >= _MAX_FRAMES:
            _FRAMES.clear()
        f = _FRAMES[key] = _new_frame(list(nodes))
    return f


def _new_frame(nodes: list[NodeView]) -> Frame:
    n = len(nodes)
    # One trip over the nodes, reading attributes in line (an attrgetter
    # call costs about twice as much); C-level maps over what it read.
    node_ids: list[str] = []
    cpus: list[float] = []
    mems: list[int] = []
    node_labels: list[Mapping[str, str]] = []
    schedulable: list[bool] = []
    builds: dict[tuple[GpuKey, ...], _Build] = {}
    build: list[_Build] = []
    for nd in nodes:
        node_ids.append(nd.node_id)
        cpus.append(nd.cpus)
        mems.append(nd.mem_bytes)
        node_labels.append(nd.labels)
        schedulable.append(nd.schedulable)
        # Clusters are made of a few kinds of machine: facts per GPU are
        # worked out once per kind and shared by its nodes (read-only).
        key = tuple([(g.index, g.model, g.mem_bytes, g.domain) for g in nd.gpus])
        b = builds.get(key)
        if b is None:
            b = builds[key] = _build_of(key)
        build.append(b)
    # Labels as sorted items; nodes share few distinct label sets.
    sorted_labels: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
    labels_key: list[tuple[tuple[str, str], ...]] = []
    for labels in node_labels:
        items = tuple(labels.items())
        lkey = sorted_labels.get(items)
        if lkey is None:
            lkey = sorted_labels[items] = tuple(sorted(items))
        labels_key.append(lkey)
    # Pools: schedulable nodes grouped by (labels, GPU make-up), numbered
    # in the order of their first node.
    PoolKey = tuple[tuple[tuple[str, str], ...], tuple[tuple[str, int, int], ...]]
    members: dict[PoolKey, list[int]] = {}
    pool_keys: list[PoolKey] = list(zip(labels_key, map(_makeup, build), strict=True))
    unschedulable: list[int] = []  # nodes in no pool: draining or down
    for i in range(n):
        if schedulable[i]:
            m = members.get(pool_keys[i])
            if m is None:
                members[pool_keys[i]] = [i]
            else:
                m.append(i)
        else:
            unschedulable.append(i)
    pool_of = [-1] * n
    pools = []
    for pid, ((_, makeup), idx) in enumerate(members.items()):
        for i in idx:
            pool_of[i] = pid
        pools.append(
            (
                dict(nodes[idx[0]].labels),
                makeup,
                idx,
                sum(c for _, _, c in makeup),
                max(0.0, max(map(cpus.__getitem__, idx))),
                max(0, max(map(mems.__getitem__, idx))),
            )
        )
    # What a shape may use depends only on the pools' labels, make-up and
    # largest node.
    layout = tuple([(k[0], k[1], p[4], p[5]) for k, p in zip(members, pools, strict=True)])
    return Frame(
        nodes=nodes,
        node_ids=node_ids,
        cpus=cpus,
        mems=mems,
        build=build,
        index_of=dict(zip(node_ids, range(n), strict=True)),
        gpu_info=[b.info for b in build],
        multi_domain=[b.multi_domain for b in build],
        free=list(map(_indices, build)),
        labels_key=labels_key,
        unschedulable=unschedulable,
        pool_of=pool_of,
        pools=pools,
        layout=layout,
    )


class Cluster:
    def __init__(self, nodes: Sequence[NodeView], allocations: Sequence[Allocation]) -> None:
        # The nodes' part, shared with earlier passes over the same views
        # (read only: a pass changes only what is free and the pools' buckets).
        frame = self.frame = _frame_of(nodes)
        self.nodes = frame.nodes
        n = len(self.nodes)
        self.build = frame.build
        self.node_ids = frame.node_ids
        cpus, mems = frame.cpus, frame.mems
        self.node_cpus, self.node_mem = cpus, mems  # as the view has them
        self.index_of = frame.index_of
        self.gpu_info = frame.gpu_info
        self.multi_domain = frame.multi_domain
        self.labels_key = frame.labels_key
        self.unschedulable = frame.unschedulable
        self.pool_of = frame.pool_of
        self.free_cpu = list(map(float, cpus))
        self.free_mem: list[int] = list(mems)
        # Free GPU indices per node, sorted; tuples, replaced whole on change
        # (a pick is remembered by them, and evictions are stamped with them).
        self.free: list[tuple[int, ...]] = list(frame.free)
        used: dict[int, set[int]] = {}
        self.allocs_on: list[list[Allocation]] = [[] for _ in range(n)]
        for a in allocations:
            i = self.index_of.get(a.node_id)
            if i is None:
                continue  # a task on a node the view no longer has holds nothing here
            used.setdefault(i, set()).update(a.gpus)
            self.free_cpu[i] -= a.cpus
            self.free_mem[i] -= a.mem_bytes
            self.allocs_on[i].append(a)
        for i, gone in used.items():
            self.free[i] = tuple([g for g in self.free[i] if g not in gone])
        # Free GPU count per node: a list for the per-task hot path (numpy
        # scalar access is slow) and, on a large cluster only, an array for
        # whole-cluster questions, which a few nodes answer in plain Python.
        self.nfree_l = list(map(len, self.free))
        self._nfree = np.array(self.nfree_l, dtype=np.int64) if n > SMALL_CLUSTER else None
        self.claims: dict[int, list[Claim]] = {}
        self.pools: list[Pool] = []
        nfree_l = self.nfree_l
        for labels, makeup, idx, total, max_cpus, max_mem in frame.pools:
            buckets: list[list[int]] = [[] for _ in range(total + 1)]
            for i in idx:
                buckets[nfree_l[i]].append(i)  # appended in index order: a heap
            self.pools.append(
                Pool(
                    labels,
                    makeup,
                    nodes=idx,
                    buckets=buckets,
                    live=list(map(len, buckets)),
                    max_cpus=max_cpus,
                    max_mem=max_mem,
                )
            )
        # Free count f -> bit set of the pools with a node that has f free:
        # best fit asks "which of my pools have a node with f free?" for
        # f = g, g+1, ... with one AND each.
        self.pools_at: list[int] = [0] * (1 + max((len(p.live) - 1 for p in self.pools), default=0))
        for pid, p in enumerate(self.pools):
            for f, k in enumerate(p.live):
                if k:
                    self.pools_at[f] |= 1 << pid
        # What a shape may use depends only on the pools' labels, make-up and
        # largest node: answers kept from earlier passes over pools like
        # these (read only, as the answers of this pass are).
        # The frame keeps the answers it was given (hashing the layout is
        # much of a small pass's set-up).
        by_shape = frame.by_shape
        if by_shape is None or len(by_shape.shape_pools) > _MAX_SHAPES:
            layout = frame.layout
            by_shape = _BY_LAYOUT.get(layout)
            if by_shape is None or len(by_shape.shape_pools) > _MAX_SHAPES:
                if len(_BY_LAYOUT) >= _MAX_LAYOUTS:
                    _BY_LAYOUT.clear()
                by_shape = _BY_LAYOUT[layout] = _ByShape()
            frame.by_shape = by_shape
        self._shape_pools = by_shape.shape_pools
        self._whole_sets = by_shape.whole_sets
        self._usable_sets = by_shape.usable_sets
        self._roomy = by_shape.roomy
        self._plain = by_shape.plain
        self._block_holders: dict[str, list[int]] | None = None
        self._pool_arrays: dict[int, np.ndarray] = {}
        # GPUs picked on a node, by its build, its free GPUs and the count:
        # the same on every pass (_Build objects are kept, _build_of).
        if len(_PICKS) > _MAX_PICKS:
            _PICKS.clear()
            _PICKS_LEFT.clear()
        self._picks = _PICKS
        # The same key -> (GPUs picked, GPUs left free), for fit_and_take.
        self._picks_left = _PICKS_LEFT

    @property
    def nfree(self) -> np.ndarray:
        """Free GPUs per node as an array: kept current on a large cluster,
        made when asked on a small one."""
        if self._nfree is None:
            return np.array(self.nfree_l, dtype=np.int64)
        return self._nfree

    # -- matching ---------------------------------------------------------

    def shape_pools(self, shape: Shape) -> tuple[list[int], list[int]]:
        """(pools where every GPU matches, pools where only some do) for a shape."""
        hit = self._shape_pools.get(shape)
        if hit is not None:
            return hit
        whole: list[int] = []
        mixed: list[int] = []
        for pid, p in enumerate(self.pools):
            if not labels_ok(p.labels, shape[5]):
                continue
            if shape[0] == 0:
                whole.append(pid)
                continue
            ok = [gpu_matches(m, mem, shape) for m, mem, _ in p.makeup]
            n_ok = sum(c for (_, _, c), y in zip(p.makeup, ok, strict=True) if y)
            if n_ok < shape[0]:
                continue  # no node of this pool could ever host it
            (whole if all(ok) else mixed).append(pid)
        self._shape_pools[shape] = (whole, mixed)
        return whole, mixed

    def pool_nodes(self, pid: int) -> np.ndarray:
        """A pool's node indices as an array (a pool's members never change)."""
        arr = self._pool_arrays.get(pid)
        if arr is None:
            arr = self._pool_arrays[pid] = np.asarray(self.pools[pid].nodes, dtype=np.int64)
        return arr

    def whole_pools(self, shape: Shape) -> frozenset[int]:
        hit = self._whole_sets.get(shape)
        if hit is None:
            hit = self._whole_sets[shape] = frozenset(self.shape_pools(shape)[0])
        return hit

    def usable_pools(self, shape: Shape) -> frozenset[int]:
        """Pools where at least some nodes' GPUs match (whole or mixed)."""
        hit = self._usable_sets.get(shape)
        if hit is None:
            whole, mixed = self.shape_pools(shape)
            hit = self._usable_sets[shape] = frozenset((*whole, *mixed))
        return hit

    def matching_free(self, i: int, shape: Shape) -> list[int]:
        if shape[0] == 0:
            return []
        if self.pool_of[i] in self.whole_pools(shape):
            return list(self.free[i])
        info = self.gpu_info[i]
        return [g for g in self.free[i] if gpu_matches(info[g][0], info[g][1], shape)]

    def fits_cpu_mem(self, i: int, shape: Shape) -> bool:
        return self.free_cpu[i] + EPS >= shape[1] and self.free_mem[i] >= shape[2]

    def block_hits(self, blocks: frozenset[str]) -> dict[int, int]:
        if self._block_holders is None:
            holders: dict[str, list[int]] = {}
            for i, nd in enumerate(self.nodes):
                for b in nd.cached_blocks:
                    holders.setdefault(b, []).append(i)
            self._block_holders = holders
        hits: dict[int, int] = {}
        for b in blocks:
            for i in self._block_holders.get(b, ()):
                hits[i] = hits.get(i, 0) + 1
        return hits

    # -- bookkeeping --------------------------------------------------------

    def _rebucket(self, i: int) -> None:
        f = len(self.free[i])
        old = self.nfree_l[i]
        if f == old:
            return
        self.nfree_l[i] = f
        if self._nfree is not None:
            self._nfree[i] = f
        pid = self.pool_of[i]
        if pid >= 0:
            pool = self.pools[pid]
            pool.live[old] -= 1
            if not pool.live[old]:
                self.pools_at[old] &= ~(1 << pid)
            pool.live[f] += 1
            self.pools_at[f] |= 1 << pid
            heapq.heappush(pool.buckets[f], i)

    def take(self, i: int, gpus: Sequence[int], cpus: float, mem: int) -> None:
        if gpus:
            gone = set(gpus)
            self.free[i] = tuple([g for g in self.free[i] if g not in gone])
        self.free_cpu[i] -= cpus
        self.free_mem[i] -= mem
        if gpus:
            self._rebucket(i)

    def give(self, i: int, gpus: Sequence[int], cpus: float, mem: int) -> None:
        if gpus:
            self.free[i] = tuple(sorted([*self.free[i], *gpus]))
        self.free_cpu[i] += cpus
        self.free_mem[i] += mem
        if gpus:
            self._rebucket(i)

    def hold(self, i: int, claim: Claim) -> None:
        self.take(i, claim.gpus, claim.cpus, claim.mem_bytes)
        self.claims.setdefault(i, []).append(claim)

    # -- choosing a node ------------------------------------------------------

    def _bucket_first(
        self, heap: list[int], f: int, shape: Shape, exclude: frozenset[int] | set[int]
    ) -> int | None:
        """Lowest-index live node of a bucket that fits cpu/mem and is not excluded.

        Entries are lazy: a node is pushed again whenever its free count changes,
        and an entry whose node no longer has `f` free GPUs is dropped on sight.
        """
        skipped: list[int] = []
        found = None
        nfree = self.nfree_l
        while heap:
            i = heap[0]
            if nfree[i] != f:
                heapq.heappop(heap)
                continue
            if i in exclude or not self.fits_cpu_mem(i, shape):
                skipped.append(heapq.heappop(heap))
                continue
            found = i
            break
        for i in skipped:
            heapq.heappush(heap, i)
        return found

    def _roomy_bits(self, shape: Shape) -> int:
        """Whole pools whose largest node has the shape's CPUs and memory at
        all, as a bit set of pool ids."""
        bits = self._roomy.get(shape)
        if bits is None:
            bits = self._roomy[shape] = sum(
                1 << pid
                for pid in self.shape_pools(shape)[0]
                if self.pools[pid].max_cpus + EPS >= shape[1]
                and self.pools[pid].max_mem >= shape[2]
            )
        return bits

    def find_node(
        self,
        shape: Shape,
        exclude: frozenset[int] | set[int] = frozenset(),
        spread: bool = False,
        blocks: frozenset[str] = frozenset(),
    ) -> int | None:
        """Best node for one task, or None.

        Bin-packing takes the node left with the fewest free GPUs (whole nodes
        stay whole for the big requests); `spread` takes the least-loaded one.
        Among nodes equally good by that measure, more cached blocks win, then
        the lower index (input order), so the choice is deterministic.
        """
        g, cpus, mem = shape[0], shape[1], shape[2]
        whole, mixed = self.shape_pools(shape)
        nfree, free_cpu, free_mem = self.nfree_l, self.free_cpu, self.free_mem
        # (free count, node) of the best candidate so far; spread negates the count.
        best: tuple[int, int] | None = None
        # Whole pools: free counts in order of preference (fewest first, or
        # most first for spread); the first count that any of the shape's
        # pools has with a node that fits wins, lowest node index first.
        roomy = self._roomy_bits(shape)
        pools, pools_at = self.pools, self.pools_at
        counts = range(len(pools_at) - 1, g - 1, -1) if spread else range(g, len(pools_at))
        for f in counts:
            have = pools_at[f] & roomy
            found = -1
            while have:
                low = have & -have
                have ^= low
                heap = pools[low.bit_length() - 1].buckets[f]
                first: int | None = heap[0] if heap else None
                # Fast path: the top entry is live, fits and is not excluded.
                if first is None or not (
                    nfree[first] == f
                    and first not in exclude
                    and free_cpu[first] + EPS >= cpus
                    and free_mem[first] >= mem
                ):
                    first = self._bucket_first(heap, f, shape, exclude)
                if first is not None and (found < 0 or first < found):
                    found = first
            if found >= 0:
                best = (-f if spread else f, found)
                break
        # Mixed pools (only some GPU models match) are rare; scan them directly.
        extra: dict[int, list[int]] = {}
        for pid in mixed:
            for i in self.pools[pid].nodes:
                if i in exclude or not self.fits_cpu_mem(i, shape):
                    continue
                if len(self.matching_free(i, shape)) >= g:
                    f = nfree[i]
                    extra.setdefault(f, []).append(i)
                    key = (-f if spread else f, i)
                    if best is None or key < best:
                        best = key
        if best is None:
            return None
        if blocks:
            hits = self.block_hits(blocks)
            if hits:
                f = -best[0] if spread else best[0]
                return self._cache_tiebreak(best[1], f, shape, exclude, hits, whole, extra)
        return best[1]

    def fit_and_take(
        self,
        shape: Shape,
        cpus: float,
        mem: int,
        exclude: frozenset[int] | set[int] = _NOTHING,
    ) -> tuple[int, tuple[int, ...]] | None:
        """`find_node(shape, exclude)` (best fit, no spread, no cached blocks
        to prefer), then `pick_gpus` and `take` on the node found: the same
        choice, in one call.  This is the path of almost every placement, so
        it reads the shape's pools once and does the rest inline."""
        plain = self._plain.get(shape)
        if plain is None:
            plain = self._plain[shape] = (
                self._roomy_bits(shape),
                bool(self.shape_pools(shape)[1]),
            )
        roomy, has_mixed = plain
        g = shape[0]
        if has_mixed:
            found = self.find_node(shape, exclude)
            if found is None:
                return None
            i = found
        else:
            nfree, free_cpu, free_mem = self.nfree_l, self.free_cpu, self.free_mem
            need_cpus, need_mem = shape[1], shape[2]
            pools, pools_at = self.pools, self.pools_at
            # The lowest free count at or above g that one of the shape's
            # pools has, then the lowest node index among those pools; the
            # next count up only when no node there fits CPUs and memory.
            best_i = -1
            best_heap: list[int] = []
            for f in range(g, len(pools_at)):
                have = pools_at[f] & roomy
                while have:
                    low = have & -have
                    have ^= low
                    heap = pools[low.bit_length() - 1].buckets[f]
                    first: int | None = heap[0] if heap else None
                    if first is None or not (
                        nfree[first] == f
                        and free_cpu[first] + EPS >= need_cpus
                        and free_mem[first] >= need_mem
                        and first not in exclude
                    ):
                        first = self._bucket_first(heap, f, shape, exclude)
                    if first is not None and (best_i < 0 or first < best_i):
                        best_i, best_heap = first, heap
                if best_i >= 0:
                    break
            if best_i < 0:
                return None
            i = best_i
            if g and best_heap[0] == i:
                # Its entry there is about to go stale: drop it now rather
                # than have the next search pop it.
                heapq.heappop(best_heap)
        gpus: tuple[int, ...] = ()
        if g:
            free = self.free[i]  # sorted; every GPU matches on a node of a whole pool
            whole = not has_mixed or self.pool_of[i] in self.whole_pools(shape)
            if whole and (not self.multi_domain[i] or len(free) == g):
                # pick_gpus takes the lowest g here: what is left is the rest.
                gpus = free[:g]
                self.free[i] = free[g:]
            elif whole:
                # pick_gpus by domain, remembered with what it leaves free.
                key = (self.build[i], free, g)
                hit = self._picks_left.get(key)
                if hit is None:
                    gpus = self.pick_gpus(i, shape)
                    hit = self._picks_left[key] = (gpus, tuple(x for x in free if x not in gpus))
                gpus, self.free[i] = hit
            else:
                gpus = self.pick_gpus(i, shape)
                gone = set(gpus)
                self.free[i] = tuple([x for x in free if x not in gone])
            # _rebucket, inline (the count went down by g).
            old, f = self.nfree_l[i], len(self.free[i])
            self.nfree_l[i] = f
            if self._nfree is not None:
                self._nfree[i] = f
            pid = self.pool_of[i]
            if pid >= 0:
                pool = self.pools[pid]
                live = pool.live
                live[old] -= 1
                if not live[old]:
                    self.pools_at[old] &= ~(1 << pid)
                live[f] += 1
                self.pools_at[f] |= 1 << pid
                heapq.heappush(pool.buckets[f], i)
        self.free_cpu[i] -= cpus
        self.free_mem[i] -= mem
        return i, gpus

    def _cache_tiebreak(
        self,
        best: int,
        f: int,
        shape: Shape,
        exclude: frozenset[int] | set[int],
        hits: dict[int, int],
        whole: list[int],
        extra: dict[int, list[int]],
    ) -> int:
        whole_set = set(whole)
        in_extra = set(extra.get(f, ()))
        key = (-hits.get(best, 0), best)
        for i, h in hits.items():
            if self.nfree_l[i] != f or i in exclude or not self.fits_cpu_mem(i, shape):
                continue
            if self.pool_of[i] not in whole_set and i not in in_extra:
                continue
            if (-h, i) < key:
                key = (-h, i)
        return key[1]

    def pick_gpus(
        self,
        i: int,
        shape: Shape,
        candidates: list[int] | None = None,
        presorted: bool = False,
    ) -> tuple[int, ...]:
        """Concrete GPUs on node i: the smallest NVLink/NUMA domain that holds
        them all (keeps bigger domains whole), then the lowest indices.
        `candidates` defaults to the node's matching free GPUs; `presorted`
        says they come sorted already."""
        g = shape[0]
        if g == 0:
            return ()
        if candidates is None:
            cands = self.matching_free(i, shape)
        else:
            cands = candidates if presorted else sorted(candidates)
        if not self.multi_domain[i] or len(cands) == g:
            return tuple(cands[:g])
        # The choice depends on the node's build, the candidates and the count
        # only, and a pass sees few distinct combinations: remember them.
        key = (self.build[i], tuple(cands), g)
        hit = self._picks.get(key)
        if hit is None:
            hit = self._picks[key] = _by_domain(self.gpu_info[i], cands, g)
        return hit


def _by_domain(info: Mapping[int, GpuFacts], cands: list[int], g: int) -> tuple[int, ...]:
    by_domain: dict[int, list[int]] = {}
    for x in cands:
        by_domain.setdefault(info[x][2], []).append(x)
    best: tuple[tuple[int, bool, int], list[int]] | None = None
    for d, xs in by_domain.items():
        if len(xs) >= g:
            key = (len(xs), d == -1, xs[0])
            if best is None or key < best[0]:
                best = (key, xs)
    return tuple(best[1][:g]) if best else tuple(cands[:g])
