"""The leader's cluster series from a state view, without processes
(leptond/metrics.py): per-user series agree with `leptonctl queue`
(scheduler.queue_report), down nodes count as no capacity, and a follower
says nothing about the cluster."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import scheduler as sch
from leptond import views
from leptond.clock import REAL
from leptond.liveness import NodeLiveness
from leptond.metrics import ClusterCollector
from raft.view import Publisher
from tests.test_metrics_e2e import value
from tests.test_state_support import Harness


class Gate:
    def __init__(self, leads: bool) -> None:
        self.leads = leads

    def is_leader(self) -> bool:
        return self.leads


def exposition(h: Harness, leads: bool = True) -> str:
    reader = Publisher(h.state, threading.RLock())
    reg = CollectorRegistry()
    reg.register(ClusterCollector(reader, Gate(leads), NodeLiveness(REAL), 10.0, REAL))
    return generate_latest(reg).decode()


@pytest.fixture
def busy() -> Harness:
    h = Harness()
    h.register("n1", gpus=4, cpus=16.0)
    h.register("n2", gpus=4, cpus=16.0)
    h.register("n3", gpus=8, cpus=64.0)
    for i, (user, gpus, cpus) in enumerate(
        [("alice", 2, 4.0), ("alice", 1, 1.0), ("bob", 4, 2.0), ("carol", 0, 8.0)]
    ):
        h.submit(f"run{i}", user=user, gpus=gpus, cpus=cpus)
    h.run("run0.0", "n1", [0, 1])
    h.run("run1.0", "n1", [2])
    h.run("run2.0", "n2", [0, 1, 2, 3])
    h.run("run3.0", "n1", [])
    for i, (user, gpus) in enumerate([("alice", 8), ("dave", 2), ("dave", 1), ("bob", 0)]):
        h.submit(f"wait{i}", user=user, gpus=gpus)
    h.ok("node_down", {"node_id": "n3"})
    h.ok("gpu_health", {"node_id": "n1", "unhealthy": [{"index": 3, "reason": "Xid 79"}]})
    return h


def test_per_user_series_agree_with_the_queue_report(busy: Harness) -> None:
    text = exposition(busy)
    nodes, allocs, pending = views.scheduler_inputs(busy.state.freeze())
    rows = sch.queue_report(nodes, allocs, pending, sch.Policy())
    assert {r.user for r in rows} == {"alice", "bob", "carol", "dave"}
    for r in rows:
        assert value(text, "lepton_user_gpus", user=r.user) == r.gpus
        assert value(text, "lepton_user_pending_gpus", user=r.user) == r.pending_gpus
        assert value(text, "lepton_user_pending_tasks", user=r.user) == r.pending_tasks
        share: Any = value(text, "lepton_user_dominant_share", user=r.user)
        assert share == pytest.approx(r.dominant_share), r


def test_capacity_leaves_out_down_nodes_and_unhealthy_gpus(busy: Harness) -> None:
    text = exposition(busy)
    assert value(text, "lepton_gpus") == 4 + 4 - 1  # n3 is down, one of n1's is unhealthy
    assert value(text, "lepton_gpus_allocated") == 7
    assert value(text, "lepton_gpus_unhealthy") == 1
    assert value(text, "lepton_node_state", node="n3", state="down") == 1
    assert value(text, "lepton_nodes", state="ready") == 2
    assert value(text, "lepton_tasks", state="pending") == 4
    assert value(text, "lepton_tasks_started_total") == 4


def test_a_follower_exports_no_cluster_series(busy: Harness) -> None:
    assert "lepton_" not in exposition(busy, leads=False)


def test_per_user_pending_leaves_out_what_the_scheduler_holds_back_as_queue_does() -> None:
    """An array over its --max-running and a job waiting for another are
    pending, but neither is work the scheduler may place yet: `queue` leaves
    them out, and so do the per-user series."""
    h = Harness()
    h.register("n1", gpus=4, cpus=16.0)
    h.submit("arr", user="erin", gpus=1, array=[[0, 9, 1]], max_running=3)
    h.run("arr.0", "n1", [0])
    h.submit("first", user="frank", gpus=1)
    h.submit("then", user="frank", gpus=2, after_ok=["first"])
    text = exposition(h)
    nodes, allocs, pending = views.scheduler_inputs(h.state.freeze())
    rows = {r.user: r for r in sch.queue_report(nodes, allocs, pending, sch.Policy())}
    assert (rows["erin"].pending_tasks, rows["frank"].pending_tasks) == (2, 1)
    for r in rows.values():
        assert value(text, "lepton_user_pending_gpus", user=r.user) == r.pending_gpus
        assert value(text, "lepton_user_pending_tasks", user=r.user) == r.pending_tasks
    assert value(text, "lepton_tasks", state="pending") == 9 + 2  # every pending task
