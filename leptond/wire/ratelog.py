"""A log that says each kind of thing at most once per interval."""

from __future__ import annotations

import logging
from collections import Counter

from ..clock import REAL


class Throttle:
    """At most one event per key per interval, counting those held back. The
    caller gives the time, so a log filter can use its records' own."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def admit(self, key: str, now: float) -> int | None:
        """None: held back (and counted); otherwise let through, with how many
        were held back since the last one let through."""
        if now - self._last.get(key, -1e18) < self._interval_s:
            self._held[key] += 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


class RateLimitedLog:
    """At most one line per reason per interval, with a count of what was held back."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log = logger
        self._throttle = Throttle(interval_s)

    def warning(self, reason: str, msg: str) -> None:
        held = self._throttle.admit(reason, REAL.monotonic())
        if held is None:
            return
        suffix = f" ({held} more like it since the last line)" if held else ""
        self._log.warning("%s%s", msg, suffix)
