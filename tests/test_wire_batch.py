"""Batches: several small messages sealed as one frame, between peers that
both said in their hello that they read them, and never to a peer that did not."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop

from leptond.wire import handshake as hs
from leptond.wire import open_connection
from leptond.wire.codec import (
    FLAG_BATCH,
    BatchBuilder,
    FrameReader,
    Opener,
    Sealer,
    decode_body,
    decode_messages,
    encode_body,
    frame,
)
from tests.wire_raw import PSK, RawPeer, ServerProc, server_process

N = 200


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with server_process(tmp_path_factory.mktemp("wire_batch")) as srv:
        yield srv


def frames_until(peer: RawPeer, n_replies: int) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Reads frames until `n_replies` responses came; (responses, opened plaintexts)."""
    assert peer.opener is not None
    replies: list[dict[str, Any]] = []
    plains: list[bytes] = []
    while len(replies) < n_replies:
        plain = peer.opener.open(peer.recv_frame())
        plains.append(plain)
        replies += [m for m in decode_messages(plain) if m["t"] == "r"]
    return replies, plains


def test_a_peer_that_reads_batches_gets_them_and_may_send_them(server: ServerProc) -> None:
    with RawPeer.open(server.port) as peer:
        peer.handshake()
        peer.send_msg({"t": "h", "b": 1})
        assert peer.recv_msg() == {"t": "h", "b": 1}
        batch = BatchBuilder()
        for i in range(1, N + 1):
            batch.add(encode_body({"t": "q", "i": i, "m": "echo", "a": i * 10}))
        peer.sock.sendall(peer.seal_plain(bytes(batch.take())))
        replies, plains = frames_until(peer, N)
        assert sorted((r["i"], r["r"]) for r in replies) == [(i, i * 10) for i in range(1, N + 1)]
        # The replies of one loop iteration went out sealed together.
        assert len(plains) < N
        assert any(p[0] == FLAG_BATCH for p in plains)


def test_a_peer_that_did_not_say_so_never_gets_a_batch(server: ServerProc) -> None:
    with RawPeer.connect(server.port) as peer:  # its hello has no "b"
        requests = b"".join(
            peer.seal({"t": "q", "i": i, "m": "echo", "a": i}) for i in range(1, N + 1)
        )
        peer.sock.sendall(requests)  # all in flight at once
        got = []
        for _ in range(N):
            assert peer.opener is not None
            plain = peer.opener.open(peer.recv_frame())
            assert plain[0] != FLAG_BATCH
            got.append(decode_body(plain))
        assert sorted((m["i"], m["r"]) for m in got) == [(i, i) for i in range(1, N + 1)]


class OldServer:
    """A server as it was before batches: it answers the hello without "b",
    reads one message per frame and answers echo calls, one frame each."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frames = 0
        self.batches = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            sock, _ = self.listener.accept()
            with sock:
                self._talk(sock)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    def _talk(self, sock: socket.socket) -> None:
        reader = FrameReader()
        pending: list[bytes] = []

        def next_frame() -> bytes | None:
            while not pending:
                data = sock.recv(1 << 16)
                if not data:
                    return None
                pending.extend(reader.feed(data))
            return pending.pop(0)

        hello = next_frame()
        assert hello is not None
        _, nonce, pub = hs.parse_client_hello(hello)
        state = hs.HandshakeState()
        keys = hs.derive_keys(state, pub, nonce, PSK, is_client=False)
        sock.sendall(frame(hs.server_hello(state)))
        sealer, opener = Sealer(keys.send), Opener(keys.recv)
        while (payload := next_frame()) is not None:
            plain = opener.open(payload)
            self.frames += 1
            if plain[0] == FLAG_BATCH:
                self.batches += 1
                continue  # an old server would have dropped the connection here
            msg = decode_body(plain)
            if msg["t"] == "h":
                reply = {"t": "h"}
            elif msg["t"] == "q":
                reply = {"t": "r", "i": msg["i"], "r": msg["a"]}
            else:
                continue
            sock.sendall(frame(sealer.seal(encode_body(reply))))

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def test_a_client_sends_no_batch_to_a_server_that_did_not_say_so() -> None:
    old = OldServer()
    try:

        async def calls() -> list[Any]:
            conn = await open_connection("127.0.0.1", old.port, key_id="cluster", psk=PSK)
            try:
                return list(await asyncio.gather(*(conn.call("echo", i) for i in range(N))))
            finally:
                conn.close()

        assert uvloop.run(asyncio.wait_for(calls(), 60)) == list(range(N))
    finally:
        old.close()
    assert old.error is None, old.error
    assert old.batches == 0
    assert old.frames == N + 1  # the hello and one frame per call


def test_batched_and_single_frames_keep_their_order(server: ServerProc) -> None:
    """One stream whose items alternate between small (batched), medium (a
    frame of their own) and big (written at once) arrives in order."""
    sizes = [10, 100_000, 10, 20_000, 10, 10, 100_000, 3, 20_000, 10] * 5

    async def run() -> list[int]:
        conn = await open_connection("127.0.0.1", server.port, key_id="cluster", psk=PSK)
        try:
            return [len(x) async for x in conn.stream("stream", {"sizes": sizes})]
        finally:
            conn.close()

    assert uvloop.run(asyncio.wait_for(run(), 60)) == sizes
