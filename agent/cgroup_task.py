"""One task's cgroup, as the task's shim and the runner use it.

The agent creates the cgroup and sets its limits (agent/cgroups.py); its
description travels to the shim in spec.json (`to_json`). The shim moves the
task into it before exec, kills it as a whole, reads whether the kernel
killed anything for lack of memory, and removes it once it is empty. This
module imports only the standard library and the leaf leptond.clock: the
shim loads it on the task-start path.

Two implementations of one small interface:
- v1 (legacy or hybrid hosts): one directory per controller hierarchy; the
  whole-task kill freezes the freezer cgroup, SIGKILLs every member, thaws.
- v2 (unified): one directory; the kill is `cgroup.kill` (Linux 5.14+).
Either way a process cannot leave its cgroup by setsid or a double fork,
and an unprivileged one cannot write to the root-owned cgroup files, so
"every process of the task" is exactly the cgroup's members.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from dataclasses import dataclass
from typing import Any, Protocol

from leptond.clock import REAL as clock

# A whole-task kill retries until the cgroup is empty, for at most this long.
KILL_WAIT_S = 5.0
# How long a v1 freeze may take before the kill goes ahead without it.
FREEZE_WAIT_S = 1.0
POLL_S = 0.01


class CgroupError(Exception):
    """A cgroup could not be created, configured or used; one clear line."""


@dataclass(frozen=True)
class CgroupUsage:
    cpu_s: float  # user+system CPU seconds of every process the task ever ran
    mem_bytes: int  # memory charged to the cgroup now
    processes: int


class TaskCgroup(Protocol):
    version: int

    def to_json(self) -> dict[str, Any]: ...

    def join_self(self) -> None:
        """Move the calling process in. Only for a single-threaded process, such
        as the task's child between fork and exec, where the shim calls it, so
        that nothing the task runs ever exists outside the cgroup."""
        ...

    def pids(self) -> set[int]: ...

    def signal(self, sig: int) -> None:
        """Send `sig` to every process in the cgroup (a polite stop)."""
        ...

    def kill(self) -> bool:
        """SIGKILL every process, including ones forked meanwhile; True once empty."""
        ...

    def is_empty(self) -> bool: ...

    def oom_kills(self) -> int:
        """Processes the kernel has killed in this cgroup for lack of memory."""
        ...

    def usage(self) -> CgroupUsage: ...

    def remove(self) -> bool:
        """Remove the (empty) cgroup; True when it is gone."""
        ...


def from_json(obj: Any) -> TaskCgroup | None:
    """The cgroup a spec.json names, or None for a task without one."""
    if not isinstance(obj, dict):
        return None
    if obj.get("version") == 1 and isinstance(obj.get("dirs"), dict):
        return V1TaskCgroup({str(k): str(v) for k, v in obj["dirs"].items()})
    if obj.get("version") == 2 and isinstance(obj.get("dir"), str):
        return V2TaskCgroup(obj["dir"])
    return None


# ---------------------------------------------------------------- helpers


def write_file(path: str, text: str) -> None:
    """One write(2), the way cgroup files want it (no buffering, no truncation
    surprises); errors carry the file name."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_file(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def read_keyed(path: str, key: str) -> int:
    """`key N` from a flat keyed file (memory.events, cpu.stat...); 0 when absent."""
    try:
        text = read_file(path)
    except OSError:
        return 0
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            with contextlib.suppress(ValueError):
                return int(v)
    return 0


def read_int(path: str) -> int:
    try:
        return int(read_file(path).split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def read_pids(path: str) -> set[int]:
    try:
        text = read_file(path)
    except OSError:
        return set()
    return {int(x) for x in text.split() if x.isdigit()}


def signal_pids(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise
    return True


# --------------------------------------------------------------------- v1


class V1TaskCgroup:
    """`dirs`: controller name -> this task's directory in that hierarchy.
    Co-mounted controllers (cpu,cpuacct) share one directory."""

    version = 1

    def __init__(self, dirs: dict[str, str]) -> None:
        self.dirs = dict(dirs)
        self._unique = sorted(set(self.dirs.values()))

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "dirs": dict(self.dirs)}

    def join_self(self) -> None:
        # "0" into `tasks` moves the calling thread, which is the whole process
        # here (single-threaded). The kernel then skips the global threadgroup
        # lock that a write to cgroup.procs takes, and with it an RCU grace
        # period per hierarchy: about 2 ms each on an idle host, which made
        # joining five or six hierarchies most of a task's start-up.
        for d in self._unique:
            write_file(f"{d}/tasks", "0")

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self._unique:
            out |= read_pids(f"{d}/cgroup.procs")
        return out

    def signal(self, sig: int) -> None:
        signal_pids(self.pids(), sig)

    def kill(self) -> bool:
        if self.is_empty():
            return True  # the common end of a task: nothing to freeze
        freezer = self.dirs.get("freezer")
        deadline = clock.monotonic() + KILL_WAIT_S
        while True:
            frozen = freezer is not None and self._freeze(freezer)
            # Frozen, nothing in the cgroup can fork between the read and the
            # kill; unfrozen (no freezer), the loop catches what was forked.
            pids = self.pids()
            signal_pids(pids, signal.SIGKILL)
            if frozen:
                assert freezer is not None
                with contextlib.suppress(OSError):
                    write_file(f"{freezer}/freezer.state", "THAWED")
            if not pids or self._wait_empty(min(0.5, max(0.0, deadline - clock.monotonic()))):
                return True
            if clock.monotonic() >= deadline:
                return False

    @staticmethod
    def _freeze(freezer: str) -> bool:
        try:
            write_file(f"{freezer}/freezer.state", "FROZEN")
        except OSError:
            return False
        end = clock.monotonic() + FREEZE_WAIT_S
        while clock.monotonic() < end:
            try:
                if read_file(f"{freezer}/freezer.state").strip() == "FROZEN":
                    return True
            except OSError:
                return False
            clock.block(POLL_S)
        return True  # still FREEZING: kill anyway, the thaw delivers the SIGKILLs

    def _wait_empty(self, timeout_s: float) -> bool:
        end = clock.monotonic() + timeout_s
        while not self.is_empty():
            if clock.monotonic() >= end:
                return False
            clock.block(POLL_S)
        return True

    def is_empty(self) -> bool:
        return not self.pids()

    def oom_kills(self) -> int:
        d = self.dirs.get("memory")
        return read_keyed(f"{d}/memory.oom_control", "oom_kill") if d else 0

    def usage(self) -> CgroupUsage:
        acct = self.dirs.get("cpuacct")
        mem = self.dirs.get("memory")
        return CgroupUsage(
            cpu_s=read_int(f"{acct}/cpuacct.usage") / 1e9 if acct else 0.0,
            mem_bytes=read_int(f"{mem}/memory.usage_in_bytes") if mem else 0,
            processes=len(self.pids()),
        )

    def remove(self) -> bool:
        gone = True
        for d in self._unique:
            gone = rmdir(d) and gone
        return gone


# --------------------------------------------------------------------- v2


class V2TaskCgroup:
    version = 2

    def __init__(self, path: str) -> None:
        self.dir = path

    def to_json(self) -> dict[str, Any]:
        return {"version": 2, "dir": self.dir}

    def join_self(self) -> None:
        write_file(f"{self.dir}/cgroup.procs", str(os.getpid()))

    def pids(self) -> set[int]:
        return read_pids(f"{self.dir}/cgroup.procs")

    def signal(self, sig: int) -> None:
        signal_pids(self.pids(), sig)

    def kill(self) -> bool:
        deadline = clock.monotonic() + KILL_WAIT_S
        try:
            # The kernel kills every member and every process forked meanwhile.
            write_file(f"{self.dir}/cgroup.kill", "1")
            killed = True
        except FileNotFoundError:
            if not os.path.isdir(self.dir):
                return True  # the cgroup itself is gone
            killed = False  # before Linux 5.14: freeze, kill, thaw
        except OSError:
            killed = False
        while True:
            if not killed:
                self._freeze_kill_thaw()
            if self._wait_empty(min(0.5, max(0.0, deadline - clock.monotonic()))):
                return True
            if clock.monotonic() >= deadline:
                return False

    def _freeze_kill_thaw(self) -> None:
        frozen = False
        with contextlib.suppress(OSError):
            write_file(f"{self.dir}/cgroup.freeze", "1")
            frozen = True
        signal_pids(self.pids(), signal.SIGKILL)
        if frozen:
            with contextlib.suppress(OSError):
                write_file(f"{self.dir}/cgroup.freeze", "0")

    def _wait_empty(self, timeout_s: float) -> bool:
        end = clock.monotonic() + timeout_s
        while not self.is_empty():
            if clock.monotonic() >= end:
                return False
            clock.block(POLL_S)
        return True

    def is_empty(self) -> bool:
        try:
            return read_keyed(f"{self.dir}/cgroup.events", "populated") == 0
        except OSError:
            return True

    def oom_kills(self) -> int:
        return read_keyed(f"{self.dir}/memory.events", "oom_kill")

    def usage(self) -> CgroupUsage:
        return CgroupUsage(
            cpu_s=read_keyed(f"{self.dir}/cpu.stat", "usage_usec") / 1e6,
            mem_bytes=read_int(f"{self.dir}/memory.current"),
            processes=len(self.pids()),
        )

    def remove(self) -> bool:
        return rmdir(self.dir)


def size_text(n: int) -> str:
    """A memory limit the way people read it in a status line."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 20):.1f} MiB"
