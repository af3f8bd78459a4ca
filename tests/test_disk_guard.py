"""The pieces that keep a master's data disk from filling up, on real small
disks (tmpfs): the disk reserve and journal health, the block store's limit,
the per-user upload ledger, and a journal that meets a full disk."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from leptond.blocks import BlockStore, StoreFull, block_id
from leptond.disk import DiskGuard, DiskState
from leptond.health import assess
from leptond.uploads import UploadLedger
from leptond.wire.errors import RpcError
from raft.journal import DurableJournal
from tests.tmpfs import MiB, fill, tmpfs


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", 8 * MiB) as d:
        yield d


def test_below_the_reserve_new_work_is_refused_with_one_line(small_disk: Path) -> None:
    clock = [0.0]
    guard = DiskGuard(small_disk, 4 * MiB, clock=lambda: clock[0])
    st = guard.state()
    assert not st.low and st.journal_writable and st.problems() == []
    guard.check_new_work()
    fill(small_disk, leave_bytes=2 * MiB)
    clock[0] += 1.0  # the state is measured again at most twice a second
    st = guard.state()
    assert st.low and st.journal_writable
    with pytest.raises(RpcError) as exc:
        guard.check_new_work()
    assert exc.value.code == "disk_low"
    assert "\n" not in exc.value.message and "under the reserve of 4 MiB" in exc.value.message
    (small_disk / "filler").unlink()
    clock[0] += 1.0
    assert not guard.state().low
    guard.check_new_work()


def test_a_full_disk_or_a_failed_journal_write_is_not_writable(small_disk: Path) -> None:
    err: list[str | None] = [None]
    clock = [0.0]
    guard = DiskGuard(small_disk, 0, journal_error=lambda: err[0], clock=lambda: clock[0])
    fill(small_disk)
    clock[0] += 1.0
    st = guard.state()
    assert st.free_bytes == 0 and not st.journal_writable
    assert any("is full" in p for p in st.problems())
    (small_disk / "filler").unlink()
    err[0] = "raft.journal: No space left on device"
    clock[0] += 1.0
    st = guard.state()
    assert st.free_bytes > 0 and not st.journal_writable
    assert st.problems() == [
        "the Raft journal cannot be written: raft.journal: No space left on device"
    ]


def test_a_journal_that_meets_a_full_disk_keeps_every_synced_entry(small_disk: Path) -> None:
    """A write cut short by ENOSPC must not leave a torn record in front of the retry."""
    path = small_disk / "raft.journal"
    j = DurableJournal(path)
    payload = b"x" * 3000
    synced: list[int] = []
    index = 0
    filler = fill(small_disk, leave_bytes=64 * 1024)
    with pytest.raises(OSError) as exc:
        while True:
            index += 1
            j.add(payload + str(index).encode(), index, 1)
            if index % 7 == 0:  # batches of several records, as a tick makes
                j.sync()
                synced.append(index)
    assert exc.value.errno == errno.ENOSPC
    assert j.write_error is not None and "No space left" in j.write_error
    assert path.stat().st_size == j.synced_size  # the partial batch was cut off
    filler.unlink()  # space freed: the same batch goes out whole
    j.sync()
    assert j.write_error is None
    j.close()
    again = DurableJournal(path)
    assert [e[1] for e in again[:]] == list(range(1, index + 1))
    assert synced, "the disk filled before the first batch"
    again.close()


def test_the_block_store_limit_refuses_new_blocks_only(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "blocks", limit_bytes=10_000)
    a, b, c = b"a" * 4000, b"b" * 4000, b"c" * 4000
    store.put(block_id(a), a)
    store.put(block_id(b), b)
    with pytest.raises(StoreFull, match="the block store is full"):
        store.put(block_id(c), c)
    store.put(block_id(a), a)  # one it has is no new space
    assert store.bytes_on_disk == 8000 and block_id(c) not in store
    store.delete(block_id(a))
    store.put(block_id(c), c)


def test_the_upload_ledger_charges_each_holder_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "owners.log"
    led = UploadLedger(path, stored=set())
    led.charge("b1", "mallory", 100)
    led.charge("b2", "mallory", 50)
    led.charge("b1", "eve", 100)  # the same content uploaded by eve: hers too
    led.charge("b1", "eve", 100)  # again: nothing more
    led.charge("b3", "eve", 10)
    assert dict(led.usage) == {"mallory": 150, "eve": 110}
    assert led.holds("eve", "b1") and not led.holds("eve", "b2")
    led.close()
    # Only blocks still stored count after a restart; a torn last line is skipped.
    with open(path, "a") as f:
        f.write('["b4", "eve"')
    again = UploadLedger(path, stored={"b1", "b3"})
    assert dict(again.usage) == {"mallory": 100, "eve": 110}
    assert again.holders("b1") == ["eve", "mallory"] and again.holders("b2") == []
    again.retain({"b3"})  # garbage collection removed b1
    assert dict(again.usage) == {"eve": 10}
    assert not again.holds("mallory", "b1")
    again.close()
    assert UploadLedger(path, stored={"b3"}).usage == {"eve": 10}


def state(free: int = 100 * MiB, reserve: int = MiB, err: str | None = None) -> DiskState:
    return DiskState("/data", free, reserve, False, err)


def raft(leader: str | None = "a:1", connected: tuple[bool, ...] = (True, True)) -> dict:
    members = [{"addr": f"m{i}:1", "connected": c} for i, c in enumerate(connected)]
    quorum = (1 + sum(connected)) * 2 > 1 + len(connected)
    return {"leader": leader, "has_quorum": quorum, "members": members}


def test_health_is_ok_only_with_a_leader_a_quorum_a_journal_and_the_reserve() -> None:
    assert assess(raft(), state()) | {"disk": None} == {
        "ok": True,
        "leader": "a:1",
        "quorum": True,
        "reachable": 3,
        "members": 3,
        "unreachable": [],
        "disk": None,
        "problems": [],
    }
    one_down = assess(raft(connected=(True, False)), state())
    assert one_down["ok"] and one_down["problems"] == ["master m1:1 unreachable"]
    no_leader = assess(raft(leader=None), state())
    assert not no_leader["ok"] and no_leader["problems"][0].startswith("no leader")
    lost = assess(raft(leader=None, connected=(False, False)), state())
    assert not lost["ok"] and "no quorum: 1 of 3 masters reachable" in lost["problems"]
    low = assess(raft(), state(free=MiB // 2))
    assert not low["ok"] and low["problems"][0].startswith("disk low: 0 MiB free")
    broken = assess(raft(), state(err="EIO"))
    assert not broken["ok"] and broken["problems"] == ["the Raft journal cannot be written: EIO"]
