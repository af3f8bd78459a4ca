"""What one authenticated peer can make an RPC server hold or do with its
frames: a 66 KB lz4 frame that unpacks into 16 million lists, a batch of a
thousand such messages, replies it never reads, a reply too large for a
frame, stream items it does not consume.

Live: tests/wire_server_proc.py in its own process (memory measured there),
and in-process servers for the stream window.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import lz4.block
import msgpack
import pytest
import uvloop

from leptond.wire import Connection, RpcError, RpcServer, open_connection
from leptond.wire.codec import (
    FLAG_LZ4,
    MAX_BATCH_ITEMS,
    MAX_FRAME,
    ProtocolError,
    decode_messages,
)
from tests.rss_support import PeakRss
from tests.wire_raw import RawPeer, ServerProc, counter, server_process, wait_until

MiB = 1024 * 1024
PSK = b"k" * 32


def bomb_body(i: int, n: int, method: str = "echo") -> bytes:
    """msgpack of {"t": "q", "i": i, "m": method, "a": [[]] * n}, built by hand."""
    head = msgpack.packb({"t": "q", "i": i, "m": method})
    return (
        bytes([head[0] + 1])
        + head[1:]
        + msgpack.packb("a")
        + b"\xdd"
        + struct.pack(">I", n)
        + b"\x90" * n
    )


def lz4_bomb(i: int) -> bytes:
    """A frame body of about 66 KB that decompresses to 16 MiB of empty arrays."""
    body = bomb_body(i, MAX_FRAME - 256)
    return bytes([FLAG_LZ4]) + lz4.block.compress(body)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp("wire-limits")
    with server_process(tmp, "--max-pending-output", str(8 * MiB)) as srv:
        yield srv


def test_the_decoder_stops_at_its_item_cap_before_building_the_bomb() -> None:
    plain = b"\x00" + bomb_body(1, 4 * MiB)
    started = time.process_time()
    with pytest.raises(ProtocolError) as exc:
        decode_messages(plain, max_items=1 << 16)
    assert exc.value.reason == "too_many_items"
    # A trusted peer's frame (no cap) still decodes the same bytes.
    assert len(decode_messages(plain)[0]["a"]) == 4 * MiB
    assert time.process_time() - started < 60  # sanity: it finished at all


def test_a_lz4_msgpack_bomb_is_refused_without_being_built(server: ServerProc) -> None:
    other = RawPeer.connect(server.port)
    peer = RawPeer.connect(server.port)
    try:
        frame = peer.seal_plain(lz4_bomb(7))
        assert len(frame) < 100_000  # what the attacker sends
        with PeakRss(server.proc.pid) as rss:
            peer.sock.sendall(frame)
            assert peer.closed_by_server(60)
            wait_until(
                lambda: counter(server.stats(), "rejected_too_many_items") >= 1,
                30,
                "the bomb to be refused",
            )
        # Unpacked, it is 1.2 GiB of lists; refused, a few MiB of decompressed bytes.
        assert rss.growth < 200 * MiB, f"server grew by {rss.growth >> 20} MiB"
        assert other.call("echo", "still here") == "still here"
    finally:
        peer.close()
        other.close()


def test_a_batch_of_many_small_bombs_is_refused_as_one_frame(server: ServerProc) -> None:
    other = RawPeer.connect(server.port)
    peer = RawPeer.connect(server.port)
    try:
        # Entries of 16 KiB each unpack cheaply on their own; together, 16
        # million lists. The cap counts the whole frame.
        entry = b"\x00" + bomb_body(1, 16 * 1024 - 64)
        plain = b"\x02" + (struct.pack(">I", len(entry)) + entry) * 1000
        assert len(plain) < MAX_FRAME
        before = counter(server.stats(), "rejected_too_many_items")
        with PeakRss(server.proc.pid) as rss:
            peer.sock.sendall(peer.seal_plain(plain))
            assert peer.closed_by_server(60)
            wait_until(
                lambda: counter(server.stats(), "rejected_too_many_items") > before,
                30,
                "the batch to be refused",
            )
        assert rss.growth < 200 * MiB, f"server grew by {rss.growth >> 20} MiB"
        # A batch of more messages than any sender puts in one is refused too.
        many = RawPeer.connect(server.port)
        try:
            small = b"\x00" + msgpack.packb({"t": "p"})
            batch = b"\x02" + (struct.pack(">I", len(small)) + small) * (MAX_BATCH_ITEMS + 1)
            many.sock.sendall(many.seal_plain(batch))
            assert many.closed_by_server(30)
        finally:
            many.close()
        assert other.call("echo", 1) == 1
    finally:
        peer.close()
        other.close()


def test_a_peer_that_does_not_read_its_replies_is_closed(server: ServerProc) -> None:
    other = RawPeer.connect(server.port)
    peer = RawPeer.connect(server.port)
    try:
        before = counter(server.stats(), "closed_slow_readers")
        # 400 small requests for 1 MiB replies each, and not a byte read back.
        asks = b"".join(
            peer.seal({"t": "q", "i": 100 + k, "m": "blob", "a": MiB}) for k in range(400)
        )
        with PeakRss(server.proc.pid) as rss:
            peer.sock.sendall(asks)
            wait_until(
                lambda: counter(server.stats(), "closed_slow_readers") > before,
                60,
                "the server to give up on the peer that does not read",
            )
        # Without the cap, all 400 MiB of replies would wait in its buffers.
        assert rss.growth < 120 * MiB, f"server grew by {rss.growth >> 20} MiB"
        stats = server.stats()
        assert counter(stats, "unsent_reply_bytes") < 8 * MiB
        assert other.call("echo", "fine") == "fine"
    finally:
        peer.close()
        other.close()


def test_a_reply_too_large_for_a_frame_is_an_error_and_the_connection_goes_on(
    server: ServerProc,
) -> None:
    with RawPeer.connect(server.port) as peer:
        peer.send_msg({"t": "q", "i": 1, "m": "blob", "a": MAX_FRAME})
        reply = peer.recv_msg()
        assert reply["i"] == 1 and reply["e"]["code"] == "too_large", reply
        assert "\n" not in reply["e"]["message"]
        # The same connection answers the next call.
        assert peer.call("echo", [1, 2]) == [1, 2]


# -- stream windows (in-process) -------------------------------------------------------


def test_a_stream_sends_no_more_than_its_window_ahead_of_its_reader() -> None:
    uvloop.run(asyncio.wait_for(_stream_window(), 60))


async def _stream_window() -> None:
    produced: list[int] = []

    async def numbers(conn: Connection, args: Any) -> AsyncIterator[int]:
        for k in range(200):
            produced.append(k)
            yield k

    server = RpcServer({"numbers": numbers}, lambda key_id: PSK if key_id == "c" else None)
    port = await server.start("127.0.0.1", 0)
    try:
        conn = await open_connection("127.0.0.1", port, key_id="c", psk=PSK)
        items = conn.stream("numbers", None, window=4)
        assert await items.__anext__() == 0
        # The reader holds back: the server sends its window and waits.
        for _ in range(100):
            if len(produced) >= 4:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        assert len(produced) <= 5, f"the server ran {len(produced)} items ahead"
        # Reading on gets every item, in order.
        rest = [x async for x in items]
        assert rest == list(range(1, 200))
        with pytest.raises(ValueError):
            await conn.stream("numbers", None, window=0).__anext__()
        conn.close()
    finally:
        await server.close()


def test_a_call_too_large_to_send_is_refused_locally() -> None:
    uvloop.run(asyncio.wait_for(_call_too_large(), 60))


async def _call_too_large() -> None:
    async def echo(conn: Connection, args: Any) -> Any:
        return args

    server = RpcServer({"echo": echo}, lambda key_id: PSK if key_id == "c" else None)
    port = await server.start("127.0.0.1", 0)
    try:
        conn = await open_connection("127.0.0.1", port, key_id="c", psk=PSK)
        with pytest.raises(RpcError) as exc:
            await conn.call("echo", bytes(MAX_FRAME))
        assert exc.value.code == "too_large"
        assert await conn.call("echo", "ok") == "ok"
        conn.close()
    finally:
        await server.close()
