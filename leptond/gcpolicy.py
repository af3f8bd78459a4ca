"""The masters' garbage-collector policy, and what the collector costs them.

Why: a master keeps its whole replicated state in Python objects (about seven
objects the cyclic collector tracks per 1-task job: the job, its task, the
spec and four lists), and CPython runs a full collection whenever the
objects that survived the younger collections grew by a quarter. A full
collection walks every tracked object with the GIL held, so the event loop
and the Raft thread both stop: 280 ms at 36,000 jobs, and up to 550 ms at a
time under load, which set the submit p99 (docs/benchmarks.md, "Submits
against etcd").

What `install` does ("tuned"):

1. Whatever survives a collection of the middle or the oldest generation is
   frozen (`gc.freeze()`: moved, O(1), to a permanent generation that no
   collection walks). An object has then lived through two young
   collections: in a master it is nearly always part of the state, which
   lives for minutes to days. The collections left walk only the young
   generations (CPython's thresholds: at most some 7,000 objects), so no
   pause grows with the state. Freezing after full collections only was
   measured too: each full collection still walked everything promoted since
   the last one, pauses of up to 250-650 ms at 256 submits in flight.
2. The bound. A frozen object that later becomes part of an unreachable
   cycle is not freed while it is frozen (objects freed by reference
   counting leave the permanent generation at once: only cycles stay). When
   the frozen count has grown past `unfreeze_factor` times what it was after
   the last collection that walked everything (and past `unfreeze_floor`),
   everything is unfrozen and nothing is frozen again until CPython's next
   full collection has walked the whole heap and freed those cycles. Frozen
   garbage is so at most max(floor, (factor - 1) x the live heap at that
   walk), passed by at most 1/RECOUNT_DIVISOR of it (the frozen objects are
   counted exactly only now and then: a count walks all of them); the whole walks, the only pauses that grow with the heap, come
   when it has doubled: amortised O(1) per object, like a growing array,
   and none while the state stays the same size (then the frozen count
   grows only by leaked cycles).
3. CPython's thresholds stay (700, 10, 10). A larger youngest threshold
   (10,000) was measured: it made each middle-generation collection walk
   ten times as much, 130-225 ms, and saved little CPU.

`GcStats` times every collection by generation, with or without the policy
(`--gc-policy stock` only records), for /metrics.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from .clock import RealClock
from .stats import Histogram

# Unfreeze when the frozen count reaches this multiple of the last whole walk's.
UNFREEZE_FACTOR = 2.0
# Frozen objects under which no whole walk is forced: a master's start-up
# and a cluster's state up to some 140,000 1-task jobs stay under it, and
# would otherwise be walked at every doubling. At 200,000, a master taking
# 3,000 submits/s from an empty state walked its whole heap two or three
# times in its first 25 s (250-700 ms each on a loaded 2-core host, both
# followers at about the same moment, so commits stopped). What it costs:
# frozen garbage cycles may reach this many objects (100-200 MiB if every
# one were garbage) before a walk frees them, where 200,000 allowed a fifth.
UNFREEZE_FLOOR = 1_000_000
# A count of the frozen objects waits until this fraction of the limit has
# been frozen since the last (see _freeze_survivors).
RECOUNT_DIVISOR = 16
GENERATIONS = (0, 1, 2)
__all__ = ["GcStats", "install"]


class GcStats:
    """Pauses of the cyclic collector in this process, and the freezing policy's
    state. Written by the collector's callback (collections never overlap: one
    runs at a time, holding the GIL); read as copies by /metrics."""

    def __init__(
        self,
        freeze: bool,
        unfreeze_factor: float = UNFREEZE_FACTOR,
        unfreeze_floor: int = UNFREEZE_FLOOR,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        if unfreeze_factor <= 1.0:
            raise ValueError("unfreeze_factor must be more than 1")
        self.freeze = freeze
        self.unfreeze_factor = unfreeze_factor
        self.unfreeze_floor = unfreeze_floor
        self._monotonic = monotonic or RealClock().monotonic  # times the pauses
        self.pauses = {g: Histogram() for g in GENERATIONS}
        self.max_pause_s = dict.fromkeys(GENERATIONS, 0.0)
        self.frozen = 0  # frozen objects: exact after a walk, else an upper bound
        self.base = 0  # frozen after the last collection that walked everything
        self.unfreezes = 0
        self.recounts = 0  # exact counts of the frozen objects
        self._recount_at = 0  # `frozen` at which the next count may be made
        # Unfrozen, waiting for a full collection to walk everything.
        self.thawed = True
        self._t0 = 0.0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside the collection's bracket, holding the GIL; never raises
        # (an exception here would be printed on every collection).
        if phase == "start":
            self._t0 = self._monotonic()
            return
        gen = int(info.get("generation", 0))
        elapsed = self._monotonic() - self._t0
        self.pauses[gen].observe(elapsed)
        if elapsed > self.max_pause_s[gen]:
            self.max_pause_s[gen] = elapsed
        if not self.freeze or gen == 0:
            return
        if self.thawed:
            if gen == 2:
                # This one walked everything: freeze what is left, the new base.
                gc.freeze()
                self.frozen = self.base = gc.get_freeze_count()
                self.thawed = False
                self._recount_at = 0
            return
        self._freeze_survivors()

    def _freeze_survivors(self) -> None:
        # The survivors were just moved to the oldest generation, which held
        # nothing since the last freeze: counting them costs what this
        # collection cost, not what the heap holds.
        self.frozen += len(gc.get_objects(2))
        gc.freeze()
        limit = max(self.unfreeze_floor, self.unfreeze_factor * self.base)
        if self.frozen <= limit:
            return
        if self.frozen < self._recount_at:
            return
        # `frozen` only adds, but frozen objects freed by reference counting
        # have left: count them (a walk of the whole list, 5-10 ms at
        # 1,000,000 objects) before deciding. While the true count sits just
        # under the limit the sum passes it again at the next collection, and
        # a count at each one cost a master 8 % of its CPU: the next count
        # waits until another 1/RECOUNT_DIVISOR of the limit was frozen, so
        # it costs O(1) per frozen object, and the bound may be passed by
        # that much (and one collection's survivors).
        self.frozen = gc.get_freeze_count()
        self.recounts += 1
        self._recount_at = self.frozen + int(limit) // RECOUNT_DIVISOR
        if self.frozen > limit:
            # O(1): all of it joins the oldest generation, and CPython's next
            # full collection (after 10 middle ones; freezing resets that
            # count, so none ran while frozen) walks it all.
            gc.unfreeze()
            self.thawed = True
            self.unfreezes += 1

    def snapshot(self) -> dict[str, Any]:
        """Copies for a reader on another thread."""
        return {
            "freeze": self.freeze,
            "pauses": {g: _copy(h) for g, h in self.pauses.items()},
            "max_pause_s": dict(self.max_pause_s),
            "frozen": self.frozen,
            "unfreezes": self.unfreezes,
        }


def _copy(h: Histogram) -> Histogram:
    c = Histogram(h.bounds)
    c.counts = list(h.counts)
    c.sum = h.sum
    c.count = h.count
    return c


def install(policy: str = "tuned", *, unfreeze_floor: int = UNFREEZE_FLOOR) -> GcStats:
    """Record the collector's pauses in this process and, with "tuned",
    apply the policy above; "stock" leaves CPython's collector as it is.
    Once per process (the collector is the process's), from its entry point."""
    if policy not in ("tuned", "stock"):
        raise ValueError(f"unknown gc policy {policy!r}: tuned or stock")
    stats = GcStats(freeze=policy == "tuned", unfreeze_floor=unfreeze_floor)
    gc.callbacks.append(stats.callback)
    if stats.freeze:
        # What start-up made (modules, classes, functions) lives as long as
        # the process: one whole walk now, and the callback freezes it.
        gc.collect()
    return stats
