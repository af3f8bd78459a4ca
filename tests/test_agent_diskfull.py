"""A task that fills the disk of its agent's data dir (agent/diskguard.py):
one real agent whose data dir is a small tmpfs, real tasks. The task that
fills it, with bytes or with empty files that take its inodes, is evicted
with a message that says so and its files are removed; the other task runs
on; while the disk is under a reserve the node takes no new task, and takes
one again once there is room."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.diskguard import MiB
from tests.harness import Cluster, wait_for
from tests.test_hosts_e2e import kill_task_leftovers, task0, wait_task
from tests.test_hosts_lease import TICKER, alive, lines, starts
from tests.tmpfs import fill, fill_inodes, free_bytes, free_inodes, tmpfs

DISK = 64 * MiB
RESERVE = 16 * MiB
# Inodes the disk has: its default inode reserve is then the floor, 10,000
# (5 % would be 2,000), far above what the agent itself keeps there.
INODES = 40_000
INODE_RESERVE = 10_000
# Makes empty files in its working directory until none can be made.
INODE_HOG = (
    "import itertools, time\n"
    "for i in itertools.count():\n"
    "    try:\n"
    "        open(f'f{i}', 'w').close()\n"
    "    except OSError:\n"
    "        break\n"
    "time.sleep(600)\n"
)
HOST = "d1"


@pytest.fixture(scope="module")
def small(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("diskfull") / "cluster", n_masters=1)
    failed_before = request.session.testsfailed
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(tmpfs(c.root / f"agent-{HOST}", DISK, INODES))
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


def pending_reason(c: Cluster, job: str) -> str:
    st = c.status(job)
    return str(st.get("reason") or "") if st["state"] == "pending" else ""


def submit_ticker(c: Cluster, out: Path) -> str:
    return c.submit("--cpus", "0.1", "--", sys.executable, "-c", TICKER, str(out))


def victim_ran_on(c: Cluster, out: Path, pid: int, victim: str) -> None:
    """The other task never stopped: it ticks on in its first attempt."""
    seen = ticks(out, pid)
    wait_for(lambda: ticks(out, pid) > seen + 20, 60, "the victim to tick on")
    assert alive(pid) and len(starts(out)) == 1
    v = task0(c, victim)
    assert v["state"] == "running" and v["attempt"] == 1, v


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
    victim_ran_on(c, out, pid, victim)
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


def test_the_task_that_takes_the_inodes_is_evicted_and_the_other_runs_on(
    small: Cluster, shared_path: Path
) -> None:
    c = small
    data = c.root / f"agent-{HOST}"
    out = shared_path / "ticks"
    victim = submit_ticker(c, out)
    wait_task(c, victim, {"running"})
    pid = wait_for(lambda: starts(out) and starts(out)[0][0], 60, "the victim to start")
    hog = c.submit("--cpus", "0.1", "--", sys.executable, "-c", INODE_HOG)
    t = wait_task(c, hog, {"failed", "succeeded", "lost"}, 120)
    assert t["state"] == "failed" and t["attempt"] == 1, t
    assert t["message"].startswith("evicted: the host's disk ("), t
    assert f"inodes free, under its reserve of {INODE_RESERVE}; this task had" in t["message"], t
    # Its files are gone, and with them the inodes: the disk never lacked bytes.
    tdir = data / "tasks" / f"{hog}.0_a{t['attempt']}"
    wait_for(lambda: not (tdir / "work").exists(), 60, "the evicted task's work dir to go")
    wait_for(lambda: free_inodes(data) > INODE_RESERVE, 60, "the inodes to come back")
    assert free_bytes(data) > RESERVE
    victim_ran_on(c, out, pid, victim)
    c.ctl("cancel", victim)
    wait_task(c, victim, {"cancelled"})


def test_a_node_short_of_inodes_says_so_and_takes_no_task_until_there_are_some(
    small: Cluster,
) -> None:
    c = small
    data = c.root / f"agent-{HOST}"
    # Something that is no task's takes the inodes, all but a few.
    filler = fill_inodes(data, leave=50)
    try:
        low = wait_for(lambda: c.nodes()[0]["disk_low"], 60, "the node to report its inodes short")
        assert low.startswith("inodes full: fewer than 10000 inodes free in "), low
        listing = c.ctl("nodes").stdout
        assert "(inodes full)" in listing and "(disk full)" not in listing, listing
        job = c.submit("--cpus", "0.1", "--", "true")
        # The scheduler has looked at it and says why it waits.
        why = wait_for(lambda: pending_reason(c, job), 60, "the job's pending reason")
        assert task0(c, job)["state"] == "pending", why
        assert c.nodes()[0]["state"] == "ready"
    finally:
        shutil.rmtree(filler)
    wait_task(c, job, {"succeeded"}, 60)
    assert c.nodes()[0]["disk_low"] is None
