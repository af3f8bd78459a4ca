"""`leptonctl run -it` and `leptonctl exec` on a real master and agent, driven
under tmux as a person would: keys sent, the pane read, the exit code
checked. The task's terminal is a real PTY on the host; window size changes
and Ctrl-C reach it; the job ends with the session; both are audited."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from leptond.client import AsyncClient, LeptonError, calls
from tests.harness import ROOT, Cluster, env, wait_for

FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cl = Cluster(tmp_path_factory.mktemp("interactive") / "cluster", n_masters=1, ttl_s=3.0)
    try:
        cl.start_masters()
        cl.start_agent("h1", gpus="2")
        cl.wait_nodes_ready(1)
        yield cl
    finally:
        cl.close()


class Tmux:
    """One detached tmux session on its own server socket, killed at the end."""

    def __init__(self, root: Path, command: str, cols: int = 100, rows: int = 30) -> None:
        self.sock = str(root / f"tmux-{uuid.uuid4().hex[:8]}")
        self.name = "t"
        self.tmux("new-session", "-d", "-s", self.name, "-x", str(cols), "-y", str(rows), command)

    def tmux(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-S", self.sock, *args], capture_output=True, text=True, timeout=30
        )
        if out.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.name, *keys)

    def pane(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.name, "-S", "-200")

    def size(self) -> tuple[int, int]:
        rows, cols = self.tmux(
            "display", "-p", "-t", self.name, "#{pane_height} #{pane_width}"
        ).split()
        return int(rows), int(cols)

    def wait(self, pattern: str, timeout_s: float = 60) -> re.Match[str]:
        try:
            return wait_for(
                lambda: re.search(pattern, self.pane()), timeout_s, f"{pattern!r} in the pane"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the pane:\n{self.pane()}") from None

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True, timeout=30)


def ctl_command(c: Cluster, *args: str, then: str = "") -> str:
    """A shell command line running leptonctl against the cluster."""
    e = env()
    e.update(LEPTON_ADDR=c.addrs, LEPTON_TOKEN=c.admin_token)
    e["LEPTON_CONFIG"] = str(c.root / "no-config.toml")
    pairs = " ".join(
        f"{k}={shlex.quote(v)}" for k, v in e.items() if k.startswith(("LEPTON", "PATH", "PYTHON"))
    )
    line = f"cd {shlex.quote(str(ROOT))} && env {pairs} {shlex.quote(sys.executable)} -m leptonctl.cli "
    return line + " ".join(shlex.quote(a) for a in args) + then


def audit(c: Cluster) -> list[dict[str, Any]]:
    path = c.root / "master-0" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def attach_error(c: Cluster, job: str) -> str:
    async def go() -> str:
        client = AsyncClient(c.addrs, c.admin_token)
        try:
            async for _ in calls.attach(client.wire, job, "s" * 16, 24, 80):
                pass
        except LeptonError as exc:
            return exc.message
        finally:
            await client.close()
        return ""

    return asyncio.run(go())


def newest_job(c: Cluster) -> str:
    rows = c.ctl_json("jobs", "--all")
    return str(max(rows, key=lambda r: r["submitted_at"])["id"])


def test_run_it_is_a_terminal_with_size_and_ctrl_c_and_ends_with_the_session(
    c: Cluster, tmp_path: Path
) -> None:
    done = tmp_path / "exit"
    cmd = ctl_command(
        c, "run", "--cpus", "0.1", "--mem", "64M", "--env", "PS1=lt$ ", "-it", "--", "sh",
        then=f"; echo EXIT=$? > {shlex.quote(str(done))}; sleep 600",
    )  # fmt: skip
    t = Tmux(tmp_path, cmd)
    try:
        t.wait(r"(?m)^lt\$$")  # the prompt (tmux drops trailing blanks)
        job = newest_job(c)
        # The terminal's socket is root's alone: no task can type into it.
        sock = c.root / "agent-h1" / "tasks" / f"{job}.0_a1" / "tty.sock"
        st_mode = sock.stat()
        assert (stat.S_ISSOCK(st_mode.st_mode), st_mode.st_mode & 0o777, st_mode.st_uid) == (
            True,
            0o600,
            0,
        )
        t.keys("echo hello-$((6*7))", "Enter")
        t.wait(r"\nhello-42")
        # A real terminal: the pane's size, then a new one after a resize.
        t.keys("tty; stty size", "Enter")
        rows, cols = t.size()
        t.wait(rf"/dev/pts/\d+\s+{rows} {cols}")
        t.tmux("resize-window", "-t", t.name, "-x", "90", "-y", "20")
        rows, cols = t.size()
        assert (rows, cols) != (30, 100)
        t.keys("stty size", "Enter")
        # Its answer ends a line; the line may lack the typed command, whose
        # echo can cross tmux's redraw of the resized pane.
        t.wait(rf"(?m)(^|\s){rows} {cols}$")
        # Ctrl-C stops the remote foreground job, not the session.
        t.keys("sleep 300; echo not-interrupted", "Enter")
        wait_for(lambda: "sleep 300" in t.pane(), 30, "the sleep to start")
        prompts = len(re.findall(r"(?m)^lt\$", t.pane()))
        t.keys("C-c")
        # The shell redraws its prompt after the interrupt; keys typed before
        # that are echoed by the terminal ahead of the prompt, and the answer
        # then follows the prompt on its line, so wait for it first.
        wait_for(lambda: len(re.findall(r"(?m)^lt\$", t.pane())) > prompts, 30, "a new prompt")
        t.keys("echo after-$((1+1))", "Enter")
        t.wait(r"(?m)(^|\s)after-2$")
        # Interrupted: the line after the sleep never ran (only its echo shows).
        assert not re.search(r"(?m)^not-interrupted$", t.pane())
        t.keys("exit 3", "Enter")
        wait_for(lambda: done.exists() and done.read_text().strip(), 60, "leptonctl to exit")
        assert done.read_text().strip() == "EXIT=3"
        st = c.wait_job(job, FINAL)
        assert (st["state"], st["tasks"][0]["exit_code"]) == ("failed", 3)
        assert c.status(job)["tasks"][0]["restarts"] == 0
        assert any(e["action"] == "attach" and e["target"] == job for e in audit(c))
    finally:
        t.close()


def test_the_job_ends_when_the_client_goes_away(c: Cluster, tmp_path: Path) -> None:
    t = Tmux(tmp_path, ctl_command(c, "run", "--cpus", "0.1", "--mem", "64M", "-it", "--", "sh"))
    try:
        t.wait(r"(?m)^(#|\$)$")
        job = newest_job(c)
        assert c.status(job)["state"] == "running"
    finally:
        t.close()  # the terminal closes: leptonctl dies with it
    st = c.wait_job(job, FINAL)
    assert st["state"] == "cancelled"


def test_exec_enters_the_task_its_user_cgroup_and_namespaces(c: Cluster, tmp_path: Path) -> None:
    # The task shows where it runs, and leaves a file in its private /tmp.
    probe = "id -u; cat /proc/self/cgroup; readlink /proc/self/ns/mnt /proc/self/ns/ipc"
    job = c.submit(
        "--cpus", "0.1", "--mem", "64M", "--", "sh", "-c",
        f"echo secret > /tmp/marker; {probe}; sleep 600",
    )  # fmt: skip
    c.wait_job(job, {"running"})
    own = wait_for(lambda: (o := c.ctl("logs", job).stdout).count("\n") >= 4 and o, 30, "its probe")
    out = c.ctl("exec", job, "--", "sh", "-c", f"{probe}; cat /tmp/marker")
    assert out.stdout == own + "secret\n"
    assert not Path("/tmp/marker").exists() or Path("/tmp/marker").read_text() != "secret\n"
    code = c.ctl("exec", job, "--", "sh", "-c", "exit 7", check=False)
    assert code.returncode == 7
    missing = c.ctl("exec", job, "--", "no-such-command-x", check=False)
    assert missing.returncode == 127 and "command not found" in missing.stdout
    assert any(
        e["action"] == "exec" and e["target"] == job and "exit 7" in e["result"] for e in audit(c)
    )
    # -it under tmux: a terminal inside the task.
    t = Tmux(
        tmp_path, ctl_command(c, "exec", job, "-it", "--", "sh", then="; echo EXIT=$?; sleep 600")
    )
    try:
        t.keys("cat /tmp/marker; tty", "Enter")
        t.wait(r"secret\s+/dev/pts/\d+")
        t.keys("exit 4", "Enter")
        t.wait(r"EXIT=4")
    finally:
        t.close()
    assert c.status(job)["state"] == "running"  # exec sessions do not end the task
    c.ctl("cancel", job)
    c.wait_job(job, FINAL)


def sleeping(pid: int, seconds: str) -> bool:
    """pid is a live (not zombie) `sleep SECONDS`: a pid reused by another
    process does not count."""
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and p.cmdline() == ["sleep", seconds]
    except psutil.Error:
        return False


def test_exec_ends_when_its_command_exits_though_a_child_runs_on(
    c: Cluster, tmp_path: Path
) -> None:
    job = c.submit("--cpus", "0.1", "--mem", "64M", "--", "sleep", "600")
    c.wait_job(job, {"running"})
    # Without a terminal: the background sleep holds the output pipe, yet the
    # exec returns the command's status after its output (docker exec's way).
    out = c.ctl(
        "exec", job, "--", "sh", "-c", "sleep 782 & echo $!; echo started; exit 5",
        check=False, timeout_s=60,
    )  # fmt: skip
    assert out.returncode == 5, out
    piped, said = out.stdout.split()
    assert said == "started" and sleeping(int(piped), "782")
    # With one: a child that ignores the hangup holds the terminal open.
    t = Tmux(
        tmp_path,
        ctl_command(
            c, "exec", job, "-it", "--", "sh", "-c",
            'trap "" HUP; sleep 783 & echo pid=$!; echo started',
            then="; echo EXIT=$?; sleep 600",
        ),
    )  # fmt: skip
    try:
        found = t.wait(r"pid=(\d+)\s+started\s+EXIT=0")
    finally:
        t.close()
    held = int(found.group(1))
    assert sleeping(held, "783")
    assert c.status(job)["state"] == "running"
    # Both children live in the task: cancelling it leaves neither behind.
    c.ctl("cancel", job)
    c.wait_job(job, FINAL)
    wait_for(
        lambda: not sleeping(int(piped), "782") and not sleeping(held, "783"),
        60,
        "the exec's background children to end with the task",
    )


def test_sessions_refuse_what_they_cannot_do(c: Cluster) -> None:
    job = c.submit("--cpus", "0.1", "--mem", "64M", "--", "sleep", "600")
    c.wait_job(job, {"running"})
    assert "has no terminal" in attach_error(c, job)
    bad = c.ctl("run", "-i", "--", "sh", check=False)
    assert bad.returncode == 2 and "add -t" in bad.stderr
    gone = c.ctl("exec", "j-000000000000", "--", "true", check=False)
    assert gone.returncode != 0 and "no job" in gone.stderr
    c.ctl("cancel", job)
