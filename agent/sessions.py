"""Interactive sessions on this host: the agent's side of `run -it` and `exec`.

`attach` connects to an interactive task's terminal (its shim's socket,
agent/tty.py) and yields what the task writes; `exec` starts a command
inside a running task (agent/execin.py: its cgroup, namespaces and user) on a
PTY the agent holds, or on a pipe without one, and yields its output and
finally its exit code. Input and window sizes arrive as `tty_input`
notifications for a session id; a session answers only to the task it was
opened for, whatever id the notification names.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from leptond.clock import REAL

from .tty import DATA, FrameError, Frames, frame, set_winsize, socket_path, winsize_frame

# Sessions one agent serves at once (each holds a socket or a process).
MAX_SESSIONS = 64
READ_BYTES = 65536
# After an exec'd command exits, its output is still read while it keeps
# coming: up to DRAIN_IDLE_S between reads and DRAIN_MAX_S in all. What it
# wrote before it exited is in a pipe at once (a PTY hands it on within a
# moment, a busy host's workqueue permitting). Without a background child
# the end (EOF, or EIO on a PTY) comes at once and nothing waits; with one,
# this bounds how long one that keeps writing can hold the session open.
DRAIN_IDLE_S = 0.5
DRAIN_MAX_S = 2.0


class SessionError(Exception):
    """A session that cannot be opened; the message is one line."""


class Sessions:
    def __init__(self) -> None:
        # session id -> (task id, send input bytes, set window size)
        self._open: dict[str, tuple[str, Callable[[bytes], None], Callable[[int, int], None]]] = {}

    def input(self, task_id: str, session: str, data: bytes, rows: int, cols: int) -> None:
        entry = self._open.get(session)
        if entry is None or entry[0] != task_id:
            return  # ended, or another task's: never written to
        if data:
            entry[1](data)
        if rows and cols:
            entry[2](rows, cols)

    def _register(
        self,
        session: str,
        task_id: str,
        send: Callable[[bytes], None],
        resize: Callable[[int, int], None],
    ) -> None:
        if len(self._open) >= MAX_SESSIONS:
            raise SessionError(f"this host has {MAX_SESSIONS} sessions open; try again later")
        if session in self._open:
            raise SessionError("that session id is in use")
        self._open[session] = (task_id, send, resize)

    async def attach(
        self, task_dir: Path, task_id: str, session: str, rows: int, cols: int
    ) -> AsyncIterator[dict[str, Any]]:
        """The terminal of an interactive task, until it ends or the session does."""
        try:
            dirfd = os.open(task_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            raise SessionError(f"task {task_id} is not running here") from None
        try:
            reader, writer = await asyncio.open_unix_connection(socket_path(task_dir, dirfd))
        except OSError:
            raise SessionError(f"task {task_id} has no terminal (submit it with run -t)") from None
        finally:
            os.close(dirfd)
        writer.write(winsize_frame(rows, cols))

        def send(data: bytes) -> None:
            writer.write(frame(DATA, data))

        def resize(r: int, c: int) -> None:
            writer.write(winsize_frame(r, c))

        try:
            self._register(session, task_id, send, resize)
        except SessionError:
            writer.close()
            raise
        frames = Frames()
        try:
            yield {"ready": True}  # input sent from now on reaches the task
            while True:
                data = await reader.read(READ_BYTES)
                if not data:
                    return
                for kind, payload in frames.feed(data):
                    if kind == DATA:
                        yield {"data": payload}
        except FrameError:
            return
        finally:
            self._open.pop(session, None)
            writer.close()

    async def exec(
        self,
        task_dir: Path,
        task_id: str,
        session: str,
        argv: list[str],
        tty: bool,
        rows: int,
        cols: int,
    ) -> AsyncIterator[dict[str, Any]]:
        """Run argv inside the task (agent/execin.py); its output, then {"exit": code}."""
        helper = [sys.executable, "-m", "agent.execin", str(task_dir), "--", *argv]
        # Both paths read one fd the agent owns (a PTY master, or a pipe's read
        # end), so the session can close it when the command exits even while
        # a child it left in the background still holds the other side.
        if tty:
            out, slave = os.openpty()
            set_winsize(out, rows, cols)
            stdin: int = slave
        else:
            out, slave = os.pipe()
            stdin = asyncio.subprocess.DEVNULL
        os.set_blocking(out, False)
        try:
            proc = await asyncio.create_subprocess_exec(
                *helper,
                stdin=stdin,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                env=_helper_env(tty),
            )
        except BaseException:
            os.close(out)
            raise
        finally:
            os.close(slave)
        master = out if tty else -1

        def send(data: bytes) -> None:
            if master >= 0:
                with contextlib.suppress(OSError):
                    os.write(master, data)

        def resize(r: int, c: int) -> None:
            if master >= 0:
                with contextlib.suppress(OSError):
                    set_winsize(master, r, c)

        try:
            self._register(session, task_id, send, resize)
        except SessionError:
            proc.kill()
            await proc.wait()
            os.close(out)
            raise
        try:
            yield {"ready": True}
            async for data in _output_until_exit(out, proc):
                yield {"data": data}
            yield {"exit": await proc.wait()}
        finally:
            self._open.pop(session, None)
            if proc.returncode is None:
                # The session ended first (the client went away): so does the command.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                await proc.wait()
            # What the command left running keeps running in the task (its
            # cgroup, killed with the task); it loses only this session's output.
            with contextlib.suppress(OSError):
                os.close(out)


def _helper_env(tty: bool) -> dict[str, str]:
    # The helper builds the task's own environment; it needs only its imports.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root
    if tty:
        env["LEPTON_EXEC_TTY"] = "1"
    return env


async def _read_fd(fd: int) -> bytes:
    """The next bytes on a non-blocking fd; b"" at its end (EIO: a PTY whose
    every slave side is closed)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.read(fd, READ_BYTES)
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno == errno.EIO:
                return b""
            raise
        readable = loop.create_future()
        loop.add_reader(fd, _wake, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)


def _wake(readable: asyncio.Future[None]) -> None:
    if not readable.done():
        readable.set_result(None)


async def _output_until_exit(fd: int, proc: asyncio.subprocess.Process) -> AsyncIterator[bytes]:
    """fd's output until its end or until proc exits, as `docker exec` does:
    a child the command left in the background may hold the PTY or pipe open
    for ever, so once proc has exited only what arrives within a short,
    bounded drain is still delivered."""
    exited = asyncio.ensure_future(proc.wait())
    read = asyncio.ensure_future(_read_fd(fd))
    try:
        while True:
            await asyncio.wait({read, exited}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                break  # the command exited; its last output may be in flight
            data = read.result()
            if not data:
                return
            yield data
            read = asyncio.ensure_future(_read_fd(fd))
        deadline = REAL.monotonic() + DRAIN_MAX_S
        while (left := deadline - REAL.monotonic()) > 0:
            await asyncio.wait({read}, timeout=min(DRAIN_IDLE_S, left))
            if not read.done():
                return  # nothing more for a moment: the session ends
            data = read.result()
            if not data:
                return
            yield data
            read = asyncio.ensure_future(_read_fd(fd))
    finally:
        read.cancel()
        exited.cancel()
