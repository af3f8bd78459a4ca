"""Fast failure handling on real masters and agents (agent/lease.py, "Disconnects").

An agent killed with kill -9 closes nothing itself: its kernel closes its
connection, the leader reads the end and declares the node down after the
confirm window, and meanwhile the task's shim, which saw the agent's pidfd
turn readable, has cut the lease and killed the task. A restarted agent that
registers again within the window keeps its task, and one stopped on purpose
hands its tasks over to the next agent whenever that one comes (within the
lease). An agent whose event loop stalls for up to a second is never judged
down with the default TTL.

The window is 4 s here (TTL 20 s, a lease of 18 s), so that an agent restart on a busy machine
is back within it; the default (1 s) is measured by bench/reschedule.py.
Nothing here asserts a time: the order of events is read from the tasks' own
lines (pid and time) and from the node's recorded reason.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.shim import LEASE_RAN_OUT
from agent.stalls import ENV as STALL_ENV
from agent.taskdir import EXIT, read_json
from leptond.config import MasterConfig
from tests.harness import Cluster, wait_for
from tests.test_hosts_e2e import kill_task_leftovers, wait_task
from tests.test_hosts_lease import agent, alive, lines, starts, submit_ticker

DEFAULTS = MasterConfig(data_dir=Path("."), secret_file=Path("."), admin_token_file=Path("."))
CONFIRM_S = 4.0
MARGIN_S = 0.5  # leptond's default --disconnect-margin
TICKS_PER_WINDOW = int(CONFIRM_S / 0.05)  # the ticker writes a line every 50 ms


@pytest.fixture(scope="module")
def failfast(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path_factory.mktemp("hosts-failfast") / "cluster",
        n_masters=3,
        ttl_s=20.0,
        master_args=["--disconnect-confirm", str(CONFIRM_S)],
    )
    failed_before = request.session.testsfailed
    try:
        c.start_masters()
        for name in ("f1", "f2"):
            c.start_agent(name, gpus="1")
        c.wait_nodes_ready(2, timeout_s=60)
        yield c
    finally:
        if request.session.testsfailed > failed_before:
            print(c.logs())
        c.close()
        kill_task_leftovers(c)


def node(c: Cluster, name: str) -> dict[str, object]:
    return next(n for n in c.nodes() if n["name"] == name)


def restart_agent(c: Cluster, name: str, kill: bool) -> None:
    """kill -9 and start again at once (a crash and its restart), or stop it
    (SIGTERM, as `systemctl stop` does) and start again."""
    old = agent(c, name)
    if kill:
        old.kill9()
    else:
        old.stop()
    c.agents.remove(old)
    c.start_agent(name, gpus="1")


def ticks_of(out: Path, pid: int) -> int:
    return sum(1 for _, p, _ in lines(out) if p == pid)


def renewed_by_another_agent(lease_file: Path, before: dict[str, object]) -> bool:
    b = read_json(lease_file)
    return b is not None and b.get("agent") != before["agent"] and "handover" not in b


def test_a_killed_agents_task_is_dead_before_it_runs_elsewhere(
    failfast: Cluster, shared_path: Path
) -> None:
    c = failfast
    out = shared_path / "ticks"
    job = submit_ticker(c, out, retries=1)
    host = wait_task(c, job, {"running"})["node"]
    wait_for(lambda: len(starts(out)) == 1, 60, "the first attempt to start")
    agent(c, host).kill9()
    wait_for(lambda: len(starts(out)) == 2, 60, "the second attempt to start elsewhere")
    (first, _), (second, second_at) = starts(out)
    t = wait_task(c, job, {"running"})
    assert t["attempt"] == 2 and t["node"] != host, t
    # Down by the fast path (the TTL is 20 s, far longer than it took).
    down = node(c, host)
    assert down["state"] == "down" and "went away" in str(down["reason"]), down
    # Dead before the second attempt began, killed by its shim for the cut lease.
    last_first = max(at for _, pid, at in lines(out) if pid == first)
    assert last_first < second_at, (last_first, second_at)
    assert not alive(first) and alive(second)
    ended = read_json(c.root / f"agent-{host}" / "tasks" / f"{job}.0_a1" / EXIT)
    assert ended is not None and ended["message"] == LEASE_RAN_OUT, ended
    assert ended["finished_at"] < second_at
    c.ctl("cancel", job)
    wait_task(c, job, {"cancelled"})
    c.agents.remove(agent(c, host))
    c.start_agent(host, gpus="1")
    c.wait_nodes_ready(2, timeout_s=60)


def test_an_agent_killed_and_restarted_within_the_window_keeps_its_task(
    failfast: Cluster, shared_path: Path
) -> None:
    """The shims cut the lease when the agent dies; the new agent registers
    within the window and renews it, which lifts the cut."""
    c = failfast
    out = shared_path / "ticks"
    job = submit_ticker(c, out, retries=1)
    host = wait_task(c, job, {"running"})["node"]
    wait_for(lambda: len(starts(out)) == 1, 60, "the task to start")
    lease_file = c.root / f"agent-{host}" / "lease.json"
    before = read_json(lease_file)
    assert before is not None and "agent" in before, before
    restart_agent(c, host, kill=True)
    wait_for(
        lambda: renewed_by_another_agent(lease_file, before),
        60,
        "the restarted agent to renew the lease",
    )
    # The task runs on, well past the window, with no second attempt.
    pid = starts(out)[0][0]
    seen = ticks_of(out, pid)
    wait_for(lambda: ticks_of(out, pid) > seen + 2 * TICKS_PER_WINDOW, 60, "the task to tick on")
    assert alive(pid)
    assert len(starts(out)) == 1
    t = wait_task(c, job, {"running"})
    assert t["attempt"] == 1 and t["node"] == host, t
    assert node(c, host)["state"] == "ready"
    c.ctl("cancel", job)
    wait_task(c, job, {"cancelled"})


def test_an_agent_stopped_on_purpose_hands_its_tasks_to_the_next_one(
    failfast: Cluster, shared_path: Path
) -> None:
    """SIGTERM: the agent marks its lease as handed over and resets its
    connection, so neither its shims nor the leader treat the stop as a
    death. The task outlives the window with no agent at all, and the next
    agent adopts it."""
    c = failfast
    out = shared_path / "ticks"
    job = submit_ticker(c, out, retries=1)
    host = wait_task(c, job, {"running"})["node"]
    wait_for(lambda: len(starts(out)) == 1, 60, "the task to start")
    lease_file = c.root / f"agent-{host}" / "lease.json"
    old = agent(c, host)
    old.stop()
    c.agents.remove(old)
    before = read_json(lease_file)
    assert before is not None and before.get("handover") is True, before
    # Longer than the window plus its margin, with no agent on the host.
    first = starts(out)[0][0]
    seen = ticks_of(out, first)
    past = TICKS_PER_WINDOW + 3 * int(MARGIN_S / 0.05)
    wait_for(lambda: ticks_of(out, first) > seen + past, 60, "the task to tick on")
    assert node(c, host)["state"] == "ready"  # the leader did not act on the reset
    c.start_agent(host, gpus="1")
    wait_for(
        lambda: renewed_by_another_agent(lease_file, before),
        60,
        "the next agent to renew the lease",
    )
    pid = starts(out)[0][0]
    assert alive(pid) and len(starts(out)) == 1
    t = wait_task(c, job, {"running"})
    assert t["attempt"] == 1 and t["node"] == host, t
    c.ctl("cancel", job)
    wait_task(c, job, {"cancelled"})


def test_an_agent_that_closes_its_connection_cuts_its_lease_first(
    failfast: Cluster, shared_path: Path
) -> None:
    """SIGSTOP the leader: the agent's heartbeat times out and it closes its
    connection itself; the lease file is cut at that moment (the leader
    cannot read that end until it runs again, and then judges the node by it)."""
    c = failfast
    host = "f1"
    lease_file = c.root / f"agent-{host}" / "lease.json"
    leader = c.wait_leader()
    leader.proc.signal(signal.SIGSTOP)
    try:
        cut = wait_for(
            lambda: (b := read_json(lease_file)) is not None and "capped_at" in b and b,
            60,
            "the agent to cut its lease as it gives up on the stopped leader",
        )
        assert float(cut["expires"]) - float(cut["sent"]) < float(cut["lease_s"]), cut
    finally:
        leader.proc.signal(signal.SIGCONT)
    # Back with a new (or the same) leader, registered again, renewed in full.
    wait_for(
        lambda: (b := read_json(lease_file)) is not None and "capped_at" not in b,
        60,
        "a full lease again",
    )
    c.wait_nodes_ready(2, timeout_s=60)


@pytest.fixture(scope="module")
def stalling(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    """One master with the default TTL; one agent whose event loop stalls for
    up to 1 s at random moments (agent/stalls.py)."""
    c = Cluster(
        tmp_path_factory.mktemp("hosts-stall") / "cluster",
        n_masters=1,
        ttl_s=DEFAULTS.heartbeat_ttl_s,
    )
    failed_before = request.session.testsfailed
    try:
        c.start_masters()
        c.start_agent("s1", gpus="1", extra_env={STALL_ENV: "1.0"})
        c.wait_nodes_ready(1, timeout_s=60)
        yield c
    finally:
        if request.session.testsfailed > failed_before:
            print(c.logs())
        c.close()
        kill_task_leftovers(c)


def test_an_agent_whose_event_loop_stalls_for_a_second_is_never_judged_down(
    stalling: Cluster, shared_path: Path
) -> None:
    c = stalling
    out = shared_path / "ticks"
    job = submit_ticker(c, out, retries=1)
    wait_task(c, job, {"running"})
    wait_for(lambda: len(starts(out)) == 1, 60, "the task to start")
    agent_log = c.root / "agent-s1.log"

    def stalls() -> int:
        return agent_log.read_text(errors="replace").count("blocking the event loop")

    n = stalls()
    wait_for(lambda: stalls() >= n + 6, 120, "six more stalls of the agent's event loop")
    master_log = c.root / "master-0.log"
    assert "marking it down" not in master_log.read_text(errors="replace")
    assert node(c, "s1")["state"] == "ready"
    t = wait_task(c, job, {"running"})
    assert t["attempt"] == 1, t  # never killed by its lease either
    assert len(starts(out)) == 1 and alive(starts(out)[0][0])
    c.ctl("cancel", job)
    wait_task(c, job, {"cancelled"})
