"""The results of recent client requests, so that a retry is answered, not applied again.

A client makes one request id per logical call and sends it with every retry
(after a lost reply, a timeout, a leader change). The first command with that
id that commits is applied; later ones get its result back.

Bounded two ways, both deterministic: by count, and by age measured on the
proposers' clocks (`at` in each command, never a clock read here). The table
rides in snapshots, so a follower restored from one, and then elected, still
answers a retry the same way; entries past the age bound are dropped before
that and never reach a snapshot.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

# A retry comes seconds after its first attempt (a client gives up on a call
# after its deadline, at most minutes); this leaves a wide margin.
MAX_AGE_S = 900.0
MAX_ENTRIES = 100_000


class RecentResults:
    def __init__(self, max_entries: int = MAX_ENTRIES, max_age_s: float = MAX_AGE_S) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        # The proposer's time of the latest command that had one. The latest,
        # not the largest: one master with a clock far ahead must not age out
        # everything the next leader remembers.
        self.clock = 0.0

    def __contains__(self, rid: object) -> bool:
        return rid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, rid: str) -> tuple[bool, Any]:
        """(found, result)."""
        hit = self._entries.get(rid)
        return (False, None) if hit is None else (True, hit[1])

    def tick(self, at: float | None) -> None:
        """A command proposed at `at` was applied: time moves, old entries go."""
        if at is not None:
            self.clock = at
        self._prune()

    def remember(self, rid: str, result: Any, at: float | None) -> None:
        self._entries[rid] = (self.clock if at is None else at, result)
        self._entries.move_to_end(rid)
        self._prune()

    def _prune(self) -> None:
        entries = self._entries
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        oldest = self.clock - self.max_age_s
        # Entries are in apply order; proposers' clocks are nearly monotonic,
        # so stopping at the first young entry leaves at most a few stale ones
        # for the next command.
        while entries and next(iter(entries.values()))[0] < oldest:
            entries.popitem(last=False)

    # -- snapshots -----------------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        return self.frozen().to_wire()

    def frozen(self) -> FrozenResults:
        """The table as of now, for a snapshot encoded later on another thread
        (the results themselves are never changed once remembered)."""
        return FrozenResults(self.clock, list(self._entries.items()))

    @classmethod
    def from_wire(cls, obj: Any) -> RecentResults:
        """From `to_wire`, or from the older form (a list of [rid, result] pairs).

        The older form remembered every command, its own fresh ids included,
        and no times. Nothing can retry those: they are dropped, exactly as a
        replica replaying the same log today would not have kept them.
        """
        out = cls()
        if isinstance(obj, dict):
            out.clock = float(obj["clock"])
            for rid, at, res in obj["entries"]:
                out._entries[str(rid)] = (float(at), res)
        elif isinstance(obj, list):
            for rid, _result in obj:  # still checked: a malformed snapshot is refused
                str(rid)
        else:
            raise ValueError("recent results are neither a map nor a list")
        return out


class FrozenResults:
    """A copy of the table's entries, taken on the apply thread, encoded later."""

    __slots__ = ("clock", "entries")

    def __init__(self, clock: float, entries: list[tuple[str, tuple[float, Any]]]) -> None:
        self.clock = clock
        self.entries = entries

    def to_wire(self) -> dict[str, Any]:
        return {"clock": self.clock, "entries": [[r, at, res] for r, (at, res) in self.entries]}
