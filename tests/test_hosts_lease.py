"""Fencing with task leases, on real masters and agents (TTL 3 s, and 10 s).

A paused agent (SIGSTOP) cannot renew its node's lease, so its task's shim
kills the task when the lease runs out; the leader runs it elsewhere only
after the TTL, later. Both attempts write their pid and the time to one file:
the first attempt's last line comes before the second one's first. A leader
change, on the other hand, kills nothing: the new leader renews in time.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.shim import LEASE_RAN_OUT
from agent.taskdir import EXIT, read_json
from tests.harness import Cluster, Proc, wait_for
from tests.test_hosts_e2e import module_cluster, task0, wait_task
from tests.test_metrics_e2e import scrape, value

# Appends "<what> <pid> <time>" lines: one "start", then a "tick" every 50 ms.
TICKER = (
    "import os, sys, time\n"
    "def say(what):\n"
    "    with open(sys.argv[1], 'a') as f:\n"
    "        f.write(f'{what} {os.getpid()} {time.time():.6f}\\n')\n"
    "say('start')\n"
    "while True:\n"
    "    time.sleep(0.05)\n"
    "    say('tick')\n"
)


@pytest.fixture(scope="module")
def leases(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    with module_cluster(tmp_path_factory.mktemp("hosts-lease"), request, ttl_s=3.0) as c:
        for name in ("h1", "h2"):
            c.start_agent(name, gpus="1")
        c.wait_nodes_ready(2, timeout_s=60)
        yield c


@pytest.fixture(scope="module")
def long_leases(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    """The default TTL (10 s, a lease of 8 s): a leader change must not kill a
    task, and whether a new leader renews within a 2.4 s lease depends on how
    busy the machine is; within 8 s it does not."""
    with module_cluster(tmp_path_factory.mktemp("hosts-lease10"), request, ttl_s=10.0) as c:
        c.start_agent("h1", gpus="1")
        c.wait_nodes_ready(1, timeout_s=60)
        yield c


def lines(path: Path) -> list[tuple[str, int, float]]:
    out = []
    for ln in path.read_text().splitlines():
        parts = ln.split()
        if len(parts) == 3:  # a line being written is skipped until it is whole
            out.append((parts[0], int(parts[1]), float(parts[2])))
    return out


def starts(path: Path) -> list[tuple[int, float]]:
    return [(pid, at) for what, pid, at in lines(path) if what == "start"] if path.exists() else []


def agent(c: Cluster, name: str) -> Proc:
    return [a for a in c.agents if a.name == name][-1]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def submit_ticker(c: Cluster, out: Path, retries: int) -> str:
    return c.submit(
        "--gpus", "1", "--retries", str(retries), "--",
        sys.executable, "-c", TICKER, str(out),
    )  # fmt: skip


def start_ticker(c: Cluster, out: Path) -> tuple[str, str]:
    """A ticker job with one retry, running its first attempt: (job, its node)."""
    job = submit_ticker(c, out, retries=1)
    host = wait_task(c, job, {"running"})["node"]
    wait_for(lambda: len(starts(out)) == 1, 60, "the first attempt to start")
    return job, host


def wait_ready(c: Cluster, host: str) -> None:
    """Wait for a resumed agent's node to be ready again."""
    wait_for(
        lambda: any(n["name"] == host and n["state"] == "ready" for n in c.nodes()),
        60,
        f"{host} ready again",
    )


def test_a_paused_agents_task_is_dead_before_it_runs_again(
    leases: Cluster, shared_path: Path
) -> None:
    c = leases
    out = shared_path / "ticks"
    job, host = start_ticker(c, out)
    paused = agent(c, host)
    paused.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: len(starts(out)) == 2, 60, "the second attempt to start elsewhere")
        (first, _), (second, second_at) = starts(out)
        t = wait_task(c, job, {"running"})
        assert t["attempt"] == 2 and t["node"] != host, t
        # Dead before the second attempt began: its last line is older, and
        # its process is gone although its agent is still stopped.
        last_first = max(at for _, pid, at in lines(out) if pid == first)
        assert last_first < second_at, (last_first, second_at)
        assert not alive(first) and alive(second)
        ended = read_json(c.root / f"agent-{host}" / "tasks" / f"{job}.0_a1" / EXIT)
        assert ended is not None and ended["message"] == LEASE_RAN_OUT, ended
        assert ended["finished_at"] < second_at
        assert paused.alive()  # stopped all along, never killed
    finally:
        paused.signal(signal.SIGCONT)
    wait_ready(c, host)
    c.ctl("cancel", job)


def ended(c: Cluster, reason: str) -> float:
    """How many task attempts the cluster has seen end for `reason`."""
    return value(scrape(c.wait_leader().http), "lepton_tasks_ended_total", reason=reason) or 0.0


def test_a_task_whose_nodes_lease_ran_out_ends_lost_and_runs_once(
    leases: Cluster, shared_path: Path
) -> None:
    c = leases
    out = shared_path / "ticks"
    job, host = start_ticker(c, out)
    lost, failed = ended(c, "lost"), ended(c, "failed")
    paused = agent(c, host)
    paused.signal(signal.SIGSTOP)
    try:
        t = wait_for(
            lambda: (t := task0(c, job))["attempt"] == 2 and t["state"] == "running" and t,
            60,
            "the retry to run",
        )
        # Its node went silent past the TTL: the attempt is lost, not failed,
        # and the retry it is owed runs on the other node.
        assert t["node"] != host, t
        assert (ended(c, "lost"), ended(c, "failed")) == (lost + 1, failed), (lost, failed)
        wait_for(lambda: len(starts(out)) == 2, 60, "the retry to start")
        (first, _), (second, second_at) = starts(out)
        assert not alive(first)  # fenced by its lease, its agent still stopped
    finally:
        paused.signal(signal.SIGCONT)
    wait_ready(c, host)
    # Resumed, the agent reports the old attempt's end and reconciles: nothing
    # of it runs again, and the retry is left as it was.
    seen = len(lines(out))
    wait_for(lambda: len(lines(out)) > seen + 40, 60, "the retry to tick on")
    assert [pid for pid, _ in starts(out)] == [first, second]
    assert max(at for _, pid, at in lines(out) if pid == first) < second_at
    assert not alive(first) and alive(second)
    again = task0(c, job)
    assert (again["state"], again["attempt"], again["node"]) == ("running", 2, t["node"]), again
    assert ended(c, "lost") == lost + 1
    c.ctl("cancel", job)
    wait_task(c, job, {"cancelled"})
    wait_for(lambda: not alive(second), 60, "the retry to end with the job")


def test_a_leader_change_kills_no_task(long_leases: Cluster, shared_path: Path) -> None:
    c = long_leases
    out = shared_path / "ticks"
    job = submit_ticker(c, out, retries=0)
    wait_task(c, job, {"running"})
    wait_for(lambda: len(starts(out)) == 1, 60, "the task to start")
    old = c.wait_leader()
    old.proc.kill9()
    try:
        c.wait_leader(timeout_s=60, not_=old)
        # A few lease periods under the new leader: the task ticks on.
        pid = starts(out)[0][0]
        seen = len(lines(out))
        wait_for(lambda: len(lines(out)) > seen + 100, 60, "the task to go on ticking")
        assert alive(pid)
        t = wait_task(c, job, {"running"})
        assert t["attempt"] == 1, t
        assert len(starts(out)) == 1
    finally:
        old.proc.start()
    c.ctl("cancel", job)
    wait_task(c, job, {"cancelled"})
