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

stderr.* is a second log of the same kind that holds the task's stderr alone
(output.log has both, in the order they came), so `leptonctl logs --stderr`
can show it apart.

Each log also keeps when its output was written: `NAME.times` holds records
of (absolute offset, wall-clock time), one at the first write after a pause
of TIMES_EVERY_S or more, so the time of any byte is known to within that.
It rotates with its log (NAME.times.1), and on its own when it reaches a cap,
so it stays small even for a task that writes one byte at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from leptond.clock import REAL

OUTPUT = "output"
STDERR = "stderr"
STREAMS = (OUTPUT, STDERR)

LOG = "output.log"
LOG_OLD = "output.log.1"
LOG_STATE = "output.state.json"
LOG_LOCK = "output.lock"

MIN_CAP_BYTES = 1024
# One time record at the first write after a pause this long: every byte's
# time is known to within it.
TIMES_EVERY_S = 0.1
_RECORD = struct.Struct("<qd")  # absolute offset, wall-clock seconds
MIN_TIMES_BYTES = 64 * 1024


@dataclass(frozen=True)
class Files:
    """The file names of one stream's log in a task directory."""

    log: str
    old: str
    state: str
    lock: str
    times: str
    times_old: str


def files(stream: str = OUTPUT) -> Files:
    if stream not in STREAMS:
        raise ValueError(f"no log stream {stream!r}")
    return Files(
        f"{stream}.log",
        f"{stream}.log.1",
        f"{stream}.state.json",
        f"{stream}.lock",
        f"{stream}.times",
        f"{stream}.times.1",
    )


class RotatingLog:
    """The writing side; only the shim uses it, from one thread."""

    def __init__(
        self,
        task_dir: Path,
        cap_bytes: int,
        stream: str = OUTPUT,
        clock: Callable[[], float] = REAL.now,
    ) -> None:
        self._dir = task_dir
        self._f = files(stream)
        self._half = max(MIN_CAP_BYTES, cap_bytes) // 2
        self._clock = clock
        self.base = 0  # absolute offset of output.log's first byte
        self.size = 0  # bytes in output.log
        self.old_size = 0  # bytes in output.log.1
        self.dropped = 0  # bytes rotated away or lost to write errors
        self._last_record: float | None = None
        self._times_cap = max(MIN_TIMES_BYTES, self._half // 8)
        self._times_size = 0
        f = self._f
        self._lock_fd = os.open(task_dir / f.lock, os.O_CREAT | os.O_RDWR, 0o600)
        self._state_fd = os.open(task_dir / f.state, os.O_CREAT | os.O_RDWR, 0o600)
        self._fd = os.open(task_dir / f.log, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        self._times_fd = os.open(task_dir / f.times, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with _locked(self._lock_fd, fcntl.LOCK_EX):
            self._save_state()

    def write(self, data: bytes) -> None:
        if data:
            self._note_time()
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

    def _note_time(self) -> None:
        """Record when the bytes about to be written were written (see above)."""
        now = self._clock()
        if self._last_record is not None and now - self._last_record < TIMES_EVERY_S:
            return
        if self._times_size + _RECORD.size > self._times_cap:
            with _locked(self._lock_fd, fcntl.LOCK_EX):
                self._rotate_times()
        with contextlib.suppress(OSError):  # a lost record costs precision, not output
            os.write(self._times_fd, _RECORD.pack(self.base + self.size, now))
            self._times_size += _RECORD.size
            self._last_record = now

    def _rotate_times(self) -> None:
        # Caller holds the exclusive lock.
        os.replace(self._dir / self._f.times, self._dir / self._f.times_old)
        os.close(self._times_fd)
        self._times_fd = os.open(
            self._dir / self._f.times, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600
        )
        self._times_size = 0

    def _rotate(self) -> None:
        f = self._f
        with _locked(self._lock_fd, fcntl.LOCK_EX):
            os.replace(self._dir / f.log, self._dir / f.old)
            os.close(self._fd)
            self._fd = os.open(self._dir / f.log, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            self.dropped += self.old_size
            self.old_size = self.size
            self.base += self.size
            self.size = 0
            self._save_state()
            # Times go with the output they describe; a record for the new
            # file's first byte keeps every kept byte's time known.
            self._rotate_times()
        self._last_record = None
        self._note_time()

    def _save_state(self) -> None:
        # Caller holds the exclusive lock.
        data = json.dumps({"base": self.base, "dropped": self.dropped}).encode()
        os.ftruncate(self._state_fd, 0)
        os.pwrite(self._state_fd, data, 0)

    def close(self) -> None:
        with _locked(self._lock_fd, fcntl.LOCK_EX):
            self._save_state()  # the final dropped count
        os.close(self._fd)
        os.close(self._times_fd)
        os.close(self._state_fd)
        os.close(self._lock_fd)


@contextlib.contextmanager
def _locked(fd: int, how: int) -> Iterator[None]:
    fcntl.flock(fd, how)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_state(task_dir: Path, f: Files) -> dict[str, int]:
    # Caller holds a lock on the stream's lock file.
    try:
        obj = json.loads((task_dir / f.state).read_bytes() or b"{}")
        return {"base": int(obj.get("base", 0)), "dropped": int(obj.get("dropped", 0))}
    except (OSError, ValueError, AttributeError, TypeError):
        return {"base": 0, "dropped": 0}


@contextlib.contextmanager
def _reading(task_dir: Path, f: Files) -> Iterator[tuple[int, int, int] | None]:
    """Under the shared lock: (first kept offset, base, end), or None before the
    shim opened the log. Nothing rotates while the caller reads."""
    try:
        lock_fd = os.open(task_dir / f.lock, os.O_RDONLY)
    except FileNotFoundError:
        yield None
        return
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_SH)
        base = _read_state(task_dir, f)["base"]
        yield base - _size(task_dir / f.old), base, base + _size(task_dir / f.log)
    finally:
        os.close(lock_fd)  # also releases the flock


def _pread_span(task_dir: Path, f: Files, base: int, first: int, offset: int, n: int) -> bytes:
    """n bytes from absolute offset (within [first, end)), across both files."""
    out = b""
    if offset < base and n > 0:
        out = _pread(task_dir / f.old, offset - first, min(n, base - offset))
    if offset + len(out) >= base and len(out) < n:
        out += _pread(task_dir / f.log, offset + len(out) - base, n - len(out))
    return out


def read_log(task_dir: Path, offset: int, limit: int, stream: str = OUTPUT) -> tuple[bytes, int]:
    """Up to `limit` bytes of output from absolute `offset`, and the next offset.

    A negative offset counts back from the end (the tail). An offset that was
    rotated away is moved up to the oldest byte still kept, so the caller sees
    the gap as `next_offset - len(data) > offset`.
    """
    f = files(stream)
    with _reading(task_dir, f) as span:
        if span is None:
            return b"", max(offset, 0)  # the shim has not opened the log yet
        first, base, end = span
        if offset < 0:
            offset = end + offset
        offset = min(max(offset, first), end)
        out = _pread_span(task_dir, f, base, first, offset, max(0, limit))
        return out, offset + len(out)


def tail_offset(task_dir: Path, lines: int, stream: str = OUTPUT) -> int:
    """The absolute offset where the last `lines` lines kept start (an
    unfinished last line counts as one); the end for 0 lines."""
    f = files(stream)
    with _reading(task_dir, f) as span:
        if span is None:
            return 0
        first, base, end = span
        if lines <= 0:
            return end
        pos, seen, chunk = end, 0, 64 * 1024
        # A final newline ends the last line; it does not start another one.
        if end > first and _pread_span(task_dir, f, base, first, end - 1, 1) == b"\n":
            pos -= 1
        while pos > first:
            n = min(chunk, pos - first)
            data = _pread_span(task_dir, f, base, first, pos - n, n)
            if len(data) < n:
                return pos  # a file shrank under us: start where we got to
            i = len(data)
            while True:
                i = data.rfind(b"\n", 0, i)
                if i < 0:
                    break
                seen += 1
                if seen == lines:
                    return pos - n + i + 1
            pos -= n
        return first


def read_times(
    task_dir: Path, start: int, end: int, stream: str = OUTPUT
) -> list[tuple[int, float]]:
    """The time records that date the bytes in [start, end): the last record
    at or before `start`, then those inside. A byte's time is that of the
    last record at or before it; bytes before the first record kept have
    none (a task that wrote very often lost its oldest records)."""
    f = files(stream)
    with _reading(task_dir, f) as span:
        if span is None:
            return []
        records: list[tuple[int, float]] = []
        for name in (f.times_old, f.times):
            try:
                raw = (task_dir / name).read_bytes()
            except FileNotFoundError:
                continue
            whole = len(raw) - len(raw) % _RECORD.size  # a torn last record is skipped
            records += [_RECORD.unpack_from(raw, i) for i in range(0, whole, _RECORD.size)]
    out: list[tuple[int, float]] = []
    for off, at in records:
        if off <= start:
            out = [(off, at)]
        elif off < end:
            out.append((off, at))
    return out


def dropped_bytes(task_dir: Path, stream: str = OUTPUT) -> int:
    """How many bytes of output the cap has discarded so far."""
    f = files(stream)
    try:
        lock_fd = os.open(task_dir / f.lock, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_SH)
        return _read_state(task_dir, f)["dropped"]
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
