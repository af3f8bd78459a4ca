"""The trace of one run: what happened, in order, and a digest of all of it.

Every line is `TIME  TEXT`, TIME being virtual seconds. The digest is a hash
of every line; two runs of the same seed give the same lines, hence the same
digest, which is how a replay is checked. Only the last lines are kept in
memory (for a failure report) unless the whole trace is asked for.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable

TAIL_LINES = 40


class Trace:
    def __init__(
        self, now: Callable[[], float], keep_all: bool = False, tail: int = TAIL_LINES
    ) -> None:
        self._now = now
        self._hash = hashlib.sha256()
        self.tail: deque[str] = deque(maxlen=tail)
        self.lines: list[str] | None = [] if keep_all else None
        self.count = 0

    def __call__(self, text: str) -> None:
        line = f"{self._now():10.3f}  {text}"
        self._hash.update(line.encode("utf-8", "replace"))
        self._hash.update(b"\n")
        self.tail.append(line)
        if self.lines is not None:
            self.lines.append(line)
        self.count += 1

    def digest(self) -> str:
        return self._hash.hexdigest()[:32]
