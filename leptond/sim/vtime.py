"""Virtual time: an asyncio loop whose clock only the simulation moves.

`VirtualLoop` is a real asyncio event loop (tasks, futures, Events, Locks and
`asyncio.wait_for` all behave as usual) whose `time()` is a number kept
here. When nothing is ready to run, the loop would wait in its selector for
the next timer; here it moves the clock to that timer instead and goes on at
once (`run_until`, `_run_once`). Nothing waits for real time, and one thread
runs every callback in an order fixed by the program and its inputs: what
is ready in the order it was made ready, then timers in the order of their
time, and those due at the same time in the order they were set (trio's
MockClock with autojump, FoundationDB's simulated time).

Work sent to a thread (`asyncio.to_thread`, `run_in_executor`) runs inline,
so the simulation never has a second thread whose timing could change the
order of events.

`SimClock` is the `Clock` (leptond/clock.py) the simulated masters get;
`HostClock` adds what an agent's host can suffer: its wall clock jumping,
and the agent process being paused (SIGSTOP), which holds its timers and
whatever the network delivers to it until it is resumed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import heapq
import itertools
import selectors
import threading
from asyncio import format_helpers
from collections.abc import Callable
from typing import Any

# Wall-clock time at virtual time 0: a fixed date, so runs repeat exactly.
EPOCH = 1_700_000_000.0


# asyncio's own thresholds (base_events.py), for _run_once.
_MIN_SCHEDULED = 100
_MIN_CANCELLED_FRACTION = 0.5
_MAX_SELECT_S = 24 * 3600

_new = object.__new__
_copy_context = contextvars.copy_context


class SimDeadlock(RuntimeError):
    """Nothing is scheduled and nothing can run: every task waits forever."""


class _Now:
    """The virtual time, shared by the loop, its selector and the clocks."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = 0.0


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs what would go to a worker thread at once, on the loop's thread
    (its pool never starts a thread: only `submit` would)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting coroutine
            fut.set_exception(exc)
        return fut


class _Handle(asyncio.Handle):
    """asyncio's Handle without the debug-mode checks (the virtual loop never
    runs in debug mode): a simulated second makes hundreds of them, and
    asking the loop `get_debug()` for each was a good part of their cost.
    Made by `VirtualLoop.call_soon`, field by field."""

    __slots__ = ()
    # Handle's fields that its stubs leave out (annotations only: the slots
    # are Handle's).
    _context: contextvars.Context
    _loop: asyncio.AbstractEventLoop
    _callback: Callable[..., Any] | None
    _repr: str | None
    _source_traceback: Any


class _TimerHandle(asyncio.TimerHandle):
    """asyncio's TimerHandle likewise, made already marked as scheduled, by
    `VirtualLoop.call_at`."""

    __slots__ = ()
    _context: contextvars.Context
    _loop: asyncio.AbstractEventLoop
    _callback: Callable[..., Any] | None
    _repr: str | None
    _source_traceback: Any
    _when: float
    _scheduled: bool

    def cancel(self) -> None:
        # TimerHandle.cancel and the loop's count of cancelled timers, in one
        # call instead of three (timeouts that did not fire are most timers).
        if not self._cancelled:
            if self._scheduled:
                self._loop._timer_cancelled_count += 1  # type: ignore[attr-defined]
            self._cancelled = True
            self._callback = None
            self._args = None  # type: ignore[assignment]


def _report(handle: asyncio.Handle, exc: BaseException) -> None:
    """What Handle._run does with what a callback raised: hand it to the
    loop's exception handler, in the same words."""
    cb = format_helpers._format_callback_source(handle._callback, handle._args)  # type: ignore[attr-defined]
    context = {"message": f"Exception in callback {cb}", "exception": exc, "handle": handle}
    handle._loop.call_exception_handler(context)  # type: ignore[attr-defined]


class VirtualLoop(asyncio.SelectorEventLoop):
    """Its timers are kept as (when, sequence, handle) in a heap: they come
    due in the order of their time, and those due at the same time in the
    order they were set (asyncio's own heap compares handles by time alone,
    in Python, which was a tenth of the loop's cost here)."""

    # BaseEventLoop's own state, which the methods below work on (not in its stubs).
    _scheduled: list[Any]  # (when, seq, asyncio.TimerHandle), a heap
    _timer_cancelled_count: int
    _ready: collections.deque[Any]
    _stopping: bool
    _closed: bool
    _clock_resolution: float
    _thread_id: int | None
    _check_closed: Callable[[], None]

    def __init__(self) -> None:
        self.now = _Now()
        self._seq = itertools.count()
        # It registers the loop's self-pipe but is never polled: with no I/O,
        # the loop moves the clock to the next timer instead of waiting.
        super().__init__(selectors.SelectSelector())
        self.set_default_executor(_InlineExecutor())

    def time(self) -> float:
        return self.now.t

    def call_soon(  # type: ignore[override]  # the same, in looser types
        self, callback: Callable[..., Any], *args: Any, context: Any = None
    ) -> asyncio.Handle:
        # BaseEventLoop.call_soon, less its debug-mode branches.
        if self._closed:
            self._check_closed()  # raises
        # Handle.__init__'s fields set here, without a call of __init__ (a
        # Python frame, for every callback of the run).
        handle = _new(_Handle)
        handle._context = _copy_context() if context is None else context
        handle._loop = self
        handle._callback = callback
        handle._args = args
        handle._cancelled = False
        handle._repr = None
        handle._source_traceback = None
        self._ready.append(handle)
        return handle

    def call_at(  # type: ignore[override]  # the same, in looser types
        self, when: float, callback: Callable[..., Any], *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        if self._closed:
            self._check_closed()  # raises
        # TimerHandle.__init__'s fields likewise, and scheduled already.
        timer = _new(_TimerHandle)
        timer._context = _copy_context() if context is None else context
        timer._loop = self
        timer._callback = callback
        timer._args = args
        timer._cancelled = False
        timer._repr = None
        timer._source_traceback = None
        timer._when = when
        timer._scheduled = True
        heapq.heappush(self._scheduled, (when, next(self._seq), timer))
        return timer

    def _drop_cancelled(self) -> list[Any]:
        """Drop cancelled timers: all of them when they are most of the heap
        (asyncio's rule), else those at its head. The heap, as it now is."""
        scheduled = self._scheduled
        n = len(scheduled)
        if n > _MIN_SCHEDULED and self._timer_cancelled_count / n > _MIN_CANCELLED_FRACTION:
            kept = []
            for entry in scheduled:
                if entry[2]._cancelled:
                    entry[2]._scheduled = False
                else:
                    kept.append(entry)
            heapq.heapify(kept)
            self._scheduled = scheduled = kept
            self._timer_cancelled_count = 0
        else:
            while scheduled and scheduled[0][2]._cancelled:
                self._timer_cancelled_count -= 1
                heapq.heappop(scheduled)[2]._scheduled = False
        return scheduled

    def _run_ready(self, scheduled: list[Any]) -> None:
        """Move the timers due now to the ready queue, then run what was
        ready (not what those callbacks make ready: that is the next round)."""
        ready = self._ready
        end = self.now.t + self._clock_resolution
        while scheduled and scheduled[0][0] < end:
            handle = heapq.heappop(scheduled)[2]
            handle._scheduled = False
            ready.append(handle)
        for _ in range(len(ready)):
            handle = ready.popleft()
            if not handle._cancelled:
                handle._run()

    def _run_once(self) -> None:
        """One iteration of the loop, for run_forever (run_until_complete):
        with no I/O, polling is moving the clock to the next timer."""
        scheduled = self._drop_cancelled()
        if not self._ready and not self._stopping:
            if not scheduled:
                raise SimDeadlock("no timer is scheduled and no callback is ready")
            when = min(scheduled[0][0], self.now.t + _MAX_SELECT_S)
            if when > self.now.t:
                self.now.t = when
        self._run_ready(scheduled)

    def run_until(self, t: float) -> None:
        """Run every callback due up to virtual time `t`, and what they make
        ready at that time, then stop there.

        The loop runs as run_forever would (it is the running loop while its
        callbacks run), but without a stop callback and run_forever's set-up
        on each call (a simulation calls this once a step), and one timer at
        a time: callbacks made ready run before the next timer, in the order
        they were made ready; timers run in the order of (time, setting)."""
        now = self.now
        ready = self._ready
        self._check_closed()
        scheduled = self._scheduled
        if not ready and (not scheduled or scheduled[0][0] > t):
            # Nothing is due up to t (most steps): the clock moves, and the
            # loop is never marked as running, which costs two calls of
            # _set_running_loop, each a getpid() in CPython 3.11. (Cancelled
            # timers left in the heap are dropped at the next step that runs:
            # what runs, and in what order, is the same.)
            if now.t < t:
                now.t = t
            return
        self._thread_id = threading.get_ident()
        asyncio.events._set_running_loop(self)
        try:
            while True:
                if ready:
                    # Handle._run in line: one call less for every callback.
                    for _ in range(len(ready)):
                        handle = ready.popleft()
                        if not handle._cancelled:
                            try:
                                handle._context.run(handle._callback, *handle._args)
                            except (SystemExit, KeyboardInterrupt):
                                raise
                            except BaseException as exc:
                                _report(handle, exc)
                    continue
                scheduled = self._scheduled
                if not scheduled:
                    break
                if scheduled[0][2]._cancelled or len(scheduled) > _MIN_SCHEDULED:
                    scheduled = self._drop_cancelled()
                    if not scheduled:
                        break
                if scheduled[0][0] > t:
                    break  # nothing more to do up to t
                when, _, handle = heapq.heappop(scheduled)
                handle._scheduled = False
                if when > now.t:
                    now.t = when
                try:
                    handle._context.run(handle._callback, *handle._args)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    _report(handle, exc)
        finally:
            asyncio.events._set_running_loop(None)
            self._thread_id = None
        if now.t < t:
            now.t = t


class _Held:
    """A timer of a `HostClock`: cancellable, and held while the host's
    agent is paused. Made by `HostClock._timer`, field by field."""

    __slots__ = ("args", "cancelled", "fn", "handle")
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    cancelled: bool
    handle: asyncio.TimerHandle | None

    def cancel(self) -> None:
        self.cancelled = True
        if self.handle is not None:
            self.handle.cancel()


class SimClock:
    """A Clock on virtual time; wall-clock `now` is EPOCH plus virtual time."""

    def __init__(self, loop: VirtualLoop) -> None:
        self.loop = loop
        self._now = loop.now

    def now(self) -> float:
        return EPOCH + self._now.t

    def monotonic(self) -> float:
        return self._now.t

    async def sleep(self, seconds: float) -> None:
        fut = self.loop.create_future()
        timer = self._timer(seconds, _settle, fut)
        try:
            await fut
        finally:
            timer.cancel()

    def call_later(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> Any:
        # _timer's work in line (HostClock has its own): a timer is set for
        # every message, call and sleep.
        return self.loop.call_at(self._now.t + (delay_s if delay_s > 0.0 else 0.0), fn, *args)

    def _timer(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> Any:
        return self.loop.call_at(self._now.t + (delay_s if delay_s > 0.0 else 0.0), fn, *args)

    def call_at(self, when: float, fn: Callable[..., Any], *args: Any) -> asyncio.TimerHandle:
        """Run `fn(*args)` at `when` on this clock's `monotonic()` (not in
        the Clock protocol: for the simulated world, which keeps a time it
        sets a timer for; a HostClock's pauses do not hold it)."""
        return self.loop.call_at(when, fn, *args)

    def block(self, seconds: float) -> None:
        raise RuntimeError("nothing may block the simulation's only thread")


class HostClock(SimClock):
    """An agent's clock: its own wall-clock offset (jumps), and pauses.

    While paused, timers that come due and deliveries from the network are
    held, in order, and run when the agent is resumed; the monotonic clock
    runs on, as CLOCK_MONOTONIC does under SIGSTOP."""

    def __init__(self, loop: VirtualLoop) -> None:
        super().__init__(loop)
        self.offset_s = 0.0
        self.paused = False
        self._held: list[_Held] = []

    def now(self) -> float:
        return EPOCH + self._now.t + self.offset_s

    def _timer(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> Any:
        # _Held's fields set here, without a call of an __init__ (a Python
        # frame called from C, for every timer and message of an agent).
        held = _new(_Held)
        held.fn = fn
        held.args = args
        held.cancelled = False
        held.handle = self.loop.call_at(
            self._now.t + (delay_s if delay_s > 0.0 else 0.0), self._fire, held
        )
        return held

    call_later = _timer  # the same, without a call between

    def _fire(self, held: _Held) -> None:
        if held.cancelled:
            return
        if self.paused:
            self._held.append(held)
            return
        held.fn(*held.args)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        held, self._held = self._held, []
        for h in held:
            if not h.cancelled:
                self.loop.call_soon(h.fn, *h.args)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
