"""The capped output log on its own: rotation keeps the newest bytes under the cap."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent import tasklog
from agent.tasklog import LOG, LOG_OLD, RotatingLog, dropped_bytes, read_log


def _stream(chunks: list[int]) -> bytes:
    # A period (251) that no cap or chunk size shares, so a misplaced byte shows.
    total = sum(chunks)
    return (bytes(range(251)) * (total // 251 + 1))[:total]


def _read_all(tdir: Path, offset: int, limit: int) -> tuple[bytes, int, int]:
    """Follow the log from `offset` in `limit`-sized reads: (data, first, end)."""
    first: int | None = None
    out = b""
    while True:
        data, nxt = read_log(tdir, offset, limit)
        if first is None:
            first = nxt - len(data)
        if not data:
            return out, first, nxt
        out += data
        offset = nxt


@settings(max_examples=40, deadline=None)
@given(
    cap=st.integers(min_value=1024, max_value=8192),
    chunks=st.lists(st.integers(min_value=0, max_value=6000), max_size=12),
    limit=st.integers(min_value=100, max_value=5000),
)
def test_log_keeps_the_newest_output_under_the_cap(cap: int, chunks: list[int], limit: int) -> None:
    stream = _stream(chunks)
    with tempfile.TemporaryDirectory() as d:
        tdir = Path(d)
        log = RotatingLog(tdir, cap)
        pos = 0
        for n in chunks:
            log.write(stream[pos : pos + n])
            pos += n
            on_disk = (tdir / LOG).stat().st_size + _size(tdir / LOG_OLD)
            assert on_disk <= cap
        log.close()

        data, first, end = _read_all(tdir, 0, limit)
        assert end == len(stream)
        assert data == stream[first:]  # a contiguous tail at its true offsets
        assert len(data) >= min(len(stream), cap // 2)  # at least half the cap is kept
        assert dropped_bytes(tdir) == first  # every byte is either kept or counted
        tail, nxt = read_log(tdir, -100, 1000)
        assert (tail, nxt) == (stream[max(first, len(stream) - 100) :], len(stream))


def test_reading_before_the_log_exists_returns_nothing(tmp_path: Path) -> None:
    assert read_log(tmp_path, 0, 100) == (b"", 0)
    assert read_log(tmp_path, 42, 100) == (b"", 42)


def _size(p: Path) -> int:
    return p.stat().st_size if p.exists() else 0


@settings(max_examples=60, deadline=None)
@given(
    cap=st.integers(min_value=1024, max_value=4096),
    lines=st.lists(st.integers(min_value=0, max_value=300), max_size=40),
    unfinished=st.booleans(),
    want=st.integers(min_value=0, max_value=50),
)
def test_tail_starts_at_the_last_lines_kept(
    cap: int, lines: list[int], unfinished: bool, want: int
) -> None:
    text = b"".join(b"x" * n + b"\n" for n in lines) + (b"partial" if unfinished else b"")
    with tempfile.TemporaryDirectory() as d:
        tdir = Path(d)
        log = RotatingLog(tdir, cap)
        log.write(text)
        log.close()
        kept, end = _read_all(tdir, 0, 1 << 20)[0], len(text)
        first = end - len(kept)
        start = tasklog.tail_offset(tdir, want)
        # What a reader of the kept bytes would call the last `want` lines.
        if want == 0:
            expect = end
        else:
            ends = [first + i + 1 for i, b in enumerate(kept) if b == 10]
            starts = [first] + [e for e in ends if e < end]
            expect = starts[max(0, len(starts) - want)]
        assert start == expect, (start, expect, first, end)


def test_times_date_every_write_to_within_a_tenth_of_a_second(tmp_path: Path) -> None:
    now = [1000.0]
    log = RotatingLog(tmp_path, 1 << 20, clock=lambda: now[0])
    log.write(b"a\n")  # offset 0 at 1000.0
    now[0] += 0.05
    log.write(b"b\n")  # too soon for a record of its own: dated 1000.0
    now[0] += 2.0
    log.write(b"c\n")  # offset 4 at 1002.05
    log.close()
    assert tasklog.read_times(tmp_path, 0, 6) == [(0, 1000.0), (4, 1002.05)]
    # Asked from the middle: the record before it comes first.
    assert tasklog.read_times(tmp_path, 2, 6) == [(0, 1000.0), (4, 1002.05)]
    assert tasklog.read_times(tmp_path, 5, 6) == [(4, 1002.05)]


def test_times_stay_small_for_a_task_that_writes_a_byte_at_a_time(tmp_path: Path) -> None:
    now = [0.0]
    log = RotatingLog(tmp_path, 1 << 20, clock=lambda: now[0])
    for _ in range(20_000):
        now[0] += 0.2
        log.write(b".")
    log.close()
    f = tasklog.files()
    size = sum((tmp_path / n).stat().st_size for n in (f.times, f.times_old))
    # 20,000 records would take 320 kB: the oldest go, two files at most remain.
    assert size <= 2 * tasklog.MIN_TIMES_BYTES
    # The newest bytes are still dated exactly.
    assert tasklog.read_times(tmp_path, 19_999, 20_000) == [(19_999, now[0])]
