"""Scheduler features through leptonctl on a real loopback cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Cluster, wait_for

TRAP = "trap 'echo got TERM; exit 143' TERM; echo started attempt $LEPTON_ATTEMPT; while true; do sleep 0.1; done"


@pytest.fixture
def quota_cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", n_masters=3, ttl_s=3.0, master_args=["--quota", "carol=1"])
    try:
        c.start_masters()
        yield c
    finally:
        c.close()


def test_preemption_stops_and_requeues_a_real_task(cluster: Cluster) -> None:
    cluster.start_agent("h1", gpus="2", extra=["--labels", "zone=a"])
    cluster.wait_nodes_ready(1)
    low = cluster.submit("--gpus", "2", "--priority", "0", "--", "sh", "-c", TRAP)
    wait_for(
        lambda: cluster.status(low)["tasks"][0]["state"] == "running",
        60,
        "low-priority job running",
    )
    wait_for(lambda: "started attempt 1" in cluster.ctl("logs", low).stdout, 30, "low job output")
    high = cluster.submit("--gpus", "2", "--priority", "10", "--", "sh", "-c", "echo high ran")
    assert cluster.wait_job(high, {"succeeded", "failed"}, timeout_s=90)["state"] == "succeeded"
    # The evicted task got SIGTERM first, returned to pending without spending a
    # retry, and runs again once the GPUs are free.
    st = wait_for(
        lambda: (
            (s := cluster.status(low))["tasks"][0]["attempt"] >= 2
            and s["tasks"][0]["state"] == "running"
            and s
        ),
        60,
        "low job running again",
    )
    assert st["tasks"][0]["preemptions"] == 1
    assert st["state"] == "running"
    wait_for(
        lambda: "started attempt 2" in cluster.ctl("logs", low).stdout, 30, "second attempt output"
    )

    # A job that refuses preemption keeps its GPUs against higher priorities.
    cluster.ctl("cancel", low)
    cluster.wait_job(low, {"cancelled"})
    wait_for(
        lambda: cluster.status(low)["tasks"][0]["state"] == "cancelled", 30, "low task stopped"
    )
    keep = cluster.submit("--gpus", "2", "--no-preempt", "--", "sh", "-c", TRAP)
    wait_for(
        lambda: cluster.status(keep)["tasks"][0]["state"] == "running", 60, "no-preempt job running"
    )
    urgent = cluster.submit("--gpus", "1", "--priority", "100", "--", "true")
    st = wait_for(lambda: (s := cluster.status(urgent)).get("reason") and s, 30, "a pending reason")
    assert st["state"] == "pending"
    assert cluster.status(keep)["tasks"][0]["preemptions"] == 0
    cluster.ctl("cancel", keep)
    cluster.ctl("cancel", urgent)


def test_pending_reasons_in_words_and_constraints(cluster: Cluster) -> None:
    cluster.start_agent("h1", gpus="4", extra=["--labels", "zone=a"])
    cluster.wait_nodes_ready(1)
    # --queue-anyway: without it these are refused at submit (test_cli_e2e).
    big = cluster.submit("--gpus", "8", "--queue-anyway", "--", "true")
    st = wait_for(lambda: (s := cluster.status(big)).get("reason") and s, 30, "reason for 8 GPUs")
    assert "8 GPUs" in st["reason"] and "4" in st["reason"]
    text = cluster.ctl("status", big).stdout
    assert "pending" in text and "8 GPUs" in text
    zone = cluster.submit("--constraint", "zone=b", "--queue-anyway", "--", "true")
    st = wait_for(lambda: (s := cluster.status(zone)).get("reason") and s, 30, "reason for zone=b")
    assert "zone=b" in st["reason"]
    model = cluster.submit("--gpus", "1", "--gpu-type", "H100", "--queue-anyway", "--", "true")
    st = wait_for(lambda: (s := cluster.status(model)).get("reason") and s, 30, "reason for H100")
    assert "H100" in st["reason"]
    # Simulated GPUs have 80 GiB each.
    roomy = cluster.submit("--gpus", "1", "--gpu-mem", "100G", "--queue-anyway", "--", "true")
    st = wait_for(
        lambda: (s := cluster.status(roomy)).get("reason") and s, 30, "reason for --gpu-mem"
    )
    assert "at least" in st["reason"] and "memory" in st["reason"]
    ok = cluster.submit(
        "--gpus",
        "1",
        "--constraint",
        "zone=a",
        "--gpu-type",
        "a100",
        "--gpu-mem",
        "40G",
        "--",
        "true",
    )
    assert cluster.wait_job(ok, {"succeeded", "failed"})["state"] == "succeeded"


def test_time_limit_is_enforced(cluster: Cluster) -> None:
    cluster.start_agent("h1", gpus="1")
    cluster.wait_nodes_ready(1)
    job = cluster.submit("--time-limit", "2s", "--", "sleep", "60")
    st = cluster.wait_job(job, {"failed", "succeeded"}, timeout_s=60)
    assert st["state"] == "failed"
    assert "time limit" in st["tasks"][0]["message"]


def test_queue_shows_users_and_quota_holds_work(quota_cluster: Cluster) -> None:
    c = quota_cluster
    c.start_agent("h1", gpus="4")
    c.wait_nodes_ready(1)
    # No such accounts on the test host: their jobs run as root (allowed here).
    carol, dave = (
        c.ctl(
            "token", "create", "--role", "submit", "--name", n, "--unix-user", "root"
        ).stdout.strip()
        for n in ("carol", "dave")
    )
    j1 = c.submit("--gpus", "1", "--cpus", "0.5", "--", "sleep", "30", token=carol)
    j2 = c.submit("--gpus", "1", "--cpus", "0.5", "--", "sleep", "30", token=carol)
    j3 = c.submit("--gpus", "2", "--cpus", "0.5", "--", "sleep", "30", token=dave)
    wait_for(
        lambda: c.status(j1)["state"] == "running" and c.status(j3)["state"] == "running",
        60,
        "jobs running",
    )
    st2 = wait_for(lambda: (s := c.status(j2)).get("reason") and s, 30, "quota reason")
    assert st2["state"] == "pending" and "quota" in st2["reason"]
    rows = {r["user"]: r for r in c.ctl_json("queue")}
    assert (
        rows["carol"]["gpus"] == 1
        and rows["carol"]["pending_tasks"] == 1
        and rows["carol"]["quota_gpus"] == 1
    )
    assert rows["dave"]["gpus"] == 2 and rows["dave"]["pending_tasks"] == 0
    assert rows["dave"]["dominant_share"] > rows["carol"]["dominant_share"]
    # A submit token cannot cancel someone else's job.
    out = c.ctl("cancel", j3, token=carol, check=False)
    assert out.returncode != 0 and "dave" in out.stderr
    for j in (j1, j2, j3):
        c.ctl("cancel", j)


def test_bin_pack_spread_and_gpu_topology(cluster: Cluster) -> None:
    # Simulated GPUs report NVLink-like domains of four: 0-3 and 4-7.
    cluster.start_agent("h1", gpus="8")
    cluster.start_agent("h2", gpus="8")
    cluster.wait_nodes_ready(2)
    first = cluster.submit("--gpus", "1", "--", "sleep", "60")
    st = wait_for(
        lambda: (s := cluster.status(first))["tasks"][0]["node"] and s, 60, "first job placed"
    )
    busy = st["tasks"][0]["node"]
    other = "h2" if busy == "h1" else "h1"
    # Bin-packing keeps the other node whole: a 4-GPU job goes beside the first,
    # on one GPU domain (4-7), not across domains (1-4).
    packed = cluster.submit("--gpus", "4", "--", "sleep", "60")
    st = wait_for(
        lambda: (s := cluster.status(packed))["tasks"][0]["node"] and s, 60, "packed job placed"
    )
    assert st["tasks"][0]["node"] == busy
    assert st["tasks"][0]["gpus"] == [4, 5, 6, 7]
    # --spread asks for the least-loaded node instead.
    spread = cluster.submit("--gpus", "1", "--spread", "--", "sleep", "60")
    st = wait_for(
        lambda: (s := cluster.status(spread))["tasks"][0]["node"] and s, 60, "spread job placed"
    )
    assert st["tasks"][0]["node"] == other
    for j in (first, packed, spread):
        cluster.ctl("cancel", j)


def test_a_gang_is_not_starved_by_a_stream_of_small_jobs(cluster: Cluster) -> None:
    cluster.start_agent("h1", gpus="2")
    cluster.start_agent("h2", gpus="2")
    cluster.wait_nodes_ready(2)
    # Small jobs keep both nodes partly busy; a 2-node gang of 2 GPUs each needs both whole.
    smalls = [cluster.submit("--gpus", "1", "--", "sleep", "3") for _ in range(2)]
    gang = cluster.submit("--nodes", "2", "--gpus", "2", "--", "true")
    # More small jobs keep arriving after the gang: they must not take what it waits for.
    stop_at = 8
    for _ in range(stop_at):
        smalls.append(cluster.submit("--gpus", "1", "--", "sleep", "3"))
    st = cluster.wait_job(gang, {"succeeded", "failed"}, timeout_s=120)
    assert st["state"] == "succeeded"
    started = sorted((cluster.status(j)["tasks"][0]["started_at"] or 1e30, j) for j in smalls)
    gang_start = min(t["started_at"] for t in st["tasks"])
    # The gang ran before most of the small jobs submitted after it.
    later = [j for t, j in started if t > gang_start]
    assert len(later) >= stop_at - 2, (gang_start, started)
    for j in smalls:
        cluster.ctl("cancel", j, check=False)
