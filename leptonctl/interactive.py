"""`leptonctl run` and `leptonctl exec`: a terminal on a task, through the leader.

With -t the task (or the exec'd command) runs on a PTY on its host; this
terminal goes into raw mode, so every key, Ctrl-C included, goes to the
remote terminal, which turns it into a signal for the remote foreground job;
window size changes follow (SIGWINCH). Input is sent in order, one call at a
time. `run` ends its job when the session ends (the leader also cancels it
when this client goes away without the task having ended), and exits with
the job's exit code; `exec` exits with the command's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import termios
import tty
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from leptond.client import calls as api
from leptond.clock import REAL as clock
from leptond.wire.client import ClusterClient
from leptond.wire.errors import RpcError

from .jobs import UsageError, build_spec, wait_job
from .output import say

START_POLL_S = 0.25
INPUT_BYTES = 4096
INPUT_RETRY_S = 0.05


def _size() -> tuple[int, int]:
    """This terminal's rows and columns. The terminal's own, not COLUMNS and
    LINES (which shutil prefers): those do not follow a resize."""
    for fd in (1, 0, 2):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            if size.lines > 0 and size.columns > 0:
                return size.lines, size.columns
    cols, rows = shutil.get_terminal_size((80, 24))
    return rows, cols


def _check(a: argparse.Namespace) -> None:
    if a.interactive and not a.tty:
        raise UsageError("-i sends this terminal's input to a terminal on the host: add -t")
    if not a.command:
        raise UsageError("no command: put it after --, e.g. leptonctl run -it -- bash")


async def run(c: ClusterClient, a: argparse.Namespace) -> int:
    _check(a)
    if not a.tty:
        # No terminal: the same as submit --wait.
        a.wait, a.all, a.quiet, a.output = True, False, False, "table"
        from .jobs import submit

        return await submit(c, a)
    name, spec, workdir = build_spec(a)
    if workdir is not None:
        from .workdir import upload_workdir

        spec["workdir"] = await upload_workdir(c, workdir_path(workdir), timeout_s=600)
    spec["tty"], spec["tty_size"] = True, list(_size())
    res = await api.submit(c, spec, name, queue_anyway=a.queue_anyway, timeout_s=a.timeout)
    job_id = str(res["id"])
    say(f"leptonctl: job {job_id}; waiting for it to start", file=sys.stderr, flush=True)
    try:
        started = await _wait_running(c, job_id, a.timeout)
        if started:
            session = uuid.uuid4().hex
            stream = api.attach(c, job_id, session, *_size())
            await _session(c, job_id, session, 0, stream, a.interactive)
    except (KeyboardInterrupt, asyncio.CancelledError):
        with contextlib.suppress(RpcError):
            await api.cancel(c, job_id, timeout_s=a.timeout)
        raise
    a.output = "table"
    return await wait_job(c, job_id, a)


def workdir_path(workdir: str) -> Any:
    from pathlib import Path

    return Path(workdir)


async def exec_in(c: ClusterClient, a: argparse.Namespace) -> int:
    _check(a)
    session = uuid.uuid4().hex
    rows, cols = _size()
    stream = api.exec_in(
        c, a.job, list(a.command), session, rank=a.rank or 0, tty=a.tty, rows=rows, cols=cols
    )
    code = await _session(c, a.job, session, a.rank or 0, stream, a.interactive)
    return 1 if code is None else code


async def _wait_running(c: ClusterClient, job_id: str, timeout_s: float) -> bool:
    """Until the job's task runs (True) or the job ended without (False)."""
    said = ""
    while True:
        st = await api.status(c, job_id, timeout_s=timeout_s, brief=True)
        task = st["tasks"][0]
        if task["state"] == "running":
            return True
        if st["state"] in ("succeeded", "failed", "cancelled"):
            return False
        reason = st.get("reason") or task.get("reason") or ""
        if reason and reason != said:
            say(f"leptonctl: pending: {reason}", file=sys.stderr, flush=True)
            said = reason
        await clock.sleep(START_POLL_S)


async def _session(
    c: ClusterClient,
    job_id: str,
    session: str,
    rank: int,
    stream: AsyncIterator[dict[str, Any]],
    interactive: bool,
) -> int | None:
    """Show the stream, send input while it lasts; the exit code it ends with, if any."""
    out = sys.stdout.buffer
    sender: asyncio.Task[None] | None = None
    code: int | None = None
    with _raw_terminal(interactive) as raw:
        try:
            async for item in stream:
                if interactive and sender is None:
                    # The host has the session now (its first item says so):
                    # what was typed meanwhile waited in this terminal.
                    sender = asyncio.ensure_future(_send_input(c, job_id, session, rank, raw))
                data = item.get("data")
                if isinstance(data, bytes) and data:
                    out.write(data)
                    out.flush()
                if isinstance(item.get("exit"), int):
                    code = int(item["exit"])
        finally:
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, RpcError):
                    await sender
    return code


@contextlib.contextmanager
def _raw_terminal(interactive: bool) -> Iterator[bool]:
    """Raw mode on this terminal while the session lasts (if it is one)."""
    fd = sys.stdin.fileno()
    if not interactive or not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    # TCSANOW, not setraw's default TCSAFLUSH: keys typed ahead are kept and sent.
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _send_input(c: ClusterClient, job_id: str, session: str, rank: int, raw: bool) -> None:
    """This terminal's input and size changes, in order, one call at a time."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bytes, tuple[int, int] | None]] = asyncio.Queue()
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, INPUT_BYTES)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            if not raw:
                queue.put_nowait((b"\x04", None))  # end of input: ^D to the terminal
            return
        queue.put_nowait((data, None))

    loop.add_reader(fd, readable)
    loop.add_signal_handler(signal.SIGWINCH, lambda: queue.put_nowait((b"", _size())))
    # The window may have changed while the job waited to start: say its
    # size now, after the handler is in place, so no change is missed.
    queue.put_nowait((b"", _size()))
    try:
        while True:
            data, size = await queue.get()
            while True:
                try:
                    await api.tty_input(c, job_id, session, data, rank=rank, size=size)
                    break
                except RpcError as exc:
                    if exc.code != "busy":
                        raise
                    # The host is behind on input: the same keys again, in order.
                    await clock.sleep(INPUT_RETRY_S)
    finally:
        loop.remove_reader(fd)
        loop.remove_signal_handler(signal.SIGWINCH)
