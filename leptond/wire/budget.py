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

No key (token) may hold more than a quarter of the budget (`share`), or one
reservation of any size when it holds nothing else: otherwise one token's
connections, each announcing a large frame and sending it slowly, would take
the whole budget and every other user's large frames (workdir uploads) would
wait behind them. A waiter held back by its own key's share does not hold up
the waiters behind it.

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
    key_id: str

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
        self.share = max(1, limit // 4)
        self._waiting: deque[tuple[Waiter, int]] = deque()
        self._by_key: dict[str, int] = {}

    def _key_fits(self, key: str, n: int) -> bool:
        held = self._by_key.get(key, 0)
        return held == 0 or held + n <= self.share

    def _take(self, key: str, n: int) -> None:
        self.used += n
        self._by_key[key] = self._by_key.get(key, 0) + n

    def reserve(self, who: Waiter, n: int) -> bool:
        """Reserve `n` bytes now (True), or queue `who` to be granted them later.

        A request never jumps ahead of one already waiting, so a stream of
        small frames cannot starve a large one.
        """
        if n > self.limit:
            raise ValueError(f"a reservation of {n} bytes can never fit a budget of {self.limit}")
        key = who.key_id
        if (
            self.used + n <= self.limit
            and self._key_fits(key, n)
            and not any(self._key_fits(w.key_id, m) for w, m in self._waiting)
        ):
            self._take(key, n)
            return True
        self._waiting.append((who, n))
        self.waits += 1
        return False

    def release(self, n: int, key: str) -> None:
        self.used = max(0, self.used - n)
        left = self._by_key.get(key, 0) - n
        if left > 0:
            self._by_key[key] = left
        else:
            self._by_key.pop(key, None)
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
        """Grant waiters in arrival order, skipping those over their key's
        share; the first other one that does not fit stops the grants."""
        while True:
            first = next(
                (e for e in self._waiting if self._key_fits(e[0].key_id, e[1])),
                None,
            )
            if first is None:
                return
            who, n = first
            if self.used + n > self.limit:
                return
            self._waiting.remove(first)
            self._take(who.key_id, n)
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
