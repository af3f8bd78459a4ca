"""A latency histogram cheap enough for hot paths (one Raft apply, one fsync).

A leaf module: it imports nothing from this project, so raft/ may use it.
One thread writes (the Raft thread); /metrics reads a copy from another. A
reader may see an observation half-counted (its bucket but not yet the
total): Prometheus tolerates that much, and the next scrape is whole.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

# What /metrics answers in (Prometheus's text format 0.0.4, which every
# Prometheus 2 reads); newer prometheus_client releases would say 1.0.0.
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: from a fraction of a millisecond (an apply) to seconds (a stalled disk).
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


class Histogram:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: over every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": bisect_left finds the
        # first bound >= value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> tuple[list[tuple[float, int]], float]:
        """[(upper bound, observations <= it), ..., (inf, all)] and the sum."""
        out: list[tuple[float, int]] = []
        acc = 0
        counts = list(self.counts)
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            acc += n
            out.append((bound, acc))
        return out, self.sum
