"""Job arrays: the indexes of an array's tasks, written as people write them.

`0-999` (a range, both ends included), `0-999:10` (with a step) and `1,5,9`
(a list, whose items may be ranges too) all become a list of [first, last,
step] ranges: what a spec stores, so a 10,000-task array is a few integers
in its Raft entry, not 10,000 of anything. Shared by leptonctl (to say what
was wrong before anything is sent) and by apply (which trusts nothing).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# The most tasks one array may have, and the largest index: each task is a
# small record in the replicated state, and an array is created in one apply.
MAX_ARRAY_TASKS = 100_000
MAX_ARRAY_INDEX = 9_999_999
# The most ranges (comma-separated items) an array may be written with.
MAX_ARRAY_RANGES = 1000


class ArrayError(ValueError):
    """A user mistake in an array's indexes; the message is one line."""


def parse_array(text: str) -> list[list[int]]:
    """`0-999`, `0-999:10`, `1,5,9` or a mix -> [[first, last, step], ...]."""
    if not isinstance(text, str) or not text.strip():
        raise ArrayError("--array takes indexes such as 0-999, 0-999:10 or 1,5,9")
    items = text.split(",")
    if len(items) > MAX_ARRAY_RANGES:
        raise ArrayError(f"--array takes at most {MAX_ARRAY_RANGES} comma-separated items")
    out = []
    for item in items:
        out.append(_parse_item(item.strip(), text))
    return check_ranges(out)


def _parse_item(item: str, whole: str) -> list[int]:
    shown = whole if len(whole) <= 40 else whole[:37] + "..."
    bad = ArrayError(
        f"--array {shown!r}: {item[:20]!r} is not an index, a range A-B or a range with a step A-B:S"
    )
    span, _, step_s = item.partition(":")
    first_s, dash, last_s = span.partition("-")
    try:
        first = _index(first_s)
        last = _index(last_s) if dash else first
        step = _index(step_s) if step_s else 1
    except ValueError:
        raise bad from None
    if (step_s and not dash) or step == 0:
        raise bad
    return [first, last, step]


def _index(s: str) -> int:
    s = s.strip()
    if not s.isascii() or not s.isdigit() or len(s) > 8:
        raise ValueError(s)
    return int(s)


def check_ranges(v: Any) -> list[list[int]]:
    """Stored ranges checked as apply must: whole numbers, first <= last,
    steps >= 1, no index twice, at most MAX_ARRAY_TASKS in all."""
    if not isinstance(v, list) or not v or len(v) > MAX_ARRAY_RANGES:
        raise ArrayError(f"an array needs 1 to {MAX_ARRAY_RANGES} ranges of indexes")
    out: list[list[int]] = []
    total = 0
    for r in v:
        if (
            not isinstance(r, list | tuple)
            or len(r) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        ):
            raise ArrayError("each array range must be [first, last, step]")
        first, last, step = r
        if not 0 <= first <= last <= MAX_ARRAY_INDEX:
            raise ArrayError(
                f"array range {first}-{last}: indexes go from 0 to {MAX_ARRAY_INDEX}, "
                "the first no larger than the last"
            )
        if not 1 <= step <= MAX_ARRAY_INDEX:
            raise ArrayError(f"array range {first}-{last}: the step must be at least 1")
        total += (last - first) // step + 1
        if total > MAX_ARRAY_TASKS:
            raise ArrayError(f"an array has at most {MAX_ARRAY_TASKS} tasks")
        out.append([first, last, step])
    seen: set[int] = set()
    for i in indexes(out):
        if i in seen:
            raise ArrayError(f"array index {i} is given twice")
        seen.add(i)
    return out


def indexes(ranges: list[list[int]]) -> Iterator[int]:
    """Every index of the array, in the order written."""
    for first, last, step in ranges:
        yield from range(first, last + 1, step)


def count(ranges: list[list[int]]) -> int:
    return sum((last - first) // step + 1 for first, last, step in ranges)


def describe(ranges: list[list[int]]) -> str:
    """The ranges as --array takes them: what listings show."""
    parts = []
    for first, last, step in ranges:
        if first == last:
            parts.append(str(first))
        elif step == 1:
            parts.append(f"{first}-{last}")
        else:
            parts.append(f"{first}-{last}:{step}")
    return ",".join(parts)
