"""Log compaction snapshots are written off the Raft thread (raft/snapwriter.py).

Real pysyncobj on 127.0.0.1, real files. A state whose snapshot encoding
waits on a gate stands for a large one: while it waits, the Raft thread must
go on committing, the journal must not be compacted and the snapshot file
must not be replaced; once it is released the snapshot is durable, the
journal is compacted behind it and a restart restores the same state.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from raft.commands import encode
from raft.node import RaftNode
from raft.snapshot import read_snapshot_file, snapshot_chunks, write_snapshot_file
from raft.snapwriter import FAILED, NOT_SERIALIZING, SERIALIZING, SUCCESS, SnapshotWriter
from raft.state import ClusterState
from raft.view import StateView
from tests.raft_kv_proc import free_port
from tests.test_raft_node import SECRET, eventually
from tests.test_state_support import node_record

pytestmark = pytest.mark.timeout(90)


class GatedView:
    """A snapshot view whose encoding waits until the test opens the gate."""

    def __init__(self, view: StateView, gate: threading.Event) -> None:
        self.view = view
        self.gate = gate

    def encode_chunks(self) -> Iterator[bytes]:
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        yield from self.view.encode_chunks()

    def encode(self) -> bytes:
        return b"".join(self.encode_chunks())


class GatedState(ClusterState):
    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def freeze(self, for_snapshot: bool = False) -> Any:
        view = super().freeze(for_snapshot)
        return GatedView(view, self.gate) if for_snapshot else view


def command(i: int) -> bytes:
    node = node_record(f"n{i % 7}")
    return encode("register_node", {"node": node, "now": 1000.0 + i}, f"rid-{i:06d}")


async def single_node(tmp_path: Path, state: ClusterState, **kw: Any) -> RaftNode:
    node = RaftNode(
        state,
        f"127.0.0.1:{free_port()}",
        [],
        tmp_path / "raft",
        SECRET,
        raft_min_timeout_s=0.4,
        raft_max_timeout_s=1.0,
        **kw,
    )
    await eventually(node.is_leader, 15, "the node to lead")
    return node


async def test_the_raft_thread_commits_while_a_snapshot_is_written(tmp_path: Path) -> None:
    state = GatedState()
    node = await single_node(tmp_path, state, log_compaction_min_entries=10)
    snap = node.data_dir / "raft.snapshot"
    try:
        state.gate.clear()
        for i in range(15):
            await node.propose(command(i), timeout_s=5)
        await eventually(lambda: node.snapshot_stats.in_progress, 15, "a snapshot to start")
        started_at = state.applied_index
        # The snapshot waits at the gate; commits go on meanwhile, each
        # within a timeout far shorter than the wait.
        for i in range(15, 40):
            await node.propose(command(i), timeout_s=2)
        await asyncio.sleep(0.3)
        assert not snap.exists(), "a snapshot file appeared before it was written"
        assert len(node.journal) >= 40, "the journal was compacted behind a snapshot not on disk"
        assert node.snapshot_stats.written == 0
        state.gate.set()
        await eventually(lambda: node.snapshot_stats.written == 1, 15, "the snapshot to land")
        data, meta = read_snapshot_file(snap)
        # The state as of the entry the snapshot names, not as of the write.
        assert meta["index"] <= started_at
        assert msgpack.unpackb(data, raw=False)["applied_index"] == meta["index"]
        await eventually(lambda: len(node.journal) < 40, 10, "compaction behind the snapshot")
        for i in range(40, 45):
            await node.propose(command(i), timeout_s=5)
        with node.lock:
            expected = state.snapshot()
    finally:
        node.close()
    again = ClusterState()
    node = RaftNode(again, node.self_addr, [], tmp_path / "raft", SECRET)
    try:
        await eventually(lambda: again.applied_index == state.applied_index, 15, "the replay")
        assert again.snapshot() == expected
    finally:
        node.close()


async def test_a_stale_temp_file_never_replaces_the_snapshot(tmp_path: Path) -> None:
    # pysyncobj renames <snapshot>.tmp onto the snapshot file after every
    # serialize; one left by an older build must not land there.
    state = ClusterState()
    raft_dir = tmp_path / "raft"
    raft_dir.mkdir()
    node = await single_node(tmp_path, state, log_compaction_min_entries=10)
    try:
        (raft_dir / "raft.snapshot.tmp").write_bytes(b"stale garbage")
        for i in range(15):
            await node.propose(command(i), timeout_s=5)
        await eventually(lambda: node.snapshot_stats.written == 1, 15, "a snapshot")
        read_snapshot_file(raft_dir / "raft.snapshot")  # a whole, valid snapshot
        assert not (raft_dir / "raft.snapshot.tmp").exists()
    finally:
        node.close()


# -- SnapshotWriter on its own, driven as pysyncobj drives it --------------------


class _Member:
    def __init__(self, addr: str) -> None:
        self.id = addr


class Parts:
    """A view that waits at a gate, or fails."""

    def __init__(self, data: bytes, gate: threading.Event | None = None, fail: bool = False):
        self.data, self.gate, self.fail = data, gate, fail

    def encode_chunks(self) -> Iterator[bytes]:
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.fail:
            raise OSError(28, "No space left on device")
        yield self.data


def serialize(w: SnapshotWriter, index: int) -> None:
    last, before = (b"cmd", index, 3), (b"cmd", index - 1, 3)
    w.serialize(str(w.path) + ".tmp", (last, before, {_Member("127.0.0.1:1")}))


def wait_state(w: SnapshotWriter, want: int) -> None:
    for _ in range(3000):
        got = w.check()
        if got == want:
            return
        assert got == SERIALIZING, got
        threading.Event().wait(0.01)
    raise AssertionError(f"checker never said {want}")


def test_the_snapshot_file_changes_only_when_the_checker_says_success(tmp_path: Path) -> None:
    path = tmp_path / "raft.snapshot"
    write_snapshot_file(path, b"old", {"index": 1, "term": 1})
    gate = threading.Event()
    views = iter([Parts(b"new", gate)])
    w = SnapshotWriter(path, lambda: next(views))
    assert w.check() == NOT_SERIALIZING
    serialize(w, 9)
    assert not (tmp_path / "raft.snapshot.tmp").exists()
    assert w.check() == SERIALIZING
    assert read_snapshot_file(path)[0] == b"old"
    gate.set()
    wait_state(w, SUCCESS)
    state, meta = read_snapshot_file(path)
    assert (state, meta["index"], meta["term"]) == (b"new", 9, 3)
    assert w.check() == NOT_SERIALIZING
    w.close()


def test_a_failed_write_leaves_the_old_snapshot_and_backs_off(tmp_path: Path) -> None:
    path = tmp_path / "raft.snapshot"
    write_snapshot_file(path, b"old", {"index": 1, "term": 1})
    w = SnapshotWriter(path, lambda: Parts(b"new", fail=True), retry_after_s=0.3)
    serialize(w, 9)
    w.close()
    # Reported only after the back-off, so pysyncobj does not retry every tick.
    assert w.check() == SERIALIZING
    wait_state(w, FAILED)
    assert read_snapshot_file(path)[0] == b"old"
    assert not w.writing.exists()
    assert w.stats.failed == 1


def test_a_snapshot_installed_from_the_leader_wins_over_one_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "raft.snapshot"
    gate = threading.Event()
    w = SnapshotWriter(path, lambda: Parts(b"local", gate))
    serialize(w, 9)
    # Meanwhile pysyncobj received a newer snapshot and renamed it into place.
    write_snapshot_file(path, b"from the leader", {"index": 20, "term": 4})
    w.superseded()
    gate.set()
    wait_state(w, FAILED)
    assert read_snapshot_file(path)[0] == b"from the leader"
    assert not w.writing.exists()


def test_snapshot_chunks_are_the_documented_msgpack_map() -> None:
    state = os.urandom(70_000)
    meta = {"index": 5, "term": 2, "cluster_members": ["a:1"], "raft_entries": [[b"x", 4, 2]]}
    data = b"".join(snapshot_chunks([state[:10], state[10:]], meta))
    body = msgpack.unpackb(data, raw=False)
    assert list(body) == [
        "format", "v", "index", "term", "cluster_members", "raft_entries", "state", "sha256",
    ]  # fmt: skip
    digest = body.pop("sha256")
    canonical = msgpack.packb({k: body[k] for k in sorted(body)}, use_bin_type=True)
    assert digest == hashlib.sha256(canonical).hexdigest()
    assert data == msgpack.packb({**body, "sha256": digest}, use_bin_type=True)
