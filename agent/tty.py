"""Terminals for interactive tasks (`leptonctl run -it`, `leptonctl exec -it`).

A task started with a terminal runs on the slave side of a PTY that its shim
opens (the task's session and controlling terminal). The shim keeps the
master: what the task writes goes to its log as any output does, and to the
one session attached, through a Unix socket in the task's directory (root's
alone, like the rest of it). The agent connects there for the leader's
`attach` stream and passes input and window sizes back the same way.

On the socket, frames of one type byte, a 4-byte big-endian length and the
payload: DATA (bytes either way) and WINSIZE (rows and columns, two 16-bit
numbers, towards the task). Keystrokes are bytes like any other: Ctrl-C is
\\x03, which the terminal turns into SIGINT for the task's foreground job.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import termios
from collections.abc import Iterator
from pathlib import Path

SOCKET = "tty.sock"
DATA = b"d"
WINSIZE = b"w"
HEADER = struct.Struct(">cI")
# The most one frame may carry: input is typed, output comes in reads of 64 KiB.
MAX_FRAME = 1 << 20
MAX_ROWS_COLS = 10_000
# How long a send to the attached session may block before it is dropped
# (a session that does not read must not stall the task's output).
SEND_TIMEOUT_S = 2.0
# What a session that attaches gets first: the task's latest output (the
# prompt a shell printed before anyone was there to see it).
REPLAY_BYTES = 16 * 1024


class FrameError(ValueError):
    pass


def frame(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def winsize_frame(rows: int, cols: int) -> bytes:
    return frame(WINSIZE, struct.pack(">HH", rows, cols))


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Set a terminal's size; the kernel sends SIGWINCH to its foreground job."""
    if 0 < rows <= MAX_ROWS_COLS and 0 < cols <= MAX_ROWS_COLS:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Frames:
    """Incremental parser: feed bytes, get whole frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[bytes, bytes]]:
        self._buf += data
        while len(self._buf) >= HEADER.size:
            kind, n = HEADER.unpack_from(self._buf)
            if n > MAX_FRAME or kind not in (DATA, WINSIZE):
                raise FrameError("bad terminal frame")
            if len(self._buf) < HEADER.size + n:
                return
            payload = bytes(self._buf[HEADER.size : HEADER.size + n])
            del self._buf[: HEADER.size + n]
            yield kind, payload


def socket_path(task_dir: Path, dirfd: int) -> str:
    """The socket's path through an open descriptor of its directory: a task
    directory's own path may be longer than a Unix socket address allows."""
    return f"/proc/self/fd/{dirfd}/{SOCKET}"


class ShimTerminal:
    """The shim's side: the PTY master, the listening socket and the session.

    The shim's loop selects on `fds()` and calls `readable(fd)`; output of the
    task arrives through the master, which the loop reads like a pipe and
    passes to `output()`.
    """

    def __init__(self, task_dir: Path, rows: int, cols: int) -> None:
        self.master, self.slave = os.openpty()
        set_winsize(self.master, rows, cols)
        dirfd = os.open(task_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path(task_dir, dirfd))
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(socket_path(task_dir, dirfd))
            # Root's alone, whatever the umask: connecting takes write
            # permission, and no task may type into another's terminal.
            os.chmod(socket_path(task_dir, dirfd), 0o600)
        finally:
            os.close(dirfd)
        self.listener.listen(2)
        self.listener.setblocking(False)
        self.session: socket.socket | None = None
        self.frames = Frames()
        self.recent = b""

    def child_side(self) -> int:
        return self.slave

    def started(self) -> None:
        """The task has the slave side now; the shim keeps only the master."""
        os.close(self.slave)

    def fds(self) -> list[int]:
        out = [self.listener.fileno()]
        if self.session is not None:
            out.append(self.session.fileno())
        return out

    def readable(self, fd: int) -> None:
        if fd == self.listener.fileno():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            # A new session takes over from the one before (a reattach).
            self._drop()
            conn.settimeout(SEND_TIMEOUT_S)
            self.session, self.frames = conn, Frames()
            if self.recent:
                self.output(b"", replay=True)
            return
        if self.session is None or fd != self.session.fileno():
            return
        try:
            data = self.session.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop()
            return
        try:
            for kind, payload in self.frames.feed(data):
                if kind == DATA:
                    _write_all(self.master, payload)
                elif len(payload) == 4:
                    set_winsize(self.master, *struct.unpack(">HH", payload))
        except (FrameError, OSError):
            self._drop()

    def output(self, data: bytes, replay: bool = False) -> None:
        if not replay:
            self.recent = (self.recent + data)[-REPLAY_BYTES:]
        if self.session is None:
            return
        try:
            self.session.sendall(frame(DATA, self.recent if replay else data))
        except OSError:
            self._drop()  # too slow or gone: the output is in the log anyway

    def _drop(self) -> None:
        if self.session is not None:
            with contextlib.suppress(OSError):
                self.session.close()
            self.session = None

    def close(self) -> None:
        self._drop()
        with contextlib.suppress(OSError):
            self.listener.close()
        with contextlib.suppress(OSError):
            os.close(self.master)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def make_controlling_terminal() -> None:
    """In the child, after setsid: fd 0 (the PTY slave) becomes the session's
    controlling terminal, so Ctrl-C and window changes reach its jobs."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
