"""What an agent's heartbeat may carry, checked as it arrives.

A host's own report (its load, its GPUs' utilisation, its block cache) is
kept in the leader's memory and shown to everyone (`nodes`, /metrics). A
compromised host may send anything, so each heartbeat is reduced here to the
shape the readers expect: known GPU fields only, numbers that are finite and
clamped to a sane range, short text, bounded counts. What does not fit is
dropped and counted, never stored; one host's bad report cannot break a
listing or a scrape for everyone.
"""

from __future__ import annotations

import math
from typing import Any

from raft.validate import MAX_GPU_INDEX, MAX_NODE_GPUS

MAX_STAT_KEYS = 64
MAX_KEY_CHARS = 64
MAX_TEXT_CHARS = 128
# Task runs an agent may list in one heartbeat (running or exited).
MAX_RUNS = 10_000
MAX_TASK_ID_CHARS = 256
BIG = float(2**53)
# GPU fields: (lowest, highest); a value outside is clamped, a non-number dropped.
GPU_NUMBERS: dict[str, tuple[float, float]] = {
    "index": (0, MAX_GPU_INDEX),
    "mem_total_bytes": (-1, BIG),
    "mem_used_bytes": (-1, BIG),
    "util_pct": (-1, 100),
    "mem_util_pct": (-1, 100),
    "temperature_c": (-1, 1000),
    "power_w": (-1, 1e6),
    "ecc_errors": (-1, BIG),
    "ecc_corrected": (-1, BIG),
    "ecc_uncorrected": (-1, BIG),
    "domain": (-1, 1 << 20),
}
GPU_TEXT = frozenset({"uuid", "name"})


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class Cleaner:
    """Reduces one heartbeat; `dropped` counts the values it left out."""

    def __init__(self) -> None:
        self.dropped = 0

    def heartbeat(self, a: dict[str, Any]) -> dict[str, Any]:
        return {
            "stats": self.numbers(a.get("host")),
            "gpus": self.gpus(a.get("gpus")),
            "cache": self.flat(a.get("cache")),
        }

    def _map(self, v: Any) -> list[tuple[str, Any]]:
        if v is None:
            return []
        if not isinstance(v, dict):
            self.dropped += 1
            return []
        items = list(v.items())
        if len(items) > MAX_STAT_KEYS:
            self.dropped += len(items) - MAX_STAT_KEYS
            items = items[:MAX_STAT_KEYS]
        out = []
        for k, x in items:
            if isinstance(k, str) and 0 < len(k) <= MAX_KEY_CHARS and k.isprintable():
                out.append((k, x))
            else:
                self.dropped += 1
        return out

    def numbers(self, v: Any) -> dict[str, float | int]:
        """A map of names to finite numbers (host load, counters)."""
        out: dict[str, float | int] = {}
        for k, x in self._map(v):
            if _finite(x) and abs(x) <= BIG:
                out[k] = x
            else:
                self.dropped += 1
        return out

    def flat(self, v: Any, depth: int = 1) -> dict[str, Any]:
        """A map of names to finite numbers, short text, or (`depth` levels
        down) such maps: the block cache's stats, whose hot and disk tiers
        are maps of their own. None is a value not set (no limit, no hot
        tier): left out, not counted as malformed."""
        out: dict[str, Any] = {}
        for k, x in self._map(v):
            number = _finite(x) and abs(x) <= BIG
            if number or (isinstance(x, str) and len(x) <= MAX_TEXT_CHARS and x.isprintable()):
                out[k] = x
            elif isinstance(x, dict) and depth > 0:
                out[k] = self.flat(x, depth - 1)
            elif x is not None:
                self.dropped += 1
        return out

    def gpus(self, v: Any) -> list[dict[str, Any]]:
        if v is None:
            return []
        if not isinstance(v, list):
            self.dropped += 1
            return []
        if len(v) > MAX_NODE_GPUS:
            self.dropped += len(v) - MAX_NODE_GPUS
            v = v[:MAX_NODE_GPUS]
        out = []
        for g in v:
            if not isinstance(g, dict) or not _finite(g.get("index")):
                self.dropped += 1
                continue
            gpu: dict[str, Any] = {}
            for k, x in self._map(g):
                if k in GPU_NUMBERS:
                    if not _finite(x):
                        self.dropped += 1
                        continue
                    lo, hi = GPU_NUMBERS[k]
                    if not lo <= x <= hi:
                        self.dropped += 1
                        x = min(max(x, lo), hi)
                    gpu[k] = int(x) if k == "index" else x
                elif k in GPU_TEXT and isinstance(x, str) and len(x) <= MAX_TEXT_CHARS:
                    gpu[k] = x
                else:
                    self.dropped += 1
            out.append(gpu)
        return out

    def runs(self, v: Any) -> set[tuple[str, int]]:
        """The (task id, attempt) pairs an agent says it runs."""
        out: set[tuple[str, int]] = set()
        for r in self._list(v):
            t = r.get("task_id") if isinstance(r, dict) else None
            n = r.get("attempt") if isinstance(r, dict) else None
            if (
                isinstance(t, str)
                and 0 < len(t) <= MAX_TASK_ID_CHARS
                and isinstance(n, int)
                and not isinstance(n, bool)
                and 0 <= n < 2**31
            ):
                out.add((t, n))
            else:
                self.dropped += 1
        return out

    def task_ids(self, v: Any) -> set[str]:
        out: set[str] = set()
        for t in self._list(v):
            if isinstance(t, str) and 0 < len(t) <= MAX_TASK_ID_CHARS:
                out.add(t)
            else:
                self.dropped += 1
        return out

    def _list(self, v: Any) -> list[Any]:
        if v is None:
            return []
        if not isinstance(v, list):
            self.dropped += 1
            return []
        if len(v) > MAX_RUNS:
            self.dropped += len(v) - MAX_RUNS
            return v[:MAX_RUNS]
        return v
