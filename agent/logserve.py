"""Serving a task's output to the leader (`logs`), from its task directory.

Arguments, checked by the leader before it relays them: `offset` (absolute;
negative counts from the end), `follow`, `stream` ("output": stdout and
stderr as they came, or "stderr" alone), `tail_lines` (start that many lines
before the end, instead of at `offset`) and `times` (each item also carries
the time records that date its bytes: [[offset, unix time], ...]).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from leptond.clock import REAL, Clock

from . import tasklog

CHUNK_BYTES = 256 * 1024
POLL_S = 0.2


def _int(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


async def serve(
    task_dir: Path,
    a: dict[str, Any],
    running: Callable[[], bool],
    on_exit: Callable[[], Awaitable[None]],
    clock: Clock = REAL,
) -> AsyncIterator[dict[str, Any]]:
    """Items {data, offset[, times]} until the output ends (following: until
    the task has exited and every byte was sent; then `on_exit` runs)."""
    stream = str(a["stream"]) if a.get("stream") in tasklog.STREAMS else tasklog.OUTPUT
    follow, times = a.get("follow") is True, a.get("times") is True
    offset = _int(a.get("offset"), 0)
    tail = a.get("tail_lines")
    if isinstance(tail, int) and not isinstance(tail, bool) and tail >= 0:
        offset = tasklog.tail_offset(task_dir, tail, stream)
    while True:
        data, nxt = tasklog.read_log(task_dir, offset, CHUNK_BYTES, stream)
        if not data and (not follow or not running()):
            # One more read: output written just before the exit.
            data, nxt = tasklog.read_log(task_dir, offset, CHUNK_BYTES, stream)
        if data:
            item: dict[str, Any] = {"data": data, "offset": nxt}
            if times:
                start = nxt - len(data)
                item["times"] = [list(r) for r in tasklog.read_times(task_dir, start, nxt, stream)]
            offset = nxt
            yield item
            continue
        if not follow or not running():
            if follow:
                await on_exit()
            return
        await clock.sleep(POLL_S)
