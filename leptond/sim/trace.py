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
HASH_BATCH = 256


class Trace:
    def __init__(
        self, now: Callable[[], float], keep_all: bool = False, tail: int = TAIL_LINES
    ) -> None:
        self._now = now
        self._hash = hashlib.sha256()
        # Lines not hashed yet: hashed a batch at a time, which gives the hash
        # of the same bytes as one line at a time, for less work per line.
        self._unhashed: list[str] = []
        self.tail: deque[str] = deque(maxlen=tail)
        self.lines: list[str] | None = [] if keep_all else None
        self.count = 0

    def __call__(self, text: str) -> None:
        line = f"{self._now():10.3f}  {text}"
        self._unhashed.append(line)
        if len(self._unhashed) >= HASH_BATCH:
            self._hash_lines()
        self.tail.append(line)
        if self.lines is not None:
            self.lines.append(line)
        self.count += 1

    def _hash_lines(self) -> None:
        if self._unhashed:
            self._unhashed.append("")  # each line ends with a newline
            self._hash.update("\n".join(self._unhashed).encode("utf-8", "replace"))
            self._unhashed.clear()

    def digest(self) -> str:
        self._hash_lines()
        return self._hash.hexdigest()[:32]
