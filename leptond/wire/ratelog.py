"""A log that says each kind of thing at most once per interval."""

from __future__ import annotations

import logging
from collections import Counter

from ..clock import REAL


class RateLimitedLog:
    """At most one line per reason per interval, with a count of what was held back."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def warning(self, reason: str, msg: str) -> None:
        now = REAL.monotonic()
        if now - self._last.get(reason, -1e18) < self._interval_s:
            self._held[reason] += 1
            return
        self._last[reason] = now
        held = self._held.pop(reason, 0)
        suffix = f" ({held} more like it since the last line)" if held else ""
        self._log.warning("%s%s", msg, suffix)
