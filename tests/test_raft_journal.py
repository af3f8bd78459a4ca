"""DurableJournal: replay, torn tails, power loss, compaction; snapshot files."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raft.errors import JournalCorrupt, JournalError, SnapshotError
from raft.journal import MAGIC, DurableJournal
from raft.snapshot import read_snapshot_file, write_snapshot_file


def entries(j: DurableJournal) -> list[tuple[bytes, int, int]]:
    return list(j[:])


def test_reopen_replays_entries_deletions_term_and_commit(tmp_path: Path) -> None:
    j = DurableJournal(tmp_path / "j")
    for i in range(1, 6):
        j.add(b"cmd%d" % i, i, 1)
    j.deleteEntriesFrom(3)  # drops indexes 4, 5
    j.add(b"new4", 4, 2)
    j.setCurrentTerm(2, "127.0.0.1:1")
    j.setRaftCommitIndex(3)
    j.close()

    k = DurableJournal(tmp_path / "j")
    assert entries(k) == [(b"cmd1", 1, 1), (b"cmd2", 2, 1), (b"cmd3", 3, 1), (b"new4", 4, 2)]
    assert (k.getCurrentTerm(), k.getVotedForNodeId(), k.getRaftCommitIndex()) == (
        2,
        "127.0.0.1:1",
        3,
    )
    assert k[-1] == (b"new4", 4, 2)
    k.close()


def test_power_loss_keeps_exactly_the_synced_records(tmp_path: Path) -> None:
    j = DurableJournal(tmp_path / "j")
    j.add(b"a", 1, 1)
    j.add(b"b", 2, 1)
    j.sync()
    synced = j.synced_size
    j.add(b"c", 3, 1)
    j.deleteEntriesFrom(0)
    j.abandon()  # power loss: nothing after the last fsync survives
    # Unsynced records never reach the file, so it ends at the last fsync.
    assert (tmp_path / "j").stat().st_size == synced

    k = DurableJournal(tmp_path / "j")
    assert entries(k) == [(b"a", 1, 1), (b"b", 2, 1)]
    k.close()


def test_one_fsync_per_batch_and_none_for_commit_index_alone(tmp_path: Path) -> None:
    j = DurableJournal(tmp_path / "j")
    before = j.fsync_count
    for i in range(1, 101):
        j.add(b"x", i, 1)
    assert j.needs_sync
    j.sync_if_needed()
    assert j.fsync_count == before + 1
    j.setRaftCommitIndex(50)  # advisory: buffered, not fsynced on its own
    assert j.fsync_count == before + 1 and not j.needs_sync
    j.add(b"y", 101, 1)
    j.setRaftCommitIndex(60)  # leader commit path syncs pending entries
    assert j.fsync_count == before + 2
    j.close()


def test_term_and_vote_are_fsynced_immediately(tmp_path: Path) -> None:
    j = DurableJournal(tmp_path / "j")
    j.setCurrentTerm(7, "n2")
    j.abandon()
    k = DurableJournal(tmp_path / "j")
    assert (k.getCurrentTerm(), k.getVotedForNodeId()) == (7, "n2")
    k.close()


@pytest.mark.parametrize("cut", [1, 4, 8, 9, 15])
def test_torn_tail_record_is_discarded(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "j"
    j = DurableJournal(path)
    j.add(b"first", 1, 1)
    j.sync()
    good = path.stat().st_size
    j.add(b"second-record", 2, 1)
    j.close()
    os.truncate(path, path.stat().st_size - cut)  # crash in the middle of the write

    k = DurableJournal(path)
    assert entries(k) == [(b"first", 1, 1)]
    assert path.stat().st_size == good  # the torn bytes are cut off for good
    k.add(b"again", 2, 1)
    k.close()
    assert entries(DurableJournal(path)) == [(b"first", 1, 1), (b"again", 2, 1)]


def test_corrupt_record_ends_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = DurableJournal(path)
    for i in range(1, 4):
        j.add(b"entry-%d" % i, i, 1)
    j.close()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip a bit inside the last record's payload
    path.write_bytes(bytes(data))
    assert [e[1] for e in entries(DurableJournal(path))] == [1, 2]


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.write_bytes(b"PYSYNCOBJ\0\0\0 not ours")
    with pytest.raises(JournalError, match="not a leptond Raft journal"):
        DurableJournal(path)


def test_compaction_rewrites_the_file(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = DurableJournal(path)
    for i in range(1, 1001):
        j.add(b"payload-%d" % i, i, 3)
    j.setCurrentTerm(3, None)
    big = path.stat().st_size
    j.deleteEntriesTo(998)
    assert path.stat().st_size < big // 50
    j.add(b"after", 1001, 3)
    j.close()
    k = DurableJournal(path)
    assert [e[1] for e in entries(k)] == [999, 1000, 1001]
    assert k.getCurrentTerm() == 3
    k.clear()
    assert len(DurableJournal(path)) == 0


def test_align_with_snapshot_keeps_entries_newer_than_the_snapshot(tmp_path: Path) -> None:
    j = DurableJournal(tmp_path / "j")
    for i in range(1, 11):
        j.add(b"e%d" % i, i, 1)
    j.align_with_snapshot((b"e6", 6, 1), (b"e7", 7, 1))
    assert [e[1] for e in entries(j)] == [6, 7, 8, 9, 10]
    j.align_with_snapshot((b"zz", 8, 1), (b"e9", 9, 1))  # mismatch: left alone
    assert len(j) == 5


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.binary(max_size=40)),
        st.tuples(st.just("delete"), st.integers(0, 30)),
        st.tuples(st.just("term"), st.integers(0, 9)),
        st.tuples(st.just("sync"), st.none()),
        st.tuples(st.just("compact"), st.integers(0, 5)),
    ),
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=ops)
def test_power_loss_anywhere_recovers_the_last_synced_state(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, object]]
) -> None:
    path = tmp_path_factory.mktemp("j") / "j"
    j = DurableJournal(path)
    model: list[tuple[bytes, int, int]] = []
    term = 0
    durable: tuple[list[tuple[bytes, int, int]], int] = ([], 0)
    for op, arg in ops:
        if op == "add":
            idx = model[-1][1] + 1 if model else 1
            j.add(arg, idx, term)  # type: ignore[arg-type]
            model.append((arg, idx, term))  # type: ignore[arg-type]
        elif op == "delete":
            j.deleteEntriesFrom(arg)  # type: ignore[arg-type]
            del model[arg:]  # type: ignore[misc]
        elif op == "term":
            term = max(term, arg)  # type: ignore[call-overload]
            j.setCurrentTerm(term, None)
            durable = (durable[0], term)
        elif op == "compact":
            j.deleteEntriesTo(arg)  # type: ignore[arg-type]
            del model[:arg]  # type: ignore[misc]
        if op in ("sync", "compact", "term"):
            if op == "sync":
                j.sync()
            durable = (list(model), term)
        assert entries(j) == model
    j.abandon()
    k = DurableJournal(path)
    assert (entries(k), k.getCurrentTerm()) == durable
    k.close()


# -- snapshot files ---------------------------------------------------------


def test_snapshot_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    state = msgpack.packb({"jobs": {"j1": "pending"}})
    write_snapshot_file(path, state, {"index": 42, "term": 3, "cluster_members": ["a:1", "b:2"]})
    got, meta = read_snapshot_file(path)
    assert got == state
    assert (meta["index"], meta["term"], meta["cluster_members"]) == (42, 3, ["a:1", "b:2"])
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_snapshot_with_a_flipped_bit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    write_snapshot_file(path, b"\x81\xa1k\xa5value", {"index": 1, "term": 1})
    data = bytearray(path.read_bytes())
    data[data.index(b"value")] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        read_snapshot_file(path)


def test_snapshot_of_another_version_or_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    write_snapshot_file(path, b"x", {"index": 1, "term": 1})
    body = msgpack.unpackb(path.read_bytes())
    body["v"] = 2
    path.write_bytes(msgpack.packb(body))
    with pytest.raises(SnapshotError, match="version 2 is not supported"):
        read_snapshot_file(path)
    path.write_bytes(b"\x1f\x8b gzip+pickle from pysyncobj")
    with pytest.raises(SnapshotError, match="not a leptond snapshot"):
        read_snapshot_file(path)
    with pytest.raises(SnapshotError, match="cannot read"):
        read_snapshot_file(tmp_path / "missing")


def test_magic_is_stable() -> None:
    # Changing it would make every existing journal unreadable.
    assert MAGIC == b"LPTJRN\x00\x01"


def record_offsets(path: Path) -> list[int]:
    """Offsets of the journal's records, in file order."""
    data = path.read_bytes()
    out, offset = [], len(MAGIC)
    while offset < len(data):
        out.append(offset)
        offset += 8 + struct.unpack_from("<I", data, offset)[0]
    return out


def ten_entries(path: Path) -> list[int]:
    j = DurableJournal(path)
    for i in range(1, 11):
        j.add(b"entry-%d" % i, i, 1)
        j.sync()
    j.close()
    offsets = record_offsets(path)
    assert len(offsets) == 10
    return offsets


@pytest.mark.parametrize(
    ("where", "what"),
    [(8 + 12, "a checksum mismatch"), (4, "a checksum mismatch"), (1, "")],
    ids=["payload", "crc", "length"],
)
def test_a_bad_record_before_intact_ones_is_corruption_not_a_torn_tail(
    tmp_path: Path, where: int, what: str
) -> None:
    path = tmp_path / "j"
    offsets = ten_entries(path)
    data = bytearray(path.read_bytes())
    data[offsets[1] + where] ^= 0x04  # one bit of entry 2 of 10
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt) as err:
        DurableJournal(path)
    line = str(err.value)
    assert line.startswith(f"{path} is corrupt at offset {offsets[1]} ({what}")
    assert "rejoin it from the other masters" in line and "\n" not in line
    assert path.read_bytes() == bytes(data)  # nothing was cut off


def test_a_torn_tail_is_still_repaired_whatever_the_last_write_left(tmp_path: Path) -> None:
    path = tmp_path / "j"
    ten_entries(path)
    good = path.read_bytes()
    # The last sync wrote three records; the crash kept the first and a half.
    j = DurableJournal(path)
    for i in range(11, 14):
        j.add(b"late-%d" % i, i, 1)
    j.close()
    offsets = record_offsets(path)
    cut = offsets[11] + 10
    os.truncate(path, cut)
    assert [e[1] for e in entries(DurableJournal(path))] == list(range(1, 12))
    # The file grew but its pages were never written: zeros.
    path.write_bytes(good + bytes(8192))
    assert [e[1] for e in entries(DurableJournal(path))] == list(range(1, 11))
    assert path.read_bytes() == good
