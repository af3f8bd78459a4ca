"""GPU hosts under faults: kill -9 of agents and of the leader, re-adoption,
drain and removal, leave-on-stop, a wrong cluster secret. Real processes on
loopback; one cluster for the module, tests run in file order.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.shim import LEASE_RAN_OUT
from agent.taskdir import EXIT, SPARE_FLAG, read_json
from leptond.wire.tokens import Token, parse_token
from tests.harness import Cluster, Proc, wait_for
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


@pytest.fixture(scope="module")
def faults(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    with module_cluster(
        tmp_path_factory.mktemp("hosts-faults"), request, ttl_s=TTL_S, master_args=SLOW_RESTARTS
    ) as c:
        for name in ("h1", "h2"):
            start_agent(c, name)
        c.wait_nodes_ready(2, timeout_s=60)
        yield c


def start_agent(c: Cluster, name: str, extra: list[str] | None = None) -> Proc:
    return c.start_agent(name, gpus="4", extra=["--labels", f"host={name}", *(extra or [])])


def agent(c: Cluster, name: str) -> Proc:
    return [a for a in c.agents if a.name == name][-1]


def other(name: str) -> str:
    return {"h1": "h2", "h2": "h1"}[name]


def restart_agent(c: Cluster, name: str) -> Proc:
    c.agents.remove(agent(c, name))
    return start_agent(c, name)


def idle_spares(c: Cluster, name: str) -> list[psutil.Process]:
    """The spare shims of agent `name` that wait for a task (cwd: its task root)."""
    tasks = str((c.root / f"agent-{name}" / "tasks").resolve())
    return [
        p
        for p in psutil.process_iter(["cmdline", "cwd"])
        if SPARE_FLAG in (p.info["cmdline"] or []) and p.info["cwd"] == tasks and alive(p)
    ]


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_leader_kill_keeps_the_task_and_records_its_exit(faults: Cluster) -> None:
    job = faults.submit("--gpus", "1", "--", "sh", "-c", "sleep 4; exit 5")
    wait_task(faults, job, {"running"})
    old = faults.wait_leader()
    old.proc.kill9()
    try:
        new = wait_for(
            lambda: (m := faults.leader()) is not None and m is not old and m,
            60,
            "a new leader",
        )
        assert new is not old
        st = faults.wait_job(job, {"succeeded", "failed"}, timeout_s=90)
        t = st["tasks"][0]
        assert t["exit_code"] == 5, t
        assert t["attempt"] == 1, "the task ran again instead of being kept"
        assert_no_gpu_shared(faults)
    finally:
        old.proc.start()  # back as a follower for the next tests
    wait_for(lambda: faults.ctl_json("cluster", "status")["has_quorum"], 30, "quorum")


def test_agent_restarted_after_kill9_adopts_its_task(faults: Cluster, shared_path: Path) -> None:
    marker = shared_path / "runs"
    job = faults.submit(
        "--gpus", "1", "--", "sh", "-c", f"echo run >> {marker}; sleep 5; exit 3"
    )  # fmt: skip
    t = wait_task(faults, job, {"running"})
    host = t["node"]
    spares = wait_for(lambda: idle_spares(faults, host), 30, f"a spare shim on {host}")
    agent(faults, host).kill9()
    restart_agent(faults, host)
    # The killed agent's spare goes by itself; the task's shim stays (below).
    wait_for(lambda: not any(map(alive, spares)), 30, "the killed agent's spare to exit")
    st = faults.wait_job(job, {"succeeded", "failed"}, timeout_s=90)
    t = st["tasks"][0]
    assert t["exit_code"] == 3, t
    assert t["attempt"] == 1 and t["node"] == host, t
    assert marker.read_text().splitlines() == ["run"], "the task was started twice"
    assert_no_gpu_shared(faults)
    n = node_by_name(faults, host)
    assert n is not None and n["state"] == "ready"


def test_agent_kill9_marks_node_down_and_retries_elsewhere(faults: Cluster) -> None:
    retry = faults.submit(
        "--gpus", "2", "--retries", "1", "--",
        "sh", "-c", 'if [ "$LEPTON_ATTEMPT" = 1 ]; then sleep 120; fi; echo "ran on $LEPTON_ATTEMPT"',
    )  # fmt: skip
    host = wait_task(faults, retry, {"running"})["node"]
    # A job without retries on the same host ends `lost`.
    once = faults.submit("--gpus", "1", "--constraint", f"host={host}", "--", "sleep", "120")
    wait_task(faults, once, {"running"})
    assert_no_gpu_shared(faults)
    agent(faults, host).kill9()
    down = wait_for(
        lambda: (n := node_by_name(faults, host)) is not None and n["state"] == "down" and n,
        TTL_S + 15,
        f"{host} down",
    )
    # Here the disconnect window is as long as the TTL (SLOW_RESTARTS), so the
    # TTL, counted from the last heartbeat, comes first; the short window's
    # "went away" is tests/test_hosts_failfast.py's.
    assert down["reason"] == f"no heartbeat for {TTL_S:g}s", down
    lost = faults.wait_job(once, {"failed"})["tasks"][0]
    assert lost["state"] == "lost", lost
    assert "went down" in lost["message"]
    st = faults.wait_job(retry, {"succeeded", "failed"}, timeout_s=60)
    t = st["tasks"][0]
    assert st["state"] == "succeeded", st
    assert t["attempt"] == 2 and t["node"] == other(host), t
    assert faults.ctl("logs", retry).stdout.strip() == "ran on 2"
    assert_no_gpu_shared(faults)
    # With no agent to renew the node's lease, the shims of the lost attempts
    # ended them (before the node was judged down), agent or no agent.
    for job in (retry, once):
        ended = read_json(faults.root / f"agent-{host}" / "tasks" / f"{job}.0_a1" / EXIT)
        assert ended is not None and ended["message"] == LEASE_RAN_OUT, (job, ended)
    # The agent comes back: the node is ready again, and the lost attempts'
    # exits it reports are stale to the leader.
    restart_agent(faults, host)
    wait_for(
        lambda: (n := node_by_name(faults, host)) is not None and n["state"] == "ready",
        60,
        f"{host} ready again",
    )
    assert task0(faults, retry)["state"] == "succeeded"
    assert task0(faults, once)["state"] == "lost"


def test_drain_keeps_new_work_off_and_lets_running_work_finish(faults: Cluster) -> None:
    long = faults.submit("--gpus", "1", "--constraint", "host=h1", "--", "sh", "-c", "sleep 6")
    wait_task(faults, long, {"running"})
    faults.ctl("node", "drain", "h1")
    assert node_by_name(faults, "h1")["state"] == "draining"  # type: ignore[index]
    busy = faults.ctl("node", "rm", "h1", check=False)
    assert busy.returncode != 0
    assert len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    assert "drain it first" in busy.stderr
    more = [faults.submit("--gpus", "1", "--", "sleep", "1") for _ in range(3)]
    pinned = faults.submit("--gpus", "1", "--constraint", "host=h1", "--", "true")
    for j in more:
        st = faults.wait_job(j, {"succeeded", "failed"})
        assert st["state"] == "succeeded" and st["tasks"][0]["node"] == "h2", st
    assert faults.status(pinned)["state"] == "pending"
    assert_no_gpu_shared(faults)
    st = faults.wait_job(long, {"succeeded", "failed"}, timeout_s=60)
    assert st["state"] == "succeeded" and st["tasks"][0]["node"] == "h1", st
    assert faults.status(pinned)["state"] == "pending"
    faults.ctl("node", "undrain", "h1")
    st = faults.wait_job(pinned, {"succeeded", "failed"})
    assert st["state"] == "succeeded" and st["tasks"][0]["node"] == "h1", st


def test_agent_paused_past_the_ttl_comes_back_ready(faults: Cluster) -> None:
    """Its connection survives the pause: the node must still come back."""
    job = faults.submit("--gpus", "1", "--constraint", "host=h1", "--", "sleep", "120")
    wait_task(faults, job, {"running"})
    a = agent(faults, "h1")
    a.signal(19)  # SIGSTOP
    try:
        wait_for(
            lambda: (n := node_by_name(faults, "h1")) is not None and n["state"] == "down",
            TTL_S + 30,
            "h1 down",
        )
    finally:
        a.signal(18)  # SIGCONT
    assert faults.wait_job(job, {"failed"})["tasks"][0]["state"] == "lost"
    wait_for(
        lambda: (n := node_by_name(faults, "h1")) is not None and n["state"] == "ready",
        30,
        "h1 ready again after the pause",
    )
    again = faults.submit("--gpus", "1", "--constraint", "host=h1", "--", "true")
    assert faults.wait_job(again, {"succeeded", "failed"})["state"] == "succeeded"
    assert_no_gpu_shared(faults)


def test_leave_on_stop_drains_and_deregisters(faults: Cluster) -> None:
    p = start_agent(faults, "h3", ["--leave-on-stop"])
    faults.wait_nodes_ready(3, timeout_s=60)
    job = faults.submit(
        "--gpus", "1", "--retries", "1", "--constraint", "host=h3", "--", "sleep", "120"
    )  # fmt: skip
    wait_task(faults, job, {"running"})
    spares = wait_for(lambda: idle_spares(faults, "h3"), 30, "a spare shim on h3")
    p.signal(15)
    wait_for(lambda: not p.alive(), 60, "the agent to exit")
    assert p.popen is not None and p.popen.returncode == 0
    assert not any(map(alive, spares)), "the agent left its spare shim running"
    assert node_by_name(faults, "h3") is None
    assert "left the cluster" in p.log.read_text()
    # The agent stopped the task because it left, not because the task failed:
    # it waits to run again (only h3 matches) and no retry was spent.
    st = faults.status(job)
    assert (st["state"], st["tasks"][0]["state"], st["retries_left"]) == (
        "pending", "pending", 1,
    ), st  # fmt: skip
    assert_no_gpu_shared(faults)
    faults.ctl("cancel", job)


def test_rm_of_an_empty_node(faults: Cluster) -> None:
    a = agent(faults, "h2")
    a.stop()
    wait_for(
        lambda: (n := node_by_name(faults, "h2")) is not None and n["state"] == "down",
        TTL_S + 30,
        "h2 down",
    )
    out = faults.ctl("node", "rm", "h2")
    assert out.stdout.strip() == "h2: removed"
    assert node_by_name(faults, "h2") is None


def test_agent_with_a_wrong_join_token_is_refused(faults: Cluster, tmp_path: Path) -> None:
    # A join token this cluster knows, with a secret it never issued.
    real = parse_token(faults.join_token_file().read_text())
    forged = tmp_path / "forged.token"
    forged.write_text(str(Token(real.id, os.urandom(32))) + "\n")
    p = Proc(
        "intruder",
        [
            sys.executable, "-m", "agent.cli", "run", "--masters", faults.addrs,
            "--join-token-file", str(forged),
            "--data-dir", str(faults.root / "agent-intruder"), "--node-name", "intruder",
            "--simulate-gpus", "4", "--http-port", "0",
        ],
        faults.root / "agent-intruder.log",
    )  # fmt: skip
    faults.extra.append(p)
    p.start()
    wait_for(lambda: "refused" in p.log.read_text(), 60, "the agent to log the refusal")
    wait_for(
        lambda: any("bad_seal" in m.proc.log.read_text() for m in faults.masters),
        30,
        "a master to log the refusal",
    )
    assert node_by_name(faults, "intruder") is None
    # Let it retry a few times (backoff from 0.2 s) before counting lines.
    t0 = time.monotonic()
    wait_for(lambda: time.monotonic() - t0 > 4 and p.alive(), 30, "the agent to keep retrying")
    p.stop()
    # One line each side (the master's is rate-limited), not one per retry.
    lines = [ln for ln in p.log.read_text().splitlines() if "refused" in ln]
    assert len(lines) == 1, lines
    for m in faults.masters:
        text = m.proc.log.read_text()
        assert text.count("bad_seal") <= 2, text[-2000:]
