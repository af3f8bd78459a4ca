"""The Raft model's state of the log (raftmodel.SimRaft.oracle): a replica's
state where one has applied exactly the log, never one whose proposals
still wait (their results come from its own apply of their entries)."""

from __future__ import annotations

import random

from leptond.sim.people import token_commands
from leptond.sim.raftmodel import Member, SimRaft
from leptond.sim.trace import Trace
from leptond.sim.vtime import SimClock, VirtualLoop
from raft.state import ClusterState


def model() -> tuple[SimRaft, list[Member]]:
    loop = VirtualLoop()
    clock = SimClock(loop)
    raft = SimRaft(clock, random.Random("raftmodel"), Trace(clock.monotonic))
    members = [raft.add(f"m{i}:7442", ClusterState()) for i in range(3)]
    return raft, members


def fresh(log: list[tuple[int, bytes]]) -> ClusterState:
    s = ClusterState()
    for i, (_, data) in enumerate(log, 1):
        s.apply(data, i)
    return s


def test_the_log_state_is_a_replica_that_applied_every_entry() -> None:
    raft, (a, b, c) = model()
    entries = token_commands()
    for data in entries[:-1]:
        raft._commit(0, data)
    a.catch_up()
    raft._commit(0, entries[-1])
    # a knows every entry and has nothing waiting: it applies the one it
    # lacks (as it would when next read), and its state stands for the log's.
    assert raft.oracle is a.state and a.applied == len(raft.log)
    assert b.applied == c.applied == 0  # the others apply when they are read
    assert raft.oracle.digest() == fresh(raft.log).digest()
    b.catch_up()
    assert raft.oracle is a.state  # no member applies anything for it now


def test_a_member_with_proposals_waiting_is_not_moved_on() -> None:
    raft, members = model()
    for m in members:
        raft.isolate(m)  # none learns of the entries below
    waiting = members[0]
    waiting.known = 0
    waiting.pending.append(object())  # type: ignore[arg-type]
    for data in token_commands():
        raft._commit(0, data)
    waiting.known = len(raft.log)
    state = raft.oracle
    # Nobody could stand for the log: it applied its own copy, and the
    # member whose proposals wait applied nothing.
    assert all(state is not m.state for m in members)
    assert waiting.applied == 0 and all(m.applied == 0 for m in members)
    assert state.digest() == fresh(raft.log).digest()
