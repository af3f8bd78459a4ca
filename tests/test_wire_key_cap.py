"""No one peer can take every connection a master serves. Past
`max_connections_per_key` the next connection with that key is refused in the
handshake, in words the client shows, while other keys still get in. Only
connections that proved the key count, so knowing a key id is not enough to
use up its share. And connections that never finish their handshake hold at
most a pool of their own, oldest dropped first. Real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from leptond.wire import Connection, RpcError, RpcServer, open_connection
from leptond.wire import handshake as hs
from leptond.wire.codec import FrameReader, frame
from tests.harness import ROOT, Cluster

KEYS = {"alice": b"a" * 32, "bob": b"b" * 32}
CAP = 3


async def echo(conn: Connection, args: Any) -> Any:
    return [conn.key_id, args]


async def serve(cap: int = CAP) -> tuple[RpcServer, int]:
    server = RpcServer({"echo": echo}, KEYS.get, max_connections_per_key=cap)
    return server, await server.start("127.0.0.1", 0)


async def dial(port: int, key_id: str, psk: bytes | None = None) -> Connection:
    return await open_connection(
        "127.0.0.1", port, key_id=key_id, psk=psk or KEYS[key_id], timeout_s=10
    )


async def until(cond: Any, what: str, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def run(coro: Any) -> None:
    uvloop.run(asyncio.wait_for(coro, 60))


def test_one_key_gets_its_share_and_no_more_and_others_still_get_in() -> None:
    async def body() -> None:
        server, port = await serve()
        conns: list[Connection] = []
        try:
            for i in range(CAP):
                conns.append(await dial(port, "alice"))
                assert await conns[-1].call("echo", i) == ["alice", i]
            try:
                extra = await dial(port, "alice")
            except RpcError as exc:
                assert exc.code == "too_many_connections", exc
                assert "'alice'" in exc.message and "close some" in exc.message
                assert "\n" not in exc.message
            else:
                extra.close()
                raise AssertionError("a connection past the key's cap was let in")
            assert server.counters["rejected_key_limit"] == 1
            # The refused one changed nothing for the others.
            assert await conns[0].call("echo", "still") == ["alice", "still"]
            bob = await dial(port, "bob")
            conns.append(bob)
            assert await bob.call("echo", 1) == ["bob", 1]
            # A freed slot is alice's again.
            conns.pop(0).close()
            await until(lambda: server._per_key["alice"] == CAP - 1, "the close to count")
            conns.append(await dial(port, "alice"))
            assert await conns[-1].call("echo", "again") == ["alice", "again"]
        finally:
            for c in conns:
                c.close()
            await server.close()

    run(body())


def test_a_peer_without_the_secret_cannot_use_up_a_keys_share() -> None:
    async def body() -> None:
        server, port = await serve()
        conns: list[Connection] = []
        held: list[asyncio.StreamWriter] = []
        try:
            # Half-open handshakes naming alice's key id, never proving it.
            for _ in range(CAP * 3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(frame(hs.client_hello(hs.HandshakeState(), "alice")))
                frames = FrameReader(256)
                answer: list[bytes] = []
                while not answer:
                    data = await reader.read(4096)
                    assert data, "the server closed a fresh handshake"
                    answer = frames.feed(data)
                assert hs.parse_server_hello(answer[0])[0] == hs.STATUS_OK
                held.append(writer)
            # Wrong secrets with her key id fail on their own...
            for _ in range(CAP * 3):
                try:
                    wrong = await dial(port, "alice", psk=b"x" * 32)
                except RpcError as exc:
                    assert exc.code == "unauthenticated", exc
                else:
                    wrong.close()
                    raise AssertionError("a wrong secret was let in")
            # ...and alice still has her whole share.
            for i in range(CAP):
                conns.append(await dial(port, "alice"))
                assert await conns[-1].call("echo", i) == ["alice", i]
        finally:
            for w in held:
                w.close()
            for c in conns:
                c.close()
            await server.close()

    run(body())


def test_no_cap_when_it_is_zero() -> None:
    async def body() -> None:
        server, port = await serve(cap=0)
        conns: list[Connection] = []
        try:
            for _ in range(CAP * 3):
                conns.append(await dial(port, "alice"))
            assert [await c.call("echo", 0) for c in conns] == [["alice", 0]] * (CAP * 3)
        finally:
            for c in conns:
                c.close()
            await server.close()

    run(body())


def test_leptonctl_says_in_one_line_that_its_key_is_at_its_cap(tmp_path: Path) -> None:
    from leptond.wire.tokens import parse_token

    cluster = Cluster(tmp_path, n_masters=1, master_args=["--max-connections-per-key", "2"])
    try:
        leader = cluster.start_masters()
        tok = parse_token(cluster.admin_token)

        async def body() -> None:
            held = [
                await open_connection(
                    "127.0.0.1", leader.rpc, key_id=tok.id, psk=tok.psk, timeout_s=10
                )
                for _ in range(2)
            ]
            try:
                out = cluster.ctl("nodes", check=False)
                assert out.returncode == 1, out
                lines = out.stderr.strip().splitlines()
                assert len(lines) == 1 and "close some and try again" in lines[0], out.stderr
                assert "Traceback" not in out.stderr
                # The master answers the held ones meanwhile, and a freed
                # slot lets the command through.
                assert isinstance(await held[0].call("nodes", {}), list)
            finally:
                held.pop().close()
            try:
                deadline = time.monotonic() + 30
                while cluster.ctl("nodes", check=False).returncode != 0:
                    assert time.monotonic() < deadline, "a freed slot was never given back"
                    await asyncio.sleep(0.2)
            finally:
                for c in held:
                    c.close()

        asyncio.run(asyncio.wait_for(body(), 120))
    finally:
        cluster.close()


def test_leptond_refuses_a_negative_cap_in_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "leptond.cli", "run", "--data-dir", str(tmp_path / "data"),
         "--secret-file", str(tmp_path / "cluster.key"),
         "--admin-token-file", str(tmp_path / "admin.token"),
         "--max-connections-per-key", "-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "leptond run: error: argument --max-connections-per-key: must be a whole number, "
        "0 or more, not '-1' (see leptond run --help)"
    )
    assert not (tmp_path / "data").exists()


def test_a_flood_of_unfinished_handshakes_holds_only_its_pool() -> None:
    async def body() -> None:
        server = RpcServer({"echo": echo}, KEYS.get, max_connections=64, max_handshakes=8)
        port = await server.start("127.0.0.1", 0)
        flood: list[asyncio.StreamWriter] = []
        conns: list[Connection] = []
        try:
            # Twice the whole cap of connections that never say a word.
            for _ in range(128):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                flood.append(writer)
            await until(lambda: server.counters["accepted"] >= 128, "the flood to be accepted")
            assert len(server._handshaking) <= 8
            assert server.counters["handshakes_dropped"] >= 120
            assert server.counters["over_capacity"] == 0
            # Real peers still get in, and their connections stay.
            for key in ("alice", "bob", "alice"):
                conns.append(await dial(port, key))
            for _ in range(16):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                flood.append(writer)
            await until(lambda: server.counters["accepted"] >= 147, "the second flood")
            assert [await c.call("echo", 1) for c in conns] == [
                ["alice", 1], ["bob", 1], ["alice", 1]
            ]  # fmt: skip
        finally:
            for w in flood:
                w.close()
            for c in conns:
                c.close()
            await server.close()

    run(body())
