"""A task that fills the disk of its agent's data dir (agent/diskguard.py):
one real agent whose data dir is a small tmpfs, real tasks. The task that
fills it is evicted with a message that says so and its files are removed;
the other task runs on; while the disk is under the reserve the node takes
no new task, and takes one again once there is room."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.diskguard import MiB
from tests.harness import Cluster, wait_for
from tests.test_hosts_e2e import kill_task_leftovers, task0, wait_task
from tests.test_hosts_lease import TICKER, alive, lines, starts
from tests.tmpfs import fill, free_bytes, tmpfs

DISK = 64 * MiB
RESERVE = 16 * MiB
HOST = "d1"


@pytest.fixture(scope="module")
def small(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("diskfull") / "cluster", n_masters=1)
    failed_before = request.session.testsfailed
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(tmpfs(c.root / f"agent-{HOST}", DISK))
        try:
            c.start_masters()
            c.start_agent(HOST, gpus="1", extra=["--disk-reserve", str(RESERVE)])
            c.wait_nodes_ready(1, timeout_s=60)
            yield c
        finally:
            if request.session.testsfailed > failed_before:
                print(c.logs())
            c.close()
            kill_task_leftovers(c)
            assert disk.is_mount()


def ticks(out: Path, pid: int) -> int:
    return sum(1 for what, p, _ in lines(out) if p == pid and what == "tick")


def submit_ticker(c: Cluster, out: Path) -> str:
    return c.submit("--cpus", "0.1", "--", sys.executable, "-c", TICKER, str(out))


def test_the_task_that_fills_the_disk_is_evicted_and_the_other_runs_on(
    small: Cluster, shared_path: Path
) -> None:
    c = small
    out = shared_path / "ticks"
    victim = submit_ticker(c, out)
    wait_task(c, victim, {"running"})
    pid = wait_for(lambda: starts(out) and starts(out)[0][0], 60, "the victim to start")
    hog = c.submit(
        "--cpus", "0.1", "--",
        "sh", "-c", "dd if=/dev/zero of=big bs=1M 2>/dev/null; sleep 600",
    )  # fmt: skip
    t = wait_task(
        c,
        hog,
        {"failed", "succeeded", "lost"},
        120,
    )
    assert t["state"] == "failed" and t["attempt"] == 1, t
    assert t["message"].startswith("evicted: the host's disk ("), t
    assert f"under its reserve of {RESERVE // MiB} MiB; this task's files used" in t["message"], t
    # Its files are gone at once (not after --task-retention), its log stays.
    tdir = c.root / f"agent-{HOST}" / "tasks" / f"{hog}.0_a{t['attempt']}"
    wait_for(lambda: not (tdir / "work").exists(), 60, "the evicted task's work dir to go")
    assert (tdir / "output.log").exists()
    wait_for(lambda: free_bytes(c.root / f"agent-{HOST}") > RESERVE, 60, "the space to come back")
    # The other task never stopped.
    seen = ticks(out, pid)
    wait_for(lambda: ticks(out, pid) > seen + 20, 60, "the victim to tick on")
    assert alive(pid) and len(starts(out)) == 1
    v = task0(c, victim)
    assert v["state"] == "running" and v["attempt"] == 1, v
    c.ctl("cancel", victim)
    c.ctl("cancel", hog, check=False)
    wait_task(c, victim, {"cancelled"})


def test_a_node_under_its_disk_reserve_takes_no_task_until_there_is_room(
    small: Cluster, shared_path: Path
) -> None:
    c = small
    out = shared_path / "ticks"
    running = submit_ticker(c, out)
    wait_task(c, running, {"running"})
    pid = wait_for(lambda: starts(out) and starts(out)[0][0], 60, "the task to start")
    # Something that is no task's fills the disk to the last byte.
    filler = fill(c.root / f"agent-{HOST}")
    try:
        wait_for(
            lambda: (n := c.nodes()[0])["disk_low"] and n,
            60,
            "the node to report its disk under the reserve",
        )
        assert "(disk full)" in c.ctl("nodes").stdout
        job = c.submit("--cpus", "0.1", "--", "true")
        # The lease is renewed in place meanwhile (a full disk): the running
        # task ticks on, well past a lease, and the new one waits.
        seen = ticks(out, pid)
        wait_for(lambda: ticks(out, pid) > seen + 200, 60, "the task to tick on, the disk full")
        assert task0(c, job)["state"] == "pending"
        assert c.nodes()[0]["state"] == "ready"
    finally:
        filler.unlink()
    wait_task(c, job, {"succeeded"}, 60)
    assert c.nodes()[0]["disk_low"] is None
    assert alive(pid) and task0(c, running)["state"] == "running"
    c.ctl("cancel", running)
    wait_task(c, running, {"cancelled"})
