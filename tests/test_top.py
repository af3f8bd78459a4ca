"""`leptonctl top`: what it draws (a pure function of the overview), and the
real thing in a terminal under tmux, on a cluster of one master and one
agent: it shows nodes, GPUs and jobs, follows a job from pending to running
without a restart, and quits on q."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leptonctl.top import gpu_cells, render
from tests.harness import ROOT, Cluster, env, wait_for

TMUX = shutil.which("tmux")


def node(
    name: str, state: str = "ready", used: int = 0, total: int = 4, **kw: Any
) -> dict[str, Any]:
    return {
        "name": name, "state": state, "gpus_used": used, "gpus_total": total,
        "gpu_util_pct": 50.0, "cpus_used": 1.0, "cpus": 8.0, "mem_used_bytes": 0,
        "mem_bytes": 1 << 30, "gpu_faults": [], "drain_reason": None, **kw,
    }  # fmt: skip


def test_render_draws_gpus_as_a_grid_and_says_why_jobs_wait() -> None:
    ov = {
        "cluster": {"leader": "10.0.0.1:7441"},
        "gpus": {"total": 7, "allocated": 2, "unhealthy": 1},
        "nodes": [
            node("gpu-1", used=2, gpu_faults=[{"index": 3, "reason": "Xid 79: off the bus"}]),
            node("gpu-2", state="down", total=4, gpu_util_pct=None),
        ],
        "running": [
            {
                "id": "j-1",
                "user": "alice",
                "name": "train",
                "gpus_total": 2,
                "started_at": 1000.0,
                "on": ["gpu-1"],
            },
        ],
        "pending": [
            {
                "id": "j-2",
                "user": "bob",
                "name": "big",
                "gpus_total": 8,
                "submitted_at": 900.0,
                "reason": "needs 8 GPUs on one node; the largest has 4",
            },
        ],
        "counts": {"running": 1, "pending": 1},
    }
    lines = render(ov, 120, 40, now=1090.0)
    text = "\n".join(lines)
    assert lines[0] == "leptond top - 00:18:10 UTC - q quits"
    assert "leader 10.0.0.1:7441" in lines[1] and "GPUs 2/7 in use, 1 unhealthy" in lines[1]
    assert "[##.x]" in text and "[----]" in text
    assert "GPU 3 unhealthy: Xid 79: off the bus" in text
    assert any(" j-1 " in line and "1m30s" in line and "gpu-1" in line for line in lines)
    assert any(" j-2 " in line and "needs 8 GPUs on one node" in line for line in lines)
    # Small terminals get what fits, and a count of the rest.
    small = render(ov, 30, 5, now=1090.0)
    assert len(small) == 5 and all(len(line) <= 30 for line in small)
    assert small[-1].startswith("... ")
    assert gpu_cells(node("n", used=1, total=2)) == "#."
    # Names and reasons come from other users and hosts: none drives the terminal.
    ov["running"][0]["name"] = "\x1b[2Jgone"
    ov["nodes"][0]["gpu_faults"][0]["reason"] = "Xid 79\nforged line\x1b]0;title\x07"
    lines = render(ov, 200, 40, now=1090.0)
    assert not any(c in line for line in lines for c in "\x1b\x07\n")
    assert any("\\x1b[2Jgone" in line for line in lines)
    assert any("Xid 79\\nforged line\\x1b]0;title\\x07" in line for line in lines)


def test_render_shows_an_array_as_one_row_with_its_counts() -> None:
    array = {"array": "0-999", "array_tasks": 1000, "gpus_total": 1, "name": "sweep"}
    ov = {
        "cluster": {"leader": None},
        "gpus": {"total": 8, "allocated": 8, "unhealthy": 0},
        "nodes": [node("gpu-1", used=4), node("gpu-2", used=4)],
        "running": [
            {
                **array, "id": "j-a", "user": "alice", "started_at": 1000.0,
                "on": ["gpu-1", "gpu-2"], "gpus_held": 8,
                "task_states": {"running": 8, "pending": 900, "succeeded": 90, "failed": 2},
            },
        ],
        "pending": [
            {
                **array, "id": "j-b", "user": "bob", "submitted_at": 1000.0, "reason": "",
                "task_states": {"pending": 1000},
            },
        ],
        "counts": {"running": 1, "pending": 1},
    }  # fmt: skip
    lines = render(ov, 200, 40, now=1090.0)
    run = next(line for line in lines if " j-a " in line)
    assert "   8  " in run and "gpu-1,gpu-2" in run
    assert "[array 0-999: 8 running, 900 pending, 90 succeeded, 2 failed]" in run
    pend = next(line for line in lines if " j-b " in line)
    assert pend.endswith("[array 0-999: 1000 pending]")


def test_render_counts_every_node_when_the_master_lists_only_the_first() -> None:
    # A large cluster: `overview` lists the nodes that fit in its byte budget
    # and counts all of them by state.
    ov = {
        "cluster": {"leader": None},
        "gpus": {"total": 0, "allocated": 0, "unhealthy": 0},
        "nodes": [node("gpu-1"), node("gpu-2")],
        "node_counts": {"ready": 9000, "down": 1000},
        "running": [], "pending": [],
        "counts": {"running": 0, "pending": 0},
    }  # fmt: skip
    lines = render(ov, 200, 40, now=1090.0)
    assert "nodes: down 1000, ready 9000" in lines[1]
    assert "NODES (10000; the first 2 below, leptonctl nodes lists all)" in lines
    # All of them listed: the plain count, as before.
    ov["node_counts"] = {"ready": 2}
    assert "NODES (2)" in render(ov, 200, 40, now=1090.0)


@pytest.fixture(scope="module")
def tc(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("top") / "cluster", n_masters=1)
    failed = request.session.testsfailed
    try:
        c.start_masters()
        c.start_agent("h1", gpus="2")
        c.wait_nodes_ready(1)
        yield c
    finally:
        if request.session.testsfailed > failed:
            print(c.logs())
        c.close()


class Tmux:
    """One tmux server of our own (-L), killed at the end."""

    def __init__(self, root: Path) -> None:
        assert TMUX is not None, "tmux is missing: apt-get install tmux (.ci/run does)"
        self.tmux = TMUX
        self.sock = f"lepton-top-{uuid.uuid4().hex[:8]}"
        self.root = root

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.tmux, "-L", self.sock, *args], capture_output=True, text=True, timeout=30,
            check=check,
        )  # fmt: skip

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top").stdout

    def alive(self) -> bool:
        return self.run("has-session", "-t", "top", check=False).returncode == 0

    def close(self) -> None:
        self.run("kill-server", check=False)


def test_top_under_tmux_refreshes_and_quits_on_q(tc: Cluster, tmp_path: Path) -> None:
    t = Tmux(tmp_path)
    rc = tmp_path / "rc"
    e = env()
    e.update(LEPTON_ADDR=tc.addrs, LEPTON_TOKEN=tc.admin_token, TERM="xterm-256color")
    e["LEPTON_CONFIG"] = str(tmp_path / "none.toml")
    cmd = f"{sys.executable} -m leptonctl.cli top; echo $? > {rc}"
    try:
        # The session's environment comes from tmux's server: pass it on -e.
        args = [f"-e{k}={v}" for k, v in e.items() if k.startswith(("LEPTON_", "PYTHON"))]
        t.run("new-session", "-d", "-s", "top", "-x", "150", "-y", "40", "-c", str(ROOT),
              *args, cmd)  # fmt: skip
        first = wait_for(lambda: "h1" in (s := t.screen()) and s, 60, "top to draw h1")
        assert "NODES (1)" in first and "[..]" in first and "q quits" in first
        # A job appears, then runs, without restarting top.
        blocker = tc.submit("--gpus", "2", "--", "sleep", "600")
        tc.wait_job(blocker, {"running"})
        job = tc.submit("--gpus", "1", "--", "sleep", "600")
        wait_for(lambda: "[##]" in (s := t.screen()) and job in s and s, 30, "the grid full")
        screen = t.screen()
        waiting = next(line for line in screen.splitlines() if job in line)
        assert "needs 1 GPU" in waiting, screen  # the scheduler's reason, cut to the width
        tc.ctl("cancel", blocker)
        wait_for(
            lambda: (s := t.screen()) and any(job in ln and "h1" in ln for ln in s.splitlines()),
            30,
            "the job shown running on h1",
        )
        tc.ctl("cancel", job)
        t.run("send-keys", "-t", "top", "q")
        wait_for(lambda: rc.exists() and rc.read_text().strip() == "0", 30, "top to exit 0")
    finally:
        t.close()


def test_top_refuses_a_pipe_with_one_line(tc: Cluster) -> None:
    out = tc.ctl("top", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "leptonctl: error: top draws on a terminal; for scripts use nodes, jobs or queue"
    ]
