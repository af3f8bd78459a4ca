"""BlockStore on real files: put/get, corruption, restart, disk budget,
pins, garbage collection, and the lz4 transfer helpers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import lz4.block
import pytest

from leptond.blocks.store import BlockCorrupt, BlockStore, StoreFull, pack_block, unpack_block


def bid(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_get_has_missing(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "s")
    a, b = b"alpha" * 100, b"beta"
    store.put(bid(a), a)
    store.put(bid(a), a)  # idempotent
    assert store.get(bid(a)) == a and store.has(bid(a))
    assert store.get(bid(b)) is None
    assert store.missing([bid(b), bid(a), bid(b)]) == [bid(b)]
    assert store.path_of(bid(a)) == tmp_path / "s" / bid(a)[:2] / bid(a)
    assert store.bytes_on_disk == len(a) and store.ids() == [bid(a)]


def test_put_refuses_bytes_that_do_not_match(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "s")
    with pytest.raises(BlockCorrupt, match="does not match"):
        store.put(bid(b"good"), b"evil")
    assert not store.has(bid(b"good"))
    assert not store.path_of(bid(b"good")).exists()
    assert list((tmp_path / "s" / "tmp").iterdir()) == []


def test_corrupt_file_is_deleted_and_reported_missing(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "s")
    data = b"payload" * 10
    store.put(bid(data), data)
    store.path_of(bid(data)).write_bytes(b"bit rot")
    assert store.get(bid(data)) is None
    assert not store.has(bid(data)) and not store.path_of(bid(data)).exists()
    assert store.stats().corrupt_dropped == 1


def test_restart_rebuilds_index_and_drops_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = BlockStore(root)
    blocks = [os.urandom(50) for _ in range(5)]
    for data in blocks:
        store.put(bid(data), data)
    (root / "tmp" / "half-written").write_bytes(b"partial")  # a crash mid-put
    (root / "ab").mkdir(exist_ok=True)
    (root / "ab" / "not-a-block").write_bytes(b"?")

    again = BlockStore(root)
    assert sorted(again.ids()) == sorted(bid(d) for d in blocks)
    assert again.bytes_on_disk == 250
    assert all(again.get(bid(d)) == d for d in blocks)
    assert list((root / "tmp").iterdir()) == []


def test_hot_cache_serves_repeated_reads(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "s", cache_bytes=1000)
    data = b"hot" * 10
    store.put(bid(data), data)
    store.path_of(bid(data)).unlink()  # only the memory copy is left
    assert store.get(bid(data)) == data
    hot = store.stats().hot
    assert hot is not None and hot.hits == 1


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_disk_budget_evicts_files(tmp_path: Path, policy: str) -> None:
    store = BlockStore(tmp_path / "s", policy=policy, disk_budget_bytes=300)  # type: ignore[arg-type]
    blocks = [bytes([i]) * 100 for i in range(4)]
    for data in blocks[:3]:
        store.put(bid(data), data)
    store.get(bid(blocks[0]))  # used again: not the victim under either policy
    store.put(bid(blocks[3]), blocks[3])
    assert not store.has(bid(blocks[1]))
    assert not store.path_of(bid(blocks[1])).exists()
    assert store.has(bid(blocks[0])) and store.bytes_on_disk == 300
    disk = store.stats().disk
    assert disk is not None and disk.evictions == 1


def test_pinned_blocks_survive_eviction_and_gc(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "s", disk_budget_bytes=200)
    a, b, c = b"a" * 100, b"b" * 100, b"c" * 100
    store.pin([bid(a), bid(b)])  # a task is being prepared: pin before fetching
    for data in (a, b):
        store.put(bid(data), data)
    with pytest.raises(StoreFull, match="does not fit the disk budget of 200 bytes"):
        store.put(bid(c), c)
    assert store.has(bid(a)) and store.has(bid(b)) and not store.has(bid(c))
    assert not store.path_of(bid(c)).exists()
    assert store.collect_garbage(keep=set(), older_than_s=0, now=2e9) == 0
    store.unpin([bid(a), bid(b)])
    store.put(bid(c), c)  # room again: a, the least recent, goes
    assert sorted(store.ids()) == sorted([bid(b), bid(c)])
    assert store.collect_garbage(keep={bid(b)}, older_than_s=0, now=2e9) == 1
    assert store.ids() == [bid(b)] and not store.path_of(bid(c)).exists()
    with pytest.raises(KeyError):
        store.unpin([bid(a)])


def test_gc_keeps_recent_and_referenced_blocks(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "s")
    old, kept, fresh = b"old", b"kept", b"fresh"
    for data in (old, kept, fresh):
        store.put(bid(data), data)
    for data in (old, kept):
        os.utime(store.path_of(bid(data)), (1000.0, 1000.0))
    os.utime(store.path_of(bid(fresh)), (5000.0, 5000.0))
    deleted = store.collect_garbage(keep={bid(kept)}, older_than_s=3600, now=6000.0)
    assert deleted == 1
    assert sorted(store.ids()) == sorted([bid(kept), bid(fresh)])
    assert not store.path_of(bid(old)).exists()


def test_pack_compresses_only_when_it_helps() -> None:
    text = b"abc" * 10_000
    payload, compressed = pack_block(text)
    assert compressed and len(payload) < len(text)
    assert unpack_block(payload, compressed, len(text)) == text
    noise = os.urandom(4096)
    payload, compressed = pack_block(noise)
    assert not compressed and payload == noise
    assert unpack_block(payload, compressed, 4096) == noise


def test_unpack_refuses_claims_over_the_cap() -> None:
    bomb = lz4.block.compress(bytes(10_000_000), store_size=True)
    with pytest.raises(BlockCorrupt, match="claims 10000000 bytes"):
        unpack_block(bomb, True, 4 * 1024 * 1024)
    with pytest.raises(BlockCorrupt, match="over the 10 cap"):
        unpack_block(b"x" * 11, False, 10)
    with pytest.raises(BlockCorrupt, match="does not decompress"):
        unpack_block(b"\x10\x00\x00\x00garbage", True, 100)


def test_unknown_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown cache policy 'mru'"):
        BlockStore(tmp_path / "s", policy="mru")  # type: ignore[arg-type]


def test_restart_with_a_smaller_budget_keeps_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = BlockStore(root)
    blocks = [bytes([i]) * 100 for i in range(4)]
    for age, data in enumerate(blocks):
        store.put(bid(data), data)
        os.utime(store.path_of(bid(data)), (1000.0 + age, 1000.0 + age))
    smaller = BlockStore(root, disk_budget_bytes=250)
    assert sorted(smaller.ids()) == sorted(bid(d) for d in blocks[2:])
    assert not store.path_of(bid(blocks[0])).exists()
    assert smaller.bytes_on_disk == 200
