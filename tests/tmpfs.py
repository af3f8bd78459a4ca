"""A real small, full-able disk for tests: a tmpfs mounted on a directory.

Mounting needs root (the test machines run the suite as root). Every mount is
undone by the same context manager, whatever happens in between.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

MiB = 1 << 20


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int, inodes: int | None = None) -> Iterator[Path]:
    """`inodes`: how many files it can hold (nr_inodes), None: tmpfs's default."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size_bytes},mode=0700" + ("" if inodes is None else f",nr_inodes={inodes}")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        # Lazy: a process of the test that still has a file open there must
        # not keep the mount behind.
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave_bytes: int = 0, name: str = "filler") -> Path:
    """Write a file that leaves about `leave_bytes` free (0: until the disk is full)."""
    target = path / name
    chunk = b"\xa5" * MiB
    with open(target, "ab") as f:
        while True:
            room = free_bytes(path) - leave_bytes
            if room <= 0:
                break
            try:
                f.write(chunk[: min(len(chunk), room)])
                f.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return target


def free_inodes(path: Path) -> int:
    return os.statvfs(path).f_favail


def fill_inodes(path: Path, leave: int, name: str = "inode-filler") -> Path:
    """A directory of empty files that leaves about `leave` inodes free."""
    target = path / name
    target.mkdir(exist_ok=True)
    i = 0
    while free_inodes(path) > leave:
        try:
            (target / str(i)).touch()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            break
        i += 1
    return target
