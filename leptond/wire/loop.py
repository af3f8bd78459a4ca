"""Event loop selection (uvloop when installed) and process set-up for it."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep large buffers on the heap instead of fresh mmaps.

    Every big frame (up to 16 MiB) makes a few buffers of its size: the
    ciphertext, the plaintext, the unpacked bytes. By default glibc serves each
    from a fresh mmap and unmaps it on free, so every frame pays page faults and
    zeroing for all of them: that was most of the CPU of a 1 MiB upload
    (311 -> about 1,000 MB/s without it, bench/rpc.py). Freed memory up to the
    trim threshold stays with the process for reuse. glibc only; a no-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1  # glibc's maximum
    ok &= mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1
    ok &= mallopt(_M_TOP_PAD, 16 << 20) == 1
    return bool(ok)


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop where available (Linux), else the default loop."""
    tune_malloc()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
