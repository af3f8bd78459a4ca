"""Content-addressed block store on local disk, with an optional in-memory
hot cache in front (masters) and an optional disk budget with LRU/LFU
eviction behind (agents), or a hard limit that refuses new blocks (masters,
whose blocks must not be evicted while a manifest may need them).

Layout: ``root/<first two hex digits>/<block id>``; new blocks are written
under ``root/tmp/``, fsynced, and renamed into place, then the fan-out
directory is fsynced, so a crash leaves either the whole block under its
final name or nothing (a stray temp file, removed at the next start).

Not thread-safe: one owner (an event loop or one thread) calls it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import lz4.block

from .cache import POLICIES, ByteCache, CacheStats, Policy, make_policy_cache
from .manifest import is_block_id

_TMP_DIR = "tmp"


class StoreFull(Exception):
    """A block does not fit the disk budget, even after evicting every
    block that is not pinned."""


class BlockCorrupt(Exception):
    """Bytes that do not match their block id, or a payload that cannot be
    unpacked safely."""


@dataclass(frozen=True, slots=True)
class StoreStats:
    blocks: int
    bytes_on_disk: int
    disk_budget_bytes: int | None
    limit_bytes: int | None
    corrupt_dropped: int
    hot: CacheStats | None
    disk: CacheStats | None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlockStore:
    def __init__(
        self,
        root: Path,
        cache_bytes: int = 0,
        policy: Policy = "lru",
        disk_budget_bytes: int | None = None,
        limit_bytes: int | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}: use one of {', '.join(POLICIES)}")
        self.root = Path(root)
        self._tmp = self.root / _TMP_DIR
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self._pins: dict[str, int] = {}
        self._corrupt_dropped = 0
        self._hot: ByteCache[str, bytes] | None = (
            make_policy_cache(policy, cache_bytes) if cache_bytes > 0 else None
        )
        self._disk_budget = disk_budget_bytes
        self._limit = limit_bytes
        # The disk cache holds sizes only; evicting from it deletes the file.
        self._disk: ByteCache[str, int] | None = (
            make_policy_cache(policy, disk_budget_bytes, self._on_disk_evict)
            if disk_budget_bytes is not None
            else None
        )
        self._reindex()

    # -- startup -------------------------------------------------------------

    def _reindex(self) -> None:
        for stray in self._tmp.iterdir():
            stray.unlink(missing_ok=True)  # half-written blocks from a crash
        found: list[tuple[float, str, int]] = []
        for fan in self.root.iterdir():
            if fan.name == _TMP_DIR or not fan.is_dir():
                continue
            for entry in os.scandir(fan):
                name = entry.name
                if not (is_block_id(name) and name.startswith(fan.name)) or not entry.is_file(
                    follow_symlinks=False
                ):
                    continue
                st = entry.stat(follow_symlinks=False)
                found.append((st.st_mtime, name, st.st_size))
        # Oldest first, so the disk cache's recency order starts out as the
        # files' age order.
        found.sort()
        for _, block_id, size in found:
            if self._disk is not None and not self._disk.admits(block_id, size):
                self.path_of(block_id).unlink()  # the budget shrank below one block
                continue
            self._index(block_id, size)

    # -- paths and index -----------------------------------------------------

    def path_of(self, block_id: str) -> Path:
        if not is_block_id(block_id):
            raise ValueError(f"not a block id: {block_id!r}")
        return self.root / block_id[:2] / block_id

    def _index(self, block_id: str, size: int) -> None:
        self._sizes[block_id] = size
        self._bytes += size
        if self._disk is not None:
            self._disk.put(block_id, size, size)

    def _unindex(self, block_id: str) -> None:
        size = self._sizes.pop(block_id, None)
        if size is not None:
            self._bytes -= size
        if self._disk is not None:
            self._disk.discard(block_id)
        if self._hot is not None:
            self._hot.discard(block_id)

    def _on_disk_evict(self, block_id: str, size: int) -> None:
        # Called by the disk cache after it dropped the entry.
        self._sizes.pop(block_id, None)
        self._bytes -= size
        if self._hot is not None:
            self._hot.discard(block_id)
        self.path_of(block_id).unlink(missing_ok=True)

    # -- blocks --------------------------------------------------------------

    def has(self, block_id: str) -> bool:
        return block_id in self._sizes

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._sizes

    def missing(self, ids: Iterable[str]) -> list[str]:
        """The ids not stored here, in order, without duplicates."""
        sizes = self._sizes
        return [b for b in dict.fromkeys(ids) if b not in sizes]

    def ids(self) -> list[str]:
        return list(self._sizes)

    def size_of(self, block_id: str) -> int | None:
        """The stored block's size in bytes, or None when it is not stored."""
        return self._sizes.get(block_id)

    @property
    def bytes_on_disk(self) -> int:
        return self._bytes

    def put(self, block_id: str, data: bytes) -> None:
        """Store a block after checking it is what its id says."""
        path = self.path_of(block_id)
        if hashlib.sha256(data).hexdigest() != block_id:
            raise BlockCorrupt(f"block {block_id[:12]}… does not match its sha256")
        disk = self._disk
        if disk is not None and not disk.admits(block_id, len(data)):
            raise StoreFull(
                f"block of {len(data)} bytes does not fit the disk budget of "
                f"{self._disk_budget} bytes ({self.pinned_bytes()} bytes pinned); "
                "unpin finished tasks' blocks or raise the budget"
            )
        if block_id in self._sizes:
            try:
                os.utime(path)  # still wanted: restart its garbage-collection clock
                return
            except FileNotFoundError:
                self._unindex(block_id)  # removed behind our back: write it again
        if self._limit is not None and self._bytes + len(data) > self._limit:
            raise StoreFull(
                f"the block store is full ({self._bytes >> 20} MiB of {self._limit >> 20} MiB "
                "used); "
                "blocks no job uses are removed after a day, or an admin can raise the limit"
            )
        path.parent.mkdir(exist_ok=True)
        tmp = self._tmp / f"{block_id[:16]}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        self._index(block_id, len(data))
        if self._hot is not None:
            self._hot.put(block_id, bytes(data), len(data))

    def get(self, block_id: str) -> bytes | None:
        """The block's bytes, or None if it is not here or its file was
        corrupt (then the file is deleted, so it can be fetched again)."""
        if self._hot is not None:
            data = self._hot.get(block_id)
            if data is not None:
                if self._disk is not None:
                    self._disk.get(block_id)
                return data
        if block_id not in self._sizes:
            return None
        path = self.path_of(block_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._unindex(block_id)  # removed behind our back
            return None
        if hashlib.sha256(data).hexdigest() != block_id:
            self._corrupt_dropped += 1
            self.delete(block_id)
            return None
        if self._disk is not None:
            self._disk.get(block_id)
        if self._hot is not None:
            self._hot.put(block_id, data, len(data))
        return data

    def delete(self, block_id: str) -> None:
        self._unindex(block_id)
        self.path_of(block_id).unlink(missing_ok=True)

    # -- pins and garbage collection ------------------------------------------

    def pin(self, ids: Iterable[str]) -> None:
        """Keep these blocks (stored now or fetched later) from eviction and
        garbage collection until unpinned; counted per call."""
        for block_id in ids:
            self._pins[block_id] = self._pins.get(block_id, 0) + 1
            if self._disk is not None:
                self._disk.pin(block_id)

    def unpin(self, ids: Iterable[str]) -> None:
        for block_id in ids:
            count = self._pins.get(block_id, 0)
            if count == 0:
                raise KeyError(f"block {block_id!r} is not pinned")
            if count == 1:
                del self._pins[block_id]
            else:
                self._pins[block_id] = count - 1
            if self._disk is not None:
                self._disk.unpin(block_id)

    def is_pinned(self, block_id: str) -> bool:
        return block_id in self._pins

    def pinned_bytes(self) -> int:
        sizes = self._sizes
        return sum(sizes.get(b, 0) for b in self._pins)

    def collect_garbage(self, keep: set[str], older_than_s: float, now: float) -> int:
        """Delete blocks that are neither in ``keep`` nor pinned and whose file
        is older than ``older_than_s`` (so an upload whose manifest is not yet
        committed survives).  Returns how many were deleted."""
        cutoff = now - older_than_s
        deleted = 0
        for block_id in list(self._sizes):
            if block_id in keep or block_id in self._pins:
                continue
            try:
                mtime = self.path_of(block_id).stat().st_mtime
            except FileNotFoundError:
                self._unindex(block_id)
                continue
            if mtime < cutoff:
                self.delete(block_id)
                deleted += 1
        return deleted

    def stats(self) -> StoreStats:
        return StoreStats(
            blocks=len(self._sizes),
            bytes_on_disk=self._bytes,
            disk_budget_bytes=self._disk_budget,
            limit_bytes=self._limit,
            corrupt_dropped=self._corrupt_dropped,
            hot=self._hot.stats() if self._hot is not None else None,
            disk=self._disk.stats() if self._disk is not None else None,
        )


# -- transfer encoding ---------------------------------------------------------

_SIZE_HEADER = 4  # lz4.block's store_size prefix: uint32, little-endian


# Compressing a large incompressible block (random weights, already-compressed
# data) costs more than sending it: try a sample first.
_SAMPLE = 64 * 1024


def pack_block(data: bytes) -> tuple[bytes, bool]:
    """``(payload, compressed)``: lz4 only when that makes it smaller."""
    if len(data) > 4 * _SAMPLE:
        sample = lz4.block.compress(data[:_SAMPLE], store_size=False)
        if len(sample) > _SAMPLE * 0.9:
            return bytes(data), False
    packed: bytes = lz4.block.compress(data, store_size=True)
    if len(packed) < len(data):
        return packed, True
    return bytes(data), False


def unpack_block(payload: bytes, compressed: bool, expected_size_cap: int) -> bytes:
    """Undo ``pack_block``; refuses, before allocating, a payload that claims
    to grow past ``expected_size_cap`` bytes."""
    if not compressed:
        if len(payload) > expected_size_cap:
            raise BlockCorrupt(f"block of {len(payload)} bytes is over the {expected_size_cap} cap")
        return payload
    if len(payload) < _SIZE_HEADER:
        raise BlockCorrupt("compressed block is too short to hold its size")
    claimed = int.from_bytes(payload[:_SIZE_HEADER], "little")
    if claimed > expected_size_cap:
        raise BlockCorrupt(
            f"compressed block claims {claimed} bytes, over the {expected_size_cap} cap"
        )
    try:
        data: bytes = lz4.block.decompress(payload)
    except lz4.block.LZ4BlockError as e:
        raise BlockCorrupt(f"compressed block does not decompress: {e}") from None
    if len(data) != claimed:
        raise BlockCorrupt("compressed block decompressed to a different size than it claims")
    return data


__all__ = ["BlockCorrupt", "BlockStore", "StoreFull", "StoreStats", "pack_block", "unpack_block"]
