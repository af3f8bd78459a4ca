"""The on-disk layout of one task directory, shared by the runner and the shim.

A task directory is the only channel between the agent and a task's shim, so
that either side can die and the other still finds out what happened:

    spec.json      written by the runner before the shim starts (TaskSpec)
    shim.pid       written by the shim once its signal handlers are installed
    task.pid       written by the shim once the task process exists
    output.log     the task's stdout+stderr, newest part (see tasklog.py)
    output.log.1   the part before that; older output is dropped
    output.times   when the output was written (and .times.1 for .log.1)
    stderr.*       the same for the task's stderr alone
    stop           written by the runner: please stop (JSON with grace_s)
    exit.json      written once, atomically, when the task is over
    acked          written by the runner once the leader recorded the exit
    shim.log       the shim's own stderr, for debugging the shim itself
    .nodev         an empty file of mode 0 that covers other GPUs' device files
                   in the task's mount namespace (only where no device rules)
    work/          the task's default working directory

Everything but work/ is the agent's (root's, 0600). When the task runs as
another account, work/ is that account's (0700) and the directory itself is
0711, so the account can pass through to work/ and do nothing else here.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil

SPEC = "spec.json"
SHIM_PID = "shim.pid"
TASK_PID = "task.pid"
EXIT = "exit.json"
STOP = "stop"
# The leader asks for the task's warning signal now (a drain deadline is
# near): the shim sends it once, as it does before the time limit.
WARN = "warn"
# The signals a task may be warned with (the masters accept these names).
WARN_SIGNAL_NAMES = ("USR1", "USR2", "TERM", "INT", "HUP", "ALRM")
WARN_SIGNUMS = frozenset(int(signal.Signals[f"SIG{n}"]) for n in WARN_SIGNAL_NAMES)


def warn_signum(name: object) -> int | None:
    """The number of a warning signal named by the leader, or None."""
    if isinstance(name, str) and name in WARN_SIGNAL_NAMES:
        return int(signal.Signals[f"SIG{name}"])
    return None


ACKED = "acked"
SHIM_LOG = "shim.log"
WORK = "work"

SHIM_MODULE = "agent.shim"
# `python -m agent.shim --spare AGENT_PID`: a shim started before its task
# exists, waiting for the task dir on stdin (agent/spare.py).
SPARE_FLAG = "--spare"

# psutil derives create_time from the boot time, which the kernel reports
# with up to a second of jitter between readers; a reused pid that also has
# our exact command line and started within this window is not a real risk.
CREATE_TIME_SLACK_S = 1.0


def atomic_write_json(path: Path, obj: Any, durable: bool = True, exclusive: bool = False) -> bool:
    """Replace `path` with JSON so readers see the old or the new file, never half.

    durable=True also fsyncs the file and its directory, so the content
    survives a power cut once this returns (used for spec.json and exit.json).
    exclusive=True never replaces an existing file and returns False instead:
    exit.json is written once, by whoever first knows how the task ended.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(obj, sort_keys=True).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    if exclusive:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    else:
        os.replace(tmp, path)
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return True


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing or unreadable."""
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


@dataclass(frozen=True)
class ProcRecord:
    """A pid plus its start time: enough to tell our process from a reused pid."""

    pid: int
    create_time: float

    @staticmethod
    def of(pid: int) -> ProcRecord | None:
        t = create_time(pid)
        return None if t is None else ProcRecord(pid, t)

    @staticmethod
    def load(path: Path) -> ProcRecord | None:
        obj = read_json(path)
        if obj is None:
            return None
        try:
            return ProcRecord(int(obj["pid"]), float(obj["create_time"]))
        except (KeyError, TypeError, ValueError):
            return None

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"pid": self.pid, "create_time": self.create_time}, durable=False)

    def process(self) -> psutil.Process | None:
        """The live process this record names, or None (gone, zombie or reused pid)."""
        import psutil

        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.create_time) > CREATE_TIME_SLACK_S:
                return None
            if p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except psutil.Error:
            return None


def create_time(pid: int) -> float | None:
    """A process's start time the way psutil computes it on Linux (boot time
    plus the start tick in /proc/PID/stat), without importing psutil: the shim
    runs on the task-start path, where every millisecond of start-up counts."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # Fields after the command name, which may itself hold spaces or parens.
        fields = stat[stat.rindex(b")") + 2 :].split()
        ticks = int(fields[19])
        return ticks / os.sysconf("SC_CLK_TCK") + _boot_time()
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        import psutil

        try:
            return float(psutil.Process(pid).create_time())
        except psutil.Error:
            return None


_BOOT: list[float] = []


def _boot_time() -> float:
    if not _BOOT:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime"):
                    _BOOT.append(float(line.split()[1]))
                    break
    return _BOOT[0]


def is_shim_of(p: psutil.Process, task_dir: Path) -> bool:
    """Whether `p` is the shim supervising `task_dir` (guards against pid reuse)."""
    import psutil

    try:
        cmd = p.cmdline()
    except psutil.Error:
        return False
    if len(cmd) < 2 or SHIM_MODULE not in cmd:
        return False
    if SPARE_FLAG in cmd:
        # A spare was started before its task existed, so its command line
        # cannot name the task dir; it moves into the dir it is handed before
        # writing shim.pid and never leaves it.
        try:
            where = p.cwd()
        except psutil.Error:
            return False
    else:
        where = cmd[-1]
    return Path(where).resolve() == task_dir.resolve()
