"""Nodes leaving and shrinking on a real loopback cluster: `node drain --deadline`
moves what still runs there at the deadline, a drain without one leaves it be,
and an agent back with fewer GPUs requeues the task on a GPU that vanished.
A task stopped before its agent started it ends at once; a drain outlives its
node going down and coming back, and an agent's leave keeps an admin's drain.
One cluster for the module; tests run in file order and leave it idle.
"""

from __future__ import annotations

import contextlib
import re
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
# must come back as itself (keeping its tasks), not be judged down in between.
# The agent's end-of-stream would cut that to the disconnect window (1 s by
# default, which a Python restart on a loaded machine can miss), so the window
# is the TTL here too; tests/test_hosts_failfast.py covers the short one.
TTL_S = 6.0
SLOW_RESTARTS = ["--disconnect-confirm", str(TTL_S)]
NODES = ("h1", "h2", "h3")
TRAP = "trap 'echo got TERM; exit 143' TERM; echo attempt $LEPTON_ATTEMPT; while true; do sleep 0.1; done"


@pytest.fixture(scope="module")
def drains(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    with module_cluster(
        tmp_path_factory.mktemp("hosts-drain"), request, ttl_s=TTL_S, master_args=SLOW_RESTARTS
    ) as c:
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


# -- tasks stopped before they started ------------------------------------------------


@contextlib.contextmanager
def paused(c: Cluster, name: str) -> Iterator[None]:
    """The agent frozen (SIGSTOP): it takes no pushes until it is resumed, well
    within the TTL, so its node stays up; what it missed waits in its socket."""
    a = agent(c, name)
    a.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        a.signal(signal.SIGCONT)


def submit_rpc(c: Cluster, argv: list[str], **spec: Any) -> str:
    """A submit in-process: a leptonctl run costs too much of the agent's pause."""
    spec = {"argv": argv, "gpus": 1, **spec}
    return str(c.rpc("submit", {"spec": spec, "rid": uuid.uuid4().hex})["id"])


def run_dir(c: Cluster, node: str, job: str, attempt: int) -> Path:
    """The agent's directory of one run of a job's task 0 (agent/taskdir.py)."""
    return c.root / f"agent-{node}" / "tasks" / f"{job}.0_a{attempt}"


def test_a_task_stopped_before_its_agent_started_it_ends_at_once(drains: Cluster) -> None:
    """Cancelled (or stopped at a drain deadline) before its agent started it, a
    task ends without waiting for an exit, and its node stays up. The agent,
    resumed, starts the run it was sent before the stop: it is told to stop it."""
    c = drains
    argv = ["sleep", "600"]

    with paused(c, "h2"):
        job = submit_rpc(c, argv, constraints={"host": "h2"})
        wait_task(c, job, {"assigned"}, timeout_s=TTL_S)
        c.rpc("cancel", {"job_id": job})
        t = wait_task(c, job, {"cancelled"}, timeout_s=TTL_S)
        # Not "lost: node h2 went down": it ended while its node was up.
        assert t["message"] == "cancelled before it started", t
    assert c.status(job)["finished_at"] is not None
    late = run_dir(c, "h2", job, 1)
    wait_for((late / "spec.json").exists, 30, "the agent to start the run it was sent")
    wait_for((late / "exit.json").exists, 30, "the agent to stop the cancelled task's late run")

    with paused(c, "h2"):
        job = submit_rpc(c, argv, constraints={"host": "h2"}, retries=1)
        wait_task(c, job, {"assigned"}, timeout_s=TTL_S)
        c.rpc("node_drain", {"node": "h2", "deadline_s": 0.5})
        t = wait_task(c, job, {"pending"}, timeout_s=TTL_S)
        assert t["message"] == (
            "stopped at the drain deadline of node h2 before it started; waiting to run again"
        ), t
        assert (t["attempt"], c.status(job)["retries_left"]) == (1, 1)
        n = node_by_name(c, "h2")
        assert n is not None and n["state"] == "draining", n
    late = run_dir(c, "h2", job, 1)
    wait_for((late / "spec.json").exists, 30, "the agent to start the run it was sent")
    # Undrained, it runs on h2 again as attempt 2, and the late run of attempt 1 stops.
    c.ctl("node", "undrain", "h2")
    t = wait_task(c, job, {"running"})
    assert (t["node"], t["attempt"]) == ("h2", 2), t
    wait_for((late / "exit.json").exists, 30, "the agent to stop the late run of attempt 1")
    assert not (run_dir(c, "h2", job, 2) / "exit.json").exists()
    assert (c.status(job)["retries_left"], task0(c, job)["attempt"]) == (1, 2)
    assert_no_gpu_shared(c)
    c.ctl("cancel", job)
    wait_for(lambda: task0(c, job)["state"] == "cancelled", 60, f"{job} stopped")


# -- drains across an agent's absence ----------------------------------------------------


def test_a_drained_node_whose_agent_dies_and_returns_stays_drained(drains: Cluster) -> None:
    c = drains
    out = c.ctl("node", "drain", "h1", "--deadline", "1h").stdout.strip()
    assert out.startswith("h1: draining (deadline in "), out
    deadline = node_by_name(c, "h1")["drain_deadline"]  # type: ignore[index]
    agent(c, "h1").kill9()
    n = wait_for(
        lambda: (n := node_by_name(c, "h1")) is not None and n["state"] == "down" and n,
        TTL_S + 30,
        "h1 down",
    )
    assert (n["drain_deadline"], n.get("drain_reason")) == (deadline, "drained"), n
    table = c.ctl("nodes").stdout
    assert re.search(r"^h1\s.*down \(drained, deadline in 1\.0h\)", table, re.M), table

    start_agent(c, "h1", gpus="2")
    n = wait_for(
        lambda: (n := node_by_name(c, "h1")) is not None and n["state"] != "down" and n,
        60,
        "h1 back",
    )
    assert (n["state"], n["reason"], n["drain_deadline"]) == ("draining", "drained", deadline), n
    # No new work lands on it while it is drained ...
    job = c.submit("--gpus", "1", "--constraint", "host=h1", "--", "true")
    st = wait_for(lambda: (s := c.status(job)).get("reason") and s, 30, "a pending reason")
    assert st["state"] == "pending", st
    # ... and once undrained, it does.
    assert c.ctl("node", "undrain", "h1").stdout.strip() == "h1: ready"
    assert c.wait_job(job, {"succeeded", "failed"})["state"] == "succeeded"


def test_an_agent_leaving_keeps_the_admins_drain_deadline(
    drains: Cluster, shared_path: Path
) -> None:
    c = drains
    marker = shared_path / "leaver-termed"
    # A long kill grace and a task that outlives SIGTERM hold the node between
    # the agent's leave and its deregistration, long enough to look at it.
    p = c.start_agent(
        "h4", gpus="1", extra=["--labels", "host=h4", "--leave-on-stop", "--kill-grace", "8"]
    )
    wait_for(lambda: (n := node_by_name(c, "h4")) and n["state"] == "ready", 60, "h4 ready")
    job = c.submit(
        "--gpus", "1", "--constraint", "host=h4", "--",
        "sh", "-c", f"trap 'touch {marker}' TERM; while true; do sleep 0.1; done",
    )  # fmt: skip
    wait_task(c, job, {"running"})
    c.ctl("node", "drain", "h4", "--deadline", "1h")
    deadline = node_by_name(c, "h4")["drain_deadline"]  # type: ignore[index]
    p.signal(signal.SIGTERM)
    # The agent stops its runs once its leave is committed.
    wait_for(marker.exists, 60, "the leaving agent to stop its task")
    n = node_by_name(c, "h4")
    assert n is not None, "h4 deregistered before its task stopped"
    assert (n["state"], n["reason"], n["drain_deadline"]) == ("draining", "drained", deadline), n
    wait_for(lambda: not p.alive(), 60, "the agent to exit")
    assert node_by_name(c, "h4") is None
    wait_for(lambda: task0(c, job)["state"] != "running", 30, "the task to stop")
    c.ctl("cancel", job, check=False)
