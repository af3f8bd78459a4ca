"""Run a command inside a running task: `python -m agent.execin TASK_DIR -- CMD...`.

What `leptonctl exec` starts, as root, from the agent (agent/sessions.py).
Before it becomes the command it enters what the task's own child entered
(agent/shim.py ChildSetup): the task's cgroup (its limits, and its device
rules where a device program guards the GPUs), the task's mount and IPC
namespaces (its private /tmp and /dev/shm, and the covers over other GPUs'
device files where no device program could be attached), then the task's
user, and its working directory and environment. With LEPTON_EXEC_TTY set,
fd 0 is a PTY slave and becomes its controlling terminal first.

Every failure is one line on stderr and exit 125 (the task is not running or
cannot be entered), 126 (the command cannot be run) or 127 (not found).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from agent.cgroup_task import from_json as cgroup_from_json
from agent.shim import base_env
from agent.taskdir import SPEC, TASK_PID, ProcRecord, read_json
from agent.tty import make_controlling_terminal

NAMESPACES = ("ipc", "mnt")


def fail(code: int, message: str) -> int:
    os.write(2, f"leptond: exec: {message}\n".encode())
    return code


def enter_namespaces(pid: int) -> None:
    """Join the task's namespaces that differ from ours."""
    libc = ctypes.CDLL(None, use_errno=True)
    for ns in NAMESPACES:
        theirs = f"/proc/{pid}/ns/{ns}"
        if os.readlink(theirs) == os.readlink(f"/proc/self/ns/{ns}"):
            continue
        fd = os.open(theirs, os.O_RDONLY)
        try:
            if libc.setns(fd, 0) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns {ns}: {os.strerror(err)}")
        finally:
            os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        return fail(125, "usage: python -m agent.execin TASK_DIR -- CMD...")
    task_dir, cmd = Path(argv[0]), argv[2:]
    if os.environ.get("LEPTON_EXEC_TTY"):
        try:
            make_controlling_terminal()
        except OSError as e:
            return fail(125, f"cannot take the terminal: {e.strerror}")
    spec = read_json(task_dir / SPEC)
    rec = ProcRecord.load(task_dir / TASK_PID)
    task = rec.process() if rec is not None else None
    if spec is None or rec is None or task is None:
        return fail(125, "the task is not running")
    user = spec.get("user")
    step = "joining the task's cgroup"
    try:
        cgroup = cgroup_from_json(spec.get("cgroup"))
        if cgroup is not None:
            cgroup.join_self()
        step = "entering the task's namespaces"
        enter_namespaces(rec.pid)
        cwd = str(spec.get("cwd") or "/")
        if user is not None and int(user["uid"]) != os.geteuid():
            step = f"switching to user {user['name']}"
            os.setgroups([int(g) for g in user["groups"]])
            os.setresgid(*(int(user["gid"]),) * 3)
            os.setresuid(*(int(user["uid"]),) * 3)
        step = f"entering {cwd}"
        os.chdir(cwd)
    except (OSError, KeyError, TypeError, ValueError) as e:
        return fail(125, f"{step}: {getattr(e, 'strerror', None) or e}")
    env = base_env(user)
    env.update({str(k): str(v) for k, v in dict(spec.get("env") or {}).items()})
    if os.environ.get("LEPTON_EXEC_TTY"):
        env.setdefault("TERM", "xterm-256color")
    try:
        os.execvpe(cmd[0], cmd, env)
    except FileNotFoundError:
        return fail(127, f"command not found: {cmd[0]}")
    except OSError as e:
        return fail(126, f"cannot run {cmd[0]}: {e.strerror}")
    return 126  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
