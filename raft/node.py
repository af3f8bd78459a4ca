"""The thin pysyncobj shell under the replicated cluster state.

``RaftNode`` owns one private ``SyncObj`` subclass with exactly one
``@replicated`` method. pysyncobj runs on its own thread (autoTick); results
come back to asyncio through ``loop.call_soon_threadsafe``, and every wait is
bounded by a timeout because pysyncobj can drop callbacks (leader change).

Storage: ``raft.journal.DurableJournal`` (fsynced log), ``raft.transport``
(fsync before send), ``raft.snapshot`` (msgpack snapshots instead of pickle),
written off the Raft thread from an immutable view (``raft.snapwriter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pysyncobj.syncobj as _pso
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.config import FAIL_REASON

from leptond.clock import REAL, Clock
from leptond.fsutil import fsync_dir
from leptond.stats import Histogram
from raft.commands import MAX_ENTRY_BYTES, human_bytes
from raft.errors import (
    EntryTooLarge,
    MembershipError,
    NoQuorum,
    NotLeader,
    ProposeTimeout,
    RaftError,
    SnapshotError,
)
from raft.journal import DurableJournal
from raft.membership import (
    MEMBERSHIP_ENTRY,
    lock_data_dir,
    parse_member,
    probe_member,
    quorum_after,
    read_members_file,
)
from raft.snapshot import read_snapshot_file
from raft.snapwriter import Frozen, SnapshotStats, SnapshotWriter
from raft.transport import SyncBeforeSendTransport

log = logging.getLogger(__name__)

PASSWORD_LABEL = b"leptond/raft-transport-password/v1"
# pysyncobj sends a single entry of appendEntriesBatchSizeBytes or more
# through its chunked "transmission" path, which labels the last chunk by the
# entry's raw length rather than its pickled length. Pickle protocol 2 writes
# every byte >= 0x80 of a bytes object as two, so the follower unpickles a
# truncated entry (EOFError), the leader starts over every tick, and nothing
# commits again. We never let that path run: a stored entry is pysyncobj's
# pickle of our command (at most twice its size plus a few bytes), and the
# batch size is above that for every command up to MAX_ENTRY_BYTES
# (tests/test_raft_entry_size.py checks both the arithmetic and the cause).
APPEND_BATCH_BYTES = 3 * MAX_ENTRY_BYTES
# How long add_member waits for a just-started master to answer the Raft
# handshake before it refuses the address.
PROBE_TIMEOUT_S = 5.0
# A follower that loses its connection to the leader stands for election
# after LEADER_LOST_BASE_S plus LEADER_LOST_STAGGER_S times its rank among the
# remaining members (_ShellSyncObj.leader_lost). The stagger is longer than a
# vote request and its answer take on a busy machine.
LEADER_LOST_BASE_S = 0.02
LEADER_LOST_STAGGER_S = 0.15
JOURNAL_NAME = "raft.journal"
SNAPSHOT_NAME = "raft.snapshot"
# A tick gap (time between two passes of pysyncobj's loop) over this is slow:
# elections time out at a few hundred milliseconds.
SLOW_TICK_S = 0.1
# How long a thread that wants the GIL waits before the holder is asked to
# let go (CPython's default is 5 ms). The Raft thread takes the GIL back after
# every poll and system call, so with a busy thread beside it (a snapshot
# being encoded, a large scheduling pass) each of those waits adds to its
# tick: 0.5 ms took about 20 ms off the longest tick during a 100k-job
# snapshot (bench/snapshot.py). The process that runs a RaftNode sets it.
GIL_SWITCH_INTERVAL_S = 0.0005


class StateMachine(Protocol):
    def apply(self, command: bytes, index: int) -> Any: ...  # total, deterministic
    # An immutable view as of the last applied entry, cheap to take (the
    # Raft thread waits for it), encoded later on another thread.
    def freeze(self, for_snapshot: bool = False) -> Frozen: ...
    def restore(self, data: bytes) -> None: ...


@dataclass
class TickStats:
    """How regularly the Raft thread runs (its loop wakes at least every 50 ms)."""

    max_gap_s: float = 0.0
    slow: int = 0  # gaps over SLOW_TICK_S
    last: float = 0.0


@dataclass
class RaftCounters:
    """What this member has seen since it started (its own, for /metrics)."""

    elections: int = 0  # times it stood for election (became a candidate)
    leader_changes: int = 0  # times the leader it knows changed (to another, or to none)
    leader: str | None = None  # the last leader seen, to notice a change
    apply_seconds: Histogram = field(default_factory=Histogram)


def derive_password(secret: bytes) -> str:
    """pysyncobj password from the cluster secret (HMAC with a fixed label).

    The raw secret is never handed to pysyncobj, so a leak of the Raft key
    does not give away the secret used elsewhere (RPC, token sealing).
    """
    if not secret:
        raise ValueError(
            "a cluster secret is required for Raft: without a password pysyncobj "
            "unpickles whatever reaches its port; run `leptond init` to create one"
        )
    return hmac.new(secret, PASSWORD_LABEL, hashlib.sha256).hexdigest()


# pysyncobj builds its journal with the module-level ``createJournal`` of
# syncobj.py (SyncObj.__init__: ``createJournal(self.__conf.journalFile)``).
# We pass our journal *object* as ``journalFile``; this wrapper hands it back
# and leaves every other SyncObj in the process on pysyncobj's own factory.
_original_create_journal = _pso.createJournal


def _create_journal(journal_file: Any = None) -> Any:
    if isinstance(journal_file, DurableJournal):
        return journal_file
    return _original_create_journal(journal_file)


_pso.createJournal = _create_journal

_NOT_LEADER_REASONS = {
    FAIL_REASON.MISSING_LEADER,
    FAIL_REASON.NOT_LEADER,
    FAIL_REASON.LEADER_CHANGED,
    FAIL_REASON.DISCARDED,
}


class _ShellSyncObj(SyncObj):
    """SyncObj with exactly one replicated method.

    pysyncobj numbers replicated methods by sorted name and journals the
    number, so a second ``@replicated`` method would change what existing
    journal entries mean. Never add one.
    """

    def __init__(
        self,
        apply_fn: Callable[[bytes, int], Any],
        journal: DurableJournal,
        self_addr: str,
        peers: Sequence[str],
        conf: SyncObjConf,
    ) -> None:
        self._apply_fn = apply_fn
        self.raft_journal = journal  # read by SyncBeforeSendTransport.__init__
        super().__init__(
            self_addr,
            [p for p in peers if p != self_addr],
            conf,
            transportClass=SyncBeforeSendTransport,
        )

    @replicated
    def apply_command(self, command: bytes) -> Any:
        # pysyncobj increments raftLastApplied right after this returns
        # (syncobj.py __applyLogEntries), so this entry's index is one more.
        return self._apply_fn(command, self.raftLastApplied + 1)

    def private(self, name: str) -> Any:
        """Read a SyncObj private attribute (pysyncobj pinned to 0.3.17)."""
        return getattr(self, "_SyncObj__" + name)

    def leader_lost(self, node: Any) -> None:
        """Raft thread: the connection to `node` ended (closed, reset, or
        silent past pysyncobj's connectionTimeout).

        When `node` is our leader, nothing from it can reach us until the
        connection is made again, so our election timeout would fire anyway;
        firing it now instead (a leader killed with kill -9 is seen at once,
        its kernel closes its sockets) is what makes failovers short. It is
        safe in Raft: no election timing is part of its safety. To keep the
        remaining members from splitting the vote, they go in a fixed order,
        LEADER_LOST_STAGGER_S apart: the lowest address first. A candidate
        whose log is behind is refused, and the next one stands after it.
        """
        if self.private("raftState") != _pso._RAFT_STATE.FOLLOWER or node != self.private(
            "raftLeader"
        ):
            return
        me = self.private("selfNode")
        if me is None:
            return
        others = [n.address for n in self.private("otherNodes") if n != node]
        rank = sorted([me.address, *others]).index(me.address)
        deadline = _pso.monotonicTime() + LEADER_LOST_BASE_S + rank * LEADER_LOST_STAGGER_S
        if deadline < self.private("raftElectionDeadline"):
            self._SyncObj__raftElectionDeadline = deadline
            log.info(
                "lost the connection to the leader %s: election in %.2fs",
                node,
                deadline - _pso.monotonicTime(),
            )


class RaftNode:
    """A master's Raft membership: propose commands, watch leadership.

    Construct it on a long-lived thread (normally the main thread): pysyncobj's
    Raft thread stops by itself once the thread that built it has exited.
    """

    def __init__(
        self,
        state: StateMachine,
        self_addr: str,
        peers: Sequence[str],
        data_dir: Path,
        secret: bytes,
        on_leadership: Callable[[bool], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        raft_min_timeout_s: float = 0.6,
        raft_max_timeout_s: float = 1.6,
        dynamic_membership: bool = True,
        leader_fallback_timeout_s: float | None = None,
        connection_retry_s: float = 1.0,
        log_compaction_min_entries: int = 5000,
        log_compaction_min_time_s: float = 600.0,
        background_snapshots: bool = True,
        clock: Clock = REAL,
        fast_election: bool = True,
        bind_addr: str | None = None,
    ) -> None:
        """`bind_addr` ("host:port") is where the Raft port listens; by default
        `self_addr`, the address peers dial (pysyncobj itself would listen on
        every interface). `background_snapshots=False` encodes and writes snapshots on the
        Raft thread (the way pysyncobj does), and `fast_election=False` waits
        for the election timeout after the leader's connection ended
        (_ShellSyncObj.leader_lost); both only for comparison in benchmarks. `clock` must be the real one in production:
        pysyncobj compares its own monotonic clock readings with ours."""
        password = derive_password(secret)  # refuses an empty secret first
        self._state = state
        self._clock = clock
        self.ticks = TickStats()
        self.counters = RaftCounters()
        self.self_addr = self_addr
        self.lock = threading.RLock()  # held while applying; readers take it too
        self._on_leadership = on_leadership
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        self._loop = loop
        self._announced_leader = False
        self._closed = False

        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # One process per data dir (a second master, or `leptond recover`
        # while this one runs, would corrupt it); released by close().
        self._lock_fd = lock_data_dir(self.data_dir)
        try:
            peers = self._initial_members(peers)
            self._snapshot_path = self.data_dir / SNAPSHOT_NAME
            self._snapshots = SnapshotWriter(
                self._snapshot_path, self._freeze, background=background_snapshots, clock=clock
            )
            self._snapshots.remove_leftovers(str(self._snapshot_path) + ".tmp")
            self.journal = DurableJournal(self.data_dir / JOURNAL_NAME, clock=clock)
            self._check_snapshot_on_start()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._membership_lock = asyncio.Lock()

        conf = SyncObjConf(
            password=password,
            journalFile=self.journal,
            fullDumpFile=str(self._snapshot_path),
            serializer=self._snapshots.serialize,
            serializeChecker=self._snapshots.check,
            deserializer=self._deserialize,
            useFork=False,
            appendEntriesUseBatch=False,
            appendEntriesBatchSizeBytes=APPEND_BATCH_BYTES,
            dynamicMembershipChange=dynamic_membership,
            raftMinTimeout=raft_min_timeout_s,
            raftMaxTimeout=raft_max_timeout_s,
            # A leader that has not heard from a majority for this long steps
            # down (pysyncobj's default is 30 s, far too long for clients).
            leaderFallbackTimeout=leader_fallback_timeout_s or 3 * raft_max_timeout_s,
            connectionRetryTime=connection_retry_s,
            connectionTimeout=max(1.0, raft_max_timeout_s),
            logCompactionMinEntries=log_compaction_min_entries,
            logCompactionMinTime=log_compaction_min_time_s,
            onStateChanged=self._on_state_changed,
            commandsWaitLeader=False,
            bindAddress=bind_addr or self_addr,
        )
        self._obj = _ShellSyncObj(self._apply, self.journal, self_addr, peers, conf)
        if fast_election:
            self._obj.private("transport").on_peer_lost = self._obj.leader_lost
        self._obj.addOnTickCallback(self._on_tick)

    def _initial_members(self, peers: Sequence[str]) -> list[str]:
        """The membership the log starts from: `leptond recover`'s list when
        there is one (it replaces --peers for good), else the peers given."""
        recovered = read_members_file(self.data_dir)
        if recovered is None:
            return list(peers)
        if self.self_addr not in recovered:
            raise MembershipError(
                f"{self.data_dir}: the members set by `leptond recover` "
                f"({', '.join(recovered)}) do not include this master ({self.self_addr}); "
                "run it again with this master's Raft address"
            )
        if sorted(set(peers) | {self.self_addr}) != sorted(recovered):
            log.warning(
                "using the members set by `leptond recover` (%s), not --peers",
                ",".join(recovered),
            )
        return recovered

    # -- applying -----------------------------------------------------------

    def _apply(self, command: bytes, index: int) -> Any:
        # Runs on the Raft thread. Must never raise: an exception escaping a
        # replicated method stops pysyncobj from ever applying the next entry.
        try:
            began = self._clock.monotonic()
            with self.lock:
                out = self._state.apply(command, index)
            self.counters.apply_seconds.observe(self._clock.monotonic() - began)
            return out
        except Exception as e:
            log.exception("apply of entry %d failed; treating it as a no-op", index)
            return {"error": {"code": "apply_failed", "message": f"{type(e).__name__}: {e}"}}

    # -- snapshots ----------------------------------------------------------

    def _check_snapshot_on_start(self) -> None:
        # pysyncobj only logs a bad dump and carries on with an empty state;
        # refuse to start instead (read_snapshot_file raises SnapshotError).
        if not self._snapshot_path.exists():
            return
        _, meta = read_snapshot_file(self._snapshot_path)
        entries = meta.get("raft_entries")
        if not entries or len(entries) != 2:
            raise SnapshotError(
                f"{self._snapshot_path}: snapshot has no Raft log position (a state "
                "export, not a node snapshot); move it away before starting the node"
            )
        last, before = (tuple(e) for e in entries)
        self.journal.align_with_snapshot(before, last)

    def _freeze(self) -> Frozen:
        # Raft thread (pysyncobj's log compaction), which is also the one
        # thread that applies: the view is the state as of the entry
        # pysyncobj names. The lock keeps readers' views out meanwhile.
        with self.lock:
            return self._state.freeze(for_snapshot=True)

    @property
    def snapshot_stats(self) -> SnapshotStats:
        return self._snapshots.stats

    @property
    def fsync_seconds(self) -> Histogram:
        return self.journal.fsync_seconds

    def _deserialize(self, path: str) -> tuple[Any, Any, list[str]]:
        # The file may have been received from the leader and renamed into
        # place by pysyncobj without fsync (serializer.py setTransmissionData);
        # make it durable before the journal is cleared behind it.
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        fsync_dir(Path(path).parent)
        self._snapshots.superseded()  # a local snapshot in flight is older
        state_bytes, meta = read_snapshot_file(path)
        with self.lock:
            self._state.restore(state_bytes)
        entries = meta.get("raft_entries") or []
        if len(entries) != 2:
            raise RaftError(f"{path}: snapshot lacks the Raft entries it ends with")
        last, before = (tuple(e) for e in entries)
        # Only addresses, never pickled Node objects: pysyncobj accepts ids
        # (syncobj.py __updateClusterConfiguration). Its own address must go
        # here: pysyncobj drops it with `node != selfNode`, a Node-to-str
        # comparison that is always true, and would count this node among its
        # own peers (3 masters would then need 3 of "4" for a quorum).
        members = [str(m) for m in meta.get("cluster_members") or [] if str(m) != self.self_addr]
        return last, before, members

    # -- leadership -----------------------------------------------------------

    def _on_state_changed(self, old: int, new: int) -> None:
        if new == 1:  # 1 = _RAFT_STATE.CANDIDATE: this member stands for election
            self.counters.elections += 1
        if new != 2 and self._announced_leader:  # 2 = _RAFT_STATE.LEADER
            self._announce(False)
        # How each election went, for reading failovers from the logs.
        names = ("follower", "candidate", "leader")
        log.info("raft: %s -> %s in term %d", names[old], names[new], self._obj.raftCurrentTerm)

    def _on_tick(self) -> None:
        # Raft thread, every tick. Announce leadership only once everything
        # committed in this term has been applied here: the term's first entry
        # (the no-op pysyncobj appends on election) committing proves that.
        try:
            self._measure_tick()
            self._watch_leader()
            obj = self._obj
            if not obj._isLeader():
                if self._announced_leader:
                    self._announce(False)
                return
            if self._announced_leader:
                return
            commit = obj.raftCommitIndex
            if (
                self.journal.term_at(commit) == obj.raftCurrentTerm
                and obj.raftLastApplied >= commit
            ):
                self._announce(True)
        except Exception:
            log.exception("leadership monitor failed")

    def _watch_leader(self) -> None:
        node = self._obj._getLeader()
        leader = None if node is None else str(node.id)
        c = self.counters
        if leader != c.leader:
            c.leader_changes += 1
            c.leader = leader

    def _measure_tick(self) -> None:
        now = self._clock.monotonic()
        t = self.ticks
        if t.last:
            gap = now - t.last
            t.max_gap_s = max(t.max_gap_s, gap)
            t.slow += gap > SLOW_TICK_S
            self._snapshots.observe_tick_gap(gap)
        t.last = now

    def _announce(self, is_leader: bool) -> None:
        self._announced_leader = is_leader
        cb = self._on_leadership
        if cb is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(cb, is_leader)
        else:
            cb(is_leader)

    # -- queries --------------------------------------------------------------

    def is_leader(self) -> bool:
        return bool(self._obj._isLeader())

    def leader(self) -> str | None:
        """The leader's Raft address, or None when none is known or reachable.

        pysyncobj keeps naming the last leader while it cannot reach anyone
        (it starts no election then), so a leader other than this node that
        it has no connection to is reported as no leader.
        """
        node = self._obj._getLeader()
        if node is None:
            return None
        if str(node.id) != self.self_addr and not self._obj.isNodeConnected(node):
            return None
        return str(node.id)

    def reachable(self) -> tuple[int, int]:
        """(masters this one is connected to, itself included; members)."""
        return self._reachable()

    def _reachable(self) -> tuple[int, int]:
        others = list(self._obj.otherNodes)
        connected = sum(1 for n in others if self._obj.isNodeConnected(n))
        return connected + 1, len(others) + 1

    def heard_from_majority_within(self, window_s: float) -> bool:
        """Leader only: whether a majority (this node included) answered it
        within the last `window_s` seconds.

        A leader cut off from the others keeps believing it leads until
        pysyncobj's leaderFallbackTimeout; one that was paused believes it
        until its Raft thread runs again. Neither may promise anything (a
        node's lease) meanwhile: this is the check.
        """
        if not self.is_leader():
            return False
        heard = self._obj.private("lastResponseTime")
        others = list(self._obj.otherNodes)
        deadline = self._clock.monotonic() - window_s  # pysyncobj's monotonicTime
        for _ in range(5):  # the Raft thread mutates the dict
            try:
                recent = sum(1 for n in others if heard.get(n, 0.0) > deadline)
                break
            except RuntimeError:
                self._clock.block(0.001)
        else:
            return False
        return (recent + 1) * 2 > len(others) + 1

    def status(self) -> dict[str, Any]:
        for _ in range(5):  # getStatus iterates dicts the Raft thread mutates
            try:
                raw = self._obj.getStatus()
                break
            except RuntimeError:
                self._clock.block(0.001)
        else:
            raise RaftError("status unavailable: Raft thread kept changing it")
        commit = int(raw["commit_idx"])
        members = []
        for node in sorted(self._obj.otherNodes, key=lambda n: str(n.id)):
            nid = str(node.id)
            match = raw.get("match_idx_server_" + nid)
            members.append(
                {
                    "addr": nid,
                    "match_index": match,
                    "next_index": raw.get("next_node_idx_server_" + nid),
                    "connected": bool(self._obj.isNodeConnected(node)),
                    "lag": None if match is None else max(0, commit - int(match)),
                }
            )
        leader = self.leader()
        return {
            "self": self.self_addr,
            "term": int(raw["raft_term"]),
            "commit_index": commit,
            "last_applied": int(raw["last_applied"]),
            "leader": leader,
            "is_leader": self.is_leader(),
            "has_quorum": bool(raw["has_quorum"]),
            "members": members,
            "log_len": int(raw["log_len"]),
        }

    def wait_ready(self, timeout_s: float) -> None:
        """Block until bound and caught up with the leader's commit index."""
        deadline = self._clock.monotonic() + timeout_s
        while not self._obj.isReady():
            if self._clock.monotonic() > deadline:
                raise ProposeTimeout(
                    f"raft node {self.self_addr} not ready within "
                    f"{timeout_s:g}s: no leader reachable or still catching up"
                )
            self._clock.block(0.02)

    # -- writes ---------------------------------------------------------------

    async def propose(self, command: bytes, timeout_s: float = 5.0) -> Any:
        """Commit ``command`` and return what ``apply`` returned on this node."""
        if len(command) > MAX_ENTRY_BYTES:
            raise EntryTooLarge(
                f"a command of {human_bytes(len(command))} is over the Raft entry limit of "
                f"{human_bytes(MAX_ENTRY_BYTES)}; it was not proposed"
            )
        if not self.is_leader():
            raise NotLeader(self.leader())
        reason, result = await self._submit(
            lambda cb: self._obj.apply_command(bytes(command), callback=cb), timeout_s
        )
        if reason == FAIL_REASON.SUCCESS:
            return result
        self._raise_failure(reason, timeout_s, "the command")

    def members(self) -> list[str]:
        """Every member's Raft address, this one included."""
        return sorted({self.self_addr} | {str(n.id) for n in self._obj.otherNodes})

    async def add_member(self, addr: str, timeout_s: float = 10.0) -> None:
        """Add a running master; refused (MembershipError) unless the checks
        of raft.membership pass."""
        async with self._membership_lock:
            parse_member(addr)
            self._check_change_allowed()
            if addr in self.members():
                raise MembershipError(f"{addr} is already a member")
            await probe_member(addr, self._obj.encryptor, timeout_s=PROBE_TIMEOUT_S)
            reachable, members = self._reachable()
            if not quorum_after(members + 1, reachable + 1):
                raise MembershipError(
                    f"adding {addr} would leave {reachable + 1} of {members + 1} masters "
                    "reachable, no quorum; bring the unreachable ones back first"
                )
            await self._change_member(self._obj.addNodeToCluster, addr, timeout_s)

    async def remove_member(self, addr: str, timeout_s: float = 10.0) -> None:
        """Remove a member; refused (MembershipError) when it is not one, or
        when the rest would have no quorum of reachable members."""
        async with self._membership_lock:
            parse_member(addr)
            self._check_change_allowed()
            node = next((n for n in self._obj.otherNodes if str(n.id) == addr), None)
            if node is None:
                raise MembershipError(
                    f"{addr} is this master; remove it from another one"
                    if addr == self.self_addr
                    else f"{addr} is not a member"
                )
            reachable, members = self._reachable()
            if self._obj.isNodeConnected(node):
                reachable -= 1
            if not quorum_after(members - 1, reachable):
                raise MembershipError(
                    f"removing {addr} would leave {reachable} of {members - 1} masters "
                    "reachable, no quorum; bring the unreachable ones back first"
                )
            await self._change_member(self._obj.removeNodeFromCluster, addr, timeout_s)

    def _check_change_allowed(self) -> None:
        if not self.is_leader():
            raise NotLeader(self.leader())
        # pysyncobj 0.3.17 means to allow one change at a time, but never
        # records the pending one (syncobj.py __changeCluster), so look for
        # a membership entry not applied yet in the log ourselves.
        pending = self.journal.last_index_after(
            self._obj.raftLastApplied, lambda cmd: cmd[:1] == MEMBERSHIP_ENTRY
        )
        if pending is not None:
            raise MembershipError(
                f"another membership change (log entry {pending}) is still committing; "
                "retry when it is done"
            )

    async def _change_member(self, fn: Callable[..., None], addr: str, timeout_s: float) -> None:
        if not self.is_leader():
            raise NotLeader(self.leader())
        reason, _ = await self._submit(lambda cb: fn(addr, callback=cb), timeout_s)
        if reason == FAIL_REASON.REQUEST_DENIED:
            raise RaftError(
                f"membership change for {addr} refused: another change is "
                "still committing, or the member is already in that state"
            )
        if reason != FAIL_REASON.SUCCESS:
            self._raise_failure(reason, timeout_s, f"the membership change for {addr}")

    async def _submit(
        self, start: Callable[[Callable[[Any, int], None]], None], timeout_s: float
    ) -> tuple[int | None, Any]:
        """Run ``start(callback)`` and wait, bounded, for pysyncobj's callback.

        Returns (fail reason, result); reason None means the wait timed out,
        which must be possible: pysyncobj may never call back at all.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, Any]] = loop.create_future()

        def settle(res: Any, err: int) -> None:
            if not fut.done():
                fut.set_result((err, res))

        def callback(res: Any, err: int) -> None:  # Raft thread
            # A closed loop means nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, res, err)

        start(callback)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            return None, None

    def _raise_failure(self, reason: int | None, timeout_s: float, what: str) -> Any:
        if reason in _NOT_LEADER_REASONS or not self.is_leader():
            raise NotLeader(None if self.is_leader() else self.leader())
        reachable, members = self._reachable()
        if reason is None and reachable * 2 <= members:
            raise NoQuorum(timeout_s, reachable, members)
        if reason is None:
            raise ProposeTimeout(
                f"{what} was not committed within {timeout_s:g}s "
                f"({reachable} of {members} masters reachable); "
                "retry with the same request id"
            )
        if reason == FAIL_REASON.QUEUE_FULL:
            raise ProposeTimeout("the Raft command queue is full; retry shortly")
        raise ProposeTimeout(
            f"{what} has an unknown outcome (pysyncobj reason {reason}); "
            "retry with the same request id"
        )

    # -- lifecycle ------------------------------------------------------------

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the Raft thread, then sync and close the journal."""
        if self._closed:
            return
        self._closed = True
        if self._announced_leader:
            self._announce(False)
        self._obj.destroy()
        thread = self._obj.private("thread")
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        self._snapshots.close(timeout_s)
        self.journal.close()  # idempotent; the Raft thread normally closed it
        os.close(self._lock_fd)
