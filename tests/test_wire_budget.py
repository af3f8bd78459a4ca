"""The server-wide cap on bytes held in partly received frames.

Pure: the budget's bookkeeping and the codec's view of a frame that has begun.
Live (tests/wire_server_proc.py): a connection whose large frame does not fit
the budget waits, and goes on once the budget frees, without losing a byte; a
sender that holds a reservation and stalls is closed, and the next one goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from leptond.wire.budget import UNCOUNTED_FRAME, BufferBudget
from leptond.wire.codec import MAX_FRAME, FrameReader, frame
from tests.wire_raw import RawPeer, ServerProc, counter, server_process, wait_until

MiB = 1024 * 1024


class Rec:
    """A waiter; each has a key of its own unless told."""

    def __init__(self, key_id: str = "") -> None:
        self.key_id = key_id or f"key-{id(self)}"
        self.granted: list[int] = []

    def budget_granted(self, n: int) -> None:
        self.granted.append(n)


def test_budget_grants_in_arrival_order_and_never_over_the_limit() -> None:
    b = BufferBudget(100)
    first, big, small = Rec(), Rec(), Rec()
    assert b.reserve(first, 60)
    assert not b.reserve(big, 50)  # does not fit: waits
    # Fits by itself, but must not jump ahead of the waiting big one.
    assert not b.reserve(small, 10)
    assert (b.used, b.waiting) == (60, 2)
    b.release(60, first.key_id)
    assert big.granted == [50] and small.granted == [10]
    assert (b.used, b.waiting) == (60, 0)
    b.release(50, big.key_id)
    b.release(10, small.key_id)
    assert b.used == 0


def test_one_key_holds_at_most_its_share_and_does_not_hold_up_others() -> None:
    b = BufferBudget(100)  # a share of 25 per key
    m1, m2, m3, alice = Rec("mallory"), Rec("mallory"), Rec("mallory"), Rec("alice")
    assert b.reserve(m1, 20)
    assert not b.reserve(m2, 20)  # over mallory's share, though the budget has room
    assert b.reserve(alice, 25)  # not held up by mallory's waiter
    # One reservation of any size when the key holds nothing else.
    assert b.reserve(Rec("bob"), 40)
    b.release(20, "mallory")
    assert m2.granted == [20] and not b.reserve(m3, 10)
    b.release(20, "mallory")
    assert m3.granted == [10]
    assert b.used == 25 + 40 + 10


def test_budget_forgets_a_closed_waiter_and_grants_the_next() -> None:
    b = BufferBudget(100)
    holder, gone, nxt = Rec(), Rec(), Rec()
    assert b.reserve(holder, 90)
    assert not b.reserve(gone, 80)
    assert not b.reserve(nxt, 10)
    b.forget(gone)  # the waiter at the head closed: the one behind fits now
    assert nxt.granted == [10] and gone.granted == []
    assert b.used == 100


def test_budget_refuses_a_reservation_that_can_never_fit() -> None:
    with pytest.raises(ValueError):
        BufferBudget(100).reserve(Rec(), 101)


def test_partial_frame_length_reports_only_a_begun_incomplete_frame() -> None:
    r = FrameReader()
    assert r.partial_frame_length() is None
    r.append((1000).to_bytes(4, "big")[:3])
    assert r.partial_frame_length() is None  # no whole header yet
    r.append((1000).to_bytes(4, "big")[3:] + b"x" * 10)
    assert r.partial_frame_length() == 1000
    r.append(b"x" * 990)
    assert r.partial_frame_length() is None  # complete: next() returns it
    assert r.next() == b"x" * 1000
    big = 5 * UNCOUNTED_FRAME
    r.append(frame(b"y" * big)[:UNCOUNTED_FRAME])
    assert r.partial_frame_length() == big
    assert r.next() is None  # now collected as chunks
    assert r.partial_frame_length() == big
    r.append(b"y" * (big - UNCOUNTED_FRAME + 4))
    assert r.partial_frame_length() is None
    assert r.next() == b"y" * big
    over = FrameReader(max_frame=100)
    over.append((101).to_bytes(4, "big"))
    assert over.partial_frame_length() is None  # next() raises for it


def tight_server(tmp: Path, frame_timeout_s: float) -> Iterator[ServerProc]:
    """A server whose budget holds exactly one frame of the largest size."""
    with server_process(
        tmp, "--max-buffered-bytes", str(MAX_FRAME), "--frame-timeout-s", str(frame_timeout_s)
    ) as srv:
        yield srv


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[ServerProc]:
    yield from tight_server(tmp_path, frame_timeout_s=60)


@pytest.fixture
def impatient(tmp_path: Path) -> Iterator[ServerProc]:
    yield from tight_server(tmp_path, frame_timeout_s=2)


def big_call(peer: RawPeer, n: int, i: int = 1) -> bytes:
    """A sealed `sink` call whose frame is close to `n` bytes."""
    return peer.seal({"t": "q", "i": i, "m": "sink", "a": b"\x00" * n}, compress=False)


def answer(peer: RawPeer, i: int = 1) -> object:
    while True:
        msg = peer.recv_msg()
        if msg.get("t") == "r" and msg.get("i") == i:
            return msg.get("r")


def test_a_frame_over_the_budget_waits_then_completes(tight: ServerProc) -> None:
    holder = RawPeer.connect(tight.port)
    waiter = RawPeer.connect(tight.port)
    try:
        held = big_call(holder, 4 * MiB)
        holder.sock.sendall(held[: 2 * MiB])  # reserves ~4 MiB and stops halfway
        wait_until(
            lambda: counter(tight.stats(), "buffered_bytes_reserved") >= 4 * MiB,
            10,
            "the first frame's reservation",
        )
        # The largest frame does not fit beside it: the server stops reading it.
        whole = big_call(waiter, MAX_FRAME - 64)
        sender = threading.Thread(target=waiter.sock.sendall, args=(whole,), daemon=True)
        sender.start()
        wait_until(lambda: counter(tight.stats(), "buffer_waiting") == 1, 10, "a waiting frame")
        holder.sock.sendall(held[2 * MiB :])
        assert answer(holder) == 4 * MiB
        # Granted once the first frame completed: every byte arrives.
        sender.join(30)
        assert not sender.is_alive()
        assert answer(waiter) == MAX_FRAME - 64
        stats = tight.stats()
        assert counter(stats, "buffered_bytes_reserved") == 0
        assert counter(stats, "buffer_waits") >= 1
        assert counter(stats, "rejected") == 0
    finally:
        holder.close()
        waiter.close()


def test_a_stalled_reservation_is_closed_and_the_next_frame_goes_on(
    impatient: ServerProc,
) -> None:
    tight = impatient
    staller = RawPeer.connect(tight.port)
    waiter = RawPeer.connect(tight.port)
    try:
        staller.sock.sendall(big_call(staller, MAX_FRAME - 64)[:MiB])
        wait_until(
            lambda: counter(tight.stats(), "buffered_bytes_reserved") > 8 * MiB,
            10,
            "the staller's reservation",
        )
        whole = big_call(waiter, 2 * MiB)
        sender = threading.Thread(target=waiter.sock.sendall, args=(whole,), daemon=True)
        sender.start()
        # The staller never finishes: after the frame timeout it is closed...
        assert staller.closed_by_server(timeout_s=30)
        # ...and the waiting frame is granted and answered.
        sender.join(30)
        assert answer(waiter) == 2 * MiB
        stats = tight.stats()
        assert counter(stats, "rejected_slow_frame") == 1
        assert counter(stats, "buffered_bytes_reserved") == 0
    finally:
        staller.close()
        waiter.close()


def test_a_waiter_that_closes_gives_its_reservation_back(tight: ServerProc) -> None:
    """A paused connection is not read, so its close is seen when it is granted
    its frame: it then gives the reservation straight back."""
    holder = RawPeer.connect(tight.port)
    quitter = RawPeer.connect(tight.port)
    late = RawPeer.connect(tight.port)
    try:
        held = big_call(holder, 12 * MiB)
        holder.sock.sendall(held[:MiB])
        quitter.sock.sendall(big_call(quitter, 8 * MiB)[:MiB])
        wait_until(lambda: counter(tight.stats(), "buffer_waiting") == 1, 10, "the quitter waiting")
        quitter.close()
        # Small frames need no reservation: read at once, whoever waits.
        late.send_msg({"t": "q", "i": 1, "m": "echo", "a": "ok"})
        assert answer(late) == "ok"
        holder.sock.sendall(held[MiB:])
        assert answer(holder) == 12 * MiB
        wait_until(
            lambda: counter(tight.stats(), "buffered_bytes_reserved") == 0,
            10,
            "the closed waiter's reservation to come back",
        )
        # The whole budget is free again: the largest frame goes through.
        late.sock.sendall(big_call(late, MAX_FRAME - 64, i=2))
        assert answer(late, i=2) == MAX_FRAME - 64
    finally:
        holder.close()
        quitter.close()
        late.close()
