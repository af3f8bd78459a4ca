"""The host's data disk against what tasks write (node-pressure eviction).

A task's working directory lives in the agent's data dir, on the same file
system as the lease file, the task directories and the block cache; nothing
else bounds what a task writes there. So, as Kubernetes' kubelet does for
ephemeral storage: the agent looks at the free space (one statvfs) on every
heartbeat, and under its reserve (`--disk-reserve`) it

- measures the running tasks' working directories (a bounded walk that
  follows no symlink and counts allocated blocks, so a sparse file costs
  what it really takes),
- stops the task that uses the most, with a message that says why, after
  truncating its files so that the space comes back at once even while its
  processes still hold them open (a stop must write files too),
- removes that run's working directory as soon as it has ended (its output
  log is capped and kept), instead of keeping it for --task-retention,
- and tells the leader, which places no new work on the node until the free
  space is back over the reserve.

All of it works on a full disk: the lease is rewritten in place
(agent/lease.py), and the truncation frees space before the stop is written.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from leptond.disk import mib

MiB = 1 << 20
GiB = 1 << 30
# The reserve when none is given: 5 % of the file system (kubelet evicts at
# 10 %; free space here is f_bavail, which already leaves out what ext4 keeps
# for root), at least 1 GiB (what sshd, journald, the running tasks' capped
# logs and the agent's own files need), at most 10 GiB (several seconds of
# writes at disk speed: more than a heartbeat, which is what the reserve
# must outlast), and never over a quarter of the disk, so that a small disk
# is not always "full".
DEFAULT_RESERVE_FRACTION = 0.05
DEFAULT_RESERVE_FLOOR = 1 * GiB
DEFAULT_RESERVE_CEILING = 10 * GiB
DEFAULT_RESERVE_CAP_FRACTION = 0.25
# Entries one measurement looks at per working directory: a task with
# millions of files is measured in part (what it has beyond is not counted),
# and the heartbeat's helper thread is not held for minutes.
MAX_ENTRIES = 200_000


@dataclass(frozen=True)
class DiskSpace:
    path: str
    free_bytes: int
    total_bytes: int
    reserve_bytes: int

    @property
    def low(self) -> bool:
        return self.free_bytes < self.reserve_bytes

    def reason(self) -> str:
        return (
            f"disk full: {mib(self.free_bytes)} free in {self.path}, "
            f"under the reserve of {mib(self.reserve_bytes)}"
        )


def default_reserve(total_bytes: int) -> int:
    want = max(DEFAULT_RESERVE_FLOOR, int(total_bytes * DEFAULT_RESERVE_FRACTION))
    return min(want, DEFAULT_RESERVE_CEILING, int(total_bytes * DEFAULT_RESERVE_CAP_FRACTION))


def space(path: Path, reserve_bytes: int | None) -> DiskSpace:
    """Free space for unprivileged writers (f_bavail: what tasks can take)
    under `path`; `reserve_bytes` None: the default for its size."""
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    reserve = default_reserve(total) if reserve_bytes is None else reserve_bytes
    return DiskSpace(str(path), st.f_bavail * st.f_frsize, total, reserve)


def usage(root: Path, max_entries: int = MAX_ENTRIES) -> int:
    """Bytes allocated under `root` (st_blocks), following no symlink and not
    leaving its file system; at most `max_entries` entries are looked at."""
    try:
        top = os.lstat(root)
    except OSError:
        return 0
    if not stat.S_ISDIR(top.st_mode):
        return top.st_blocks * 512
    total, seen, stack = top.st_blocks * 512, 0, [str(root)]
    while stack and seen < max_entries:
        d = stack.pop()
        with contextlib.suppress(OSError), os.scandir(d) as it:
            for e in it:
                seen += 1
                if seen > max_entries:
                    break
                with contextlib.suppress(OSError):
                    st = e.stat(follow_symlinks=False)
                    if st.st_dev != top.st_dev:
                        continue  # a mount inside: not this disk's
                    total += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(e.path)
    return total


def release(root: Path, max_entries: int = MAX_ENTRIES) -> int:
    """Truncate the regular files under `root` to nothing, so their blocks
    come back now, even while a process still holds them open (an unlinked
    open file keeps its blocks until it is closed). A file with other hard
    links is left alone: it is also somewhere else, and removing this name
    would not free it anyway. Opened with O_NOFOLLOW under directories
    opened the same way, so a task cannot point this at another file."""
    freed, seen = 0, 0
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return 0
    stack = [top]
    dev = os.fstat(top).st_dev
    try:
        while stack and seen < max_entries:
            dfd = stack.pop()
            try:
                names = os.listdir(dfd)
            except OSError:
                names = []
            for name in names:
                seen += 1
                if seen > max_entries:
                    break
                with contextlib.suppress(OSError):
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if st.st_dev != dev:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(
                            os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                        )
                    elif stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_blocks:
                        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
                        try:
                            if os.fstat(fd).st_ino == st.st_ino:  # not swapped since
                                os.ftruncate(fd, 0)
                                freed += st.st_blocks * 512
                        finally:
                            os.close(fd)
            os.close(dfd)
    finally:
        for fd in stack:
            with contextlib.suppress(OSError):
                os.close(fd)
    return freed


def eviction_message(s: DiskSpace, used_bytes: int) -> str:
    return (
        f"evicted: the host's disk ({s.path}) had {mib(s.free_bytes)} free, under its "
        f"reserve of {mib(s.reserve_bytes)}; this task's files used {mib(used_bytes)}"
    )
