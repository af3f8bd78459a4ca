"""raft.membership: address checks, the quorum rule, and `leptond recover`'s rewrite."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from raft.errors import JournalError, MembershipError, RaftError
from raft.journal import DurableJournal
from raft.membership import (
    lock_data_dir,
    parse_member,
    quorum_after,
    read_members_file,
    recover_data_dir,
)
from raft.node import RaftNode
from raft.snapshot import read_snapshot_file, write_snapshot_file
from tests.raft_kv_proc import KVStateMachine, free_port, kv_command

NO_OP, MEMBERSHIP, REGULAR = b"\x01", b"\x02", b"\x00"


@pytest.mark.parametrize(
    ("addr", "why"),
    [
        ("999.1.1.1:7442", "'999.1.1.1' is not a valid IP address"),
        ("127.0.0.1", "expected HOST:RAFTPORT"),
        ("127.0.0.1:0", "expected HOST:RAFTPORT"),
        ("127.0.0.1:65536", "expected HOST:RAFTPORT"),
        (":7442", "expected HOST:RAFTPORT"),
        ("bad host:7442", "is not a valid address"),
        ("::zz:7442", "is not a valid IP address"),
    ],
)
def test_bad_member_addresses_are_one_line_errors(addr: str, why: str) -> None:
    with pytest.raises(MembershipError, match=why):
        parse_member(addr)


def test_good_member_addresses_parse() -> None:
    assert parse_member("10.0.0.7:7442") == ("10.0.0.7", 7442)
    assert parse_member("m1.example:7442") == ("m1.example", 7442)
    assert parse_member("::1:7442") == ("::1", 7442)


def test_a_quorum_is_a_strict_majority() -> None:
    assert quorum_after(3, 2) and not quorum_after(4, 2) and quorum_after(4, 3)
    assert quorum_after(1, 1) and not quorum_after(2, 1)


def test_recover_neutralizes_membership_entries_and_rewrites_the_snapshot(tmp_path: Path) -> None:
    raft_dir = tmp_path / "raft"
    raft_dir.mkdir()
    j = DurableJournal(raft_dir / "raft.journal")
    log = [(MEMBERSHIP + b"add-old", 5, 2), (REGULAR + b"job", 6, 2), (MEMBERSHIP + b"rem", 7, 3)]
    for e in log:
        j.add(*e)
    j.setCurrentTerm(3, "127.0.0.1:9")
    j.close()
    write_snapshot_file(
        raft_dir / "raft.snapshot",
        b"state",
        {
            "index": 6,
            "term": 2,
            "cluster_members": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
            "raft_entries": [[log[1][0], 6, 2], [log[0][0], 5, 2]],
        },
    )
    res = recover_data_dir(raft_dir, ["127.0.0.1:1"])
    assert res == {"membership_entries": 2, "members": 1}
    k = DurableJournal(raft_dir / "raft.journal")
    assert list(k[:]) == [(NO_OP, 5, 2), (REGULAR + b"job", 6, 2), (NO_OP, 7, 3)]
    assert (k.getCurrentTerm(), k.getVotedForNodeId()) == (3, "127.0.0.1:9")
    k.close()
    state, meta = read_snapshot_file(raft_dir / "raft.snapshot")
    assert state == b"state" and meta["cluster_members"] == ["127.0.0.1:1"]
    assert [tuple(e) for e in meta["raft_entries"]] == [(REGULAR + b"job", 6, 2), (NO_OP, 5, 2)]
    assert read_members_file(raft_dir) == ["127.0.0.1:1"]


def test_recover_refuses_a_running_master_a_missing_journal_and_bad_members(
    tmp_path: Path,
) -> None:
    with pytest.raises(JournalError, match="holds no Raft journal"):
        recover_data_dir(tmp_path / "nowhere", ["127.0.0.1:1"])
    assert not (tmp_path / "nowhere").exists()
    raft_dir = tmp_path / "raft"
    DurableJournal(raft_dir / "raft.journal").close()
    with pytest.raises(MembershipError, match="not a valid IP address"):
        recover_data_dir(raft_dir, ["127.0.0.1:1", "999.1.1.1:7442"])
    with pytest.raises(MembershipError, match="at least this master"):
        recover_data_dir(raft_dir, [])
    fd = lock_data_dir(raft_dir)  # what a running master holds
    try:
        with pytest.raises(JournalError, match="in use by a running master; stop it first"):
            recover_data_dir(raft_dir, ["127.0.0.1:1"])
    finally:
        os.close(fd)
    assert read_members_file(raft_dir) is None


async def test_one_membership_change_at_a_time(tmp_path: Path) -> None:
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    nodes = [
        RaftNode(
            KVStateMachine(),
            a,
            addrs,
            tmp_path / a.replace(":", "_"),
            b"secret",
            raft_min_timeout_s=0.4,
            raft_max_timeout_s=1.0,
            leader_fallback_timeout_s=120.0,  # stays leader alone, for this test
        )
        for a in addrs
    ]
    try:
        # A leader takes no membership change before its term's no-op entry is
        # applied (pysyncobj refuses it outright), so make it commit one entry
        # of its own first: that entry is applied after the no-op.
        deadline = time.monotonic() + 30
        leader = None
        while leader is None:
            assert time.monotonic() < deadline, "no leader committed an entry"
            candidates = [n for n in nodes if n.is_leader()]
            if not candidates:
                await asyncio.sleep(0.05)
                continue
            try:
                await candidates[0].propose(kv_command("first", "k", "v"), timeout_s=5.0)
                leader = candidates[0]
            except RaftError:  # not leader any more, or no commit in time
                await asyncio.sleep(0.05)
        followers = [n for n in nodes if n is not leader]
        for f in followers:
            f.close()
        # A change pysyncobj took but cannot commit: its followers are gone.
        leader._obj.removeNodeFromCluster(followers[0].self_addr)
        deadline = time.monotonic() + 10
        while leader.journal.last_index_after(1, lambda c: c[:1] == b"\x02") is None:
            assert time.monotonic() < deadline, "the change never reached the log"
            await asyncio.sleep(0.05)
        for change in (leader.add_member, leader.remove_member):
            with pytest.raises(MembershipError, match=r"another membership change .* committing"):
                await change(followers[1].self_addr, timeout_s=2.0)
    finally:
        for n in nodes:
            n.close()
