"""The audit log: JSON lines of who did what, when, and with what result.

One file per master, in its data dir, on the disk it shares with the Raft
journal. Anyone with a token can make a master write here (a refused call is
audited too), so what one caller can make it write is bounded:
- each field is cut short: a refused call's megabyte argument is recorded as
  its first few hundred characters;
- refusals are rate-limited per caller (a token bucket): beyond the rate they
  are counted, and the next record written for that caller says how many
  were held back;
- the file is rotated by size, keeping a few old ones (`audit.log.1` is the
  newest of those), so it never takes more than (keep + 1) x max_bytes;
- while the data disk is under its reserve (`--min-free-disk`, leptond/disk.py)
  refusals are only counted, not written: the reserve is for the journal.
A write that fails (a full disk) is counted and logged, never raised into the
call being audited.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .clock import REAL, Clock

log = logging.getLogger("lepton.master")
MAX_TARGET_CHARS = 256
MAX_RESULT_CHARS = 512
DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_KEEP = 4
# Refusals recorded per caller: a burst of this many, then this many a second.
REFUSAL_BURST = 20
REFUSALS_PER_S = 1.0


def short(v: Any, limit: int = MAX_TARGET_CHARS) -> Any:
    """`v` as recorded: scalars as they are, text cut to `limit` characters,
    anything else as the start of its repr."""
    if v is None or isinstance(v, bool | int | float):
        return v
    if isinstance(v, str):
        return v if len(v) <= limit else v[:limit] + "..."
    return repr(v)[:limit]


class AuditLog:
    """Append-only JSON lines: who, what, when, result."""

    def __init__(
        self,
        path: Path,
        clock: Clock = REAL,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
        disk_low: Callable[[], bool] = lambda: False,
    ) -> None:
        self.path = path
        self._clock = clock
        self.max_bytes = max_bytes
        self.keep = keep
        # Set by the master once its disk guard exists.
        self.disk_low = disk_low
        self._lock = threading.Lock()
        self._f = self._open()
        self._size = self._f.tell()
        # Per caller: (tokens left, monotonic time of the last refill).
        self._buckets: dict[str, tuple[float, float]] = {}
        self._held: dict[str, int] = {}
        self.held_back = 0  # refusal records not written, ever
        self.write_errors = 0

    def _open(self) -> Any:
        f = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives with the master
        os.chmod(self.path, 0o600)
        return f

    def record(self, who: str, role: str, action: str, target: Any, result: str) -> None:
        refused = result.startswith("error")
        with self._lock:
            if refused and not self._may_record_refusal(who):
                self._held[who] = self._held.get(who, 0) + 1
                self.held_back += 1
                return
            entry: dict[str, Any] = {
                "ts": round(self._clock.now(), 3),
                "who": short(who, 128),
                "role": short(role, 32),
                "action": short(action, 64),
                "target": short(target),
                "result": short(result, MAX_RESULT_CHARS),
            }
            held = self._held.pop(who, 0)
            if held:
                entry["refusals_held_back"] = held
            self._write(json.dumps(entry, default=str) + "\n")

    def _may_record_refusal(self, who: str) -> bool:
        if self.disk_low():
            return False
        now = self._clock.monotonic()
        tokens, at = self._buckets.get(who, (float(REFUSAL_BURST), now))
        tokens = min(float(REFUSAL_BURST), tokens + (now - at) * REFUSALS_PER_S)
        if tokens < 1.0:
            self._buckets[who] = (tokens, now)
            return False
        self._buckets[who] = (tokens - 1.0, now)
        if len(self._buckets) > 10_000:
            # Full buckets carry no state worth keeping.
            self._buckets = {k: v for k, v in self._buckets.items() if v[0] < REFUSAL_BURST - 1}
        return True

    def _write(self, line: str) -> None:
        try:
            if self._size + len(line) > self.max_bytes and self._size > 0:
                self._rotate()
            self._f.write(line)
            self._size += len(line.encode("utf-8"))
        except OSError as exc:
            self.write_errors += 1
            if self.write_errors == 1 or self.write_errors % 1000 == 0:
                log.warning("cannot write the audit log %s: %s", self.path, exc)

    def _rotate(self) -> None:
        """audit.log -> audit.log.1 -> ... -> audit.log.<keep>; the oldest goes."""
        self._f.close()
        for i in range(self.keep, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            newer = self.path.with_name(f"{self.path.name}.{i - 1}") if i > 1 else self.path
            if i == self.keep:
                older.unlink(missing_ok=True)
            if newer.exists():
                os.replace(newer, older)
        if self.keep <= 0:
            self.path.unlink(missing_ok=True)
        self._f = self._open()
        self._size = 0

    def files_bytes(self) -> int:
        """Bytes the audit log takes on disk, its rotated files included."""
        total = 0
        rotated = [self.path.with_name(f"{self.path.name}.{i}") for i in range(1, self.keep + 1)]
        for p in [self.path, *rotated]:
            try:
                total += p.stat().st_size
            except OSError:
                pass
        return total

    def close(self) -> None:
        with self._lock:
            self._f.close()
