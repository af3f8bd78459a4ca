"""Durable Raft journal for pysyncobj 0.3.17.

pysyncobj's own ``FileJournal`` writes into an mmap and never fsyncs, so a
power loss can lose entries that followers already acknowledged. This journal
keeps the same interface (see ``pysyncobj/journal.py``: ``add``, ``clear``,
``deleteEntriesFrom``, ``deleteEntriesTo``, ``__getitem__``, ``__len__``,
``_destroy``, ``setRaftCommitIndex``/``getRaftCommitIndex``,
``setCurrentTerm``/``getCurrentTerm``/``getVotedForNodeId``,
``onOneSecondTimer``) on top of an append-only file of checksummed records.

File layout::

    MAGIC (8 bytes)
    record*: u32 payload length | u32 crc32(payload) | payload
    payload: b"E" u64 index u64 term command  -- a log entry
             b"D" u64 index                   -- delete entries with index >= this
             b"T" msgpack [term, voted_for]   -- currentTerm / votedFor
             b"C" u64 commit_index            -- advisory, see set_raft_commit_index

Ordering rules (the reason this module exists):

* Records are only buffered in memory until ``sync()``, which writes them
  and fsyncs in one go. So after a crash the file holds exactly what some
  ``sync()`` finished (or a torn prefix of the last one), never a random
  subset of later writes: the file is always a prefix of the history.
* On open, only a torn final record is repaired (etcd's WAL rule): a record
  that is short or fails its crc is cut off, with everything after it, only
  when no intact record follows it, which is all a crash in the middle of a
  ``sync()`` can leave. A damaged record with intact records after it is
  corruption (a flipped bit, a bad disk): cutting there would silently drop
  entries, a vote or a term that peers relied on, so the journal refuses to
  open with one line naming the file and offset (``JournalCorrupt``). The
  way out is to remove this member's data and rejoin it from the others.
  (A crash could in principle persist a later page of the last write before
  an earlier one; that too is refused rather than guessed at.)
* Whoever sends a Raft message must call ``sync()`` first (``raft.transport``
  does), so an entry is on disk before a follower acknowledges it or before a
  leader asks others to store it. ``needs_sync`` tells whether that would
  fsync at all, so one fsync covers a whole batch of appends.
* ``setCurrentTerm`` fsyncs at once: a vote must never be forgotten.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, overload

import msgpack

from leptond.clock import REAL, Clock
from leptond.fsutil import atomic_write, fsync_dir
from leptond.stats import Histogram
from raft.errors import JournalCorrupt, JournalError

log = logging.getLogger(__name__)

MAGIC = b"LPTJRN\x00\x01"
_HEADER = struct.Struct("<II")  # payload length, crc32(payload)
_ENTRY = struct.Struct("<QQ")  # index, term
_U64 = struct.Struct("<Q")
# A length above this is garbage from a torn write, not a real record.
MAX_RECORD_BYTES = 256 * 1024 * 1024

Entry = tuple[bytes, int, int]  # (command, index, term), pysyncobj's shape


def _record(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _entry_record(command: bytes, index: int, term: int) -> bytes:
    return _record(b"E" + _ENTRY.pack(index, term) + command)


def _term_record(term: int, voted_for: str | None) -> bytes:
    return _record(b"T" + msgpack.packb([term, voted_for]))


def _commit_record(commit_index: int) -> bytes:
    return _record(b"C" + _U64.pack(commit_index))


_KINDS = (b"E", b"D", b"T", b"C")
_KIND_BYTE = re.compile(rb"[EDTC]")


def record_at(data: bytes, offset: int) -> tuple[int, bytes] | str:
    """(end offset, payload) of the intact record at `offset`, or what is wrong there."""
    if offset + _HEADER.size > len(data):
        return "a record header cut short"
    length, crc = _HEADER.unpack_from(data, offset)
    start = offset + _HEADER.size
    end = start + length
    if length == 0 or length > MAX_RECORD_BYTES:
        return f"an impossible record length {length}"
    if end > len(data):
        return f"a record cut short ({len(data) - start} of {length} bytes)"
    payload = data[start:end]
    if zlib.crc32(payload) != crc:
        return "a checksum mismatch"
    if payload[:1] not in _KINDS:
        return "an unknown record type"
    return end, payload


def intact_record_after(data: bytes, offset: int) -> int | None:
    """Offset of an intact record starting after `offset`, if there is one.

    Where the damaged record's own length is sound, its successor starts right
    after it; otherwise every later offset whose payload begins with a record
    type byte is tried (a random match also needs its crc to agree).
    """
    if offset + _HEADER.size <= len(data):
        nxt = offset + _HEADER.size + _HEADER.unpack_from(data, offset)[0]
        if nxt < len(data) and not isinstance(record_at(data, nxt), str):
            return nxt
    for m in _KIND_BYTE.finditer(data, offset + 1 + _HEADER.size):
        candidate = m.start() - _HEADER.size
        if not isinstance(record_at(data, candidate), str):
            return candidate
    return None


def iter_records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield (end offset, payload) of each intact record after the magic,
    stopping at the first damaged one (the caller decides what that means)."""
    offset = len(MAGIC)
    while offset < len(data):
        rec = record_at(data, offset)
        if isinstance(rec, str):
            return
        yield rec
        offset = rec[0]


class DurableJournal:
    """pysyncobj journal backed by an fsynced, append-only record file."""

    def __init__(
        self, path: Path, on_synced: Callable[[int], None] | None = None, clock: Clock = REAL
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        # Test hook: told the durable file size after every fsync, so a test
        # can cut the file there to simulate a power loss.
        self.on_synced = on_synced
        self._lock = threading.RLock()
        self._entries: list[Entry] = []
        self._term = 0
        self._voted_for: str | None = None
        self._commit_index = 1
        self._pending = bytearray()
        # True when _pending holds something a peer may rely on (entries,
        # deletions, term); commit-index records alone need no fsync.
        self._must_sync = False
        self.fsync_count = 0
        # Time each sync of appended records took: the write and its fsync.
        self.fsync_seconds = Histogram()
        self.synced_size = 0  # bytes of the file known to be on disk
        # The last sync's failure (ENOSPC, EIO...), None once one succeeds:
        # a master with a journal it cannot write is not healthy.
        self.write_error: str | None = None
        self._fd = -1
        self._open()

    # -- opening and replay -------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = self.path.read_bytes() if self.path.exists() else b""
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            # Missing, or torn while being created: start empty.
            self._write_whole_file(MAGIC)
            data = MAGIC
        if not data.startswith(MAGIC):
            raise JournalError(
                f"{self.path} is not a leptond Raft journal (bad header); "
                "move it away or point the node at its own data dir"
            )
        valid_end = len(MAGIC)
        for end, payload in iter_records(data):
            self._replay(payload)
            valid_end = end
        if valid_end < len(data):
            why = record_at(data, valid_end)
            after = intact_record_after(data, valid_end)
            if after is not None:
                raise JournalCorrupt(
                    f"{self.path} is corrupt at offset {valid_end} ({why}, with intact "
                    f"records after it at offset {after}); refusing to start: remove this "
                    "member's data dir and rejoin it from the other masters (README, Operations)"
                )
            log.warning(
                "journal %s: repairing a torn tail: %s at offset %d, discarding %d bytes",
                self.path,
                why,
                valid_end,
                len(data) - valid_end,
            )
            with open(self.path, "r+b") as f:
                f.truncate(valid_end)
                f.flush()
                os.fsync(f.fileno())
        self.synced_size = valid_end
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def _replay(self, payload: bytes) -> None:
        kind, body = payload[:1], payload[1:]
        if kind == b"E":
            index, term = _ENTRY.unpack_from(body)
            self._entries.append((bytes(body[_ENTRY.size :]), index, term))
        elif kind == b"D":
            self._truncate_from_index(_U64.unpack(body)[0])
        elif kind == b"T":
            term, voted_for = msgpack.unpackb(body)
            self._term, self._voted_for = int(term), voted_for
        else:
            self._commit_index = _U64.unpack(body)[0]

    def _truncate_from_index(self, index: int) -> None:
        if self._entries:
            del self._entries[max(0, index - self._entries[0][1]) :]

    def _write_whole_file(self, content: bytes) -> None:
        """Atomically replace the file: write a temp file, fsync, rename, fsync dir."""
        atomic_write(self.path, content, tmp_suffix=".rewrite")
        self.fsync_count += 1

    # -- durability -----------------------------------------------------------

    @property
    def needs_sync(self) -> bool:
        return self._must_sync

    def sync(self) -> None:
        """Write and fsync every buffered record (no-op when nothing is buffered)."""
        with self._lock:
            if not self._pending or self._fd < 0:
                return
            view = memoryview(bytes(self._pending))
            began = self._clock.monotonic()
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
                self.fsync_seconds.observe(self._clock.monotonic() - began)
            except OSError as exc:
                # A full disk can take part of the records: cut them off, or
                # the retry would append the whole batch after a torn copy.
                self.write_error = f"{self.path}: {exc.strerror or exc}"
                try:
                    os.ftruncate(self._fd, self.synced_size)
                except OSError:
                    log.exception("journal %s: cannot cut a partial write", self.path)
                raise
            self.write_error = None
            self.synced_size += len(self._pending)
            self._pending.clear()
            self._must_sync = False
            self.fsync_count += 1
            if self.on_synced is not None:
                self.on_synced(self.synced_size)

    def sync_if_needed(self) -> None:
        """Fsync only when a peer could rely on what is buffered."""
        if self._must_sync:
            self.sync()

    def _append(self, record: bytes, must_sync: bool = True) -> None:
        self._pending += record
        self._must_sync = self._must_sync or must_sync

    def _rewrite(self) -> None:
        """Replace the file with the current in-memory state (compaction)."""
        with self._lock:
            content = bytearray(MAGIC)
            content += _term_record(self._term, self._voted_for)
            content += _commit_record(self._commit_index)
            for command, index, term in self._entries:
                content += _entry_record(command, index, term)
            os.close(self._fd)
            self._fd = -1
            self._write_whole_file(bytes(content))
            self._pending.clear()
            self._must_sync = False
            self.synced_size = len(content)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            if self.on_synced is not None:
                self.on_synced(self.synced_size)

    # -- pysyncobj Journal interface -----------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        command = bytes(command)
        with self._lock:
            self._entries.append((command, idx, term))
            self._append(_entry_record(command, idx, term))

    def clear(self) -> None:
        # Called when a snapshot replaces the whole log; the snapshot file is
        # already renamed into place, so make that rename durable first.
        fsync_dir(self.path.parent)
        with self._lock:
            self._entries = []
            self._rewrite()

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        with self._lock:
            if entryFrom >= len(self._entries):
                return
            index = self._entries[entryFrom][1]
            del self._entries[entryFrom:]
            self._append(_record(b"D" + _U64.pack(index)))

    def deleteEntriesTo(self, entryTo: int) -> None:
        # Log compaction after a snapshot: pysyncobj calls this only once the
        # snapshot file is renamed into place (syncobj.py __tryLogCompaction),
        # so fsync the directory before the entries disappear from here.
        fsync_dir(self.path.parent)
        with self._lock:
            self._entries = self._entries[entryTo:]
            self._rewrite()

    @overload
    def __getitem__(self, item: int) -> Entry: ...

    @overload
    def __getitem__(self, item: slice) -> list[Entry]: ...

    def __getitem__(self, item: int | slice) -> Entry | list[Entry]:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        self.close()

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        with self._lock:
            if raftCommitIndex != self._commit_index:
                self._commit_index = raftCommitIndex
                # Advisory: a lost commit index is learnt again from the leader,
                # and being behind entries in the file it can never point past
                # durable entries. So it does not by itself force an fsync.
                self._append(_commit_record(raftCommitIndex), must_sync=False)
            # pysyncobj calls this after advancing the commit index and before
            # applying entries and answering clients (syncobj.py _onTick, leader
            # branch). Sync here so the leader's own copy of an entry is on disk
            # before any client sees its result, even in a one-node cluster
            # where no message is ever sent.
            self.sync_if_needed()

    def getRaftCommitIndex(self) -> int:
        return self._commit_index

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:
        with self._lock:
            self._term, self._voted_for = term, votedForNodeId
            self._append(_term_record(term, votedForNodeId))
            self.sync()

    def getCurrentTerm(self) -> int:
        return self._term

    def getVotedForNodeId(self) -> str | None:
        return self._voted_for

    def onOneSecondTimer(self) -> None:
        # Bounds how stale the stored commit index can get while idle.
        self.sync()

    # -- queries and hooks for the shell and tests -----------------------------------

    def term_at(self, index: int) -> int | None:
        """Term of the entry at Raft ``index``, or None if not in the log."""
        with self._lock:
            if not self._entries:
                return None
            pos = index - self._entries[0][1]
            if 0 <= pos < len(self._entries):
                return self._entries[pos][2]
            return None

    def last_index_after(self, index: int, match: Callable[[bytes], bool]) -> int | None:
        """Raft index of the last entry after `index` whose command `match` picks."""
        with self._lock:
            for command, idx, _term in reversed(self._entries):
                if idx <= index:
                    return None
                if match(command):
                    return idx
            return None

    def align_with_snapshot(self, before: Entry, last: Entry) -> None:
        """Drop entries older than a snapshot's last two entries, if present.

        pysyncobj (``__loadDumpFile``) clears the whole journal unless its
        first two entries equal the snapshot's last two. After a crash between
        writing a snapshot and compacting the log that would throw away
        durable entries newer than the snapshot, so compact here first.
        """
        with self._lock:
            if not self._entries or self._entries[:2] == [before, last]:
                return
            pos = before[1] - self._entries[0][1]
            if pos < 0 or pos + 1 >= len(self._entries):
                return
            if self._entries[pos] == before and self._entries[pos + 1] == last:
                self._entries = self._entries[pos:]
                self._rewrite()

    def neutralize(self, match: Callable[[bytes], bool], replacement: bytes) -> int:
        """Replace the command of every entry `match` picks, keeping its index
        and term, and rewrite the file. For offline recovery only
        (raft.membership.recover_data_dir); returns how many changed."""
        with self._lock:
            changed = 0
            for i, (command, index, term) in enumerate(self._entries):
                if match(command):
                    self._entries[i] = (replacement, index, term)
                    changed += 1
            if changed:
                self._rewrite()
            return changed

    def close(self) -> None:
        """Sync what is buffered and close the file."""
        with self._lock:
            if self._fd < 0:
                return
            self.sync()
            os.close(self._fd)
            self._fd = -1

    def abandon(self) -> None:
        """Close without syncing: simulates a power loss (tests only)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._pending.clear()


def describe(journal: DurableJournal) -> dict[str, Any]:
    """Small summary for status pages and logs."""
    first = journal[0][1] if len(journal) else None
    last = journal[-1][1] if len(journal) else None
    return {
        "path": str(journal.path),
        "first_index": first,
        "last_index": last,
        "entries": len(journal),
        "fsyncs": journal.fsync_count,
    }
