"""A submit user floods `tty_input` at their own job, on a real master and agent.

Before the leader checked, it forwarded every 64 KiB of input to the agent,
session or not, until its connection to the agent held 64 MiB unsent and was
cut as a slow reader: every stream and session on that host broke with it.
Now input for a session the leader does not relay is refused, and input is
refused with `busy` while the agent's connection has much queued, so only
the flooding user's own session waits.

The agent is stopped (SIGSTOP) during the flood, so that it reads nothing and
the queue builds whatever the machine's speed; the node's TTL is long enough
that the pause does not mark it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from leptond.client import AsyncClient, LeptonError, calls
from tests.harness import Cluster, wait_for

INPUT = os.urandom(64 * 1024 - 512)
MAX_INPUTS = 4000  # 250 MiB: several times what cut the agent's connection


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cl = Cluster(tmp_path_factory.mktemp("ttyflood") / "cluster", n_masters=1, ttl_s=60.0)
    try:
        cl.start_masters()
        cl.start_agent("h1", gpus="1")
        cl.wait_nodes_ready(1)
        yield cl
    finally:
        cl.close()


def logs(c: Cluster) -> tuple[str, str]:
    master = (c.root / "master-0.log").read_text(errors="replace")
    agent = (c.root / "agent-h1.log").read_text(errors="replace")
    return master, agent


def test_input_floods_are_refused_at_the_leader_and_never_cut_the_host(c: Cluster) -> None:
    bob = c.ctl(
        "token", "create", "--role", "submit", "--name", "bob", "--unix-user", "root"
    ).stdout.strip()
    job = c.submit("--cpus", "0.1", "--mem", "64M", "--", "sleep", "900", token=bob)
    c.wait_job(job, {"running"})
    wait_for(lambda: c.status(job)["tasks"][0]["state"] == "running", 60, "its task to run")
    agent = c.agents[0]
    try:
        asyncio.run(asyncio.wait_for(_flood(c, bob, job, agent.pid), 300))
    finally:
        agent.signal(signal.SIGCONT)
    master, agent_log = logs(c)
    assert "slow_reader" not in master, master[-4000:]
    assert "registering again" not in agent_log, agent_log[-4000:]
    c.ctl("cancel", job)


async def _flood(c: Cluster, bob: str, job: str, agent_pid: int) -> None:
    attacker = AsyncClient(c.addrs, bob)
    other = AsyncClient(c.addrs, c.admin_token)
    stream: Any = None
    try:
        # No session: refused at the leader, nothing reaches the host.
        with pytest.raises(LeptonError) as no_session:
            await calls.tty_input(attacker.wire, job, "nosuchsession", INPUT)
        assert no_session.value.code == "not_found", no_session.value
        # A real session, then the flood at it while the host reads nothing.
        session = "flood-session-1"
        stream = calls.exec_in(
            attacker.wire, job, ["sh", "-c", "cat >/dev/null"], session
        ).__aiter__()
        first = await asyncio.wait_for(stream.__anext__(), 60)
        assert first.get("ready") is True, first  # the host has the session
        os.kill(agent_pid, signal.SIGSTOP)
        busy = 0
        sent = 0

        async def send() -> None:
            nonlocal busy, sent
            while not busy and sent < MAX_INPUTS:
                sent += 1
                try:
                    # The client retries `busy` until its timeout: a short one
                    # shows the answer, as a person's leptonctl would retry on.
                    await calls.tty_input(attacker.wire, job, session, INPUT, timeout_s=2)
                except LeptonError as exc:
                    assert exc.code == "busy", exc
                    busy += 1

        await asyncio.gather(*(send() for _ in range(4)))
        assert busy, f"{sent} inputs of 64 KiB were all forwarded to a host that reads nothing"
        # Another user is answered meanwhile, and the host is still connected.
        me = await calls.whoami(other.wire, timeout_s=60)
        assert me["role"] == "admin", me
        nodes = await calls.nodes(other.wire, timeout_s=60)
        assert [n["state"] for n in nodes] == ["ready"], nodes
    finally:
        os.kill(agent_pid, signal.SIGCONT)
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.aclose()
        await attacker.close()
        await other.close()
