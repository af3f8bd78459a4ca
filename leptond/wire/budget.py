"""A server-wide cap on the bytes held in partly received frames.

A frame may be up to 16 MiB, and an authenticated peer can send the first
bytes of one and then nothing more: without a cap, a few dozen connections
each holding a partial frame take gigabytes. So before a connection buffers
the rest of a large frame it reserves the frame's declared length here. When
the reservation does not fit, the connection stops reading (TCP pushes back on
the sender) and waits its turn; reservations are granted in arrival order as
earlier frames complete or their connections close. Frames up to
`UNCOUNTED_FRAME` need no reservation: each connection holds at most one of
those plus one socket read, and the connection cap bounds how many there are.

Pure bookkeeping: no sockets, no clock. The connection owns the I/O (pausing,
resuming) and the deadline that stops one sender from holding a reservation
forever.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

# Frames up to this size are read without a reservation (the codec collects
# bigger ones as a list of chunks).
UNCOUNTED_FRAME = 64 * 1024


class Waiter(Protocol):
    def budget_granted(self, n: int) -> None:
        """The `n` bytes asked for are now reserved for this waiter."""


class BufferBudget:
    """Reservations of `limit` bytes in all, granted first come, first served."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("the buffer budget must be positive")
        self.limit = limit
        self.used = 0
        self.waits = 0  # reservations that had to wait, ever
        self._waiting: deque[tuple[Waiter, int]] = deque()

    def reserve(self, who: Waiter, n: int) -> bool:
        """Reserve `n` bytes now (True), or queue `who` to be granted them later.

        A request never jumps ahead of one already waiting, so a stream of
        small frames cannot starve a large one.
        """
        if n > self.limit:
            raise ValueError(f"a reservation of {n} bytes can never fit a budget of {self.limit}")
        if not self._waiting and self.used + n <= self.limit:
            self.used += n
            return True
        self._waiting.append((who, n))
        self.waits += 1
        return False

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)
        self._grant()

    def forget(self, who: Waiter) -> None:
        """`who` no longer waits (its connection closed)."""
        if any(w is who for w, _ in self._waiting):
            self._waiting = deque((w, n) for w, n in self._waiting if w is not who)
            self._grant()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _grant(self) -> None:
        while self._waiting and self.used + self._waiting[0][1] <= self.limit:
            who, n = self._waiting.popleft()
            self.used += n
            who.budget_granted(n)


class OutputMeter:
    """Bytes waiting to be sent, all connections together, against `limit`.

    Each connection reports the size of its write buffer when it writes and
    when the buffer drains (asyncio's resume_writing), so the total is exact
    to within each transport's low-water mark. A peer that does not read its
    replies makes its connection's buffer grow: the connection stops reading
    new requests from it, and is closed once its own buffer passes its cap or
    the total passes this one (see connection.Connection._account_output).
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("the output limit must be positive")
        self.limit = limit
        self.used = 0
        self.closed = 0  # connections closed for not reading their replies, ever

    def change(self, delta: int) -> None:
        self.used = max(0, self.used + delta)

    @property
    def over(self) -> bool:
        return self.used > self.limit
