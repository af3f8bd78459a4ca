"""Log compaction snapshots, written off the Raft thread.

pysyncobj compacts its log through two hooks of `SyncObjConf` that it calls
on the Raft thread (serializer.py, syncobj.py `__tryLogCompaction`):

- `serializer(tmp_path, (last, before, cluster))` when it wants a snapshot;
- `serializeChecker()` on every tick, whose answer it trusts: SERIALIZING
  (ask again later), SUCCESS (the snapshot is durable: it deletes its
  journal up to `last`), FAILED (it logs and tries again later).

`SnapshotWriter.serialize` only takes an immutable view of the state (the
apply lock is held by the Raft thread itself here, so the view is exactly
the state as of `last`; a shallow copy of the changed maps, raft/cow.py) and
hands it to a background thread, which encodes it and writes it to a temp
file and fsyncs it. `check` reports SERIALIZING until then; back on the Raft
thread it renames the file into place, the background thread fsyncs the
directory, and only then does `check` report SUCCESS, so pysyncobj never
drops journal entries that a durable snapshot does not cover (hashicorp/
raft's FSMSnapshot.Persist). The Raft thread's share is the view and one
rename.

Ordering rules:

- pysyncobj renames `tmp_path` onto the snapshot file as soon as
  `serializer` returns (serializer.py `atomicReplace(tmpFile, fileName)`),
  which with a background write would put a half-written or stale file in
  place. `serialize` removes `tmp_path` before it returns, so that rename
  always fails (FileNotFoundError, which pysyncobj swallows) and never
  touches the snapshot file; the checker alone reports the outcome.
- Every rename onto the snapshot file happens on the Raft thread: ours in
  `check`, and pysyncobj's when a follower installs a snapshot from the
  leader (setTransmissionData). An installed snapshot is newer than any
  local one in flight, so `superseded` (called on install) makes `check`
  throw the local one away and report FAILED.
- While SERIALIZING, pysyncobj sends no snapshot to a lagging follower
  (getTransmissionData returns None until the checker has reported), so it
  never streams a file that is being replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from leptond.clock import REAL, Clock
from leptond.fsutil import fsync_dir, write_synced
from raft.snapshot import snapshot_chunks

log = logging.getLogger(__name__)

# pysyncobj's SERIALIZER_STATE values (config.py), spelled out so that this
# module reads without pysyncobj.
NOT_SERIALIZING, SERIALIZING, SUCCESS, FAILED = 0, 1, 2, 3
# After a failed write (a full disk, say) wait this long before reporting it,
# so that pysyncobj does not start another snapshot on every tick.
RETRY_AFTER_S = 5.0
WRITING_SUFFIX = ".writing"


class Frozen(Protocol):
    """An immutable view of a state machine, encodable from any thread."""

    def encode_chunks(self) -> Iterable[bytes]: ...


@dataclass
class _Job:
    frozen: Frozen
    meta: dict[str, Any]
    started: float
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    finished: float = 0.0
    superseded: bool = False
    froze_s: float = 0.0
    size: int = 0
    renamed: bool = False  # in place under the snapshot's name (not yet durable)


@dataclass
class SnapshotStats:
    """What /metrics and bench/snapshot.py read."""

    written: int = 0
    failed: int = 0
    last_total_s: float = 0.0  # serialize() called -> durable (SUCCESS)
    last_freeze_s: float = 0.0  # time the Raft thread spent taking the view
    last_bytes: int = 0
    in_progress: bool = False
    # The longest Raft tick gap from serialize() until the tick in which the
    # snapshot was reported durable (or failed): what a snapshot cost the
    # Raft thread. Reset when the next one starts.
    last_tick_gap_max_s: float = 0.0


class SnapshotWriter:
    def __init__(
        self,
        path: Path,
        freeze: Callable[[], Frozen],
        background: bool = True,
        clock: Clock = REAL,
        retry_after_s: float = RETRY_AFTER_S,
    ) -> None:
        """`freeze` runs on the Raft thread and must return a view of the
        state as of the last applied entry. background=False writes on the
        Raft thread, as pysyncobj's own serializer does (a baseline for
        bench/snapshot.py)."""
        self.path = Path(path)
        self.writing = self.path.with_name(self.path.name + WRITING_SUFFIX)
        self._freeze = freeze
        self._background = background
        self._clock = clock
        self._retry_after_s = retry_after_s
        self._job: _Job | None = None
        self._thread: threading.Thread | None = None
        self._reported = False  # check() ended a snapshot in this tick
        self.stats = SnapshotStats()

    def remove_leftovers(self, tmp_path: str | Path) -> None:
        """On start: a temp file of a write that never finished is garbage."""
        for p in (self.writing, Path(tmp_path)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    # -- pysyncobj's hooks (Raft thread) --------------------------------------
    def serialize(self, tmp_path: str, data: tuple[Any, Any, Any]) -> None:
        last, before, cluster = data
        if self._job is not None:
            return  # pysyncobj asks only when check() said NOT_SERIALIZING
        # Nothing may exist under tmp_path when this returns (see the module doc).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        started = self._clock.monotonic()
        frozen = self._freeze()
        meta = {
            "index": last[1],
            "term": last[2],
            "cluster_members": sorted(str(n.id) for n in cluster if n is not None),
            "raft_entries": [[bytes(e[0]), e[1], e[2]] for e in (last, before)],
        }
        job = self._job = _Job(frozen, meta, started)
        job.froze_s = self._clock.monotonic() - started
        self.stats.in_progress = True
        self.stats.last_tick_gap_max_s = 0.0
        self._start(self._write, job)

    def _start(self, work: Callable[[_Job], None], job: _Job) -> None:
        if not self._background:
            work(job)
            return
        self._thread = threading.Thread(target=work, args=(job,), name="raft-snapshot", daemon=True)
        self._thread.start()

    def check(self) -> int:
        job = self._job
        if job is None:
            return NOT_SERIALIZING
        if not job.done.is_set():
            return SERIALIZING
        if job.error is None and not job.superseded and not job.renamed:
            # The rename on this thread (see the module doc); making it
            # durable (fsync of the directory) goes back to the background,
            # and only then is the snapshot reported.
            try:
                os.replace(self.writing, self.path)
                job.renamed = True
            except OSError as exc:
                job.error = exc
                job.finished = self._clock.monotonic()
                log.error(
                    "snapshot at entry %d: cannot put it in place: %s", job.meta["index"], exc
                )
            else:
                job.done.clear()
                self._start(self._sync_dir, job)
                return SERIALIZING
        if job.error is not None and self._clock.monotonic() < job.finished + self._retry_after_s:
            return SERIALIZING
        self._job = None
        self.stats.in_progress = False
        self._reported = True
        if job.error is not None or job.superseded:
            if not job.renamed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.writing)
            self.stats.failed += 1
            if job.superseded:
                log.info(
                    "snapshot at entry %d dropped: one from the leader was installed meanwhile",
                    job.meta["index"],
                )
            return FAILED
        self.stats.written += 1
        self.stats.last_total_s = self._clock.monotonic() - job.started
        self.stats.last_freeze_s = job.froze_s
        self.stats.last_bytes = job.size
        log.info(
            "snapshot at entry %d: %.1f MB in %.2fs (%.1f ms on the Raft thread to take the view)",
            job.meta["index"],
            job.size / 1e6,
            self.stats.last_total_s,
            job.froze_s * 1000,
        )
        return SUCCESS

    def observe_tick_gap(self, gap_s: float) -> None:
        """The Raft thread's gap since its last tick (called every tick)."""
        if self.stats.in_progress or self._reported:
            self.stats.last_tick_gap_max_s = max(self.stats.last_tick_gap_max_s, gap_s)
            self._reported = False

    def superseded(self) -> None:
        """A snapshot from the leader was installed (Raft thread)."""
        if self._job is not None:
            self._job.superseded = True

    # -- the background thread ----------------------------------------------------
    def _write(self, job: _Job) -> None:
        try:
            state = list(job.frozen.encode_chunks())
            chunks = list(snapshot_chunks(state, job.meta))
            job.size = sum(len(c) for c in chunks)
            write_synced(self.writing, chunks)
        except BaseException as exc:  # reported through check(); never lost
            job.error = exc
            log.error("snapshot at entry %d failed: %s", job.meta["index"], exc)
        finally:
            job.finished = self._clock.monotonic()
            job.done.set()

    def _sync_dir(self, job: _Job) -> None:
        try:
            fsync_dir(self.path.parent)
        except BaseException as exc:
            job.error = exc
            log.error("snapshot at entry %d: cannot make it durable: %s", job.meta["index"], exc)
        finally:
            job.finished = self._clock.monotonic()
            job.done.set()

    def close(self, timeout_s: float = 10.0) -> None:
        """Wait for a write in progress (its file is then left unused: the
        journal still holds everything it covers)."""
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout_s)
