"""The per-task supervisor: `python -m agent.shim TASK_DIR`.

The runner starts one shim per task in a new session, so the shim outlives an
agent that crashes or is killed. (To keep the interpreter's start-up off the
task-start path, the runner may instead hand the task to a shim started ahead
of time, `python -m agent.shim --spare AGENT_PID`, which waits for its task
dir on stdin and from then on is the same shim; see agent/spare.py.)

The shim starts the task, pipes its output into the capped log, enforces the
stop request and the time limit (SIGTERM to the whole task, SIGKILL after the
grace period), and finally writes exit.json. A restarted agent learns
everything from the task directory.

The shim itself stays root; in the task's child, before exec, it moves the
child into the task's cgroup (so nothing the task ever runs is outside it),
gives it a neutral OOM score (the shim may be protected, a task never is),
its own IPC namespace and private /dev/shm and /tmp (agent/taskns.py),
covers other GPUs' device files where no device program could be attached,
and then takes on the task's user (groups, gid, uid). `kill_task` is the one
way the shim kills its task: the whole cgroup when there is one (nothing
survives through setsid or a double fork), else the task's process group.

Fencing: when the spec names a lease file (agent/lease.py), the shim ends the
whole task at once when the node's lease runs out, whatever the agent is
doing (it may be stopped or dead), and does not start a task without a lease.
It also watches the agent that wrote the lease: when that agent dies, the
lease ends within the disconnect confirm window unless a restarted agent
renews it. The leader declares the node down only later, so no task is still
running when its replacement starts elsewhere.

Ordering rules (the runner relies on them):
- shim.pid is written only after the signal handlers are installed, so a
  SIGTERM sent to a pid from shim.pid is always handled as a stop request.
- exit.json is written (durably) before the shim exits; a dead shim without
  exit.json therefore means the supervisor was lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from agent import devfilter, taskns
from agent.cgroup_task import TaskCgroup, signal_pids, size_text
from agent.cgroup_task import from_json as cgroup_from_json
from agent.lease import LeaseReader
from agent.taskdir import (
    EXIT,
    SHIM_LOG,
    SHIM_PID,
    SPARE_FLAG,
    SPEC,
    STOP,
    TASK_PID,
    WARN,
    ProcRecord,
    atomic_write_json,
    read_json,
)
from agent.tasklog import STDERR, RotatingLog
from agent.tty import ShimTerminal, make_controlling_terminal
from leptond.clock import REAL as clock

# How often the stop file and the clock are looked at when nothing else
# wakes the loop up (signals and output wake it at once).
TICK_S = 0.1
# After the main process exits, stragglers in its group are killed and the
# pipe is drained for at most this long (a setsid'd grandchild may hold it).
DRAIN_S = 1.0
# A spare checks this often that the agent that started it is still there;
# the EOF on its stdin normally tells it sooner.
SPARE_PARENT_CHECK_S = 1.0
LEASE_RAN_OUT = "killed: this node's lease from the leader ran out"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PR_SET_PDEATHSIG = 1


def base_env(user: dict[str, Any] | None = None) -> dict[str, str]:
    """The minimal environment a task starts from; the spec's env goes on top.
    A task run as another account gets that account's home, name and shell."""
    env = {
        "PATH": os.environ.get("PATH") or DEFAULT_PATH,
        "HOME": os.environ.get("HOME") or "/",
        "LANG": os.environ.get("LANG") or "C.UTF-8",
    }
    if user is not None:
        env["HOME"] = str(user["home"])
        env["USER"] = env["LOGNAME"] = str(user["name"])
        env["SHELL"] = str(user["shell"])
    return env


def exit_code_of(returncode: int) -> tuple[int, int | None]:
    """(exit_code, signal) with the shell convention 128+signo for signals."""
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, None


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


@dataclass(frozen=True)
class ChildSetup:
    """What the task's child does to itself between fork and exec, in order."""

    parent: int
    cgroup: TaskCgroup | None = None
    hide: tuple[str, ...] = ()  # device files to cover (no device program)
    cover: str = ""
    user: dict[str, Any] | None = None  # uid, gid, groups; None: stay as the shim
    cwd: str = ""
    # The task's own IPC namespace and private /dev/shm and /tmp of this many
    # bytes each (agent/taskns.py); 0: it shares the host's.
    private_tmp_bytes: int = 0
    keep: tuple[str, ...] = ()  # directories below /tmp it must still reach
    tty: bool = False  # fd 0 is a PTY slave to make the controlling terminal

    def __call__(self) -> None:
        step = "joining the task's cgroup"
        try:
            if self.tty:
                step = "taking its terminal"
                make_controlling_terminal()
                step = "joining the task's cgroup"
            # First, so that nothing the task runs exists outside its cgroup.
            if self.cgroup is not None:
                self.cgroup.join_self()
            # The shim may be protected from the OOM killer (the agent's unit
            # sets OOMScoreAdjust=-999); a task never is. Written as root, it
            # is also the floor the task cannot go below once it is its user.
            step = "resetting the task's OOM score"
            _neutral_oom_score()
            if self.private_tmp_bytes > 0:
                step = "giving the task its own /tmp, /dev/shm and IPC namespace"
                taskns.enter(self.private_tmp_bytes, self.keep)
            if self.hide:
                step = "hiding other GPUs' device files"
                devfilter.hide_in_private_namespace(
                    list(self.hide), self.cover, own_namespace=self.private_tmp_bytes <= 0
                )
            if self.private_tmp_bytes > 0:
                # The cwd Popen entered is now under a covered /tmp (a data dir
                # there): enter it again through the new mounts.
                step = f"entering {self.cwd}"
                os.chdir(self.cwd)
            if self.user is not None and int(self.user["uid"]) != os.geteuid():
                step = f"switching to user {self.user['name']}"
                os.setgroups([int(g) for g in self.user["groups"]])
                os.setresgid(*(int(self.user["gid"]),) * 3)
                os.setresuid(*(int(self.user["uid"]),) * 3)
                # Popen entered cwd as root; enter it again as the user, so a
                # directory the user may not use fails here, plainly.
                step = f"entering {self.cwd} as {self.user['name']}"
                os.chdir(self.cwd)
        except OSError as e:
            # stdout and stderr are the log pipe by now: say it there and stop.
            os.write(2, f"leptond: cannot start the task: {step}: {e.strerror}\n".encode())
            os._exit(126)
        # After the credential change, which clears the parent-death signal.
        _die_with_parent(self.parent)


def _neutral_oom_score() -> None:
    """oom_score_adj 0 for the task. Raising it is always allowed; where
    lowering a positive one back is not (an agent that is not root), the
    task is no more protected than the host's other processes, which is fine."""
    path = "/proc/self/oom_score_adj"
    try:
        with open(path, "w") as f:
            f.write("0")
    except OSError:
        with open(path) as f:
            if int(f.read().strip() or 0) < 0:
                raise


def _die_with_parent(parent: int) -> None:
    """The task gets SIGKILL when the shim dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the runner's "supervisor lost" cleanup still applies
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)  # the shim died before prctl took effect


class Output:
    """Where a task's output goes: all of it, in the order it came, to the
    output log, and its stderr also to a log of its own (agent/tasklog.py)."""

    def __init__(self, both: RotatingLog, stderr: RotatingLog) -> None:
        self.both = both
        self.stderr = stderr

    def write(self, data: bytes, err: bool = False) -> None:
        self.both.write(data)
        if err:
            self.stderr.write(data)

    @property
    def dropped(self) -> int:
        return self.both.dropped

    def close(self) -> None:
        self.both.close()
        self.stderr.close()


@dataclass
class StopRequest:
    reason: str
    grace_s: float


class Shim:
    def __init__(self, task_dir: Path) -> None:
        self.dir = task_dir
        self.spec: dict[str, Any] = {}
        self.stop_signalled = False
        self.stop: StopRequest | None = None
        self.kill_at: float | None = None  # monotonic time of the SIGKILL escalation
        self.escalated = False
        self.task_pid: int | None = None
        self.cgroup: TaskCgroup | None = None
        self.started_at = clock.now()
        self.lease: LeaseReader | None = None
        self.lease_killed = False
        # Whether the task was sent its warning signal (exit.json says so:
        # an exit 0 after it asks to run again).
        self.warned = False
        self.term: ShimTerminal | None = None  # an interactive task's terminal
        self._wake_r, self._wake_w = os.pipe()

    # ------------------------------------------------------------ signals

    def install_signals(self) -> None:
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        # Wakes select() on any handled signal. A full pipe only means a
        # wakeup is already pending, so no warning for it.
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop_signal)
        # SIGCHLD needs a Python handler for the wakeup fd to see it; the
        # handler itself does nothing, the loop reaps.
        signal.signal(signal.SIGCHLD, lambda s, f: None)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signalled = True

    # --------------------------------------------------------------- main

    def run(self) -> int:
        self.install_signals()
        me = ProcRecord.of(os.getpid())
        if me is not None:
            me.save(self.dir / SHIM_PID)
        spec = read_json(self.dir / SPEC)
        if spec is None:
            self.finish(None, None, f"leptond: cannot read {SPEC} in {self.dir}")
            return 1
        self.spec = spec
        self.cgroup = cgroup_from_json(spec.get("cgroup"))
        if (self.dir / STOP).exists() or self.stop_signalled:
            self.release_cgroup()
            self.finish(None, None, "stopped before start")
            return 0
        if spec.get("lease_file"):
            self.lease = LeaseReader(Path(str(spec["lease_file"])))
            if self.lease.expired():
                self.finish(None, None, "not started: this node's lease from the leader ran out")
                return 0
        log = Output(
            RotatingLog(self.dir, int(spec["log_cap_bytes"])),
            RotatingLog(self.dir, int(spec["log_cap_bytes"]), stream=STDERR),
        )
        try:
            code, sig, msg = self.supervise(log)
        except Exception as e:
            # A bug here must still end in a recorded exit and no stray task.
            traceback.print_exc()
            self.kill_task(signal.SIGKILL)
            code, sig, msg = None, None, f"leptond: supervisor error: {e!r}"
        finally:
            log.close()
        self.release_cgroup()
        # Last: once exit.json exists the runner may delete the directory.
        self.finish(code, sig, msg)
        return 0

    def supervise(self, log: Output) -> tuple[int | None, int | None, str]:
        argv = [str(a) for a in self.spec["argv"]]
        cwd = str(self.spec["cwd"])
        user = self.spec.get("user")
        env = base_env(user)
        env.update({str(k): str(v) for k, v in dict(self.spec.get("env") or {}).items()})
        setup = ChildSetup(
            parent=os.getpid(),
            cgroup=self.cgroup,
            hide=tuple(str(p) for p in self.spec.get("hide_devices") or ()),
            cover=str(self.spec.get("hide_cover") or ""),
            user=user,
            cwd=cwd,
            private_tmp_bytes=int(self.spec.get("private_tmp_bytes") or 0),
            keep=tuple(str(k) for k in self.spec.get("keep_visible") or ()),
            tty=bool(self.spec.get("tty")),
        )
        if setup.tty:
            return self.supervise_terminal(argv, env, cwd, setup, log)
        self.started_at = clock.now()
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,  # kept apart as well (Output)
                process_group=0,  # the task's own group: stop signals reach its children
                preexec_fn=setup,
                close_fds=True,
            )
        except OSError as e:
            code, msg = self.start_error(e, argv[0], cwd)
            log.write(msg.encode() + b"\n", err=True)
            return code, None, msg
        self.task_pid = proc.pid
        rec = ProcRecord.of(proc.pid) or ProcRecord(proc.pid, clock.now())
        rec.save(self.dir / TASK_PID)
        assert proc.stdout is not None and proc.stderr is not None
        returncode = self.loop(proc, proc.stdout.fileno(), proc.stderr.fileno(), log)
        code, sig = exit_code_of(returncode)
        return code, sig, self.message(returncode, log)

    def supervise_terminal(
        self, argv: list[str], env: dict[str, str], cwd: str, setup: ChildSetup, log: Output
    ) -> tuple[int | None, int | None, str]:
        """An interactive task: on a PTY of its own (agent/tty.py), in a new
        session whose id is its process group, as stops expect."""
        size = self.spec.get("tty_size") or [24, 80]
        term = ShimTerminal(self.dir, int(size[0]), int(size[1]))
        env.setdefault("TERM", str(self.spec.get("term") or "xterm-256color"))
        self.started_at = clock.now()
        try:
            slave = term.child_side()
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                preexec_fn=setup,
                close_fds=True,
            )
        except OSError as e:
            term.close()
            code, msg = self.start_error(e, argv[0], cwd)
            log.write(msg.encode() + b"\n", err=True)
            return code, None, msg
        term.started()
        self.task_pid = proc.pid
        rec = ProcRecord.of(proc.pid) or ProcRecord(proc.pid, clock.now())
        rec.save(self.dir / TASK_PID)
        # The terminal is the task's only output; the loop wants two, so the
        # second is a pipe already at its end.
        none_r, none_w = os.pipe()
        os.close(none_w)
        self.term = term
        try:
            returncode = self.loop(proc, term.master, none_r, log)
        finally:
            os.close(none_r)
            term.close()
        code, sig = exit_code_of(returncode)
        return code, sig, self.message(returncode, log)

    @staticmethod
    def start_error(e: OSError, cmd: str, cwd: str) -> tuple[int, str]:
        # subprocess reports a failed chdir with the directory as filename.
        if e.filename == cwd and cmd != cwd:
            return 127, f"leptond: cannot enter working directory {cwd}: {e.strerror}"
        if e.errno == errno.ENOENT:
            return 127, f"leptond: command not found: {cmd}"
        if e.errno == errno.EACCES:
            return 126, f"leptond: permission denied: {cmd}"
        return 126, f"leptond: cannot execute {cmd}: {e.strerror}"

    def loop(self, proc: subprocess.Popen[bytes], out_fd: int, err_fd: int, log: Output) -> int:
        started = clock.monotonic()
        raw_limit = self.spec.get("time_limit_s")
        limit_s = float(raw_limit) if raw_limit is not None else None
        deadline = started + limit_s if limit_s is not None else None
        raw_sig = self.spec.get("warn_signal")
        warn_sig = int(raw_sig) if raw_sig is not None else None
        # The warning goes warn_before_s ahead of the time limit (at once
        # when the limit is shorter than that).
        warn_at = None
        if warn_sig is not None and deadline is not None:
            warn_at = deadline - float(self.spec.get("warn_before_s") or 0.0)
        fds = [out_fd, err_fd, self._wake_r]
        next_stop_check = 0.0
        next_lease_check = 0.0
        while True:
            # The agent's pidfd wakes us the moment the agent exits (lease.py).
            agent_fd = self.lease.fileno() if self.lease is not None else None
            term_fds = self.term.fds() if self.term is not None else []
            watched = fds + term_fds if agent_fd is None else [*fds, *term_fds, agent_fd]
            readable, _, _ = select.select(watched, [], [], TICK_S)
            if agent_fd is not None and agent_fd in readable:
                assert self.lease is not None
                self.lease.poll_agent()
                next_lease_check = 0.0  # look at the lease now
            for fd in (out_fd, err_fd):
                if fd in readable and not self._pump(fd, log, fd == err_fd):
                    fds.remove(fd)  # EOF: the task closed it, it may still run
            for fd in term_fds:
                if fd in readable and self.term is not None:
                    self.term.readable(fd)
            if self._wake_r in readable:
                self._drain_wakeups()
            now = clock.monotonic()
            if (
                self.stop is None
                and warn_sig is not None
                and self._warn_due(warn_sig, warn_at, now, next_stop_check)
            ):
                self.warn(warn_sig)
            if self.stop is None:
                if self.stop_signalled or (now >= next_stop_check and self._stop_file()):
                    self.request_stop(self._stop_reason(), self._stop_grace_s(), proc.pid)
                elif deadline is not None and now >= deadline:
                    self.request_stop(
                        f"time limit of {limit_s:g}s exceeded",
                        float(self.spec["kill_grace_s"]),
                        proc.pid,
                    )
                if now >= next_stop_check:
                    next_stop_check = now + TICK_S
            if self.kill_at is not None and not self.escalated and now >= self.kill_at:
                self.escalated = True
                self.kill_task(signal.SIGKILL)
            if self.lease is not None and not self.lease_killed and now >= next_lease_check:
                next_lease_check = now + TICK_S
                if self.lease.expired():
                    # No grace: the leader may place this task elsewhere soon.
                    self.lease_killed = True
                    self.kill_task(signal.SIGKILL)
            if _exited(proc.pid):
                # The task is over when its main process is: nothing it left
                # behind may keep running. The leader is a zombie now, which
                # keeps its pgid reserved, so the group kill cannot hit a
                # reused id. Then reap it.
                self.kill_task(signal.SIGKILL)
                self._drain(out_fd, err_fd, log, fds)
                return proc.wait()

    def _pump(self, fd: int, log: Output, err: bool) -> bool:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            data = b""  # a PTY master once every slave side closed: its EOF
        if data:
            log.write(data, err)
            if self.term is not None and not err:
                self.term.output(data)
        return bool(data)

    def _drain(self, out_fd: int, err_fd: int, log: Output, fds: list[int]) -> None:
        end = clock.monotonic() + DRAIN_S
        pipes = [fd for fd in (out_fd, err_fd) if fd in fds]
        while pipes and clock.monotonic() < end:
            readable, _, _ = select.select(pipes, [], [], max(0.0, end - clock.monotonic()))
            for fd in readable:
                if not self._pump(fd, log, fd == err_fd):
                    pipes.remove(fd)

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    def _stop_file(self) -> bool:
        return (self.dir / STOP).exists()

    def _stop_reason(self) -> str:
        """Why the agent stops the task (an eviction says so), or the default."""
        reason = (read_json(self.dir / STOP) or {}).get("reason")
        if isinstance(reason, str) and reason:
            return reason[:512]
        return "stopped by request"

    def _stop_grace_s(self) -> float:
        req = read_json(self.dir / STOP) or {}
        grace = req.get("grace_s")
        if isinstance(grace, int | float) and grace >= 0:
            return float(grace)
        return float(self.spec["kill_grace_s"])

    def _warn_due(self, sig: int, warn_at: float | None, now: float, check_at: float) -> bool:
        """Whether the warning signal is due: its time before the limit came,
        or the leader asked for it (a drain deadline is near)."""
        if self.warned:
            return False
        if warn_at is not None and now >= warn_at:
            return True
        return now >= check_at and (self.dir / WARN).exists()

    def warn(self, sig: int) -> None:
        """Send the task its warning signal, once: it may checkpoint and exit."""
        self.warned = True
        print(f"leptond: sent {signal.Signals(sig).name} to the task as its warning")
        self.kill_task(sig)

    def request_stop(self, reason: str, grace_s: float, pgid: int) -> None:
        self.stop = StopRequest(reason, grace_s)
        self.kill_at = clock.monotonic() + grace_s
        req = read_json(self.dir / STOP) or {}
        warn_sig = self.spec.get("warn_signal")
        if req.get("warn") is True and warn_sig is not None:
            # A preemption of a task that asked for a warning: the signal
            # instead of SIGTERM (once), then SIGKILL after the grace.
            if not self.warned:
                self.warn(int(warn_sig))
            return
        self.kill_task(signal.SIGTERM)

    def kill_task(self, sig: int) -> None:
        """Signal the whole task: every process in its cgroup once (SIGKILL:
        the cgroup's kill, which nothing escapes by forking) when it has one,
        else its process group. Every stop, time limit and end of the
        task goes through here."""
        if (self.cgroup is None or sig == signal.SIGKILL) and self.task_pid is not None:
            _killpg(self.task_pid, sig)
        if self.cgroup is None:
            return
        try:
            if sig == signal.SIGKILL:
                if not self.cgroup.kill():
                    print(f"leptond: task cgroup not empty after kill: {self.cgroup.pids()}")
                return
            pids = self.cgroup.pids()
        except OSError as e:
            print(f"leptond: cannot signal the task's cgroup: {e}")  # goes to shim.log
            pids = set()
        # Once, to each process: a second SIGTERM or warning signal means
        # something to many programs (torchrun and most shells stop harder on
        # the second). The task's process group first, in one call, so that a
        # shell and its children get it together: signalled one by one, a
        # shell could wake from its child's death before its own signal came
        # and print "Terminated" into the task's log. Then the members of its
        # cgroup outside that group (setsid, setpgid). A task not in its
        # cgroup yet (it joins before exec) is all in its group.
        if self.task_pid is not None:
            _killpg(self.task_pid, sig)
        signal_pids({p for p in pids if _pgid(p) != self.task_pid}, sig)

    def release_cgroup(self) -> None:
        """Remove the task's cgroup once it is empty (the runner retries later
        if anything outlives this)."""
        if self.cgroup is None:
            return
        try:
            for _ in range(3):
                if not self.cgroup.is_empty():
                    self.cgroup.kill()
                if self.cgroup.remove():
                    return
                clock.block(0.05)  # a process still on its way out
            print(f"leptond: task cgroup still busy, left for the agent: {self.cgroup.pids()}")
        except OSError as e:
            print(f"leptond: cannot remove the task's cgroup: {e}")

    def oom_note(self, returncode: int) -> str | None:
        """Why the kernel's OOM killer was involved, if it was."""
        if self.cgroup is None:
            return None
        try:
            kills = self.cgroup.oom_kills()
        except OSError:
            return None
        if kills <= 0:
            return None
        limit = int(self.spec.get("mem_bytes") or 0)
        what = f"limit {size_text(limit)}" if limit > 0 else "no task limit"
        if returncode == -signal.SIGKILL:
            return f"out of memory ({what})"
        return f"out of memory ({what}): the kernel killed {kills} of its processes"

    def message(self, returncode: int, log: Output) -> str:
        oom = self.oom_note(returncode)
        if self.lease_killed:
            msg = LEASE_RAN_OUT
        elif self.stop is None and oom is not None and returncode == -signal.SIGKILL:
            msg = oom
        elif self.stop is None:
            msg = describe_exit(returncode)
            if oom is not None:
                msg += f"; {oom}"
        else:
            msg = self.stop.reason
            if self.escalated:
                msg += f"; killed after {self.stop.grace_s:g}s grace"
        if log.dropped:
            msg += f" ({log.dropped} bytes of early output dropped by the log cap)"
        return msg

    def finish(self, exit_code: int | None, sig: int | None, message: str) -> None:
        atomic_write_json(
            self.dir / EXIT,
            {
                "exit_code": exit_code,
                "signal": sig,
                "started_at": self.started_at,
                "finished_at": clock.now(),
                "message": message,
                "warned": self.warned,
            },
            exclusive=True,  # a runner may already have declared this task lost
        )


def _pgid(pid: int) -> int | None:
    """The process group of `pid`, or None once it is gone."""
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _exited(pid: int) -> bool:
    # WNOWAIT: look without reaping, so the caller can still signal the group.
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None and info.si_pid != 0


def wait_for_task(agent_pid: int) -> Path | None:
    """A spare's wait: the task dir the agent writes on stdin as one line, or
    None once the agent closed the pipe without one or is gone."""
    buf = b""
    while b"\n" not in buf:
        # Reparented: the agent died, and a spare must not outlive it.
        if os.getppid() != agent_pid:
            return None
        readable, _, _ = select.select([0], [], [], SPARE_PARENT_CHECK_S)
        if readable:
            chunk = os.read(0, 4096)
            if not chunk:
                return None  # EOF without a whole line: closed, or the agent died
            buf += chunk
    return Path(os.fsdecode(buf.partition(b"\n")[0]))


def enter_task_dir(task_dir: Path) -> None:
    """Set a spare up the way the runner starts a shim for `task_dir`: that dir
    as cwd (also how a restarted runner recognises it), shim.log as stdout and
    stderr, nothing on stdin."""
    os.chdir(task_dir)
    log_fd = os.open(SHIM_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null_fd)
    os.close(log_fd)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == SPARE_FLAG:
        task_dir = wait_for_task(int(argv[2]))
        if task_dir is None:
            return 0  # nothing was written, nothing is left behind
        enter_task_dir(task_dir)
        return Shim(task_dir).run()
    if len(argv) != 2:
        print("usage: python -m agent.shim TASK_DIR | --spare AGENT_PID", file=sys.stderr)
        return 2
    return Shim(Path(argv[1])).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
