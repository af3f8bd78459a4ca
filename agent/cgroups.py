"""Per-task cgroups under the agent's own: memory, CPU and pids limits, the
GPU device rules, and the one place that knows where they live.

Every task gets `<agent's cgroup>/leptond-<node id>/<run id>`:
- cgroup v2 (unified; the agent unit has Delegate=yes): the agent's cgroup is
  used as delegated. A cgroup that enables controllers for its children may
  hold no processes itself, so the agent first moves itself into the leaf
  `<agent's cgroup>/supervisor` (its task shims are born there too), then
  enables memory, cpu and pids below. Device rules are an eBPF program on
  the task's cgroup (agent/devfilter.py).
- cgroup v1 (legacy or hybrid hosts, where memory, cpu and pids are v1
  hierarchies): one directory per hierarchy, each under the agent's own
  cgroup in that hierarchy; device rules are the devices controller; a
  whole-task kill freezes the freezer cgroup first.

`detect()` picks one; `TaskCgroup` (agent/cgroup_task.py) is what a task's
shim gets. Nothing here runs on the task-start path of the shim.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import devfilter
from .cgroup_task import (
    CgroupError,
    TaskCgroup,
    V1TaskCgroup,
    V2TaskCgroup,
    read_file,
    read_pids,
    rmdir,
    write_file,
)

log = logging.getLogger("lepton.agent")

CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000  # the kernel's floor for a CFS quota
DEFAULT_TASK_PIDS_MAX = 4096
SUPERVISOR_LEAF = "supervisor"
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "devices", "freezer")
V1_REQUIRED = ("memory", "cpu", "pids", "devices", "freezer")
V2_CONTROLLERS = ("memory", "cpu", "pids")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class Limits:
    mem_bytes: int = 0  # 0: no memory limit
    cpus: float = 0.0  # 0: no CPU quota
    pids_max: int = 0  # 0: no pids limit
    # Character devices (major, minor) the task may not open: the host's
    # other GPUs. Everything else stays as the agent's own cgroup allows.
    deny_devices: tuple[tuple[int, int], ...] = ()


class CgroupManager(Protocol):
    version: int
    base: str  # where the task cgroups go (in v1, the memory hierarchy's)
    # Whether create() enforces deny_devices; if not, the caller hides them.
    filters_devices: bool

    def create(self, name: str, limits: Limits) -> TaskCgroup: ...

    def limit_tasks(self, mem_bytes: int) -> None:
        """Hold every task cgroup together to `mem_bytes` of memory (the limit
        goes on the agent's subtree, their parent). CgroupError says why not."""
        ...

    def sweep(self, keep: set[str]) -> list[str]:
        """Kill and remove every task cgroup not named in `keep` (a restarted
        agent: cgroups of tasks that are over or whose shims are gone)."""
        ...

    def close(self) -> None:
        """Remove the agent's part of the tree if no task cgroup is left."""
        ...


# ------------------------------------------------------------------ where


@dataclass(frozen=True)
class Mount:
    path: str  # where it is mounted
    root: str  # which cgroup the mount shows at its top (a cgroup namespace)
    version: int
    controllers: frozenset[str]  # v1: the hierarchy's controllers


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    out: list[Mount] = []
    try:
        text = read_file(mountinfo)
    except OSError:
        return out
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        f, p = pre.split(), post.split()
        if len(f) < 5 or len(p) < 3:
            continue
        fstype, opts = p[0], set(p[2].split(","))
        mnt = _unescape(f[4])
        if fstype == "cgroup2":
            out.append(Mount(mnt, _unescape(f[3]), 2, frozenset()))
        elif fstype == "cgroup":
            out.append(Mount(mnt, _unescape(f[3]), 1, frozenset(opts & set(V1_CONTROLLERS))))
    return out


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def own_cgroups(pid: int | str = "self") -> dict[str, str]:
    """This process's cgroup per v1 controller, and under "" its v2 cgroup."""
    out: dict[str, str] = {}
    try:
        text = read_file(f"/proc/{pid}/cgroup")
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if not ctrls:
            out[""] = path
        for c in ctrls.split(","):
            if c in V1_CONTROLLERS:
                out[c] = path
    return out


def _under(m: Mount, cgroup_path: str) -> str:
    rel = cgroup_path
    if m.root != "/" and (rel == m.root or rel.startswith(m.root + "/")):
        rel = rel[len(m.root) :]
    return os.path.normpath(m.path + "/" + rel.lstrip("/"))


def agent_subtree(node_id: str) -> str:
    if not _NAME.fullmatch(node_id):
        raise CgroupError(f"node id {node_id!r} cannot name a cgroup")
    return f"leptond-{node_id}"


# ---------------------------------------------------------------------- v1


class V1Cgroups:
    version = 1
    filters_devices = True

    def __init__(self, node_id: str, ms: list[Mount], own: dict[str, str]) -> None:
        by_ctrl: dict[str, Mount] = {}
        for m in ms:
            if m.version == 1:
                for c in m.controllers:
                    by_ctrl.setdefault(c, m)
        missing = [c for c in V1_REQUIRED if c not in by_ctrl]
        if missing:
            raise CgroupError(f"cgroup v1 controller(s) not mounted: {', '.join(missing)}")
        sub = agent_subtree(node_id)
        self.bases: dict[str, str] = {}
        for c, m in by_ctrl.items():
            self.bases[c] = os.path.join(_under(m, own.get(c, "/")), sub)
        self.base = self.bases["memory"]
        for d in sorted(set(self.bases.values())):
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as e:
                raise CgroupError(f"cannot create cgroup {d}: {e.strerror}") from None

    def create(self, name: str, limits: Limits) -> TaskCgroup:
        if not _NAME.fullmatch(name):
            raise CgroupError(f"task id {name!r} cannot name a cgroup")
        dirs = {c: os.path.join(b, name) for c, b in self.bases.items()}
        cg = V1TaskCgroup(dirs)
        made: list[str] = []
        try:
            for d in sorted(set(dirs.values())):
                _fresh_dir(d)
                made.append(d)
            self._limit(dirs, limits)
        except OSError as e:
            _remove_all(made)
            raise CgroupError(f"cannot set up cgroup {name}: {e.strerror or e}") from None
        except CgroupError:
            _remove_all(made)
            raise
        return cg

    @staticmethod
    def _limit(dirs: dict[str, str], lim: Limits) -> None:
        mem = dirs["memory"]
        if lim.mem_bytes > 0:
            write_file(f"{mem}/memory.limit_in_bytes", str(lim.mem_bytes))
            # Without swap accounting the limit already covers all; with it,
            # memory+swap gets the same limit, so a task cannot swap past it.
            with contextlib.suppress(FileNotFoundError):
                write_file(f"{mem}/memory.memsw.limit_in_bytes", str(lim.mem_bytes))
        if lim.cpus > 0:
            cpu = dirs["cpu"]
            write_file(f"{cpu}/cpu.cfs_period_us", str(CPU_PERIOD_US))
            write_file(f"{cpu}/cpu.cfs_quota_us", str(cpu_quota_us(lim.cpus)))
        if lim.pids_max > 0:
            write_file(f"{dirs['pids']}/pids.max", str(lim.pids_max))
        for major, minor in lim.deny_devices:
            write_file(f"{dirs['devices']}/devices.deny", f"c {major}:{minor} rwm")

    def limit_tasks(self, mem_bytes: int) -> None:
        mem = self.bases["memory"]
        try:
            _write_mem_limits(
                f"{mem}/memory.limit_in_bytes", f"{mem}/memory.memsw.limit_in_bytes", mem_bytes
            )
        except OSError as e:
            raise CgroupError(
                f"cannot limit the tasks' memory to {mem_bytes} bytes in {mem}: {e.strerror or e}"
            ) from None

    def sweep(self, keep: set[str]) -> list[str]:
        names: set[str] = set()
        for b in set(self.bases.values()):
            with contextlib.suppress(OSError):
                names |= {e.name for e in os.scandir(b) if e.is_dir()}
        gone = []
        for name in sorted(names - keep):
            cg = V1TaskCgroup({c: os.path.join(b, name) for c, b in self.bases.items()})
            cg.kill()
            if cg.remove():
                gone.append(name)
        return gone

    def close(self) -> None:
        for d in set(self.bases.values()):
            with contextlib.suppress(OSError):
                rmdir(d)


# ---------------------------------------------------------------------- v2


class V2Cgroups:
    version = 2

    def __init__(
        self, node_id: str, mount: Mount, own: str, delegate: bool = True, bpf: bool = True
    ) -> None:
        top = _under(mount, own)
        if os.path.basename(top) == SUPERVISOR_LEAF:
            top = os.path.dirname(top)  # restarted from inside our own leaf
        if delegate and top != mount.path:
            # Leave the delegated cgroup free of processes, so it may enable
            # controllers for its children (the "no internal processes" rule).
            self._move_self(os.path.join(top, SUPERVISOR_LEAF))
        self.base = os.path.join(top, agent_subtree(node_id))
        self.missing: list[str] = []
        try:
            avail = set(read_file(f"{top}/cgroup.controllers").split())
        except OSError as e:
            raise CgroupError(f"cannot read {top}/cgroup.controllers: {e.strerror}") from None
        want = [c for c in V2_CONTROLLERS if c in avail]
        self.missing = [c for c in V2_CONTROLLERS if c not in avail]
        try:
            os.makedirs(self.base, exist_ok=True)
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {self.base}: {e.strerror}") from None
        for d in (top, self.base):
            self._enable(d, want)
        self.controllers = frozenset(want)
        reason = devfilter.probe(self.base) if bpf else "disabled"
        self.filters_devices = reason is None
        self.device_note = reason or ""

    @staticmethod
    def _move_self(leaf: str) -> None:
        try:
            os.makedirs(leaf, exist_ok=True)
            write_file(f"{leaf}/cgroup.procs", str(os.getpid()))
        except OSError as e:
            raise CgroupError(
                f"cannot move the agent into {leaf}: {e.strerror}; run it in a cgroup "
                "of its own that it may manage (systemd: Delegate=yes)"
            ) from None

    @staticmethod
    def _enable(d: str, ctrls: list[str]) -> None:
        if not ctrls:
            return
        try:
            have = set(read_file(f"{d}/cgroup.subtree_control").split())
            need = [c for c in ctrls if c not in have]
            if need:
                write_file(f"{d}/cgroup.subtree_control", " ".join(f"+{c}" for c in need))
        except OSError as e:
            hint = (
                " (it still holds other processes; run the agent in a cgroup of its own, "
                "systemd: Delegate=yes)"
                if e.errno == errno.EBUSY
                else ""
            )
            raise CgroupError(
                f"cannot enable {', '.join(ctrls)} in {d}: {e.strerror}{hint}"
            ) from None

    def create(self, name: str, limits: Limits) -> TaskCgroup:
        if not _NAME.fullmatch(name):
            raise CgroupError(f"task id {name!r} cannot name a cgroup")
        d = os.path.join(self.base, name)
        try:
            _fresh_dir(d)
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {d}: {e.strerror}") from None
        try:
            self._limit(d, limits)
            if limits.deny_devices and self.filters_devices:
                devfilter.attach_device_filter(d, list(limits.deny_devices))
        except OSError as e:
            _remove_all([d])
            raise CgroupError(f"cannot set up cgroup {name}: {e.strerror or e}") from None
        except devfilter.DeviceFilterError as e:
            _remove_all([d])
            raise CgroupError(str(e)) from None
        return V2TaskCgroup(d)

    def _limit(self, d: str, lim: Limits) -> None:
        if lim.mem_bytes > 0 and "memory" in self.controllers:
            write_file(f"{d}/memory.max", str(lim.mem_bytes))
            # v1's memsw limit has no v2 twin: forbid swap so the limit holds.
            with contextlib.suppress(FileNotFoundError):
                write_file(f"{d}/memory.swap.max", "0")
        if lim.cpus > 0 and "cpu" in self.controllers:
            write_file(f"{d}/cpu.max", f"{cpu_quota_us(lim.cpus)} {CPU_PERIOD_US}")
        if lim.pids_max > 0 and "pids" in self.controllers:
            write_file(f"{d}/pids.max", str(lim.pids_max))

    def limit_tasks(self, mem_bytes: int) -> None:
        if "memory" not in self.controllers:
            return  # said at start: the memory controller is missing here
        try:
            write_file(f"{self.base}/memory.max", str(mem_bytes))
        except OSError as e:
            raise CgroupError(
                f"cannot limit the tasks' memory to {mem_bytes} bytes in {self.base}: "
                f"{e.strerror or e}"
            ) from None

    def sweep(self, keep: set[str]) -> list[str]:
        try:
            names = {e.name for e in os.scandir(self.base) if e.is_dir()}
        except OSError:
            return []
        gone = []
        for name in sorted(names - keep):
            cg = V2TaskCgroup(os.path.join(self.base, name))
            cg.kill()
            if cg.remove():
                gone.append(name)
        return gone

    def close(self) -> None:
        with contextlib.suppress(OSError):
            rmdir(self.base)


# ------------------------------------------------------------------ choose


def detect(node_id: str, mode: str = "auto") -> CgroupManager:
    """The cgroup manager for this host; CgroupError says why there is none.

    auto: v2 where the unified hierarchy has the memory, cpu and pids
    controllers (pure v2 hosts), else v1 where those are v1 hierarchies.
    "v1" and "v2" insist on one (on a hybrid host "v2" uses the unified
    mount for the whole-task kill and the device program, and reports the
    limits it cannot enforce).
    """
    ms = mounts()
    own = own_cgroups()
    v2 = next((m for m in ms if m.version == 2), None)
    v1_ctrls = {c for m in ms if m.version == 1 for c in m.controllers}
    if mode == "v1":
        return V1Cgroups(node_id, ms, own)
    if mode == "v2":
        if v2 is None:
            raise CgroupError("no cgroup v2 (unified) hierarchy is mounted")
        return V2Cgroups(node_id, v2, own.get("", "/"))
    if mode != "auto":
        raise CgroupError(f"unknown cgroup mode {mode!r}: use auto, v1 or v2")
    if v2 is not None:
        try:
            avail = set(read_file(f"{_under(v2, own.get('', '/'))}/cgroup.controllers").split())
        except OSError:
            avail = set()
        if set(V2_CONTROLLERS) <= avail:
            return V2Cgroups(node_id, v2, own.get("", "/"))
    if set(V1_REQUIRED) <= v1_ctrls:
        return V1Cgroups(node_id, ms, own)
    raise CgroupError(
        "no usable cgroups: neither a unified (v2) hierarchy with the memory, cpu and "
        "pids controllers nor v1 hierarchies with memory, cpu, pids, devices and freezer"
    )


def _write_mem_limits(mem_file: str, memsw_file: str, limit: int) -> None:
    """Set a v1 memory limit and, where swap is accounted, memory+swap to the
    same figure. memsw may never be below the memory limit, so which goes
    first depends on whether the limit grows or shrinks: try one order, then
    the other."""
    try:
        write_file(mem_file, str(limit))
    except OSError:
        if not os.path.exists(memsw_file):
            raise
        write_file(memsw_file, str(limit))  # growing: memsw makes room first
        write_file(mem_file, str(limit))
        return
    with contextlib.suppress(FileNotFoundError):
        write_file(memsw_file, str(limit))


def default_tasks_mem_bytes(total_bytes: int) -> int:
    """What all tasks on a host may use together when the admin does not say:
    its memory less a reserve for the system, the agent and their page cache,
    10% of it, at least 1 GiB and at most 8 GiB (and never more than half)."""
    reserve = min(max(total_bytes // 10, 1 << 30), 8 << 30, total_bytes // 2)
    return total_bytes - reserve


def cpu_quota_us(cpus: float) -> int:
    return max(MIN_CPU_QUOTA_US, round(cpus * CPU_PERIOD_US))


def _fresh_dir(d: str) -> None:
    """Create a task's cgroup; one left over by an earlier run of the same
    id (an agent that died mid-start) is reused only when it is empty."""
    try:
        os.mkdir(d)
    except FileExistsError:
        if read_pids(f"{d}/cgroup.procs"):
            raise CgroupError(f"cgroup {d} already exists and has processes in it") from None


def _remove_all(dirs: list[str]) -> None:
    for d in dirs:
        with contextlib.suppress(OSError):
            os.rmdir(d)


def remove_agent_tree(node_id: str) -> None:
    """Kill whatever is left in an agent's task cgroups, in every hierarchy this
    process can see under its own cgroups, and remove them. For test clusters
    and benchmarks that end agents by pid; an agent cleans up after itself."""
    sub = agent_subtree(node_id)
    own = own_cgroups()
    for m in mounts():
        if m.version == 1 and not m.controllers:
            continue
        ctrl = next(iter(m.controllers), "")
        base = Path(_under(m, own.get(ctrl, "/"))) / sub
        if not base.is_dir():
            continue
        for child in [p for p in base.iterdir() if p.is_dir()]:
            cg: TaskCgroup = (
                V2TaskCgroup(str(child))
                if m.version == 2
                else V1TaskCgroup({c: str(child) for c in m.controllers})
            )
            cg.kill()
            cg.remove()
        with contextlib.suppress(OSError):
            base.rmdir()
