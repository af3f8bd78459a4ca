"""The agent's disk watchdog (agent/diskguard.py has the why): one statvfs
per heartbeat, and under the reserve (of bytes, or of inodes), the eviction
of the task whose files take the most of what is short on the data dir's
disk."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

from leptond.disk import mib

from .diskguard import DiskSpace, Usage, eviction_message, measure, release, remove_files, space
from .runner import RunnerError, TaskRunner
from .taskdir import WORK

log = logging.getLogger("agent.disk")
# A task whose files take less than this is not what filled the disk: it is
# never evicted for it (the space went to something else on the host).
MIN_EVICT_BYTES = 1 << 20
# The same when inodes are short: fewer files than this is not what took them.
MIN_EVICT_FILES = 1000


class DiskWatch:
    def __init__(self, data_dir: Path, reserve_bytes: int | None, runner: TaskRunner) -> None:
        self.data_dir = data_dir
        self.reserve_bytes = reserve_bytes
        self.runner = runner
        self.space: DiskSpace | None = None
        # Runs stopped for the disk, and why, until their exits are seen.
        self.evicting: dict[str, str] = {}
        self._job: asyncio.Task[None] | None = None
        self._removing: set[asyncio.Task[None]] = set()
        self._said_nothing_to_evict = False

    def check(self) -> None:
        """On each heartbeat: look at the free space; under the reserve,
        evict one task in the background (one at a time: the next is
        chosen only once the last evicted run has ended)."""
        try:
            s = space(self.data_dir, self.reserve_bytes)
        except OSError as exc:
            log.warning("cannot read the free space of %s: %s", self.data_dir, exc)
            return
        was_low = self.space is not None and self.space.low
        self.space = s
        if s.low and not was_low:
            log.warning("%s: no new tasks here until space is freed", s.reason())
        elif was_low and not s.low:
            log.info(
                "the disk of %s has %s and %d inodes free again (reserves %s, %d): "
                "taking tasks again",
                s.path,
                mib(s.free_bytes),
                s.free_inodes,
                mib(s.reserve_bytes),
                s.inode_reserve,
            )
            self._said_nothing_to_evict = False
        if not s.low or (self._job is not None and not self._job.done()):
            return
        running = set(self.runner.running())
        if any(rid in running for rid in self.evicting):
            return  # the last one is still being stopped
        self._job = asyncio.get_running_loop().create_task(self._evict(s, sorted(running)))

    def condition(self) -> dict[str, Any] | None:
        """What the leader is told while the disk is under its reserve."""
        s = self.space
        if s is None or not s.low:
            return None
        # Stable while the disk stays low the same way: the leader acts on
        # changes. Its first words say which ran short (leptonctl nodes).
        if s.short_of_inodes:
            reason = f"inodes full: fewer than {s.inode_reserve} inodes free in {s.path}"
        else:
            reason = f"disk full: less than {mib(s.reserve_bytes)} free in {s.path}"
        return {
            "reason": reason,
            "free_bytes": s.free_bytes,
            "reserve_bytes": s.reserve_bytes,
            "free_inodes": s.free_inodes,
            "inode_reserve": s.inode_reserve,
        }

    async def _evict(self, s: DiskSpace, running: list[str]) -> None:
        try:
            await self._evict_one(s, running)
        except Exception:
            log.exception("evicting a task for the disk failed")  # tried again next heartbeat

    async def _evict_one(self, s: DiskSpace, running: list[str]) -> None:
        dirs = {rid: self._dirs(rid) for rid in running}
        used = await asyncio.to_thread(
            lambda: {rid: sum((measure(d) for d in ds), Usage()) for rid, ds in dirs.items()}
        )
        inodes = s.short_of_inodes

        def size(rid: str) -> int:
            return used[rid].files if inodes else used[rid].bytes

        rid = max(used, key=lambda r: (size(r), r), default=None)
        if rid is None or size(rid) < (MIN_EVICT_FILES if inodes else MIN_EVICT_BYTES):
            if not self._said_nothing_to_evict:
                log.warning(
                    "%s, and no running task's files take much of it: nothing to evict", s.reason()
                )
                self._said_nothing_to_evict = True
            return
        msg = eviction_message(s, used[rid])
        log.warning("task %s %s", rid, msg)
        # Room first: the stop itself writes a file, as does the exit. An
        # empty file holds an inode until it is removed; blocks come back
        # by truncation even from files the task still holds open.
        if inodes:
            gone = await asyncio.to_thread(lambda: sum(remove_files(d) for d in dirs[rid]))
            log.info("task %s: removed %d of its files", rid, gone)
        else:
            freed = await asyncio.to_thread(lambda: sum(release(d) for d in dirs[rid]))
            log.info("task %s: truncated its files, %s freed", rid, mib(freed))
        self.evicting[rid] = msg
        try:
            self.runner.stop(rid, 0.0, reason=msg)
        except RunnerError as exc:
            log.warning("cannot evict %s: %s; trying again", rid, exc)
            del self.evicting[rid]

    def _dirs(self, rid: str) -> list[Path]:
        """Where a run's task writes on this disk: its own working directory,
        or the workdir it was given (removed anyway once its exit is acked)."""
        return [self.runner.task_dir(rid) / WORK, self.data_dir / "workdirs" / rid]

    def ended(self, rid: str) -> None:
        """A run's exit was seen: an evicted one loses its working directory
        now (its output log stays, capped), not after --task-retention."""
        if self.evicting.pop(rid, None) is None:
            return
        work = self.runner.task_dir(rid) / WORK

        async def remove() -> None:
            # rmtree works through directory fds on Linux: a symlink the
            # task left is removed, never followed.
            await asyncio.to_thread(shutil.rmtree, work, True)
            log.info("task %s: removed its working directory %s (evicted)", rid, work)

        job = asyncio.get_running_loop().create_task(remove())
        self._removing.add(job)
        job.add_done_callback(self._removing.discard)
