"""api._FitNodes: the nodes a submit's "could this ever fit" reads are kept
while the view's map of nodes is the same object, and a node's view while
its record is; what changed is read again, and a job that could never fit
before is let through once a node that can host it registers."""

from __future__ import annotations

import scheduler as sch
from leptond import views
from leptond.api import _FitNodes
from tests.test_state_support import Harness


def fresh(nodes: object) -> list[sch.NodeView]:
    return [views.node_view(n, with_faulty=True) for n in nodes.values()]  # type: ignore[attr-defined]


def request(gpus: int) -> sch.TaskRequest:
    return sch.TaskRequest(
        task_id="-",
        job_id="-",
        user="-",
        priority=0,
        submitted_at=0.0,
        gpus=gpus,
        cpus=1.0,
        mem_bytes=1 << 30,
    )


def test_fit_nodes_follow_every_change_of_a_node_and_keep_the_rest() -> None:
    h = Harness()
    h.register("n1", gpus=2)
    h.register("n2", gpus=4)
    fit = _FitNodes()
    v1 = h.state.freeze()
    first = fit.of(v1.nodes)
    assert first == fresh(v1.nodes)
    assert sch.never_fits(first, request(8)) is not None
    assert fit.of(h.state.freeze().nodes) is first  # nothing applied: the same list
    # A node registers again with more GPUs: its view is made again, the
    # other node's is kept, and the job that never fitted now fits.
    h.register("n2", gpus=8)
    v2 = h.state.freeze()
    assert v2.nodes is not v1.nodes
    second = fit.of(v2.nodes)
    assert second == fresh(v2.nodes)
    assert second[0] is first[0] and second[1] is not first[1]
    assert len(second[1].gpus) == 8
    assert sch.never_fits(second, request(8)) is None
    # A node marked unhealthy or drained reads differently: made again too.
    h.ok("gpu_health", {"node_id": "n1", "unhealthy": [{"index": 0, "reason": "ecc"}]})
    h.ok("node_state", {"node_id": "n1", "state": "draining"})
    v3 = h.state.freeze()
    third = fit.of(v3.nodes)
    assert third == fresh(v3.nodes)
    assert third[0] is not second[0] and not third[0].schedulable
    assert third[1] is second[1]
    # A node removed is gone from the list.
    h.ok("remove_node", {"node_id": "n2", "force": True})
    v4 = h.state.freeze()
    assert fit.of(v4.nodes) == fresh(v4.nodes) == [third[0]]
