"""The audit log on a real file: fields cut short, refusals rate-limited per
caller, rotation by size, and silence about refusals while the disk is low.

Time comes from a stepped clock (the audit log takes a Clock), so the rate
limit is checked without waiting.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leptond.audit import REFUSAL_BURST, AuditLog
from leptond.clock import Timer


class SteppedClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds
        await asyncio.sleep(0)

    def call_later(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> Timer:
        raise NotImplementedError

    def block(self, seconds: float) -> None:
        self.t += seconds


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_fields_are_cut_and_refusals_rate_limited_per_caller(tmp_path: Path) -> None:
    clock = SteppedClock()
    log = AuditLog(tmp_path / "audit.log", clock)
    big = "A" * (4 << 20)
    for _ in range(100):
        log.record("mallory", "read", "cancel", big, f"error: bad_request: {big}")
    log.record("alice", "submit", "cancel", "j-1", "error: not_found: no job")
    entries = lines(tmp_path / "audit.log")
    assert len([e for e in entries if e["who"] == "mallory"]) == REFUSAL_BURST
    assert [e["who"] for e in entries].count("alice") == 1  # a bucket of her own
    assert all(len(json.dumps(e)) < 1024 for e in entries)
    # Successful calls are never held back; the next record written for the
    # caller says how many refusals were.
    for k in range(50):
        log.record("mallory", "submit", "submit", f"j-{k}", "ok")
    oks = [e for e in lines(tmp_path / "audit.log") if e["result"] == "ok"]
    assert len(oks) == 50
    assert oks[0]["refusals_held_back"] == 100 - REFUSAL_BURST
    assert "refusals_held_back" not in oks[1]
    assert log.held_back == 100 - REFUSAL_BURST
    # The bucket refills with time.
    clock.t += 5
    log.record("mallory", "read", "cancel", "x", "error: forbidden: no")
    assert lines(tmp_path / "audit.log")[-1]["result"] == "error: forbidden: no"
    log.close()


def test_the_log_rotates_by_size_and_keeps_a_few_old_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, SteppedClock(), max_bytes=8192, keep=2)
    for k in range(2000):
        log.record("alice", "submit", "submit", f"j-{k:06d}", "ok")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    assert all(p.stat().st_size <= 8192 for p in tmp_path.iterdir())
    assert log.files_bytes() <= 3 * 8192
    # Oldest first across the files: .2, .1, then the live one.
    ids = [
        e["target"]
        for f in ("audit.log.2", "audit.log.1", "audit.log")
        for e in lines(tmp_path / f)
    ]
    assert ids == sorted(ids) and ids[-1] == "j-001999"
    log.close()
    # Reopened, it appends to the live file and goes on rotating.
    again = AuditLog(path, SteppedClock(), max_bytes=8192, keep=2)
    again.record("bob", "submit", "cancel", "j-x", "ok")
    assert lines(path)[-1]["who"] == "bob"
    again.close()


def test_no_refusals_are_written_while_the_disk_is_low(tmp_path: Path) -> None:
    low = [True]
    log = AuditLog(tmp_path / "audit.log", SteppedClock(), disk_low=lambda: low[0])
    log.record("mallory", "read", "cancel", "x", "error: forbidden: no")
    log.record("alice", "submit", "cancel", "j-1", "ok")
    assert [e["who"] for e in lines(tmp_path / "audit.log")] == ["alice"]
    low[0] = False
    log.record("mallory", "read", "cancel", "x", "error: forbidden: no")
    last = lines(tmp_path / "audit.log")[-1]
    assert last["who"] == "mallory" and last["refusals_held_back"] == 1
    log.close()
