"""RaftNode with real pysyncobj, real sockets on 127.0.0.1 and real files.

These run several nodes as threads of the test process; kill -9 / SIGSTOP
scenarios live in test_raft_node_procs.py.
"""

from __future__ import annotations

import asyncio
import pathlib
import pickle
import socket
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from raft.errors import NoQuorum, NotLeader, SnapshotError
from raft.node import RaftNode, derive_password
from raft.snapshot import write_snapshot_file
from tests.harness import listening_on
from tests.raft_kv_proc import KVStateMachine, free_port, kv_command

SECRET = b"cluster-secret-for-tests"
pytestmark = pytest.mark.timeout(60)


async def eventually(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


class Nodes:
    """Builds RaftNodes in one test and closes every one of them afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[RaftNode] = []
        self.states: dict[str, KVStateMachine] = {}
        self.leadership: list[tuple[str, bool, int]] = []

    def make(self, addr: str, peers: list[str], secret: bytes = SECRET, **kw: Any) -> RaftNode:
        state = KVStateMachine()

        def on_leadership(is_leader: bool) -> None:
            self.leadership.append((addr, is_leader, threading.get_ident()))

        node = RaftNode(
            state,
            addr,
            peers,
            self.root / addr.replace(":", "_"),
            secret,
            on_leadership=on_leadership,
            raft_min_timeout_s=0.4,
            raft_max_timeout_s=1.0,
            connection_retry_s=0.3,
            **kw,
        )
        self.nodes.append(node)
        self.states[addr] = state
        return node

    def cluster(self, n: int, **kw: Any) -> list[RaftNode]:
        addrs = [f"127.0.0.1:{free_port()}" for _ in range(n)]
        return [self.make(a, addrs, **kw) for a in addrs]

    async def leader(self, among: list[RaftNode], timeout_s: float = 15.0) -> RaftNode:
        def find() -> RaftNode | None:
            leaders = [n for n in among if n.is_leader()]
            return leaders[0] if len(leaders) == 1 else None

        found: RaftNode = await eventually(find, timeout_s, "a single leader")
        return found

    def close(self) -> None:
        for n in self.nodes:
            n.close()


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[Nodes]:
    ns = Nodes(tmp_path)
    try:
        yield ns
    finally:
        ns.close()


async def write(node: RaftNode, rid: str, value: str, key: str = "log") -> Any:
    return await node.propose(kv_command(rid, key, value), timeout_s=5.0)


def test_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cluster secret is required"):
        RaftNode(KVStateMachine(), "127.0.0.1:1", [], tmp_path, b"")


def test_refuses_a_snapshot_without_a_raft_position(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    write_snapshot_file(data_dir / "raft.snapshot", b"\x80", {"index": 5, "term": 1})
    with pytest.raises(SnapshotError, match="no Raft log position"):
        RaftNode(KVStateMachine(), "127.0.0.1:1", [], data_dir, SECRET)


def test_password_is_derived_from_the_secret_not_the_secret_itself() -> None:
    pw = derive_password(SECRET)
    assert SECRET.decode() not in pw and pw == derive_password(SECRET)
    assert pw != derive_password(SECRET + b"x")


async def test_three_nodes_elect_a_leader_and_followers_redirect(nodes: Nodes) -> None:
    cluster = nodes.cluster(3)
    leader = await nodes.leader(cluster)
    result = await write(leader, "r1", "hello")
    assert result["len"] == 1 and result["index"] > 1

    for follower in (n for n in cluster if n is not leader):
        # A follower learns who leads from the leader's appends: on a loaded
        # machine it may not have heard one yet.
        await eventually(lambda f=follower: f.leader() == leader.self_addr, 20, "the leader known")
        with pytest.raises(NotLeader) as info:
            await write(follower, "r2", "nope")
        assert info.value.leader == leader.self_addr

    # Applied everywhere; on_leadership(True) only on the leader, on the loop thread.
    await eventually(
        lambda: all(s.lists.get("log") == ["hello"] for s in nodes.states.values()),
        5.0,
        "the write on every node",
    )
    await eventually(lambda: nodes.leadership, 5.0, "leadership callback")
    assert {(a, v) for a, v, _ in nodes.leadership} == {(leader.self_addr, True)}
    assert {t for _, _, t in nodes.leadership} == {threading.get_ident()}
    status = leader.status()
    assert status["has_quorum"] and status["leader"] == leader.self_addr
    assert {m["addr"] for m in status["members"]} == {n.self_addr for n in cluster} - {
        leader.self_addr
    }
    await eventually(
        lambda: all(m["lag"] == 0 and m["connected"] for m in leader.status()["members"]),
        5.0,
        "followers in sync",
    )


async def test_a_raising_apply_does_not_stall_the_log(nodes: Nodes) -> None:
    (node,) = nodes.cluster(1)
    await nodes.leader([node])
    boom = await node.propose(
        msgpack.packb({"rid": "b", "kind": "boom", "key": "k", "value": "v"}), timeout_s=5.0
    )
    assert boom["error"]["code"] == "apply_failed"
    assert (await write(node, "after", "ok"))["len"] == 1


async def test_duplicate_request_id_is_applied_once(nodes: Nodes) -> None:
    (node,) = nodes.cluster(1)
    await nodes.leader([node])
    first = await write(node, "same", "v")
    again = await write(node, "same", "v")
    assert first == again and nodes.states[node.self_addr].lists["log"] == ["v"]


async def test_single_node_restart_replays_the_journal(nodes: Nodes, tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    node = nodes.make(addr, [addr])
    await nodes.leader([node])
    for i in range(20):
        await write(node, f"r{i}", f"v{i}")
    assert node.journal.fsync_count >= 1
    node.close()

    again = nodes.make(addr, [addr])
    again.wait_ready(10.0)
    await nodes.leader([again])
    await eventually(lambda: len(nodes.states[addr].lists.get("log", [])) == 20, 5.0, "replay")
    assert nodes.states[addr].lists["log"] == [f"v{i}" for i in range(20)]


async def test_restart_from_snapshot_and_compacted_log(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = nodes.cluster(3, log_compaction_min_entries=30)
    addrs = [n.self_addr for n in cluster]
    leader = await nodes.leader(cluster)
    for i in range(120):
        await write(leader, f"r{i}", f"v{i}")
    expected = [f"v{i}" for i in range(120)]
    await eventually(
        lambda: all((n.data_dir / "raft.snapshot").exists() for n in cluster),
        10.0,
        "snapshots on every node",
    )
    await eventually(lambda: all(len(n.journal) < 60 for n in cluster), 10.0, "compaction")
    await eventually(
        lambda: all(s.lists.get("log") == expected for s in nodes.states.values()),
        10.0,
        "all applied",
    )
    for n in cluster:
        n.close()
    nodes.states.clear()

    restarted = [nodes.make(a, addrs, log_compaction_min_entries=30) for a in addrs]
    leader = await nodes.leader(restarted)
    await write(leader, "post", "after-restart")
    await eventually(
        lambda: all(
            s.lists.get("log") == [*expected, "after-restart"] for s in nodes.states.values()
        ),
        10.0,
        "snapshot + journal restored on every node",
    )
    # Loading the snapshot's member list must not count a node among its own
    # peers: with itself as a fourth member a 3-node quorum needs all three.
    assert [n.reachable()[1] for n in restarted] == [3, 3, 3]
    # A node joining now can only get the state as a snapshot sent over the
    # wire (the leader's log no longer starts at 1): our msgpack file, no pickle.
    joiner_addr = f"127.0.0.1:{free_port()}"
    joiner = nodes.make(joiner_addr, [*addrs, joiner_addr])
    await leader.add_member(joiner_addr, timeout_s=10.0)
    await eventually(
        lambda: nodes.states[joiner_addr].lists.get("log") == [*expected, "after-restart"],
        15.0,
        "joiner to install the snapshot",
    )
    assert (joiner.data_dir / "raft.snapshot").exists()  # installed, not compacted itself
    assert joiner.reachable()[1] == 4
    assert "failed to load full dump" not in caplog.text
    joiner.close()
    for n in restarted:
        n.close()

    # A damaged snapshot stops the node instead of starting it with no state.
    snap = restarted[0].data_dir / "raft.snapshot"
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snap.write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        nodes.make(addrs[0], addrs)


async def test_membership_grows_to_five_and_shrinks_back_while_serving(nodes: Nodes) -> None:
    cluster = nodes.cluster(3)
    acked: list[str] = []
    stop = asyncio.Event()

    async def writer() -> None:
        i = 0
        while not stop.is_set():
            leaders = [n for n in cluster if n.is_leader()]
            if leaders:
                try:
                    await write(leaders[0], f"w{i}", f"w{i}")
                    acked.append(f"w{i}")
                    i += 1
                except Exception:
                    pass
            await asyncio.sleep(0.01)

    await nodes.leader(cluster)
    task = asyncio.create_task(writer())
    addrs = [n.self_addr for n in cluster]
    extra_addrs = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    extras = []
    for addr in extra_addrs:
        # A joining node is started with the current members as its peers.
        extras.append(nodes.make(addr, [*addrs, addr]))
        leader = await nodes.leader(cluster)
        await leader.add_member(addr, timeout_s=10.0)
        addrs.append(addr)
        cluster.append(extras[-1])
    leader = await nodes.leader(cluster)
    await eventually(
        lambda: (
            len(leader.status()["members"]) == 4
            and all(m["connected"] and m["lag"] == 0 for m in leader.status()["members"])
        ),
        10.0,
        "five members in sync",
    )
    n_before = len(acked)
    await eventually(lambda: len(acked) > n_before + 5, 10.0, "writes with five members")

    for _ in extras:
        leader = await nodes.leader(cluster)
        # Back to three members: a joined node goes, or, where one of them
        # leads by now, a follower that was there from the start (a leader
        # is never asked to remove itself).
        followers = [n for n in cluster if n is not leader]
        victim = next((n for n in reversed(extras) if n in followers), followers[0])
        await leader.remove_member(victim.self_addr, timeout_s=10.0)
        cluster.remove(victim)
        victim.close()
    leader = await nodes.leader(cluster)
    await eventually(lambda: len(leader.status()["members"]) == 2, 10.0, "back to three")
    n_before = len(acked)
    await eventually(lambda: len(acked) > n_before + 5, 10.0, "writes with three members")
    stop.set()
    await task
    final = acked.copy()
    await eventually(
        lambda: all(
            nodes.states[n.self_addr].lists.get("log", [])[: len(final)] == final for n in cluster
        ),
        10.0,
        "every ack on every node",
    )


class _TouchOnUnpickle:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.touch, (self.marker,))


async def test_wrong_password_node_cannot_join_and_raw_pickles_are_not_loaded(
    nodes: Nodes, tmp_path: Path
) -> None:
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    good = [nodes.make(a, addrs) for a in addrs[:2]]
    evil = nodes.make(addrs[2], addrs, secret=b"not-the-cluster-secret")
    leader = await nodes.leader(good)
    for i in range(5):
        await write(leader, f"r{i}", f"v{i}")
    with pytest.raises(NotLeader):
        await write(evil, "evil", "evil")
    assert not evil.is_leader()
    assert nodes.states[evil.self_addr].lists == {}
    assert not any(
        m["connected"] for m in leader.status()["members"] if m["addr"] == evil.self_addr
    )

    # A pickle that would create a file if pysyncobj unpickled it.
    marker = tmp_path / "pwned"
    payload = zlib.compress(pickle.dumps(_TouchOnUnpickle(marker)))
    host, port = leader.self_addr.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(struct.pack("i", len(payload)) + payload)
        s.settimeout(5)
        closed = b""
        while True:  # the node must hang up on us after failing to decrypt
            chunk = s.recv(4096)
            if not chunk:
                break
            closed += chunk
    assert not marker.exists()
    assert (await write(leader, "still", "fine"))["len"] == 6


async def test_leader_that_loses_quorum_fails_fast_and_steps_down(nodes: Nodes) -> None:
    cluster = nodes.cluster(3)
    leader = await nodes.leader(cluster)
    await write(leader, "r0", "v0")
    await eventually(
        lambda: (leader.self_addr, True) in {(a, v) for a, v, _ in nodes.leadership},
        5.0,
        "announce",
    )
    for n in cluster:
        if n is not leader:
            n.close()
    # It fails rather than hangs (the outer wait only catches a hang).
    with pytest.raises((NoQuorum, NotLeader)) as info:
        await asyncio.wait_for(write(leader, "r1", "v1"), 60)
    if isinstance(info.value, NoQuorum):
        assert "1 of 3 masters reachable" in str(info.value)
    # pysyncobj's leaderFallbackTimeout (set to 3x the max election timeout)
    await eventually(lambda: not leader.is_leader(), 10.0, "the leader to step down")
    await eventually(
        lambda: (leader.self_addr, False) in {(a, v) for a, v, _ in nodes.leadership},
        5.0,
        "on_leadership(False)",
    )


@pytest.mark.timeout(120)
async def test_followers_stand_at_once_in_address_order_when_the_leader_is_gone(
    nodes: Nodes,
) -> None:
    """The leader's connection ends (here it shuts down; kill -9 closes it the
    same way): its followers stand for election without waiting for their
    election timeout, the lowest address first (raft/node.py leader_lost)."""
    from pysyncobj.monotonic import monotonic

    cluster = nodes.cluster(3)
    leader = await nodes.leader(cluster)
    await write(leader, "r1", "before")
    followers = [n for n in cluster if n is not leader]
    # Election timeouts far beyond this test's waits: only the fast path can
    # elect anyone now. Each follower's next heartbeat from the leader sets
    # its deadline from the new range.
    for f in followers:
        conf = f._obj.private("conf")
        conf.raftMinTimeout, conf.raftMaxTimeout = 600.0, 900.0
    await eventually(
        lambda: all(f._obj.private("raftElectionDeadline") > monotonic() + 300 for f in followers),
        10.0,
        "the followers to take the long timeouts",
    )
    leader.close()
    new = await nodes.leader(followers, timeout_s=60.0)
    assert new.self_addr == min(f.self_addr for f in followers)
    assert (await write(new, "r2", "after"))["len"] == 2


async def test_the_raft_port_listens_on_the_nodes_own_address(nodes: Nodes) -> None:
    node = nodes.cluster(1)[0]
    port = int(node.self_addr.rsplit(":", 1)[1])
    # Not 0.0.0.0, where pysyncobj listens unless given an address.
    where = await eventually(lambda: listening_on(port), 15, "the Raft port to listen")
    assert where == {"127.0.0.1"}


def test_a_master_binds_raft_where_peers_dial_it_unless_bound_to_every_interface() -> None:
    from leptond.config import MasterConfig

    here = Path(".")
    cfg = MasterConfig(here, here, here, bind="127.0.0.1", advertise="10.0.0.5", raft_port=7442)
    assert cfg.raft_bind_addr == "10.0.0.5:7442"  # not every interface
    cfg = MasterConfig(here, here, here, bind="10.0.0.6", raft_port=7442)
    assert cfg.raft_bind_addr == "10.0.0.6:7442"
    cfg = MasterConfig(here, here, here, bind="0.0.0.0", advertise="10.0.0.5", raft_port=7442)
    assert cfg.raft_bind_addr == "0.0.0.0:7442"  # asked for by --bind
