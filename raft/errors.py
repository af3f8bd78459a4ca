"""Errors raised by the Raft shell (``raft.node``) and its storage.

Every message is one line that says what went wrong and what to do next.
"""

from __future__ import annotations


class RaftError(Exception):
    """Base class of everything the Raft shell raises on purpose."""


class NotLeader(RaftError):
    """This node is not the leader; the caller should retry on ``leader``.

    ``leader`` is the Raft address of the last known leader, or None while an
    election is in progress. The shell never forwards a proposal itself.
    """

    def __init__(self, leader: str | None) -> None:
        self.leader = leader
        where = f"the leader is {leader}" if leader else "no leader is known yet"
        super().__init__(f"not the leader: {where}; retry the command there")


class ProposeTimeout(RaftError):
    """The command's outcome is unknown: it was not committed in time.

    It may still commit later, so a retry must reuse the same request id.
    """


class NoQuorum(ProposeTimeout):
    """Too few masters are reachable for the command to commit."""

    def __init__(self, timeout_s: float, reachable: int, members: int) -> None:
        self.timeout_s = timeout_s
        self.reachable = reachable
        self.members = members
        super().__init__(
            f"no quorum: the command was not committed within {timeout_s:g}s; "
            f"{reachable} of {members} masters reachable"
        )


class EntryTooLarge(RaftError):
    """A command over ``raft.commands.MAX_ENTRY_BYTES``: never proposed."""


class MembershipError(RaftError):
    """A membership change refused before it was proposed, or a bad member list."""


class JournalError(RaftError):
    """The Raft journal file cannot be used (not ours, or unreadable)."""


class JournalCorrupt(JournalError):
    """A damaged record with intact records after it: not a torn write."""


class SnapshotError(RaftError):
    """A snapshot file is damaged, of an unknown format, or unreadable."""


class ArgError(Exception):
    """A command whose arguments do not fit the state: apply turns it into an
    error value for the proposer (never an exception out of apply)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
