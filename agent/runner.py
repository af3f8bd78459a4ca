"""The task runner: start, stop, watch and re-adopt tasks on this host.

Every task runs under its own shim (agent/shim.py) in a new session, so tasks
survive a crash or `kill -9` of the agent. All state lives in the task
directories under `root` (layout in agent/taskdir.py); this object only caches
which shim belongs to which task. A restarted agent calls `adopt()` and gets
back the tasks still running and the exits it has not yet reported.

Exits are delivered at least once: `poll()` keeps returning a finished task
until `ack()` records (on disk) that the leader has it. The task directories
are read from disk once (by `adopt()`, or the first `poll()`); from then on
this object knows which runs ended unacked and when each was acked, so a poll
touches only the runs that need it, however many old directories there are.
`collect_garbage()` deletes the directories of runs acked before a time (the
agent's --task-retention).

With `keep_spare()`, tasks start under a shim started ahead of time
(agent/spare.py), which saves the interpreter's start-up; without a usable
spare a task starts under a new shim, as before.

Isolation (when the runner has a cgroup manager and the spec a user): each
task gets its own cgroup with its limits and device rules, created here
before the shim starts and removed when the task is over; the task runs as
its user, in a working directory that user owns (mode 0700). The run's
directory itself stays the agent's (its control files are root's, 0600);
it is only made passable (0711) so the user can reach the working directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

import agent
from agent import tasklog
from agent.cgroup_task import CgroupError, TaskCgroup
from agent.cgroup_task import from_json as cgroup_from_json
from agent.cgroups import CgroupManager, Limits
from agent.gpudev import device_number
from agent.identity import TaskUser, open_path_for_others, unreachable
from agent.spare import SpareShim
from agent.taskdir import (
    ACKED,
    CREATE_TIME_SLACK_S,
    EXIT,
    SHIM_LOG,
    SHIM_MODULE,
    SHIM_PID,
    SPEC,
    STOP,
    TASK_PID,
    WARN,
    WARN_SIGNUMS,
    WORK,
    ProcRecord,
    atomic_write_json,
    is_shim_of,
    read_json,
)
from agent.taskns import PRIVATE_DIRS, below
from leptond.clock import REAL, Clock

log = logging.getLogger("lepton.agent")

SUPERVISOR_LOST = "supervisor lost"
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# A task directory on its way out is renamed to this prefix first (no task id
# starts with a dot), so it is gone at once and deleted without the lock.
GONE_PREFIX = ".gone-"
# A shim that has not written shim.pid this long after spec.json appeared is
# taken as dead (it normally takes well under a second).
SHIM_START_TIMEOUT_S = 30.0
# An empty file of mode 0 that covers other GPUs' device files in a task's
# private mount namespace (where no device program could be attached).
HIDE_COVER = ".nodev"


class RunnerError(Exception):
    """A request the runner cannot carry out; the message is one clear line."""


@dataclass(frozen=True)
class TaskSpec:
    task_id: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None  # None: TASK_DIR/work, created by the runner
    time_limit_s: float | None = None
    # The warning before an ending: this signal number goes to the task
    # warn_before_s before its time limit, or when the leader asks (WARN);
    # None: none.
    warn_signal: int | None = None
    warn_before_s: float = 0.0
    # An interactive task: on a PTY of this size [rows, cols] (agent/tty.py).
    tty: bool = False
    tty_size: list[int] | None = None
    log_cap_bytes: int = 16 << 20
    kill_grace_s: float = 10.0
    user: TaskUser | None = None  # None: run as the agent's own account
    mem_bytes: int = 0  # cgroup limits; 0 means none
    cpus: float = 0.0
    pids_max: int = 0
    # Device files this task must not open (the host's other GPUs).
    denied_devices: list[str] = field(default_factory=list)
    # Its own IPC namespace and private /dev/shm and /tmp of this many bytes
    # each (agent/taskns.py); 0: it shares the host's.
    private_tmp_bytes: int = 0


@dataclass(frozen=True)
class TaskExit:
    task_id: str
    exit_code: int | None  # 128+signo when killed by a signal; None if unknown
    signal: int | None
    message: str
    started_at: float | None
    finished_at: float | None
    # Whether it had been sent its warning signal before it ended.
    warned: bool = False


@dataclass(frozen=True)
class TaskUsage:
    cpu_s: float  # user+system seconds of the task's live processes
    rss_bytes: int
    processes: int


@dataclass
class _Shim:
    pid: int
    popen: subprocess.Popen[bytes] | None  # set when this runner started it
    spare: bool = False  # a spare took the task; it may die before starting it


class TaskRunner:
    def __init__(
        self,
        root: Path,
        cgroups: CgroupManager | None = None,
        lease_file: Path | None = None,
        clock: Clock = REAL,
        keep_visible: tuple[Path, ...] = (),
    ) -> None:
        self.clock = clock
        # Resolved, because shims are recognised by the task dir on their command
        # line, and a restarted agent may be handed another spelling of root.
        self.root = Path(root).resolve()
        self.cgroups = cgroups
        # The node's lease (agent/lease.py): every task started from now on is
        # ended by its shim when the lease runs out. None: tasks run unfenced.
        self.lease_file = Path(lease_file).resolve() if lease_file is not None else None
        self._lock = threading.RLock()
        self._shims: dict[str, _Shim] = {}  # tasks believed running
        # Directories a task with a private /tmp must still reach there (the
        # agent's data dir, when it lies below /tmp); its cwd is added to them.
        self.keep_visible = tuple(str(Path(p).resolve()) for p in keep_visible)
        # Finished runs whose exit is not acked, and acked runs with when they
        # were acked: read from disk once (_scan), then kept up to date here.
        self._unacked: set[str] = set()
        self._acked: dict[str, float] = {}
        self._scanned = False
        self._spare = SpareShim(_shim_argv(), self.root, _shim_env())
        self._keep_spare = False

    def keep_spare(self) -> None:
        """From now on, keep one shim started ahead of time for the next task."""
        with self._lock:
            self._keep_spare = True
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # the spare's cwd
            self._spare.ensure()

    def close(self) -> None:
        """Stop the spare shim (running tasks are left alone: they outlive us)."""
        with self._lock:
            self._keep_spare = False
            self._spare.close()

    @property
    def spare_pid(self) -> int | None:
        return self._spare.pid

    # ------------------------------------------------------------- start

    def task_dir(self, task_id: str) -> Path:
        if not _TASK_ID.fullmatch(task_id):
            raise RunnerError(
                f"invalid task id {task_id!r}: use up to 128 letters, digits, '.', '_' or '-'"
            )
        return self.root / task_id

    def start(self, spec: TaskSpec) -> int:
        """Start a task under a new shim; returns the shim's pid."""
        _validate(spec)
        tdir = self.task_dir(spec.task_id)
        with self._lock:
            self._refresh()
            unadopted = not (tdir / EXIT).exists() and self._live_shim(tdir) is not None
            if spec.task_id in self._shims or unadopted:
                raise RunnerError(f"task {spec.task_id} is already running")
            if tdir.exists():
                if not (tdir / ACKED).exists() and (tdir / SPEC).exists():
                    raise RunnerError(
                        f"task {spec.task_id} has an unreported exit in {tdir}; ack it first"
                    )
                shutil.rmtree(tdir, ignore_errors=True)
                self._acked.pop(spec.task_id, None)
            cg: TaskCgroup | None = None
            try:
                body = self._prepare(spec, tdir)
                if self.lease_file is not None:
                    body["lease_file"] = str(self.lease_file)
                if self.cgroups is not None:
                    cg = self.cgroups.create(spec.task_id, self._limits(spec))
                    body["cgroup"] = cg.to_json()
                atomic_write_json(tdir / SPEC, body)
            except OSError as e:
                _discard(tdir, cg)
                raise RunnerError(f"cannot use task directory {tdir}: {e.strerror or e}") from None
            except CgroupError as e:
                _discard(tdir, cg)
                raise RunnerError(f"task {spec.task_id}: {e}") from None
            except RunnerError:
                _discard(tdir, cg)
                raise
            popen = self._spare.hand(tdir) if self._keep_spare else None
            spare = popen is not None
            if popen is None:
                try:
                    popen = _start_shim(tdir)
                except RunnerError:
                    _discard(tdir, cg)  # no shim: nothing to adopt later
                    raise
            self._shims[spec.task_id] = _Shim(popen.pid, popen, spare)
            if self._keep_spare:
                self._spare.ensure()  # the next one starts up while this task runs
            return popen.pid

    def _prepare(self, spec: TaskSpec, tdir: Path) -> dict[str, object]:
        """Make the run's directory and its working directory; the spec.json body."""
        user = spec.user
        if spec.private_tmp_bytes > 0 and spec.cwd is not None:
            _check_cwd_outside_private_dirs(spec.cwd, self.keep_visible)
        other = user is not None and user.uid != os.geteuid()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tdir.mkdir(mode=0o700)
        if other:
            open_path_for_others(self.root)
            open_path_for_others(tdir)
        cwd = spec.cwd
        if cwd is None:
            (tdir / WORK).mkdir(mode=0o700)
            cwd = str(tdir / WORK)
            if other:
                assert user is not None
                os.chown(cwd, user.uid, user.gid)
        if other:
            assert user is not None
            why = unreachable(Path(cwd), user)
            if why is not None:
                raise RunnerError(f"user {user.name!r} cannot reach {cwd}: {why}")
        body: dict[str, object] = asdict(spec)
        body["cwd"] = cwd
        if spec.private_tmp_bytes > 0:
            body["keep_visible"] = [*self.keep_visible, cwd]
        if spec.denied_devices and not (self.cgroups is not None and self.cgroups.filters_devices):
            # No device rules in the kernel: cover the files in the task's
            # own mount namespace instead (the shim does it, as root).
            cover = tdir / HIDE_COVER
            cover.touch(mode=0)
            os.chmod(cover, 0)
            body["hide_devices"] = list(spec.denied_devices)
            body["hide_cover"] = str(cover)
        return body

    def _limits(self, spec: TaskSpec) -> Limits:
        deny = []
        for p in spec.denied_devices:
            num = device_number(p)
            if num is None:
                raise RunnerError(f"task {spec.task_id}: {p} is not a character device")
            deny.append(num)
        return Limits(
            mem_bytes=spec.mem_bytes,
            cpus=spec.cpus,
            pids_max=spec.pids_max,
            deny_devices=tuple(deny),
        )

    # -------------------------------------------------------------- stop

    def warn(self, task_id: str) -> None:
        """Ask the task's shim to send the task its warning signal (once)."""
        tdir = self.task_dir(task_id)
        with self._lock:
            if not tdir.is_dir() or (tdir / EXIT).exists():
                return
            try:
                atomic_write_json(tdir / WARN, {}, durable=False)
            except OSError as e:
                raise RunnerError(f"cannot warn task {task_id}: {e.strerror or e}") from None

    def stop(
        self,
        task_id: str,
        grace_s: float | None = None,
        warn: bool = False,
        reason: str | None = None,
    ) -> None:
        """Ask the task's shim to stop it: SIGTERM, then SIGKILL after the grace.
        With `warn`, its warning signal first instead of SIGTERM (a preemption
        of a task that asked for one), then SIGKILL after the grace.

        The request is a file, so it holds even if the shim is still starting
        or this agent dies right after; the signal only makes it prompt.
        """
        tdir = self.task_dir(task_id)
        with self._lock:
            if not tdir.is_dir() or (tdir / EXIT).exists():
                return
            body: dict[str, object] = {"grace_s": grace_s} if grace_s is not None else {}
            if warn:
                body["warn"] = True
            if reason is not None:
                body["reason"] = reason  # the exit's message, instead of "stopped by request"
            try:
                atomic_write_json(tdir / STOP, body, durable=False)
            except OSError as e:
                raise RunnerError(f"cannot stop task {task_id}: {e.strerror or e}") from None
            proc = self._live_shim(tdir)
            if proc is not None:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGTERM)

    def kill_all_not_in(self, keep: set[str]) -> list[str]:
        """Reconcile with the leader: stop every running task it did not name."""
        doomed = [t for t in self.running() if t not in keep]
        for task_id in doomed:
            log.info("stopping task %s: the leader does not expect it here", task_id)
            self.stop(task_id)
        return doomed

    # ---------------------------------------------------------- watching

    def running(self) -> list[str]:
        with self._lock:
            self._refresh()
            return sorted(self._shims)

    def poll(self) -> list[TaskExit]:
        """Every finished task whose exit has not been acked, oldest first."""
        with self._lock:
            self._refresh()
            if not self._scanned:
                self._scan()
            return self._unacked_exits()

    def gpus(self, task_id: str) -> list[int]:
        """The GPU indexes the run was started on (from its spec's env)."""
        spec = read_json(self.task_dir(task_id) / SPEC) or {}
        env = spec.get("env")
        visible = str(env.get("CUDA_VISIBLE_DEVICES", "")) if isinstance(env, dict) else ""
        return [int(g) for g in visible.split(",") if g.isdigit()]

    def finished(self, task_id: str) -> bool:
        """Whether the run has ended: its exit is recorded (acked or not)."""
        return (self.task_dir(task_id) / EXIT).exists()

    def ack(self, task_id: str) -> None:
        """Record that the leader has this task's exit; poll() stops reporting it."""
        tdir = self.task_dir(task_id)
        with self._lock:
            if not tdir.is_dir():
                return
            if not (tdir / EXIT).exists():
                raise RunnerError(f"task {task_id} has not finished; nothing to ack")
            now = self.clock.now()
            try:
                atomic_write_json(tdir / ACKED, {"acked_at": now})
            except OSError as e:
                raise RunnerError(f"cannot ack task {task_id}: {e.strerror or e}") from None
            self._unacked.discard(task_id)
            self._acked[task_id] = now

    def cleanup(self, task_id: str) -> None:
        """Remove an acked task's directory (its log goes with it)."""
        tdir = self.task_dir(task_id)
        with self._lock:
            if not tdir.exists():
                return
            if not (tdir / ACKED).exists():
                raise RunnerError(f"task {task_id} is not acked yet; refusing to delete its files")
            gone = self._set_aside(task_id)
        _delete(gone)

    def collect_garbage(self, acked_before: float) -> list[str]:
        """Delete the directories (output, working directory) of runs whose
        exits were acked before `acked_before`; returns their ids. The slow
        part, deleting, happens without the lock (call it off the event loop)."""
        gone: list[Path] = []
        done: list[str] = []
        with self._lock:
            if not self._scanned:
                self._scan()
            for task_id, at in list(self._acked.items()):
                if at >= acked_before:
                    continue
                del self._acked[task_id]
                if task_id in self._shims or not (self.root / task_id / ACKED).exists():
                    continue  # started again under the same id since
                try:
                    gone.append(self._set_aside(task_id))
                    done.append(task_id)
                except OSError as e:
                    log.warning("cannot delete the directory of %s: %s", task_id, e.strerror or e)
            # Set aside by an earlier run that died before deleting them.
            with contextlib.suppress(OSError):
                gone += [p for p in self.root.iterdir() if p.name.startswith(GONE_PREFIX)]
        for p in gone:
            _delete(p)
        return done

    def _set_aside(self, task_id: str) -> Path:
        """Under the lock: release the run's cgroup and rename its directory
        out of the way; the caller deletes it."""
        tdir = self.root / task_id
        _release_cgroup(tdir)
        gone = self.root / f"{GONE_PREFIX}{task_id}"
        if gone.exists():
            _delete(gone)
        os.rename(tdir, gone)
        self._acked.pop(task_id, None)
        self._unacked.discard(task_id)
        return gone

    def adopt(self) -> tuple[list[str], list[TaskExit]]:
        """On agent start: find the tasks still running and the exits not yet acked."""
        with self._lock:
            try:
                entries = sorted(self.root.iterdir()) if self.root.is_dir() else []
            except OSError as e:
                raise RunnerError(f"cannot read task root {self.root}: {e.strerror}") from None
            for tdir in entries:
                task_id = tdir.name
                if task_id in self._shims or not _TASK_ID.fullmatch(task_id):
                    continue
                if not (tdir / SPEC).exists() or (tdir / EXIT).exists():
                    continue
                proc = self._live_shim(tdir)
                if proc is not None:
                    self._shims[task_id] = _Shim(proc.pid, None)
                elif not self._maybe_starting(tdir):
                    self._supervisor_lost(tdir)
                else:
                    self._shims[task_id] = _Shim(-1, None)  # shim.pid not written yet
            self._refresh()
            self._scan()
            if self.cgroups is not None:
                # Cgroups of runs that are over (or were never started) go;
                # those of running tasks stay with their shims.
                for name in self.cgroups.sweep(set(self._shims)):
                    log.info("removed the leftover cgroup of %s", name)
            return sorted(self._shims), self._unacked_exits()

    def usage(self) -> dict[str, TaskUsage]:
        """CPU time and memory of each running task's processes."""
        out: dict[str, TaskUsage] = {}
        for task_id in self.running():
            cg = cgroup_from_json((read_json(self.root / task_id / SPEC) or {}).get("cgroup"))
            if cg is not None:
                # The cgroup counts every process the task ever ran, setsid'd ones too.
                with contextlib.suppress(OSError):
                    u = cg.usage()
                    out[task_id] = TaskUsage(u.cpu_s, u.mem_bytes, u.processes)
                    continue
            rec = ProcRecord.load(self.root / task_id / TASK_PID)
            leader = rec.process() if rec is not None else None
            if leader is None:
                continue
            cpu, rss, n = 0.0, 0, 0
            with contextlib.suppress(psutil.Error):
                for p in [leader, *leader.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        t = p.cpu_times()
                        cpu += t.user + t.system
                        rss += p.memory_info().rss
                        n += 1
            out[task_id] = TaskUsage(cpu, rss, n)
        return out

    # -------------------------------------------------------------- logs

    def log_path(self, task_id: str) -> Path:
        return self.task_dir(task_id) / tasklog.LOG

    def read_log(self, task_id: str, offset: int, limit: int) -> tuple[bytes, int]:
        """Output from absolute `offset` (negative: from the end) and the next offset."""
        tdir = self.task_dir(task_id)
        if not tdir.is_dir():
            raise RunnerError(f"no task {task_id} on this node")
        return tasklog.read_log(tdir, offset, max(0, limit))

    # --------------------------------------------------------- internals

    def _refresh(self) -> None:
        """Move tasks whose shim is gone from running to finished."""
        self._spare.reap()
        for task_id, shim in list(self._shims.items()):
            tdir = self.root / task_id
            if shim.popen is not None:
                alive = shim.popen.poll() is None  # also reaps our own child
            elif shim.pid < 0:
                proc = self._live_shim(tdir)
                if proc is not None:
                    shim.pid = proc.pid
                alive = proc is not None or self._maybe_starting(tdir)
            else:
                alive = self._live_shim(tdir) is not None
            # A shim writes exit.json before it exits, so checking liveness
            # first and exit.json second cannot misreport a clean exit as lost.
            if (tdir / EXIT).exists() or not tdir.is_dir():
                del self._shims[task_id]
                self._ended(task_id)
            elif not alive and shim.spare and not (tdir / SHIM_PID).exists():
                # The spare died after taking the task but before shim.pid,
                # hence before starting it: start it again the old way, once.
                log.warning("task %s: the spare shim died before starting it; retrying", task_id)
                try:
                    popen = _start_shim(tdir)
                    self._shims[task_id] = _Shim(popen.pid, popen)
                except RunnerError as e:
                    log.error("task %s: %s", task_id, e)
                    self._supervisor_lost(tdir)
                    del self._shims[task_id]
                    self._ended(task_id)
            elif not alive:
                self._supervisor_lost(tdir)
                del self._shims[task_id]
                self._ended(task_id)

    def _ended(self, task_id: str) -> None:
        """A run this runner watched is over: its exit is to be reported."""
        if (self.root / task_id / EXIT).exists() and not (self.root / task_id / ACKED).exists():
            self._unacked.add(task_id)

    def _scan(self) -> None:
        """Learn from disk, once, which runs ended unacked and which were acked when."""
        self._scanned = True
        try:
            entries = list(os.scandir(self.root)) if self.root.is_dir() else []
        except OSError:
            return
        for e in entries:
            if not _TASK_ID.fullmatch(e.name) or e.name in self._shims:
                continue
            try:
                self._acked[e.name] = os.stat(os.path.join(e.path, ACKED)).st_mtime
                continue
            except OSError:
                pass
            if os.path.exists(os.path.join(e.path, EXIT)):
                self._unacked.add(e.name)

    def _live_shim(self, tdir: Path) -> psutil.Process | None:
        rec = ProcRecord.load(tdir / SHIM_PID)
        proc = rec.process() if rec is not None else None
        if proc is not None and is_shim_of(proc, tdir):
            return proc
        return None

    def _maybe_starting(self, tdir: Path) -> bool:
        # No shim.pid yet: the shim may still be importing. Give it a while,
        # measured from spec.json, which the runner wrote just before.
        if (tdir / SHIM_PID).exists():
            return False
        try:
            age = self.clock.now() - (tdir / SPEC).stat().st_mtime
        except OSError:
            return False
        return age < SHIM_START_TIMEOUT_S

    def _supervisor_lost(self, tdir: Path) -> None:
        """The shim died without writing exit.json: kill what is left, record it."""
        log.warning(
            "task %s: its shim died without recording an exit (see %s)", tdir.name, tdir / SHIM_LOG
        )
        task = ProcRecord.load(tdir / TASK_PID)
        # The verdict is recorded first: exit.json is write-once, so should
        # the shim be alive after all, its report and ours cannot both stand.
        with contextlib.suppress(OSError):
            atomic_write_json(
                tdir / EXIT,
                {
                    "exit_code": None,
                    "signal": None,
                    "started_at": task.create_time if task is not None else None,
                    "finished_at": self.clock.now(),
                    "message": SUPERVISOR_LOST,
                },
                exclusive=True,
            )
        _kill_orphaned_group(tdir)
        _release_cgroup(tdir)

    def _unacked_exits(self) -> list[TaskExit]:
        exits: list[TaskExit] = []
        for task_id in sorted(self._unacked):
            obj = read_json(self.root / task_id / EXIT)
            if obj is None:
                self._unacked.discard(task_id)  # its directory went
                continue
            exits.append(_task_exit(task_id, obj))
        exits.sort(key=lambda e: (e.finished_at or 0.0, e.task_id))
        return exits


def _validate(spec: TaskSpec) -> None:
    if not spec.argv or not all(isinstance(a, str) for a in spec.argv):
        raise RunnerError(f"task {spec.task_id}: argv must be a non-empty list of strings")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in spec.env.items()):
        raise RunnerError(f"task {spec.task_id}: env must map strings to strings")
    if spec.log_cap_bytes < tasklog.MIN_CAP_BYTES:
        raise RunnerError(
            f"task {spec.task_id}: log_cap_bytes must be at least {tasklog.MIN_CAP_BYTES}"
        )
    if spec.kill_grace_s < 0:
        raise RunnerError(f"task {spec.task_id}: kill_grace_s must be >= 0")
    if spec.time_limit_s is not None and spec.time_limit_s <= 0:
        raise RunnerError(f"task {spec.task_id}: time_limit_s must be > 0 (or unset)")
    if spec.warn_signal is not None and spec.warn_signal not in WARN_SIGNUMS:
        raise RunnerError(f"task {spec.task_id}: warn_signal {spec.warn_signal} is not allowed")


def _shim_argv() -> list[str]:
    # -S: no site initialisation (.pth files can cost 100 ms); the shim needs
    # only the standard library and this package.
    return [sys.executable, "-S", "-m", SHIM_MODULE]


def _check_cwd_outside_private_dirs(cwd: str, kept: tuple[str, ...]) -> None:
    """A task's /tmp and /dev/shm are its own: a working directory in the
    host's would be bound through them (it is kept visible), a way around
    their privacy for any path a submit names. Only what the agent itself
    keeps visible (its data dir, --keep-visible) may be there."""
    path = os.path.abspath(cwd)
    if any(below(path, d) for d in PRIVATE_DIRS) and not any(below(path, k) for k in kept):
        raise RunnerError(
            f"cwd {path} is in the host's /tmp or /dev/shm, which the task does not see "
            "(it has its own): give a directory elsewhere, or a workdir"
        )


def _start_shim(tdir: Path) -> subprocess.Popen[bytes]:
    """Start a new shim for the task in `tdir` (spec.json already written)."""
    try:
        with open(
            os.open(tdir / SHIM_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab"
        ) as shim_log:
            return subprocess.Popen(
                [*_shim_argv(), str(tdir)],
                cwd=tdir,
                env=_shim_env(),
                stdin=subprocess.DEVNULL,
                stdout=shim_log,
                stderr=shim_log,
                start_new_session=True,  # outlive the agent and its signals
                close_fds=True,
            )
    except OSError as e:
        raise RunnerError(f"cannot start the task shim: {e.strerror or e}") from None


def _shim_env() -> dict[str, str]:
    # The shim needs to import this package, wherever it is installed; the
    # task's environment is built by the shim from scratch, not from this one.
    pkg_root = str(Path(agent.__file__).resolve().parent.parent)
    # Where psutil lives, for the shim's rare fallback (it starts with -S).
    deps = str(Path(psutil.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TZ")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (pkg_root, os.environ.get("PYTHONPATH", ""), deps) if p
    )
    return env


def _task_exit(task_id: str, obj: dict[str, object]) -> TaskExit:
    def num(key: str) -> float | None:
        v = obj.get(key)
        return float(v) if isinstance(v, int | float) else None

    def whole(key: str) -> int | None:
        v = obj.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    return TaskExit(
        task_id=task_id,
        exit_code=whole("exit_code"),
        signal=whole("signal"),
        message=str(obj.get("message", "")),
        started_at=num("started_at"),
        finished_at=num("finished_at"),
        warned=obj.get("warned") is True,
    )


def _discard(tdir: Path, cg: TaskCgroup | None) -> None:
    """Undo a start that failed before any shim had the task."""
    if cg is not None:
        with contextlib.suppress(OSError):
            cg.remove()
    shutil.rmtree(tdir, ignore_errors=True)


def _delete(p: Path) -> None:
    """Delete a set-aside task directory. The task's own files are in it and
    the task is over; rmtree works on file descriptors and follows no link,
    so a tree the task left cannot point it elsewhere."""
    try:
        shutil.rmtree(p)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot delete %s: %s", p, e.strerror or e)


def _release_cgroup(tdir: Path) -> None:
    """Kill what is left in a finished task's cgroup and remove it."""
    cg = cgroup_from_json((read_json(tdir / SPEC) or {}).get("cgroup"))
    if cg is None:
        return
    try:
        if not cg.is_empty():
            cg.kill()
        cg.remove()
    except OSError as e:
        log.warning("cannot remove the cgroup of %s: %s", tdir.name, e)


def _kill_orphaned_group(tdir: Path) -> None:
    """SIGKILL whatever remains of the task's process group.

    The shim arranged for the group leader to die with it, but the leader's
    children stay in the group. A group is only ours if its members started
    no earlier than the recorded leader (pid reuse).
    """
    rec = ProcRecord.load(tdir / TASK_PID)
    if rec is None:
        return
    pgid = rec.pid
    try:
        if abs(psutil.Process(pgid).create_time() - rec.create_time) > CREATE_TIME_SLACK_S:
            return  # the leader's pid was reused: not our group
    except psutil.Error:
        pass  # the leader is gone; its children may still hold the group
    for p in psutil.process_iter(["create_time"]):
        try:
            if os.getpgid(p.pid) != pgid:
                continue
            if p.info["create_time"] + CREATE_TIME_SLACK_S < rec.create_time:
                continue
            p.kill()
        except (OSError, psutil.Error):
            continue
