"""Task leases on one host: the lease file (agent/lease.py) and the shims that
end their tasks when it runs out, with real shims and task processes; and the
masters' check that the TTL outlasts the lease plus its margin."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent import lease
from agent.runner import TaskRunner
from agent.shim import LEASE_RAN_OUT
from leptond.config import MasterConfig
from tests.harness import ROOT, env
from tests.test_runner import exit_of, kill_everything_under, spec, wait_for


def test_the_lease_file_round_trips_and_a_stale_boot_invalidates_it(tmp_path: Path) -> None:
    path = tmp_path / lease.LEASE_FILE
    assert lease.read_expiry(path) is None
    lease.write_lease(path, 1234.5, 3.0)
    assert lease.read_expiry(path) == 1234.5
    body = json.loads(path.read_text())
    body["boot_id"] = "another-boot"
    path.write_text(json.dumps(body))
    assert lease.read_expiry(path) is None  # written before a reboot: worthless
    path.write_text("{not json")
    assert lease.read_expiry(path) is None


def test_a_reader_sees_each_new_lease(tmp_path: Path) -> None:
    path = tmp_path / lease.LEASE_FILE
    reader = lease.LeaseReader(path)
    assert reader.expired()  # no lease at all
    lease.write_lease(path, lease.now() + 60, 60)
    assert not reader.expired()
    lease.write_lease(path, lease.now() - 1, 60)
    assert reader.expired()


@pytest.fixture(params=["new-shim", "spare"])
def leased(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[TaskRunner, Path]]:
    root = tmp_path / "tasks"
    lease_file = tmp_path / lease.LEASE_FILE
    r = TaskRunner(root, lease_file=lease_file)
    if request.param == "spare":
        r.keep_spare()
    try:
        yield r, lease_file
    finally:
        r.close()
        kill_everything_under(root)


# The task forks a child that ignores SIGTERM: the whole group must die.
FAMILY = [
    sys.executable,
    "-c",
    "import os, signal, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', "
    "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
    "open('pids', 'w').write(f'{os.getpid()} {child.pid}')\n"
    "time.sleep(600)\n",
]


def test_the_task_dies_when_the_lease_runs_out(
    leased: tuple[TaskRunner, Path], tmp_path: Path
) -> None:
    runner, lease_file = leased
    lease.write_lease(lease_file, lease.now() + 3600, 3600)
    runner.start(spec("t1", FAMILY))
    pids_file = runner.task_dir("t1") / "work" / "pids"
    wait_for(lambda: pids_file.exists() and len(pids_file.read_text().split()) == 2, "the pids")
    pids = [int(p) for p in pids_file.read_text().split()]
    assert all(psutil.pid_exists(p) for p in pids)
    lease.write_lease(lease_file, lease.now() - 0.001, 3600)  # not renewed: over
    ex = exit_of(runner, "t1")
    assert ex.message == LEASE_RAN_OUT and ex.signal == 9, ex
    for pid in pids:
        wait_for(lambda pid=pid: not alive(pid), f"process {pid} of the task to be gone")


def test_a_task_does_not_start_without_a_lease(leased: tuple[TaskRunner, Path]) -> None:
    runner, lease_file = leased
    lease.write_lease(lease_file, lease.now() - 1, 3)
    runner.start(spec("t2", ["sh", "-c", "touch started"]))
    ex = exit_of(runner, "t2")
    assert ex.exit_code is None and "lease" in ex.message, ex
    assert not (runner.task_dir("t2") / "work" / "started").exists()


def test_a_renewed_lease_keeps_the_task(leased: tuple[TaskRunner, Path]) -> None:
    runner, lease_file = leased
    lease.write_lease(lease_file, lease.now() + 1.0, 1.0)
    runner.start(spec("t3", ["sh", "-c", "sleep 2; exit 4"]))
    end = lease.now() + 2.5
    while runner.running() and lease.now() < end:  # renewed as heartbeats would
        lease.write_lease(lease_file, lease.now() + 1.0, 1.0)
        time.sleep(0.2)
    ex = exit_of(runner, "t3")
    assert ex.exit_code == 4, ex


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_master_refuses_a_ttl_not_longer_than_lease_and_margin(tmp_path: Path) -> None:
    assert MasterConfig(tmp_path, tmp_path, tmp_path, heartbeat_ttl_s=3.0).task_lease_s == 2.4
    out = subprocess.run(
        [
            sys.executable, "-m", "leptond.cli", "run",
            "--data-dir", str(tmp_path / "d"), "--secret-file", str(tmp_path / "k"),
            "--admin-token-file", str(tmp_path / "t"),
            "--heartbeat-ttl", "3", "--task-lease", "2.8", "--lease-margin", "0.3",
        ],
        env=env(), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "leptond: --heartbeat-ttl (3s) must be longer than the task lease (2.8s) plus its "
        "margin (0.3s): a node's tasks must be dead before the leader declares it down "
        "and runs them elsewhere"
    ]


AGENT = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from agent import lease\n"
    "lease.write_lease(Path(sys.argv[1]), lease.now() + 3600, 3600, sent=lease.now(), "
    "confirm_s=float(sys.argv[2]))\n"
    "print('written', flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_reader_cuts_the_lease_when_its_agent_dies_until_a_new_agent_renews_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / lease.LEASE_FILE
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(path), "2.5"],
        env=env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert agent.stdout is not None and agent.stdout.readline() == b"written\n"
        reader = lease.LeaseReader(path)
        exp = reader.expires()
        assert exp is not None and exp > lease.now() + 3000
        assert reader.fileno() is not None  # watching the agent's pidfd
    finally:
        agent.kill()
        agent.wait()
    gone = lease.now()
    wait_for(lambda: (e := reader.expires()) is not None and e < gone + 3000, "the cut")
    cut = reader.expires()
    assert cut is not None and gone <= cut <= lease.now() + 2.5
    # A renewal by this process (another agent), on a request sent after the
    # death, lifts the cut; one sent before it would not.
    lease.write_lease(path, lease.now() + 3600, 3600, sent=gone - 1, confirm_s=2.5)
    assert reader.expires() == cut
    lease.write_lease(path, lease.now() + 3600, 3600, sent=lease.now(), confirm_s=2.5)
    exp = reader.expires()
    assert exp is not None and exp > lease.now() + 3000
    reader.close()


def test_a_lease_from_an_agent_that_is_gone_already_is_cut_at_once(tmp_path: Path) -> None:
    path = tmp_path / lease.LEASE_FILE
    lease.write_lease(path, lease.now() + 3600, 3600, sent=lease.now(), confirm_s=1.0)
    body = json.loads(path.read_text())
    del body["crc"]  # edited by hand below: a record with no checksum
    body["agent"] = [body["agent"][0], body["agent"][1] + 1]  # same pid, another process
    path.write_text(json.dumps(body))
    exp = lease.LeaseReader(path).expires()
    assert exp is not None and exp <= lease.now() + 1.0


def test_cap_lease_only_shortens(tmp_path: Path) -> None:
    path = tmp_path / lease.LEASE_FILE
    assert not lease.cap_lease(path, 5.0)  # no lease: nothing to cut
    lease.write_lease(path, 100.0, 10.0)
    assert not lease.cap_lease(path, 200.0)
    assert lease.cap_lease(path, 50.0)
    assert lease.read_expiry(path) == 50.0


HANDING_OVER = (
    "import sys\n"
    "from pathlib import Path\n"
    "from agent import lease\n"
    "lease.write_lease(Path(sys.argv[1]), lease.now() + 3600, 3600, sent=lease.now(), "
    "confirm_s=1.0)\n"
    "lease.mark_handover(Path(sys.argv[1]))\n"
)


def test_a_lease_handed_over_is_not_cut_when_its_agent_exits(tmp_path: Path) -> None:
    path = tmp_path / lease.LEASE_FILE
    subprocess.run([sys.executable, "-c", HANDING_OVER, str(path)], env=env(), cwd=ROOT, check=True)
    body = json.loads(path.read_text())
    assert body["handover"] is True
    exp = lease.LeaseReader(path).expires()  # its writer has exited
    assert exp is not None and exp > lease.now() + 3000


def test_an_agent_marks_only_its_own_lease_as_handed_over(tmp_path: Path) -> None:
    """A new agent that never renewed the lease must not vouch for the old
    one, which may have died (its shims have cut the lease)."""
    path = tmp_path / lease.LEASE_FILE
    subprocess.run(
        [sys.executable, "-c", AGENT.replace("time.sleep(600)", "pass"), str(path), "1.0"],
        env=env(),
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    lease.mark_handover(path)
    assert "handover" not in json.loads(path.read_text())
    exp = lease.LeaseReader(path).expires()
    assert exp is not None and exp <= lease.now() + 1.0
