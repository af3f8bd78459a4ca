"""`leptond dev` as people use it: one per data dir, ports checked first, an
agent that dies is reported and comes back, one line when it stops.

One dev cluster (a master and two agents) serves the whole module; the
tests that must not disturb it run first, the one that stops it last.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.harness import ROOT, env, free_ports, wait_for
from tests.isolation_support import passable_dir, unix_users


@dataclass
class Dev:
    data: Path
    ports: list[int]
    out: Path
    proc: subprocess.Popen[bytes]
    env: dict[str, str]

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "leptonctl.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def agent_pid(self, i: int) -> int:
        for p in self.children():
            if f"agent-{i}" in " ".join(p.cmdline()):
                return p.pid
        raise AssertionError(f"no agent-{i} under leptond dev")


def start_dev(root: Path, *extra: str, ports: list[int] | None = None) -> Dev:
    data, out = root / "dev", root / "dev.out"
    ports = ports or free_ports(3)
    e = env()
    e["LEPTON_CONFIG"] = str(root / "client.toml")  # not the user's config
    argv = [
        sys.executable, "-m", "leptond.cli", "dev", "--data-dir", str(data),
        "--rpc-port", str(ports[0]), "--http-port", str(ports[1]), "--raft-port", str(ports[2]),
        "--simulate-gpus", "1", "--agent-http-port", "0", *extra,
    ]  # fmt: skip
    with open(out, "ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=e, cwd=ROOT)
    return Dev(data, ports, out, proc, e)


def stop(dev: Dev) -> None:
    """By pid: leptond dev, then anything of its still there."""
    kids = []
    try:
        kids = psutil.Process(dev.proc.pid).children(recursive=True)
    except psutil.Error:
        pass
    if dev.proc.poll() is None:
        dev.proc.send_signal(signal.SIGTERM)
        try:
            dev.proc.wait(30)
        except subprocess.TimeoutExpired:
            dev.proc.kill()
            dev.proc.wait(10)
    for k in kids:
        try:
            k.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    d = start_dev(tmp_path_factory.mktemp("dev"))
    try:
        wait_for(lambda: "cluster is up" in d.text(), 120, "the dev cluster to come up")
        yield d
    finally:
        stop(d)


def test_a_second_dev_cluster_in_the_same_data_dir_is_refused(dev: Dev, tmp_path: Path) -> None:
    again = subprocess.run(
        [sys.executable, "-m", "leptond.cli", "dev", "--data-dir", str(dev.data),
         "--rpc-port", str(free_ports(1)[0])],
        env=dev.env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 1
    lines = (again.stdout + again.stderr).strip().splitlines()
    assert lines == [f"leptond dev: a dev cluster is already running here (pid {dev.proc.pid})"]
    # The first one did not notice.
    assert dev.proc.poll() is None
    assert dev.ctl("nodes").returncode == 0


def test_a_port_in_use_is_named_before_anything_starts(tmp_path: Path) -> None:
    ports = free_ports(3)
    held = socket.socket()
    held.bind(("127.0.0.1", ports[2]))
    held.listen()
    try:
        d = start_dev(tmp_path, ports=ports)
        try:
            assert d.proc.wait(60) == 1
        finally:
            stop(d)
        lines = d.text().strip().splitlines()
        assert len(lines) == 1, lines
        assert f"port {ports[2]} (--raft-port)" in lines[0] and "in use" in lines[0], lines
        assert not (d.data / "master").exists()  # nothing was started
    finally:
        held.close()


def test_a_dev_cluster_run_by_root_runs_other_users_tasks(tmp_path: Path) -> None:
    # Its data dir holds the agents' task dirs: others pass through it (its
    # secrets and logs stay root's), or every non-root task fails at start.
    with passable_dir("lepton-dev-") as top, unix_users("dev") as (user,):
        d = start_dev(top)
        try:
            wait_for(lambda: "cluster is up" in d.text(), 120, "the dev cluster to come up")
            assert (d.data.stat().st_mode & 0o777, (d.data / "logs").stat().st_mode & 0o777) == (
                0o711,
                0o700,
            )
            made = d.ctl(
                "token", "create", "--role", "submit", "--name", "u", "--unix-user", user.pw_name
            )
            assert made.returncode == 0, made.stderr
            d.env["LEPTON_TOKEN"] = made.stdout.strip()
            ran = d.ctl("submit", "--wait", "--", "id", "-un")
            assert (ran.returncode, ran.stdout.strip()) == (0, user.pw_name), (
                ran.stdout,
                ran.stderr,
            )
        finally:
            stop(d)


def test_cluster_status_on_the_dev_cluster_shows_its_master(dev: Dev) -> None:
    out = dev.ctl("cluster", "status")
    assert out.returncode == 0, out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("127.0.0.1:")]
    assert rows and rows[0][:3] == [
        f"127.0.0.1:{dev.ports[2]}",
        f"127.0.0.1:{dev.ports[0]}",
        "leader",
    ], out.stdout


def test_a_dead_agent_is_reported_and_started_again(dev: Dev) -> None:
    pid = dev.agent_pid(1)
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: "agent dev-1 exited with signal 9; restarting it in 5s" in dev.text(),
        30,
        "leptond dev to report the dead agent",
    )
    # The rest goes on meanwhile: the master answers, the other agent runs.
    assert dev.proc.poll() is None
    assert dev.ctl("nodes").returncode == 0
    wait_for(lambda: "agent dev-1 started again" in dev.text(), 30, "the agent to start again")
    assert dev.agent_pid(1) != pid

    def dev1_ready() -> bool:
        out = dev.ctl("nodes", "-o", "json")
        import json

        return any(n["name"] == "dev-1" and n["state"] == "ready" for n in json.loads(out.stdout))

    wait_for(dev1_ready, 60, "dev-1 to be ready again")


def test_with_no_restart_a_dead_agent_stays_dead(tmp_path: Path) -> None:
    d = start_dev(tmp_path, "--agents", "1", "--no-restart")
    try:
        wait_for(lambda: "cluster is up" in d.text(), 120, "the dev cluster to come up")
        os.kill(d.agent_pid(0), signal.SIGKILL)
        wait_for(
            lambda: (
                "agent dev-0 exited with signal 9; not restarting it (--no-restart)" in d.text()
            ),
            30,
            "leptond dev to report the dead agent",
        )
        assert d.proc.poll() is None  # the master goes on
        assert all("agent-0" not in " ".join(p.cmdline()) for p in d.children())
    finally:
        stop(d)


def test_it_stops_with_one_line_and_leaves_nothing_running(dev: Dev) -> None:
    kids = [p.pid for p in dev.children()]
    assert len(kids) == 3  # the master and two agents
    before = dev.text()
    dev.proc.send_signal(signal.SIGTERM)
    assert dev.proc.wait(60) == 0
    said = dev.text()[len(before) :].strip().splitlines()
    assert said == ["leptond dev: stopped the master and 2 agent(s)"], said
    for pid in kids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
