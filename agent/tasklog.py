"""A task's output log, capped in size: the shim writes it, the runner reads it.

The newest output is kept. Each of output.log and output.log.1 holds at most
half the cap; when output.log is full it becomes output.log.1 (the previous
output.log.1 is dropped and its size counted), so the two stay under the cap.

Readers address the output by absolute stream offsets (bytes since the task
started), so `leptonctl logs -f` can resume where it stopped even across a
rotation. output.state.json records `base`, the offset of output.log's first
byte; output.log.1 ends exactly there. Rotation (rename + new base) happens
under an exclusive flock on output.lock and readers hold a shared one, so a
reader never pairs a new base with old files. The state file is only read and
written under that lock, so it is rewritten in place (no rename: renames cost
milliseconds on overlay file systems and a flood rotates often). Appends need
no lock: they only grow output.log.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

LOG = "output.log"
LOG_OLD = "output.log.1"
LOG_STATE = "output.state.json"
LOG_LOCK = "output.lock"

MIN_CAP_BYTES = 1024


class RotatingLog:
    """The writing side; only the shim uses it, from one thread."""

    def __init__(self, task_dir: Path, cap_bytes: int) -> None:
        self._dir = task_dir
        self._half = max(MIN_CAP_BYTES, cap_bytes) // 2
        self.base = 0  # absolute offset of output.log's first byte
        self.size = 0  # bytes in output.log
        self.old_size = 0  # bytes in output.log.1
        self.dropped = 0  # bytes rotated away or lost to write errors
        self._lock_fd = os.open(task_dir / LOG_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        self._state_fd = os.open(task_dir / LOG_STATE, os.O_CREAT | os.O_RDWR, 0o600)
        self._fd = os.open(task_dir / LOG, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with _locked(self._lock_fd, fcntl.LOCK_EX):
            self._save_state()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self._half - self.size
            if room <= 0:
                self._rotate()
                continue
            try:
                n = os.write(self._fd, view[:room])
            except OSError:
                # Disk full or similar: losing output must not kill the shim,
                # which still has to reap the task and report its exit.
                self.dropped += len(view)
                return
            self.size += n
            view = view[n:]

    def _rotate(self) -> None:
        with _locked(self._lock_fd, fcntl.LOCK_EX):
            os.replace(self._dir / LOG, self._dir / LOG_OLD)
            os.close(self._fd)
            self._fd = os.open(self._dir / LOG, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            self.dropped += self.old_size
            self.old_size = self.size
            self.base += self.size
            self.size = 0
            self._save_state()

    def _save_state(self) -> None:
        # Caller holds the exclusive lock.
        data = json.dumps({"base": self.base, "dropped": self.dropped}).encode()
        os.ftruncate(self._state_fd, 0)
        os.pwrite(self._state_fd, data, 0)

    def close(self) -> None:
        with _locked(self._lock_fd, fcntl.LOCK_EX):
            self._save_state()  # the final dropped count
        os.close(self._fd)
        os.close(self._state_fd)
        os.close(self._lock_fd)


@contextlib.contextmanager
def _locked(fd: int, how: int) -> Iterator[None]:
    fcntl.flock(fd, how)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_state(task_dir: Path) -> dict[str, int]:
    # Caller holds a lock on output.lock.
    try:
        obj = json.loads((task_dir / LOG_STATE).read_bytes() or b"{}")
        return {"base": int(obj.get("base", 0)), "dropped": int(obj.get("dropped", 0))}
    except (OSError, ValueError, AttributeError, TypeError):
        return {"base": 0, "dropped": 0}


def read_log(task_dir: Path, offset: int, limit: int) -> tuple[bytes, int]:
    """Up to `limit` bytes of output from absolute `offset`, and the next offset.

    A negative offset counts back from the end (the tail). An offset that was
    rotated away is moved up to the oldest byte still kept, so the caller sees
    the gap as `next_offset - len(data) > offset`.
    """
    try:
        lock_fd = os.open(task_dir / LOG_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return b"", max(offset, 0)  # the shim has not opened the log yet
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_SH)
        base = _read_state(task_dir)["base"]
        cur_size = _size(task_dir / LOG)
        old_size = _size(task_dir / LOG_OLD)
        start, end = base - old_size, base + cur_size
        if offset < 0:
            offset = end + offset
        offset = min(max(offset, start), end)
        out = b""
        if offset < base and limit > 0:
            out = _pread(task_dir / LOG_OLD, offset - start, min(limit, base - offset))
        if offset + len(out) >= base and len(out) < limit:
            pos = offset + len(out) - base
            out += _pread(task_dir / LOG, pos, limit - len(out))
        return out, offset + len(out)
    finally:
        os.close(lock_fd)  # also releases the flock


def dropped_bytes(task_dir: Path) -> int:
    """How many bytes of output the cap has discarded so far."""
    try:
        lock_fd = os.open(task_dir / LOG_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_SH)
        return _read_state(task_dir)["dropped"]
    finally:
        os.close(lock_fd)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _pread(path: Path, pos: int, n: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return b""
    try:
        return os.pread(fd, n, pos)
    finally:
        os.close(fd)
