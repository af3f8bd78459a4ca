"""clock.wait_event: True once the event is set, False when the time runs out
first, and a cancel of the waiting task is a cancel, not a timeout."""

from __future__ import annotations

import asyncio

import pytest

from leptond.clock import REAL, wait_event


def test_wait_event_answers_set_timed_out_and_cancelled() -> None:
    async def main() -> None:
        ev = asyncio.Event()
        assert await wait_event(REAL, ev, 0.01) is False  # nobody sets it
        loop = asyncio.get_running_loop()
        loop.call_soon(ev.set)
        assert await wait_event(REAL, ev, 60.0) is True
        assert await wait_event(REAL, ev, 0.0) is True  # already set
        ev.clear()
        waiting = loop.create_task(wait_event(REAL, ev, 60.0))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # Nothing of the cancelled wait is left waiting on the event.
        assert not ev._waiters  # type: ignore[attr-defined]
        assert await wait_event(REAL, ev, 0.01) is False

    asyncio.run(main())
