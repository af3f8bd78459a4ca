"""Durable file replacement: temp file, fsync, rename, fsync the directory.

A leaf module with no project imports, so every package may use it (raft/
included). A crash at any point leaves either the old file or the new one
under the final name, never a mix, and once `atomic_write` returns the new
one survives a power cut.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def fsync_dir(path: Path | str) -> None:
    """Make a rename or file creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written (it may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_synced(path: Path | str, chunks: Iterable[bytes], mode: int = 0o600) -> None:
    """Create or truncate `path`, write `chunks` and fsync it. No rename: the
    caller renames it into place (atomic_write does both)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        for chunk in chunks:
            write_all(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_synced(tmp: Path | str, path: Path | str) -> None:
    """Rename a synced temp file onto `path` and make the rename durable."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write(
    path: Path | str,
    data: bytes | Iterable[bytes],
    mode: int = 0o600,
    tmp_suffix: str = ".tmp",
) -> None:
    """Replace `path` with `data` (bytes, or an iterable of byte chunks written
    in turn, so a large file need not be joined in memory first) durably."""
    path = Path(path)
    tmp = path.with_name(path.name + tmp_suffix)
    write_synced(tmp, [data] if isinstance(data, bytes | bytearray) else data, mode)
    replace_synced(tmp, path)
