"""Bad input against a live server process.

Every case: the offending connection is closed, the server logs a line for it
(rate-limited: many bad connections give a handful of lines), counts it in its
stats, keeps serving a good client that was connected all along, and its memory
stays bounded.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest

from leptond.wire.codec import MAX_FRAME
from leptond.wire.handshake import STATUS_UNKNOWN_KEY
from tests.wire_raw import RawPeer, ServerProc, counter, server_process, wait_until

REPEAT = 40
IDLE_S = 4.0
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp("wire_bad")
    with server_process(tmp, "--handshake-timeout-s", "1", "--idle-timeout-s", "60") as srv:
        yield srv


@pytest.fixture
def side(server: ServerProc) -> Iterator[RawPeer]:
    """A good client, connected before the bad input arrives."""
    with RawPeer.connect(server.port) as peer:
        assert peer.call("echo", "before") == "before"
        yield peer


def authed(port: int) -> RawPeer:
    return RawPeer.connect(port)


def wrong_psk(port: int) -> RawPeer:
    peer = RawPeer.open(port)
    peer.handshake(psk=bytes(32))
    peer.send_msg({"t": "h"})
    return peer


def unknown_key_id(port: int) -> RawPeer:
    peer = RawPeer.open(port)
    assert peer.handshake(key_id="nobody") == STATUS_UNKNOWN_KEY
    return peer


def truncated(port: int) -> RawPeer:
    peer = authed(port)
    sealed = peer.seal({"t": "q", "i": 1, "m": "echo", "a": "x" * 100})
    peer.sock.sendall(sealed[: len(sealed) // 2])
    peer.sock.shutdown(socket.SHUT_WR)
    return peer


def over_cap(port: int) -> RawPeer:
    peer = authed(port)
    peer.sock.sendall((MAX_FRAME + 1).to_bytes(4, "big") + b"\x00" * 64)
    return peer


def over_cap_before_handshake(port: int) -> RawPeer:
    peer = RawPeer.open(port)
    peer.sock.sendall((1000).to_bytes(4, "big") + b"\x00" * 1000)
    return peer


def random_bytes(port: int) -> RawPeer:
    peer = RawPeer.open(port)
    # A small length so that the server reads a whole garbage "hello".
    peer.sock.sendall(b"\x00\x00\x00\x40" + os.urandom(64) + os.urandom(256))
    return peer


def replayed(port: int) -> RawPeer:
    peer = authed(port)
    sealed = peer.seal({"t": "q", "i": 1, "m": "echo", "a": 1})
    peer.sock.sendall(sealed + sealed)
    return peer


def swapped(port: int) -> RawPeer:
    peer = authed(port)
    first = peer.seal({"t": "q", "i": 1, "m": "echo", "a": 1})
    second = peer.seal({"t": "q", "i": 2, "m": "echo", "a": 2})
    peer.sock.sendall(second + first)
    return peer


def bit_flipped(port: int) -> RawPeer:
    peer = authed(port)
    sealed = bytearray(peer.seal({"t": "q", "i": 1, "m": "echo", "a": "hello"}))
    bit = int.from_bytes(os.urandom(2), "big") % ((len(sealed) - 4) * 8)
    sealed[4 + bit // 8] ^= 1 << (bit % 8)
    peer.sock.sendall(sealed)
    return peer


def sealed_plain(plain: bytes) -> Callable[[int], RawPeer]:
    def send(port: int) -> RawPeer:
        peer = authed(port)
        peer.sock.sendall(peer.seal_plain(plain))
        return peer

    return send


# (name, how, counter that must go up by one per connection)
CASES: list[tuple[str, Callable[[int], RawPeer], str]] = [
    ("wrong_psk", wrong_psk, "rejected_bad_seal"),
    ("unknown_key_id", unknown_key_id, "rejected_unknown_key"),
    ("truncated_frame", truncated, "rejected_truncated"),
    ("length_over_cap", over_cap, "rejected_frame_too_large"),
    ("length_over_cap_before_handshake", over_cap_before_handshake, "rejected_frame_too_large"),
    ("random_bytes", random_bytes, "rejected_bad_hello"),
    ("replayed_frame", replayed, "rejected_bad_seal"),
    ("swapped_frames", swapped, "rejected_bad_seal"),
    ("bit_flipped", bit_flipped, "rejected_bad_seal"),
    ("body_not_msgpack", sealed_plain(b"\x00\xc1"), "rejected_bad_msgpack"),
    ("body_trailing_bytes", sealed_plain(b"\x00\x80\x01"), "rejected_bad_msgpack"),
    ("body_not_a_map", sealed_plain(b"\x00" + msgpack.packb([1, 2])), "rejected_not_a_map"),
    ("body_without_type", sealed_plain(b"\x00" + msgpack.packb({"i": 1})), "rejected_no_type"),
    ("unknown_flags", sealed_plain(b"\x80" + msgpack.packb({"t": "p"})), "rejected_bad_flags"),
    (
        "lz4_bomb",
        sealed_plain(b"\x01" + (2**31).to_bytes(4, "little") + b"\x1f\x00" * 8),
        "rejected_lz4_bomb",
    ),
    (
        "lz4_garbage",
        sealed_plain(b"\x01" + (1000).to_bytes(4, "little") + os.urandom(40)),
        "rejected_bad_lz4",
    ),
    ("empty_batch", sealed_plain(b"\x02"), "rejected_bad_batch"),
    (
        "batch_entry_past_the_end",
        sealed_plain(b"\x02" + (1000).to_bytes(4, "big") + b"\x00" + msgpack.packb({"t": "p"})),
        "rejected_bad_batch",
    ),
    (
        "batch_with_lz4_entry",
        sealed_plain(
            b"\x02" + (6).to_bytes(4, "big") + b"\x01" + (2**31).to_bytes(4, "little") + b"\x1f"
        ),
        "rejected_bad_batch",
    ),
]


@pytest.mark.parametrize(("name", "how", "count"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_closes_only_that_connection(
    server: ServerProc,
    side: RawPeer,
    name: str,
    how: Callable[[int], RawPeer],
    count: str,
) -> None:
    before = server.stats()
    lines_before = len(server.log_lines())
    for _ in range(REPEAT):
        with how(server.port) as bad:
            assert bad.closed_by_server(5.0), f"{name}: server kept the connection open"
    after = wait_until(
        lambda: (
            (s := server.stats()) and counter(s, count) - counter(before, count) >= REPEAT and s
        ),
        5.0,
        f"{count} to count {REPEAT} rejections",
    )
    assert counter(after, count) - counter(before, count) == REPEAT
    assert counter(after, "rejected") - counter(before, "rejected") == REPEAT
    # Rate-limited: one line per reason per interval, not one per connection.
    reason = count.removeprefix("rejected_")
    new_lines = server.log_lines()[lines_before:]
    assert len(new_lines) <= 3, new_lines
    assert any(f"[{reason}]" in line for line in server.log_lines())
    # The good client on the side never noticed.
    assert side.call("echo", name) == name
    assert after["rss"] - before["rss"] < 50 * MiB
    assert server.alive()


def test_silent_client_is_closed_after_the_handshake_timeout(
    server: ServerProc, side: RawPeer
) -> None:
    before = server.stats()
    with RawPeer.open(server.port) as silent, RawPeer.open(server.port) as half:
        half.handshake()  # keys agreed, but never proves it holds them
        assert silent.closed_by_server(10.0)
        assert half.closed_by_server(10.0)
    after = server.stats()
    assert (
        counter(after, "rejected_handshake_timeout") - counter(before, "rejected_handshake_timeout")
        == 2
    )
    assert side.call("echo", 1) == 1


def test_a_wrong_frame_after_good_traffic_drops_nothing_else(
    server: ServerProc, side: RawPeer
) -> None:
    with authed(server.port) as peer:
        assert peer.call("echo", {"big": b"x" * 100_000}) == {"big": b"x" * 100_000}
        sealed = peer.seal({"t": "q", "i": 99, "m": "echo", "a": 1})
        peer.sock.sendall(sealed)
        assert peer.recv_msg() == {"t": "r", "i": 99, "r": 1}
        peer.sock.sendall(sealed)  # the same frame again, after it was served
        assert peer.closed_by_server(5.0)
    assert side.call("echo", "still") == "still"


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp("wire_idle")
    flags = ("--handshake-timeout-s", f"{IDLE_S}", "--idle-timeout-s", f"{IDLE_S}")
    with server_process(tmp, *flags) as srv:
        yield srv


def test_a_thousand_idle_connections(idle_server: ServerProc, tmp_path: Path) -> None:
    srv = idle_server
    base = srv.stats()
    peers: list[RawPeer] = []
    try:
        for k in range(1000):
            # Half never start the handshake, half finish it and then go quiet.
            peers.append(RawPeer.open(srv.port) if k % 2 else RawPeer.connect(srv.port))
        # Every one was taken in (none refused for capacity), however long
        # opening them took; and the server serves while they are open.
        busy = srv.stats()
        assert counter(busy, "accepted") - counter(base, "accepted") >= 1000
        assert counter(busy, "over_capacity") == counter(base, "over_capacity")
        with RawPeer.connect(srv.port) as good:
            assert good.call("echo", "served") == "served"
        for peer in peers:
            assert peer.closed_by_server(15.0), "an idle connection was never closed"
        after = wait_until(
            lambda: (s := srv.stats()) and s["server"]["connections"] <= 1 and s,
            10.0,
            "the server to forget the idle connections",
        )
    finally:
        for peer in peers:
            peer.close()
    assert (
        counter(after, "rejected_handshake_timeout") - counter(base, "rejected_handshake_timeout")
        == 500
    )
    assert counter(after, "idle_closed") - counter(base, "idle_closed") >= 500
    assert max(busy["rss"], after["rss"]) - base["rss"] < 100 * MiB
    assert len(srv.log_lines()) < 20


def test_a_hundred_bad_connections_log_a_handful_of_lines(
    server: ServerProc, side: RawPeer
) -> None:
    before = server.stats()
    lines_before = len(server.log_lines())
    for k in range(100):
        how = (wrong_psk, random_bytes, bit_flipped, over_cap)[k % 4]
        with how(server.port) as bad:
            assert bad.closed_by_server(5.0)
    after = wait_until(
        lambda: (
            (s := server.stats())
            and counter(s, "rejected") - counter(before, "rejected") >= 100
            and s
        ),
        5.0,
        "100 rejections to be counted",
    )
    assert counter(after, "rejected") - counter(before, "rejected") == 100
    assert len(server.log_lines()) - lines_before <= 8  # one per reason per interval at most
    assert side.call("echo", "fine") == "fine"
