"""Time in one place: the `Clock` every service is given, and the real one.

A leaf module: it imports nothing from this project, so every package may
use it (raft/, agent/ and agent/shim.py, which runs under `python -S` with
only the standard library and this package, included).

No other module reads the time or sleeps directly (tests/test_layers.py
checks it); each takes a `Clock`, normally `REAL`. A simulation passes a
virtual clock instead and so runs the same code at any speed, with timing
drawn from a seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio

# asyncio is imported where it is used: agent/shim.py, one process per task,
# reads this clock and never needs an event loop.


class Timer(Protocol):
    """A pending `call_later`; `cancel` is safe to call more than once."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch: for times that are recorded,
        proposed (a command's `now`) or shown to people."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: for intervals, deadlines
        and timeouts within this process."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Let `seconds` pass on this clock (asyncio)."""
        ...

    def call_later(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> Timer:
        """Run `fn(*args)` on the running event loop after `delay_s`."""
        ...

    def block(self, seconds: float) -> None:
        """Block this thread for `seconds` (for code outside asyncio)."""
        ...


class RealClock:
    """The system clocks and the running asyncio loop."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        import asyncio

        await asyncio.sleep(seconds)

    def call_later(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> Timer:
        import asyncio

        return asyncio.get_running_loop().call_later(delay_s, fn, *args)

    def block(self, seconds: float) -> None:
        time.sleep(seconds)


REAL: Clock = RealClock()


def boottime() -> float:
    """Seconds since boot on CLOCK_BOOTTIME: one clock for every process on
    the host, which (unlike CLOCK_MONOTONIC) runs on while it is suspended.
    Node leases are measured on it (agent/lease.py)."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


async def wait_event(clock: Clock, event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for `event` at most `timeout_s` on `clock`; True when it was set.

    asyncio.wait_for would time out on the loop's own clock, which a virtual
    clock does not move."""
    import asyncio

    if event.is_set():
        return True
    # ensure_future's work for a coroutine, without its checks of what it was given.
    waiter = asyncio.get_running_loop().create_task(event.wait())
    timer = clock.call_later(timeout_s, waiter.cancel)
    try:
        await waiter
        return True
    except asyncio.CancelledError:
        if waiter.cancelled() and not _current_cancelling():
            return event.is_set()
        raise
    finally:
        timer.cancel()
        waiter.cancel()


def _current_cancelling() -> bool:
    """Whether the running task itself is being cancelled (not just the waiter)."""
    import asyncio

    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())
