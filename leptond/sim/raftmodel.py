"""A model of the masters' Raft log: linearizable, with leaders that come and go.

What the control plane relies on from Raft (raft/node.py over pysyncobj),
and nothing more:

- one log of committed entries, each applied by every replica in order;
- a leader per term; only it commits, in the order it proposed, and only
  while it hears from a majority; commits take a while, sometimes long;
- a leader cut off from the others keeps believing it leads until it learns
  of a newer term or its fallback timeout passes (pysyncobj's
  leaderFallbackTimeout); whatever it proposes meanwhile never commits;
- a new leader is elected once a majority has heard nothing for an election
  timeout; its log holds every committed entry and possibly some of the old
  leader's uncommitted ones (a prefix of them), which commit in the new term
  although their proposer may have been told they failed;
- a leader announces itself once the first entry of its term is committed
  (raft.node announces after its no-op), and steps down when it learns of a
  newer term.

Each `Member` is one master's Raft member: the `RaftRole`, the `Commits` of
proposer.RaftProposer (so the real proposer runs on it, with its real error
mapping) and `heard_from_majority_within` for lease renewals. Every timing
and every choice comes from the run's random generator.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable
from typing import Any

from raft.commands import MAX_ENTRY_BYTES, BadCommand, Command, decode
from raft.errors import EntryTooLarge, MembershipError, NoQuorum, NotLeader, ProposeTimeout
from raft.state import ClusterState

from .trace import Trace
from .vtime import SimClock

ELECTION_TIMEOUT_S = (0.35, 0.8)  # MasterConfig's raft_min/max_timeout_s
LEADER_FALLBACK_S = 3 * ELECTION_TIMEOUT_S[1]  # raft.node: 3 x raft_max_timeout_s
COMMIT_S = (0.001, 0.02)  # one round trip to a majority and an fsync
SLOW_COMMIT_S = (0.2, 7.0)  # a slow disk or network: some pass the commit timeout


class Proposal:
    __slots__ = ("data", "fut", "index", "ready_at", "term")

    def __init__(self, data: bytes | None, term: int, ready_at: float, fut: Any) -> None:
        self.data = data  # None: the no-op that starts a term
        self.term = term
        self.ready_at = ready_at
        self.fut: asyncio.Future[tuple[str, Any]] = fut
        self.index = 0  # log index once committed


class Member:
    """One master's Raft member, as its master sees it."""

    def __init__(self, raft: SimRaft, addr: str, state: ClusterState) -> None:
        self.raft = raft
        self.addr = addr
        self.state = state
        self.applied = 0  # entries applied to `state`
        self.known = 0  # entries this member knows are committed
        self.leading: int | None = None  # the term it believes it leads
        self.announced = False
        self.isolated_since: float | None = None  # cut off from the other masters
        self.lost_contact_at: float | None = None  # no majority since (None: has one)
        self.pending: deque[Proposal] = deque()  # proposed, not committed
        self.on_leadership: Callable[[bool], None] = lambda leads: None

    @property
    def isolated(self) -> bool:
        return self.isolated_since is not None

    # -- RaftRole --------------------------------------------------------------
    def is_leader(self) -> bool:
        return self.leading is not None

    def leader(self) -> str | None:
        if self.leading is not None:
            return self.addr
        cur = self.raft.leader
        if self.isolated or cur is None or cur.isolated or cur.leading != self.raft.term:
            return None
        return cur.addr

    def reachable(self) -> tuple[int, int]:
        members = self.raft.members
        if self.isolated:
            return 1, len(members)
        return sum(1 for m in members if not m.isolated), len(members)

    def status(self) -> dict[str, Any]:
        return {"term": self.leading or self.raft.term, "applied": self.applied}

    def heard_from_majority_within(self, window_s: float) -> bool:
        if self.leading is None:
            return False
        lost = self.lost_contact_at
        return lost is None or self.raft.clock.monotonic() - lost <= window_s

    async def add_member(self, addr: str, timeout_s: float = 10.0) -> None:
        raise MembershipError("the simulation has a fixed set of masters")

    async def remove_member(self, addr: str, timeout_s: float = 10.0) -> None:
        raise MembershipError("the simulation has a fixed set of masters")

    # -- Commits (proposer.RaftProposer) ------------------------------------------
    async def propose(self, command: bytes, timeout_s: float = 5.0) -> Any:
        """As raft.node.RaftNode.propose: the result of applying the command
        here, or NotLeader, NoQuorum or ProposeTimeout."""
        if len(command) > MAX_ENTRY_BYTES:
            raise EntryTooLarge(f"a command of {len(command)} bytes is over the entry limit")
        if self.leading is None:
            raise NotLeader(self.leader())
        p = self.raft.append(self, command)
        timer = self.raft.clock.call_later(timeout_s, _settle, p.fut, ("timeout", None))
        try:
            reason, result = await p.fut
        finally:
            timer.cancel()
        if reason == "ok":
            return result
        # raft.node.RaftNode._raise_failure
        if reason == "discarded" or self.leading is None:
            raise NotLeader(None if self.leading is not None else self.leader())
        reachable, members = self.reachable()
        if reachable * 2 <= members:
            raise NoQuorum(timeout_s, reachable, members)
        raise ProposeTimeout(
            f"the command was not committed within {timeout_s:g}s; retry with the same request id"
        )

    # -- applying ------------------------------------------------------------------
    def catch_up(self, upto: int | None = None) -> Any:
        """Apply committed entries up to `upto` (what it knows); the last result."""
        end = self.known if upto is None else upto
        result: Any = None
        log = self.raft.log
        while self.applied < end:
            self.applied += 1
            data = log[self.applied - 1][1]
            result = self.state.apply(data, self.applied)
        return result


class SimRaft:
    def __init__(self, clock: SimClock, rng: random.Random, trace: Trace) -> None:
        self.clock = clock
        self.rng = rng
        self.trace = trace
        self.members: list[Member] = []
        self.log: list[tuple[int, bytes]] = []
        self.term = 0
        self.leader: Member | None = None  # who leads `term` (None: no one yet)
        self.term_leader: Member | None = None  # who was elected in `term`
        # The log's own copy of the state, applied only when no replica can
        # stand for it (see `oracle`), and how many entries it has applied.
        self._own = ClusterState()
        self._own_applied = 0
        self.slow_until = -1.0  # commits are slow until then (a fault)
        self.describe: Callable[[bytes], str] = lambda data: ""
        # Told of every commit: (term, index, command, what apply returned).
        self.watchers: list[Callable[[int, int, bytes, Any], None]] = []
        self._election: Any = None
        self._exclude: Member | None = None  # not to be elected next (stepped down)

    def add(self, addr: str, state: ClusterState) -> Member:
        m = Member(self, addr, state)
        self.members.append(m)
        return m

    def majority(self) -> list[Member]:
        """The masters that can reach each other and make a majority, if any."""
        connected = [m for m in self.members if not m.isolated]
        return connected if 2 * len(connected) > len(self.members) else []

    # -- proposing and committing ----------------------------------------------------
    def append(self, member: Member, data: bytes | None) -> Proposal:
        assert member.leading is not None
        now = self.clock.monotonic()
        lo, hi = SLOW_COMMIT_S if now < self.slow_until else COMMIT_S
        ready = now + self.rng.uniform(lo, hi)
        # Entries commit in order, pipelined: one is never committed before
        # an earlier one, but does not wait a whole round after it either.
        if member.pending:
            ready = max(ready, member.pending[-1].ready_at)
        p = Proposal(data, member.leading, ready, self.clock.loop.create_future())
        member.pending.append(p)
        self.clock.call_later(p.ready_at - now, self._pump, member)
        return p

    def _can_commit(self, m: Member) -> bool:
        return self.leader is m and m.leading == self.term and m.lost_contact_at is None

    def _pump(self, m: Member) -> None:
        """Commit what the leader proposed, in order, as it comes due."""
        if not self._can_commit(m):
            return
        now = self.clock.monotonic()
        while m.pending and m.pending[0].ready_at <= now + 1e-9 and self._can_commit(m):
            p = m.pending.popleft()
            if p.data is None:  # the term's first entry: now it leads for real
                if not m.announced:
                    m.announced = True
                    self.trace(f"{m.addr} leads term {m.leading}")
                    m.on_leadership(True)
                continue
            p.index, result = self._commit(p.term, p.data, m)
            _settle(p.fut, ("ok", result))

    def _commit(self, term: int, data: bytes, by: Member | None = None) -> tuple[int, Any]:
        """Commit one entry; its index and what apply returned. The leader
        `by` that committed it applies it at once (as it would right after)."""
        self.log.append((term, data))
        index = len(self.log)
        for m in self.members:
            if not m.isolated:
                m.known = index
        if by is not None:
            result = by.catch_up(index)
        elif self.watchers:
            result = self._bring_up_to(index)[1]
        else:
            result = None  # nobody reads it: the replicas apply it when they catch up
        for watch in self.watchers:
            watch(term, index, data, result)
        self.trace(f"commit {index} t{term} {self.describe(data)}")
        return index, result

    # -- the log's state ----------------------------------------------------------------
    @property
    def oracle(self) -> ClusterState:
        """The committed log applied in order (what the checker judges).

        Apply is deterministic, so a replica that has applied exactly the
        log holds this state: its state stands for the log's, and no entry
        is applied a fourth time for the checker. Only where no replica has
        applied every entry, nor can without anyone noticing, does the log
        apply its own copy. converged() compares every replica with it (and
        so with each other) once they have all caught up."""
        return self._bring_up_to(len(self.log))[0]

    def _bring_up_to(self, end: int) -> tuple[ClusterState, Any]:
        """A state that has applied the first `end` entries (all the log has),
        and the result of the last entry applied on the way (None if none)."""
        members = self.members
        lead = self.leader
        if lead is not None and lead.applied == end:
            return lead.state, None
        for m in members:
            if m.applied == end:
                return m.state, None
        # A member that knows every entry is committed applies them when
        # anyone next reads its view (masters._Reader): applying them now
        # changes nothing it can tell, unless it has proposals waiting, whose
        # results come from its own apply of their entries.
        for m in members:
            if m.known == end and not m.pending and m.applied < end:
                return m.state, m.catch_up(end)
        result: Any = None
        while self._own_applied < end:
            self._own_applied += 1
            result = self._own.apply(self.log[self._own_applied - 1][1], self._own_applied)
        return self._own, result

    # -- leadership ----------------------------------------------------------------
    def start(self, first: Member) -> None:
        """A fresh cluster: `first` is elected in term 1."""
        self._become_leader(first)

    def _become_leader(self, m: Member) -> None:
        self.term += 1
        self.leader = self.term_leader = m
        m.known = len(self.log)
        self._settle_pending(m)
        m.leading = self.term
        m.catch_up()
        self.trace(f"{m.addr} elected in term {self.term}")
        self.append(m, None)  # announced once this commits

    def _settle_pending(self, m: Member) -> None:
        """`m` learns the log: each of its pending proposals was committed (by a
        later leader, which adopted it) or is lost."""
        m.known = len(self.log)
        for p in m.pending:
            if p.data is None:
                continue
            if p.index:
                _settle(p.fut, ("ok", m.catch_up(p.index)))
            else:
                _settle(p.fut, ("discarded", None))
        m.pending.clear()

    def _step_down(self, m: Member, learned: bool) -> None:
        """`m` stops leading; with `learned`, it has heard of the newer term
        and learns the log (its pending proposals are settled)."""
        if m.leading is not None:
            m.leading = None
            self.trace(f"{m.addr} steps down")
            if m.announced:
                m.announced = False
                m.on_leadership(False)
        if self.leader is m:
            self.leader = None
        if learned:
            self._settle_pending(m)

    def _schedule_election(self) -> None:
        if self._election is None:
            delay = self.rng.uniform(*ELECTION_TIMEOUT_S)
            self._election = self.clock.call_later(delay, self._elect)

    def _elect(self) -> None:
        self._election = None
        cur = self.leader
        if cur is not None and self._can_commit(cur) and self._exclude is None:
            return  # the leader is fine after all
        voters = self.majority()
        if not voters:
            return  # no majority: elections resume once one is back
        candidates = [m for m in voters if m is not self._exclude] or voters
        self._exclude = None
        new = self.rng.choice(candidates)
        prev = self.term_leader
        if prev is not None:
            # The old leader's uncommitted entries that reached the new
            # majority commit in the new term: a prefix of them (all of them
            # when it is elected again: a leader never drops its own log).
            entries = [
                p
                for p in prev.pending
                if p.term == self.term and p.data is not None and not p.index
            ]
            keep = len(entries) if prev is new else self.rng.randint(0, len(entries))
            for p in entries[:keep]:
                assert p.data is not None
                p.index = self._commit(p.term, p.data)[0]
        for m in self.members:
            if m is not new and not m.isolated and (m.leading is not None or m.pending):
                self._step_down(m, learned=True)
        if new.leading is not None:
            self._step_down(new, learned=False)
        self._become_leader(new)

    def _recompute_contact(self) -> None:
        majority = set(map(id, self.majority()))
        now = self.clock.monotonic()
        for m in self.members:
            if id(m) in majority:
                m.lost_contact_at = None
            elif m.lost_contact_at is None:
                m.lost_contact_at = now
                if m.leading is not None:
                    self.clock.call_later(LEADER_FALLBACK_S, self._fallback, m, now)

    def _fallback(self, m: Member, since: float) -> None:
        if m.lost_contact_at == since and m.leading is not None:
            self._step_down(m, learned=False)

    # -- faults -----------------------------------------------------------------------
    def isolate(self, m: Member) -> None:
        """Cut `m` off from the other masters (a partition or a stalled process)."""
        if m.isolated:
            return
        m.isolated_since = self.clock.monotonic()
        self.trace(f"{m.addr} cut off from the other masters")
        self._recompute_contact()
        cur = self.leader
        if cur is None or not self._can_commit(cur):
            self._schedule_election()

    def heal(self, m: Member) -> None:
        if not m.isolated:
            return
        m.isolated_since = None
        self.trace(f"{m.addr} reconnected")
        self._recompute_contact()
        if m.leading is not None and not (self.leader is m and m.leading == self.term):
            self._step_down(m, learned=True)  # it hears of the newer term
        elif self.leader is not m:
            self._settle_pending(m)
        m.known = len(self.log)
        cur = self.leader
        if cur is not None and self._can_commit(cur):
            self.clock.call_later(0.0, self._pump, cur)
        else:
            self._schedule_election()

    def depose(self) -> None:
        """The leader misses its heartbeats for an election timeout while
        connected (a stall): another master is elected and it steps down."""
        cur = self.leader
        if cur is None or cur.isolated or cur.leading != self.term:
            return
        self.trace(f"{cur.addr} stalls; an election follows")
        self._exclude = cur
        self._schedule_election()

    def slow_commits(self, seconds: float) -> None:
        self.slow_until = max(self.slow_until, self.clock.monotonic() + seconds)


_last_decoded: tuple[bytes | None, Command | str] = (None, "")


def decoded(data: bytes) -> Command | str:
    """The command of a committed entry, or why it is none: decoded once for
    the simulation's own readers of each commit (its trace line, the
    checker's watch), which read it and change nothing. The masters' apply
    decodes its own, as a replica does."""
    global _last_decoded
    last, cmd = _last_decoded
    if last is data:
        return cmd
    try:
        cmd = decode(data)
    except BadCommand as exc:
        cmd = str(exc)
    _last_decoded = (data, cmd)
    return cmd


def _settle(fut: asyncio.Future[tuple[str, Any]], value: tuple[str, Any]) -> None:
    if not fut.done():
        fut.set_result(value)
