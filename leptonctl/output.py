"""Tables and JSON for people and scripts.

Everything printed for people that came from the cluster (names, commands,
messages, labels: other users choose them) goes through `clean`, so that a
string cannot drive the terminal: a job named with `\x1b]0;...\x07` or
`\x1b[2J` could retitle it, clear it or fake lines. JSON output is exact JSON,
which escapes such characters itself. A task's own output (`logs`) is passed
through as the task wrote it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from leptond.clock import REAL as clock
from leptond.printable import clean


def say(*values: object, file: TextIO | None = None, flush: bool = False) -> None:
    """print() for text that holds values from the cluster: each one cleaned."""
    print(*(clean(v) for v in values), file=file, flush=flush)


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=_default)
    sys.stdout.write("\n")


def _default(o: Any) -> Any:
    if isinstance(o, bytes):
        return o.hex()
    return str(o)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[clean(h) for h in headers]] + [[clean(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def ago(ts: float | None) -> str:
    if not ts:
        return "-"
    d = max(0.0, clock.now() - ts)
    if d < 60:
        return f"{d:.0f}s ago"
    if d < 3600:
        return f"{d / 60:.0f}m ago"
    if d < 86400:
        return f"{d / 3600:.1f}h ago"
    return f"{d / 86400:.1f}d ago"


def until(ts: float) -> str | None:
    """How long from now until `ts`, e.g. '42s', '4m', '1.5h'; None once it has passed."""
    d = ts - clock.now()
    if d <= 0:
        return None
    # Thresholds just under each unit, so that 59.7 s reads 1m, not 60s.
    if d < 59.5:
        return f"{max(1, round(d))}s"
    if d < 3570:
        return f"{round(d / 60)}m"
    if d < 86220:
        return f"{d / 3600:.1f}h"
    return f"{d / 86400:.1f}d"


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def duration(seconds: float | None) -> str:
    """45s, 3m12s, 1h05m, 2d03h; '-' when unknown."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def ran_for(started_at: float | None, finished_at: float | None) -> str:
    """How long a job ran: from its start to its end, or until now."""
    if started_at is None:
        return "-"
    return duration((finished_at or clock.now()) - started_at)


def job_state(job: dict[str, Any]) -> str:
    """A job's state as every command shows it: `cancelled (stopping)` while
    tasks of a cancelled or failed job are still being stopped."""
    return str(job["state"]) + (" (stopping)" if job.get("stopping") else "")


def stamp(t: float | None) -> str:
    """A wall-clock time for log lines: 2024-05-01T12:00:03.250Z (UTC)."""
    if t is None:
        return "-" * 24
    whole = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{whole}.{int(t * 1000) % 1000:03d}Z"
