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

Inodes run out the same way (kubelet's nodefs.inodesFree): a task that makes
millions of empty files leaves bytes free but no file can be created, the
agent's own state writes included. So the same statvfs also compares the
free inodes (f_favail) with an inode reserve; when inodes are what is short,
the task with the most files is the one evicted, and its files are removed
(not truncated: an empty file still holds its inode) before it is stopped.
A file system that reports no inodes at all (f_files 0: btrfs, some
network file systems) allocates them as it goes and has no inode reserve.

All of it works on a full disk: the lease is rewritten in place
(agent/lease.py), and the truncation frees space before the stop is written.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
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
# The inode reserve: 5 % of the file system's inodes, as kubelet's default
# eviction threshold (nodefs.inodesFree<5%), at least 10,000 (the agent's
# state writes, the stops' and exits' files, sshd and journald), at most
# 1,000,000 (seconds of file creation even at a fast file system's rate,
# more than a heartbeat), never over a quarter of the inodes.
DEFAULT_INODE_RESERVE_FRACTION = 0.05
DEFAULT_INODE_RESERVE_FLOOR = 10_000
DEFAULT_INODE_RESERVE_CEILING = 1_000_000


@dataclass(frozen=True)
class DiskSpace:
    path: str
    free_bytes: int
    total_bytes: int
    reserve_bytes: int
    free_inodes: int = 0
    total_inodes: int = 0
    # 0: no inode reserve (a file system that reports no inodes).
    inode_reserve: int = 0

    @property
    def bytes_low(self) -> bool:
        return self.free_bytes < self.reserve_bytes

    @property
    def inodes_low(self) -> bool:
        return self.inode_reserve > 0 and self.free_inodes < self.inode_reserve

    @property
    def low(self) -> bool:
        return self.bytes_low or self.inodes_low

    @property
    def short_of_inodes(self) -> bool:
        """Whether inodes, rather than bytes, are what to free first: the
        one further under its reserve when both are low."""
        if not self.inodes_low:
            return False
        if not self.bytes_low:
            return True
        return self.free_inodes * self.reserve_bytes < self.free_bytes * self.inode_reserve

    def reason(self) -> str:
        if self.short_of_inodes:
            return (
                f"inodes full: {self.free_inodes} of {self.total_inodes} inodes free in "
                f"{self.path}, under the reserve of {self.inode_reserve}"
            )
        return (
            f"disk full: {mib(self.free_bytes)} free in {self.path}, "
            f"under the reserve of {mib(self.reserve_bytes)}"
        )


def default_reserve(total_bytes: int) -> int:
    want = max(DEFAULT_RESERVE_FLOOR, int(total_bytes * DEFAULT_RESERVE_FRACTION))
    return min(want, DEFAULT_RESERVE_CEILING, int(total_bytes * DEFAULT_RESERVE_CAP_FRACTION))


def default_inode_reserve(total_inodes: int) -> int:
    if total_inodes <= 0:
        return 0
    want = max(DEFAULT_INODE_RESERVE_FLOOR, int(total_inodes * DEFAULT_INODE_RESERVE_FRACTION))
    return min(want, DEFAULT_INODE_RESERVE_CEILING, total_inodes // 4)


def space(path: Path, reserve_bytes: int | None) -> DiskSpace:
    """Free space and inodes for unprivileged writers (f_bavail, f_favail:
    what tasks can take) under `path`; `reserve_bytes` None: the default for
    its size."""
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    reserve = default_reserve(total) if reserve_bytes is None else reserve_bytes
    return DiskSpace(
        str(path),
        st.f_bavail * st.f_frsize,
        total,
        reserve,
        st.f_favail,
        st.f_files,
        default_inode_reserve(st.f_files),
    )


@dataclass(frozen=True)
class Usage:
    bytes: int = 0
    # Entries (each holds an inode; a hard link is counted once a name).
    files: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.bytes + other.bytes, self.files + other.files)


def usage(root: Path, max_entries: int = MAX_ENTRIES) -> int:
    """Bytes allocated under `root` (st_blocks), following no symlink and not
    leaving its file system; at most `max_entries` entries are looked at."""
    return measure(root, max_entries).bytes


def measure(root: Path, max_entries: int = MAX_ENTRIES) -> Usage:
    """Bytes allocated (st_blocks) and entries under `root`, root included,
    following no symlink and not leaving its file system; at most
    `max_entries` entries are looked at."""
    try:
        top = os.lstat(root)
    except OSError:
        return Usage()
    if not stat.S_ISDIR(top.st_mode):
        return Usage(top.st_blocks * 512, 1)
    total, files, seen, stack = top.st_blocks * 512, 1, 0, [str(root)]
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
                    files += 1
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(e.path)
    return Usage(total, files)


def _entries(root: Path, max_entries: int) -> Iterator[tuple[int, str, os.stat_result]]:
    """(directory fd, name, lstat) of every entry under `root` that is not a
    directory, on root's file system, at most `max_entries` looked at. The
    directories are opened with O_NOFOLLOW, each under the one before, so a
    task cannot point the walk at another file by a symlink."""
    seen = 0
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    stack = [top]
    dev = os.fstat(top).st_dev
    try:
        while stack and seen < max_entries:
            dfd = stack.pop()
            try:
                # An iterator, not a list: a directory of millions of names
                # is looked at in part without holding them all in memory.
                scan = os.scandir(dfd)
            except OSError:
                os.close(dfd)
                continue
            try:
                with scan:
                    for entry in scan:
                        name = entry.name
                        seen += 1
                        if seen > max_entries:
                            break
                        try:
                            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                            if st.st_dev != dev:
                                continue
                            if stat.S_ISDIR(st.st_mode):
                                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                stack.append(os.open(name, flags, dir_fd=dfd))
                                continue
                        except OSError:
                            continue
                        yield dfd, name, st
            finally:
                os.close(dfd)
    finally:
        for fd in stack:
            with contextlib.suppress(OSError):
                os.close(fd)


def release(root: Path, max_entries: int = MAX_ENTRIES) -> int:
    """Truncate the regular files under `root` to nothing, so their blocks
    come back now, even while a process still holds them open (an unlinked
    open file keeps its blocks until it is closed). A file with other hard
    links is left alone: it is also somewhere else, and removing this name
    would not free it anyway."""
    freed = 0
    for dfd, name, st in _entries(root, max_entries):
        if not (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_blocks):
            continue
        with contextlib.suppress(OSError):
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
            try:
                if os.fstat(fd).st_ino == st.st_ino:  # not swapped since
                    os.ftruncate(fd, 0)
                    freed += st.st_blocks * 512
            finally:
                os.close(fd)
    return freed


def remove_files(root: Path, max_entries: int = MAX_ENTRIES) -> int:
    """Unlink what is not a directory under `root` (files, symlinks, fifos,
    never what a symlink points at): an empty file holds an inode that only
    its removal gives back. The number of names removed."""
    removed = 0
    for dfd, name, _ in _entries(root, max_entries):
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dfd)
            removed += 1
    return removed


def eviction_message(s: DiskSpace, used: Usage) -> str:
    if s.short_of_inodes:
        return (
            f"evicted: the host's disk ({s.path}) had {s.free_inodes} inodes free, under its "
            f"reserve of {s.inode_reserve}; this task had {used.files} files"
        )
    used_bytes = used.bytes
    return (
        f"evicted: the host's disk ({s.path}) had {mib(s.free_bytes)} free, under its "
        f"reserve of {mib(s.reserve_bytes)}; this task's files used {mib(used_bytes)}"
    )
