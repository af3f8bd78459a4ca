"""The cluster's one-call best fit (`fit_and_take`) makes the same choice as
the general search (`find_node`, then `pick_gpus`, then `take`) and leaves the
same state behind, on clusters that mix GPU models within a node."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import Allocation, Gpu, NodeView, TaskRequest
from scheduler.cluster import Cluster, shape_of
from tests.test_scheduler_support import GIB, alloc, task

MODELS = [
    ("NVIDIA H100 80GB HBM3", 80 * GIB),
    ("NVIDIA A100-SXM4-40GB", 40 * GIB),
    ("NVIDIA L40S", 48 * GIB),
]


@st.composite
def views(draw: st.DrawFn, alike: bool = False) -> tuple[list[NodeView], list[Allocation]]:
    """A few nodes of random make-up, or (`alike`) more nodes of one kind,
    so that several share a pool and a free count."""
    nodes: list[NodeView] = []
    allocs: list[Allocation] = []
    for i in range(draw(st.integers(1, 12 if alike else 8))):
        n_gpus = 8 if alike else draw(st.sampled_from([0, 2, 4, 8]))
        mixed = not alike and draw(st.booleans()) and draw(st.booleans())
        first = MODELS[0] if alike else draw(st.sampled_from(MODELS))
        one_domain = draw(st.booleans())  # else NVLink/NUMA domains per GPU
        gpus = tuple(
            Gpu(
                k,
                f"GPU-{i}-{k}",
                *(draw(st.sampled_from(MODELS)) if mixed else first),
                domain=-1 if one_domain else draw(st.sampled_from([-1, 0, 1])),
            )
            for k in range(n_gpus)
        )
        cpus = float(draw(st.integers(4, 64)))
        mem = draw(st.integers(8, 256)) * GIB
        nd = NodeView(
            f"h{i}",
            f"h{i}",
            cpus,
            mem,
            gpus,
            labels={"zone": "a" if alike else draw(st.sampled_from("ab"))},
            schedulable=alike or draw(st.booleans()) or draw(st.booleans()),
        )
        nodes.append(nd)
        busy = draw(st.lists(st.integers(0, max(n_gpus - 1, 0)), unique=True, max_size=n_gpus))
        if busy and n_gpus:
            allocs.append(alloc(f"a{i}", nd.node_id, sorted(busy), cpus=cpus / 4, mem=mem // 4))
    return nodes, allocs


requests = st.builds(
    lambda k, gpus, gpu_type, mem_min, zone, cpus, mem: task(
        f"t{k}",
        gpus=gpus,
        gpu_type=gpu_type,
        gpu_mem_min=mem_min,
        constraints={"zone": zone} if zone else {},
        cpus=float(cpus),
        mem_bytes=mem * GIB,
    ),
    st.integers(0, 10**6),
    st.sampled_from([0, 1, 1, 2, 3, 4, 8]),
    st.sampled_from([None, None, "h100", "A100", "l40s", "V100"]),
    st.sampled_from([0, 0, 45 * GIB]),
    st.sampled_from([None, None, "a", "b"]),
    st.integers(0, 24),
    st.integers(0, 96),
)


@settings(max_examples=150, deadline=None)
@given(views(), st.lists(st.tuples(requests, st.booleans()), max_size=25))
def test_fit_and_take_matches_find_pick_take(
    view: tuple[list[NodeView], list[Allocation]], reqs: list[tuple[TaskRequest, bool]]
) -> None:
    nodes, allocs = view
    fast, slow = Cluster(nodes, allocs), Cluster(nodes, allocs)
    for t, give_back in reqs:
        shape = shape_of(t)
        got = fast.fit_and_take(shape, t.cpus, t.mem_bytes)
        i = slow.find_node(shape)
        if i is None:
            assert got is None
        else:
            gpus = slow.pick_gpus(i, shape)
            slow.take(i, gpus, t.cpus, t.mem_bytes)
            assert got == (i, gpus)
            if give_back:  # as a gang's rollback does
                fast.give(i, gpus, t.cpus, t.mem_bytes)
                slow.give(i, gpus, t.cpus, t.mem_bytes)
        assert fast.free == slow.free
        assert fast.nfree_l == slow.nfree_l
        assert fast.free_cpu == slow.free_cpu
        assert fast.free_mem == slow.free_mem


def brute_best(
    cl: Cluster, nodes: list[NodeView], t: TaskRequest, exclude: set[int], spread: bool
) -> int | None:
    """Best fit (or spread) by scanning every node: the fewest (most) free
    GPUs among the nodes that can host the task, then the lowest index."""
    shape = shape_of(t)
    best: tuple[int, int] | None = None
    for i, nd in enumerate(nodes):
        if not nd.schedulable or i in exclude:
            continue
        if any(nd.labels.get(k) != v for k, v in t.constraints.items()):
            continue
        if cl.free_cpu[i] + 1e-9 < t.cpus or cl.free_mem[i] < t.mem_bytes:
            continue
        by_index = {g.index: g for g in nd.gpus}
        matching = [
            x
            for x in cl.free[i]
            if (t.gpu_type is None or t.gpu_type.lower() in by_index[x].model.lower())
            and by_index[x].mem_bytes >= t.gpu_mem_min
        ]
        if len(matching) < shape[0]:
            continue
        key = (-len(cl.free[i]) if spread else len(cl.free[i]), i)
        if best is None or key < best:
            best = key
    return None if best is None else best[1]


def assert_buckets_consistent(cl: Cluster) -> None:
    """Per pool and free count: the live count, the pools' bit set and the
    heap entries agree with the nodes' free GPUs."""
    for pid, pool in enumerate(cl.pools):
        for f, live in enumerate(pool.live):
            members = [i for i in pool.nodes if len(cl.free[i]) == f]
            assert live == len(members)
            assert bool(cl.pools_at[f] >> pid & 1) == bool(members)
            assert set(members) <= set(pool.buckets[f])
    assert cl.nfree_l == [len(f) for f in cl.free]
    assert cl.nfree.tolist() == cl.nfree_l


@settings(max_examples=200, deadline=None)
@given(
    st.booleans().flatmap(lambda alike: views(alike)),
    st.lists(
        st.tuples(requests, st.booleans(), st.booleans(), st.sets(st.integers(0, 7), max_size=3)),
        max_size=25,
    ),
)
def test_node_choice_matches_a_scan_of_every_node(
    view: tuple[list[NodeView], list[Allocation]],
    reqs: list[tuple[TaskRequest, bool, bool, set[int]]],
) -> None:
    """find_node and fit_and_take (with nodes excluded, as for a gang's
    later tasks) choose what a scan of every node chooses, and the per-count
    structures stay consistent through takes and gang-style give-backs."""
    nodes, allocs = view
    cl = Cluster(nodes, allocs)
    assert_buckets_consistent(cl)
    for t, spread, give_back, exclude in reqs:
        shape = shape_of(t)
        assert cl.find_node(shape, exclude, spread=spread) == brute_best(
            cl, nodes, t, exclude, spread
        )
        want = brute_best(cl, nodes, t, exclude, spread=False)
        got = cl.fit_and_take(shape, t.cpus, t.mem_bytes, exclude)
        assert (None if got is None else got[0]) == want
        if got is not None and give_back:
            cl.give(got[0], got[1], t.cpus, t.mem_bytes)
        assert_buckets_consistent(cl)


def test_a_pass_uses_what_earlier_passes_learnt_only_of_the_same_pools() -> None:
    # What a shape may use is kept from pass to pass per layout of pools;
    # two layouts that differ only in their largest node's CPUs or memory
    # must not share it: a task that fits nowhere on the small node fits on
    # the big one, and the other way round, in either order.
    def nodes(cpus: float, mem: int) -> list[NodeView]:
        gpus = tuple(Gpu(k, f"GPU-{k}", *MODELS[0]) for k in range(8))
        return [NodeView("h0", "h0", cpus, mem, gpus, labels={"zone": "a"})]

    big_cpu = task("t", gpus=1, cpus=32.0, mem_bytes=8 * GIB)
    big_mem = task("u", gpus=1, cpus=1.0, mem_bytes=128 * GIB)
    for first, then in [
        ((16.0, 64 * GIB), (64.0, 256 * GIB)),
        ((64.0, 256 * GIB), (16.0, 64 * GIB)),
    ]:
        for cpus, mem in (first, then, first):
            fits = cpus >= 32.0
            for t in (big_cpu, big_mem):
                cl = Cluster(nodes(cpus, mem), [])
                got = cl.fit_and_take(shape_of(t), t.cpus, t.mem_bytes)
                assert (got is not None) == fits, (cpus, mem, t.task_id)
