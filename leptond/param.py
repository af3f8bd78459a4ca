"""Arguments of RPC methods: the value of one name, or a `bad_request` that
says in one line which argument was wrong and what it takes.

Every handler reads its arguments through these, so a wrong type or range
(`rank: "abc"`, `limit: [1]`, a float where an id goes) is the caller's
mistake in words, never an exception in the master (DESIGN §3).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from .wire.errors import BAD_REQUEST, RpcError

MAX_ID_CHARS = 256


def bad(message: str) -> RpcError:
    return RpcError(BAD_REQUEST, message)


def string(a: dict[str, Any], key: str, default: str = "", max_chars: int = MAX_ID_CHARS) -> str:
    """A text argument (absent or None: `default`)."""
    v = a.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        raise bad(f"{key} must be text, got {type(v).__name__}")
    if len(v) > max_chars:
        raise bad(f"{key} is over {max_chars} characters")
    return v


def flag(a: dict[str, Any], key: str, default: bool = False) -> bool:
    """A true/false argument (absent or None: `default`)."""
    v = a.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{key} must be true or false, got {type(v).__name__}")
    return v


def integer(a: dict[str, Any], key: str, lo: int, hi: int, default: int) -> int:
    """A whole number from lo to hi (absent or None: `default`)."""
    v = a.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{key} must be a whole number, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise bad(f"{key} must be from {lo} to {hi}, got {v}")
    return v


def number(a: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    """A finite number from lo to hi, or None when absent."""
    v = a.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise bad(f"{key} must be a number, got {v!r}"[:200])
    if not lo <= v <= hi:
        raise bad(f"{key} must be from {lo:g} to {hi:g}, got {v:g}")
    return float(v)


def choice(a: dict[str, Any], key: str, allowed: Collection[str], default: str) -> str:
    """One word from `allowed` (absent or None: `default`)."""
    v = a.get(key)
    if v is None:
        return default
    if not isinstance(v, str) or v not in allowed:
        raise bad(f"{key} must be one of {', '.join(allowed)}, got {repr(v)[:40]}")
    return v


def choices(a: dict[str, Any], key: str, allowed: Collection[str]) -> list[str]:
    """A list of words from `allowed` (or one word); absent or None: []."""
    v = a.get(key)
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > len(allowed):
        raise bad(f"{key} must be a list of: {', '.join(allowed)}")
    for item in items:
        if not isinstance(item, str) or item not in allowed:
            shown = repr(item)[:40]
            raise bad(f"{key}: {shown} is not one of {', '.join(allowed)}")
    return list(items)
