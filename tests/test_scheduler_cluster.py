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
def views(draw: st.DrawFn) -> tuple[list[NodeView], list[Allocation]]:
    nodes: list[NodeView] = []
    allocs: list[Allocation] = []
    for i in range(draw(st.integers(1, 8))):
        n_gpus = draw(st.sampled_from([0, 2, 4, 8]))
        mixed = draw(st.booleans()) and draw(st.booleans())
        first = draw(st.sampled_from(MODELS))
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
            labels={"zone": draw(st.sampled_from("ab"))},
            schedulable=draw(st.booleans()) or draw(st.booleans()),
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
