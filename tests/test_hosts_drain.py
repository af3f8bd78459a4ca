"""Nodes leaving and shrinking on a real loopback cluster: `node drain --deadline`
moves what still runs there at the deadline, a drain without one leaves it be,
and an agent back with fewer GPUs requeues the task on a GPU that vanished.
One cluster for the module; tests run in file order and leave it idle.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.harness import Cluster, Master, Proc, wait_for
from tests.test_hosts_e2e import (
    assert_no_gpu_shared,
    module_cluster,
    node_by_name,
    task0,
    wait_task,
)

# Long enough that an agent restarted at once is back before it: the node
# must come back as itself, not be judged down in between.
TTL_S = 6.0
NODES = ("h1", "h2", "h3")
TRAP = "trap 'echo got TERM; exit 143' TERM; echo attempt $LEPTON_ATTEMPT; while true; do sleep 0.1; done"


@pytest.fixture(scope="module")
def drains(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    with module_cluster(tmp_path_factory.mktemp("hosts-drain"), request, ttl_s=TTL_S) as c:
        for name in NODES:
            start_agent(c, name, gpus="4" if name == "h3" else "2")
        c.wait_nodes_ready(3, timeout_s=60)
        yield c


def start_agent(c: Cluster, name: str, gpus: str) -> Proc:
    return c.start_agent(name, gpus=gpus, extra=["--labels", f"host={name}"])


def agent(c: Cluster, name: str) -> Proc:
    return [a for a in c.agents if a.name == name][-1]


def leader_log(c: Cluster) -> str:
    m: Master = c.wait_leader()
    return m.proc.log.read_text(errors="replace")


def test_a_bad_drain_deadline_is_one_line_exit_2_and_changes_nothing(drains: Cluster) -> None:
    for deadline in ("10x", "0s", "soon"):
        out = drains.ctl("node", "drain", "h1", "--deadline", deadline, check=False)
        assert out.returncode == 2, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "--deadline" in out.stderr and deadline in out.stderr
    n = node_by_name(drains, "h1")
    assert n is not None and (n["state"], n["drain_deadline"]) == ("ready", None)


def test_at_a_drain_deadline_the_task_moves_and_a_drain_without_one_keeps_its_task(
    drains: Cluster,
) -> None:
    c = drains
    moved = c.submit("--gpus", "1", "--retries", "1", "--", "sh", "-c", TRAP)
    x = wait_task(c, moved, {"running"})["node"]
    y, z = (n for n in NODES if n != x)
    kept = c.submit("--gpus", "1", "--constraint", f"host={y}", "--", "sh", "-c", TRAP)
    wait_task(c, kept, {"running"})

    assert c.ctl("node", "drain", y).stdout.strip() == f"{y}: draining"
    out = c.ctl("drain", x, "--deadline", "2s").stdout.strip()
    assert re.fullmatch(rf"{x}: draining \(deadline (in [12]s|passed)\)", out), out
    rows = {r["name"]: r for r in c.ctl_json("nodes")}
    assert rows[x]["state"] == "draining" and isinstance(rows[x]["drain_deadline"], float)
    assert (rows[y]["state"], rows[y]["drain_deadline"]) == ("draining", None)

    # At the deadline the leader stops it (as a preemption does) and it runs
    # again on the one node still ready, without spending its retry.
    st = wait_for(
        lambda: (
            (s := c.status(moved))["tasks"][0]["attempt"] == 2
            and s["tasks"][0]["state"] == "running"
            and s
        ),
        60,
        f"the task drained off {x} running again",
    )
    t = st["tasks"][0]
    assert (t["node"], t["preemptions"]) == (z, 0), t
    assert (st["retries"], st["retries_left"]) == (1, 1), st
    assert f"node {x}: drain deadline passed; stopping 1 task(s)" in leader_log(c)
    wait_for(lambda: "attempt 2" in c.ctl("logs", moved).stdout, 30, "the second attempt's output")

    # The drain loop has acted on x's deadline, so it has looked at y since y
    # was drained: y's task, with no deadline, was left to run.
    k = task0(c, kept)
    assert (k["state"], k["node"], k["attempt"], k["stopping"]) == ("running", y, 1, None), k
    table = c.ctl("nodes").stdout
    assert re.search(rf"^{x}\s.*draining \(deadline passed\)", table, re.M), table
    assert re.search(rf"^{y}\s+\S+\s+draining\s", table, re.M), table
    assert_no_gpu_shared(c)

    for n in (x, y):
        assert c.ctl("node", "undrain", n).stdout.strip() == f"{n}: ready"
    rows = {r["name"]: r for r in c.ctl_json("nodes")}
    assert [(rows[n]["state"], rows[n]["drain_deadline"]) for n in NODES] == [("ready", None)] * 3
    for job in (moved, kept):
        c.ctl("cancel", job)
        wait_for(lambda j=job: task0(c, j)["state"] == "cancelled", 60, f"{job} stopped")


def test_an_agent_back_with_fewer_gpus_requeues_the_task_on_a_vanished_one(
    drains: Cluster,
) -> None:
    c = drains
    keep = c.submit("--gpus", "2", "--constraint", "host=h3", "--", "sleep", "600")
    assert wait_task(c, keep, {"running"})["gpus"] == [0, 1]
    gone = c.submit("--gpus", "2", "--constraint", "host=h3", "--", "sleep", "600")
    assert wait_task(c, gone, {"running"})["gpus"] == [2, 3]

    # The host restarts with two of its four GPUs (the tasks' shims live on).
    agent(c, "h3").kill9()
    start_agent(c, "h3", gpus="2")
    st = wait_for(
        lambda: (s := c.status(gone))["tasks"][0]["state"] == "pending" and s,
        60,
        "the task on GPUs 2,3 back to pending",
    )
    t = st["tasks"][0]
    assert t["message"] == "node h3 came back without GPU 2,3; waiting to run again", t
    assert t["attempt"] == 1 and st["state"] == "pending", st  # no retry: it had none to spend
    assert "came back without GPU 2,3" in c.ctl("status", gone).stdout
    k = task0(c, keep)
    assert (k["state"], k["node"], k["gpus"], k["attempt"]) == ("running", "h3", [0, 1], 1), k
    n = node_by_name(c, "h3")
    assert n is not None and (n["state"], n["gpus_total"], n["gpus_free"]) == ("ready", 2, 0), n
    log = leader_log(c)
    assert log.count("node h3 registered with less than its tasks held") == 1, log[-3000:]
    wait_for(
        lambda: (
            "stopped 1 task(s) the leader no longer places here" in agent(c, "h3").log.read_text()
        ),
        30,
        "the agent to stop the run on the vanished GPUs",
    )
    assert_no_gpu_shared(c)

    # Once the GPUs that remain are free, it runs there again.
    c.ctl("cancel", keep)
    again = wait_task(c, gone, {"running"})
    assert (again["node"], again["gpus"], again["attempt"]) == ("h3", [0, 1], 2), again
    c.ctl("cancel", gone)
    for job in (keep, gone):
        wait_for(lambda j=job: task0(c, j)["state"] == "cancelled", 60, f"{job} stopped")
