"""The table of recent client requests (raft/dedupe.py) inside ClusterState:
a retry is answered with the first result, also on a replica restored from a
snapshot; the table is bounded by count and by the proposers' time, and
commands with ids of their own are neither remembered nor snapshotted."""

from __future__ import annotations

import msgpack

from raft.commands import decode, encode
from raft.dedupe import MAX_AGE_S, RecentResults
from raft.state import ClusterState
from tests.test_state_support import Harness, is_error

T0 = 1_700_000_000.0


def cancel(job: str, rid: str | None, at: float) -> bytes:
    return encode("cancel_job", {"job_id": job, "user": "alice", "now": at}, rid, at=at)


def test_a_command_says_whether_it_is_remembered_and_when_it_was_proposed() -> None:
    mine = decode(encode("noop", {}, "client-rid-1", at=T0))
    assert (mine.rid, mine.at, mine.dedupe) == ("client-rid-1", T0, True)
    own = decode(encode("noop", {}))
    assert (own.at, own.dedupe) == (None, False)
    assert len(own.rid) == 32
    # A time that is not a finite number is ignored, not trusted.
    odd = decode(msgpack.packb({"op": "noop", "v": 1, "rid": "r", "args": {}, "at": float("inf")}))
    assert odd.at is None


def test_a_retry_on_a_replica_restored_from_a_snapshot_gets_the_first_answer() -> None:
    h = Harness()
    h.submit("j1")
    first = h.raw(cancel("j1", "retry-me", T0))
    assert first == {"id": "j1", "state": "cancelled"}
    # The entry with the first answer rides in the snapshot a follower gets.
    follower = ClusterState()
    follower.restore(h.state.snapshot())
    assert follower.apply(cancel("j1", "retry-me", T0 + 5), 999) == first
    assert h.raw(cancel("j1", "retry-me", T0 + 5)) == first
    # Another call is another request: it is applied, and finds the job cancelled.
    assert is_error(h.raw(cancel("j1", "another", T0 + 6)), "conflict")


def test_commands_with_their_own_ids_are_not_remembered() -> None:
    h = Harness()
    h.submit("j1")
    h.raw(cancel("j1", None, T0))
    assert len(h.state.recent) == 0
    snap = msgpack.unpackb(h.state.snapshot(), raw=False, strict_map_key=False)
    assert snap["recent"]["entries"] == []


def test_entries_age_out_by_the_proposers_time() -> None:
    h = Harness()
    h.submit("j1")
    first = h.raw(cancel("j1", "old-call", T0))
    h.raw(encode("noop", {}, None, at=T0 + MAX_AGE_S - 1))
    assert "old-call" in h.state.recent
    # Any command moves the table's clock; past the age bound the entry is gone.
    h.raw(encode("noop", {}, None, at=T0 + MAX_AGE_S + 1))
    assert "old-call" not in h.state.recent
    again = h.raw(cancel("j1", "old-call", T0 + MAX_AGE_S + 2))
    assert again != first and is_error(again, "conflict")


def test_the_table_follows_the_latest_time_not_the_largest() -> None:
    r = RecentResults(max_age_s=100)
    r.tick(T0 + 10_000)  # a master whose clock ran far ahead...
    r.remember("a", 1, T0 + 10_000)
    r.tick(T0)  # ...then a leader with the right time: it keeps its own entries
    r.remember("b", 2, T0)
    r.tick(T0 + 50)
    assert "b" in r and "a" in r
    r.tick(T0 + 10_101)
    assert "a" not in r and "b" not in r


def test_the_table_is_bounded_by_count() -> None:
    r = RecentResults(max_entries=3)
    for k in range(5):
        r.remember(f"r{k}", k, T0)
    assert [x for x in ("r0", "r1", "r2", "r3", "r4") if x in r] == ["r2", "r3", "r4"]


def test_snapshots_round_trip_and_the_older_form_is_dropped() -> None:
    h = Harness()
    h.submit("j1")
    h.raw(cancel("j1", "kept-call", T0))
    data = h.state.snapshot()
    again = ClusterState()
    again.restore(data)
    assert again.snapshot() == data
    assert again.recent.clock == T0
    # Snapshots written before: [rid, result] pairs of every command, no times.
    old = msgpack.unpackb(data, raw=False, strict_map_key=False)
    old["recent"] = [["some-old-rid", {"ok": True}]]
    older = ClusterState()
    older.restore(msgpack.packb(old, use_bin_type=True))
    assert len(older.recent) == 0 and older.jobs.keys() == h.state.jobs.keys()
