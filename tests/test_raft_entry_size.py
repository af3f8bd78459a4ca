"""One Raft entry's size: pysyncobj's large-entry path, and the cap that keeps us off it.

pysyncobj (0.3.17) sends a single entry of ``appendEntriesBatchSizeBytes`` or
more in chunks, and marks the last chunk by the entry's raw length instead of
its pickled length. Pickle protocol 2 writes every byte >= 0x80 of a bytes
object as two, so a follower unpickles a truncated entry and the leader starts
over at every tick: one such entry stops every later write. The first test
reproduces that with pysyncobj alone; the rest pin down that RaftNode never
takes that path for any command up to ``MAX_ENTRY_BYTES``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj import pickle as pso_pickle

from raft.commands import MAX_ENTRY_BYTES
from raft.errors import EntryTooLarge, NotLeader
from raft.node import APPEND_BATCH_BYTES, RaftNode
from tests.raft_kv_proc import KVStateMachine, free_port, kv_command

SECRET = b"entry-size-secret"
pytestmark = pytest.mark.timeout(180)
# Characters of 2, 3 and 4 bytes in UTF-8: every byte of them is >= 0x80.
WIDE = "é中😀"


def wide_text(n_bytes: int, seed: int = 0) -> str:
    """Text of exactly n_bytes of UTF-8, none of them ASCII after the first few."""
    rnd = random.Random(seed)
    out: list[str] = []
    left = n_bytes
    while left >= 4:
        ch = rnd.choice(WIDE)
        out.append(ch)
        left -= len(ch.encode())
    out.append("é" * (left // 2) + "a" * (left % 2))
    return "".join(out)


def command_of(size: int, rid: str) -> bytes:
    """A KV command of exactly `size` bytes whose value is wide UTF-8."""
    overhead = len(kv_command(rid, "big", ""))
    value_bytes = size - overhead
    # msgpack's str header grows with the length (2, 3 or 5 bytes).
    for _ in range(3):
        cmd = kv_command(rid, "big", wide_text(value_bytes))
        value_bytes -= len(cmd) - size
    cmd = kv_command(rid, "big", wide_text(value_bytes))
    assert len(cmd) == size, (len(cmd), size)
    return cmd


async def eventually(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


class _Plain(SyncObj):
    """pysyncobj with its own defaults, as the cause needs them."""

    def __init__(self, addr: str, peers: list[str]) -> None:
        super().__init__(addr, peers, SyncObjConf(appendEntriesUseBatch=False))
        self.values: list[bytes] = []

    @replicated
    def put(self, value: bytes) -> None:
        self.values.append(value)


def test_the_cause_pysyncobj_truncates_a_large_entry_of_non_ascii_bytes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    nodes = [_Plain(a, [p for p in addrs if p != a]) for a in addrs]
    try:
        deadline = time.monotonic() + 20
        while not any(n._isLeader() for n in nodes):
            assert time.monotonic() < deadline, "no leader"
            time.sleep(0.05)
        leader = next(n for n in nodes if n._isLeader())
        entry = ("😀" * 240_000).encode()  # the 1 MB of 4-byte UTF-8
        # What the follower receives: pickle protocol 2 doubles these bytes,
        # while the chunking stops counting at their raw length.
        stored = pso_pickle.dumps((0, (entry,)))
        assert len(pso_pickle.dumps((stored, 2, 1))) > 2 * len(stored)
        with caplog.at_level(logging.ERROR, logger="pysyncobj"):
            leader.put(entry)
            deadline = time.monotonic() + 30
            while not any(
                r.exc_info and issubclass(r.exc_info[0], EOFError | pso_pickle.pickle.PickleError)
                for r in caplog.records
            ):
                assert time.monotonic() < deadline, "the follower never failed to unpickle"
                time.sleep(0.05)
        assert any("failed _onTick" in r.getMessage() for r in caplog.records)
    finally:
        for n in nodes:
            n.destroy()
        for n in nodes:
            thread = n._SyncObj__thread  # type: ignore[attr-defined]
            if thread is not None:
                thread.join(10)


def test_no_command_up_to_the_cap_takes_the_large_entry_path() -> None:
    # pysyncobj stores REGULAR-type byte + pickle((method id, (command,))) and
    # chunks an entry of at least the batch size; the worst case is a command
    # whose every byte is >= 0x80.
    worst = bytes([0xFF]) * MAX_ENTRY_BYTES
    stored = b"\x00" + pso_pickle.dumps((0, (worst,)))
    assert len(stored) < APPEND_BATCH_BYTES


class Nodes:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[RaftNode] = []
        self.states: dict[str, KVStateMachine] = {}

    def cluster(self, n: int) -> list[RaftNode]:
        addrs = [f"127.0.0.1:{free_port()}" for _ in range(n)]
        for a in addrs:
            state = KVStateMachine()
            self.states[a] = state
            self.nodes.append(
                RaftNode(
                    state,
                    a,
                    addrs,
                    self.root / a.replace(":", "_"),
                    SECRET,
                    raft_min_timeout_s=0.6,
                    raft_max_timeout_s=1.5,
                    connection_retry_s=0.3,
                )
            )
        return list(self.nodes)

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


async def propose_retrying(cluster: list[RaftNode], cmd: bytes) -> Any:
    """As a client does: to whoever leads now, again when leadership moved
    (elections happen on a loaded machine). The state machine answers a
    request id it applied already with its first result, so a retry of a
    command that did commit is not applied twice."""
    deadline = time.monotonic() + 120
    while True:
        leader = await eventually(
            lambda: next((n for n in cluster if n.is_leader()), None), 20, "a leader"
        )
        try:
            return await leader.propose(cmd, timeout_s=30.0)
        except NotLeader:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_entries_of_every_size_up_to_the_cap_replicate_with_non_ascii_bytes(
    nodes: Nodes,
) -> None:
    cluster = nodes.cluster(3)
    kib64 = 64 * 1024  # pysyncobj's default batch size, where chunking began
    sizes = {100, kib64 - 1, kib64, kib64 + 1, 3 * kib64 + 7, MAX_ENTRY_BYTES // 2}
    sizes |= {MAX_ENTRY_BYTES - 64 * 1024 - 1, MAX_ENTRY_BYTES - 1, MAX_ENTRY_BYTES}
    rnd = random.Random(11)
    sizes |= {rnd.randrange(100, MAX_ENTRY_BYTES) for _ in range(5)}
    sent: list[str] = []
    for i, size in enumerate(sorted(sizes)):
        cmd = command_of(size, f"r{i}")
        result = await propose_retrying(cluster, cmd)
        assert "error" not in result, result
        sent.append(msgpack.unpackb(cmd)["value"])
    await eventually(
        lambda: all(len(s.lists.get("big", [])) == len(sent) for s in nodes.states.values()),
        60,
        "every entry on every node",
    )
    for state in nodes.states.values():
        assert state.lists["big"] == sent

    leader = next(n for n in cluster if n.is_leader())
    with pytest.raises(EntryTooLarge, match="over the Raft entry limit of 1 MiB"):
        await leader.propose(command_of(MAX_ENTRY_BYTES + 1, "too-big"), timeout_s=5.0)
    # Nothing was proposed, and the log keeps committing.
    after = await leader.propose(kv_command("after", "small", "ok"), timeout_s=10.0)
    assert after["len"] == 1
    assert all(len(s.lists["big"]) == len(sent) for s in nodes.states.values())
