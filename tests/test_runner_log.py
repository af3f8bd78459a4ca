"""The capped output log on its own: rotation keeps the newest bytes under the cap."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

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
