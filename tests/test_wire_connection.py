"""Connection behaviour end to end on 127.0.0.1, on uvloop and on asyncio's own loop."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from leptond.rpcstats import RpcStats
from leptond.wire import Connection, RpcError, RpcServer, open_connection
from leptond.wire.client import ClusterClient
from leptond.wire.codec import FrameReader, decode_messages, encode_body, frame
from leptond.wire.connection import FLUSH_AT

PSK = b"k" * 32


Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a test body on uvloop (what the daemons use) or on asyncio's own loop."""

    def runner(coro: Coroutine[Any, Any, None]) -> None:
        if request.param == "uvloop":
            uvloop.run(asyncio.wait_for(coro, 60))
        else:
            asyncio.run(asyncio.wait_for(coro, 60))

    return runner


async def echo(conn: Connection, args: Any) -> Any:
    return args


async def fail(conn: Connection, args: Any) -> Any:
    raise RpcError("not_found", "no such job: 42")


async def start(handlers: dict[str, Any], **kw: Any) -> tuple[RpcServer, int]:
    server = RpcServer(handlers, lambda key_id: PSK if key_id == "cluster" else None, **kw)
    return server, await server.start("127.0.0.1", 0)


async def connect(port: int, **kw: Any) -> Connection:
    return await open_connection("127.0.0.1", port, key_id="cluster", psk=PSK, **kw)


def test_calls_errors_and_unknown_methods(run: Runner) -> None:
    run(_calls_errors_and_unknown_methods())


async def _calls_errors_and_unknown_methods() -> None:
    server, port = await start({"echo": echo, "fail": fail})
    try:
        conn = await connect(port)
        assert await conn.call("echo", {"a": [1, b"x"]}) == {"a": [1, b"x"]}
        with pytest.raises(RpcError) as err:
            await conn.call("fail")
        assert (err.value.code, str(err.value)) == ("not_found", "no such job: 42")
        with pytest.raises(RpcError) as err:
            await conn.call("nosuch")
        assert err.value.code == "unknown_method"
        results = await asyncio.gather(*(conn.call("echo", k) for k in range(300)))
        assert results == list(range(300))
        conn.close()
    finally:
        await server.close()


def test_plain_framing_works_for_the_benchmark_baseline(run: Runner) -> None:
    run(_plain_framing_works_for_the_benchmark_baseline())


async def _plain_framing_works_for_the_benchmark_baseline() -> None:
    server, port = await start({"echo": echo}, sealed=False)
    try:
        conn = await connect(port, sealed=False)
        assert await conn.call("echo", b"x" * 200_000) == b"x" * 200_000
        conn.close()
    finally:
        await server.close()


def test_wrong_key_and_unknown_key_id_give_one_clear_error(run: Runner) -> None:
    run(_wrong_key_and_unknown_key_id_give_one_clear_error())


async def _wrong_key_and_unknown_key_id_give_one_clear_error() -> None:
    server, port = await start({"echo": echo})
    try:
        with pytest.raises(RpcError) as err:
            await open_connection("127.0.0.1", port, key_id="cluster", psk=b"w" * 32)
        assert err.value.code == "unauthenticated"
        with pytest.raises(RpcError) as err:
            await open_connection("127.0.0.1", port, key_id="nobody", psk=PSK)
        assert err.value.code == "unauthenticated"
        assert "nobody" in str(err.value)
        assert server.stats()["rejected"] == 2
    finally:
        await server.close()


def test_a_big_push_right_after_the_handshake_reaches_the_client(run: Runner) -> None:
    run(_a_big_push_right_after_the_handshake_reaches_the_client())


async def _a_big_push_right_after_the_handshake_reaches_the_client() -> None:
    # The server's hello and a push sent on connect leave in one write; the
    # client must not judge the push against the small pre-handshake cap.
    got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def assigned(conn: Connection, args: Any) -> None:
        got.set_result(args)

    def on_connect(conn: Connection) -> None:
        conn.notify("assigned", {"tasks": ["t"] * 500})

    server, port = await start({}, on_connect=on_connect)
    try:
        conn = await connect(port, handlers={"assigned": assigned})
        assert await asyncio.wait_for(got, 5) == {"tasks": ["t"] * 500}
        conn.close()
    finally:
        await server.close()


def test_a_stream_that_never_awaits_hands_its_output_to_the_transport(run: Runner) -> None:
    run(_a_stream_that_never_awaits_hands_its_output_to_the_transport())


async def _a_stream_that_never_awaits_hands_its_output_to_the_transport() -> None:
    # Frames produced in one loop iteration are gathered and written together,
    # but a handler that never awaits must not pile its whole output up in
    # that buffer: past FLUSH_AT it goes to the transport, whose flow control
    # then pauses the stream.
    item = os.urandom(10_000)  # incompressible, so frames stay this big
    most_held = 0

    async def flood(conn: Connection, args: Any) -> AsyncIterator[bytes]:
        nonlocal most_held
        for _ in range(300):  # 3 MB, never awaiting anything
            most_held = max(most_held, conn.pending_output)
            yield item

    server, port = await start({"flood": flood})
    try:
        conn = await connect(port)
        n = 0
        async for got in conn.stream("flood"):
            assert got == item
            n += 1
        assert n == 300
        assert 0 < most_held <= FLUSH_AT + len(item) + 100
        conn.close()
    finally:
        await server.close()


def test_idle_connections_are_closed_but_busy_ones_are_not(run: Runner) -> None:
    run(_idle_connections_are_closed_but_busy_ones_are_not())


async def _idle_connections_are_closed_but_busy_ones_are_not() -> None:
    async def slow(conn: Connection, args: Any) -> str:
        await asyncio.sleep(1.5)
        return "done"

    server, port = await start({"slow": slow, "echo": echo}, idle_timeout_s=0.5)
    try:
        idle = await connect(port)
        busy = await connect(port)
        assert await busy.call("slow", timeout_s=10) == "done"
        await asyncio.wait_for(idle.closed, 5)
        assert server.stats()["idle_closed"] >= 1
    finally:
        await server.close()


def test_a_call_that_times_out_cancels_the_handler(run: Runner) -> None:
    run(_a_call_that_times_out_cancels_the_handler())


async def _a_call_that_times_out_cancels_the_handler() -> None:
    cancelled = asyncio.Event()

    async def hang(conn: Connection, args: Any) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server, port = await start({"hang": hang, "echo": echo})
    try:
        conn = await connect(port)
        with pytest.raises(RpcError) as err:
            await conn.call("hang", timeout_s=0.2)
        assert err.value.code == "timeout"
        await asyncio.wait_for(cancelled.wait(), 5)
        assert await conn.call("echo", 1) == 1  # the connection is still good
        conn.close()
    finally:
        await server.close()


def test_calls_in_flight_fail_when_the_server_goes_away(run: Runner) -> None:
    run(_calls_in_flight_fail_when_the_server_goes_away())


async def _calls_in_flight_fail_when_the_server_goes_away() -> None:
    async def hang(conn: Connection, args: Any) -> None:
        await asyncio.sleep(60)

    server, port = await start({"hang": hang})
    conn = await connect(port)
    call = asyncio.ensure_future(conn.call("hang", timeout_s=30))
    await asyncio.sleep(0)
    await server.close()
    with pytest.raises(RpcError) as err:
        await asyncio.wait_for(call, 5)
    assert err.value.code == "unavailable"


def test_a_handshake_not_answered_in_time_is_retried_by_the_cluster_client(run: Runner) -> None:
    run(_a_handshake_not_answered_in_time_is_retried_by_the_cluster_client())


async def _a_handshake_not_answered_in_time_is_retried_by_the_cluster_client() -> None:
    # A leader too busy to answer a handshake within the client's connect
    # timeout (10,000 agents on a loaded machine) is a transient state: the
    # call is retried until its own deadline, as for a master that is down,
    # instead of ending at once with a protocol error. Here a relay in front
    # of a real server plays the busy leader: it accepts the first connection
    # and says nothing on it until the client gives up; later ones it relays.
    server, port = await start({"echo": echo})
    accepted = 0

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        if accepted == 1:
            with contextlib.suppress(OSError):
                while await r.read(65536):  # the client's hello, then its end
                    pass
            w.close()
            return
        ur, uw = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    front = await asyncio.start_server(relay, "127.0.0.1", 0)
    front_port = front.sockets[0].getsockname()[1]
    client = ClusterClient(
        [("127.0.0.1", front_port)], key_id="cluster", psk=PSK, connect_timeout_s=1.0
    )
    try:
        with pytest.raises(RpcError) as err:
            await open_connection("127.0.0.1", front_port, key_id="cluster", psk=PSK, timeout_s=1.0)
        assert err.value.code == "unavailable"
        assert "did not complete the handshake in 1s (a busy master" in str(err.value)
        accepted = 0  # the client's first connection meets the silent one again
        assert await client.call("echo", [1, "x"], timeout_s=30) == [1, "x"]
        assert accepted >= 2
    finally:
        await client.close()
        front.close()
        await server.close()


def test_plain_function_handlers_are_answered_inline_without_a_task(run: Runner) -> None:
    run(_plain_function_handlers_are_answered_inline_without_a_task())


async def _plain_function_handlers_are_answered_inline_without_a_task() -> None:
    # A handler that is a plain function (the leader's heartbeat) is served
    # in the read that brought its request: no task, and its answer is the
    # reply. Its errors are answered as a coroutine's are, the connection
    # lives on, and RpcStats counts it like any other.
    tasks_seen: list[asyncio.Task[Any] | None] = []

    def beat(conn: Connection, args: Any) -> dict[str, Any]:
        tasks_seen.append(asyncio.current_task())
        if args == "refuse":
            raise RpcError("unregistered", "register before sending heartbeats")
        if args == "bug":
            raise KeyError("oops")
        return {"echo": args}

    stats = RpcStats()
    wrapped = stats.wrap({"beat": beat, "echo": echo})
    # Counting keeps each handler's kind, so the connection serves it as it
    # would serve the handler itself.
    assert inspect.iscoroutinefunction(wrapped["echo"])
    assert not inspect.iscoroutinefunction(wrapped["beat"])
    server, port = await start(wrapped)
    try:
        conn = await connect(port)
        assert await conn.call("beat", 7) == {"echo": 7}
        assert tasks_seen == [None]
        with pytest.raises(RpcError) as err:
            await conn.call("beat", "refuse")
        assert (err.value.code, str(err.value)) == (
            "unregistered",
            "register before sending heartbeats",
        )
        with pytest.raises(RpcError) as err:
            await conn.call("beat", "bug")
        assert err.value.code == "internal"
        # Inline and task-served requests in the same frames, answered in full.
        calls = [conn.call("beat" if k % 2 else "echo", k) for k in range(300)]
        assert await asyncio.gather(*calls) == [{"echo": k} if k % 2 else k for k in range(300)]
        assert stats.requests["beat"] == 153
        assert stats.errors["beat", "unregistered"] == 1
        assert stats.errors["beat", "internal"] == 1
        assert set(tasks_seen) == {None}
        conn.close()
    finally:
        await server.close()


class _Transport(asyncio.Transport):
    """Records what the connection writes, and when."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


def test_answers_to_one_read_are_written_before_the_read_returns() -> None:
    async def body() -> None:
        # The answers a read's requests get inline leave in one write at the
        # end of that read, not from a callback of a later loop iteration.
        def beat(conn: Connection, args: Any) -> Any:
            return args

        conn = Connection(is_client=False, handlers={"beat": beat}, sealed=False)
        transport = _Transport()
        conn.connection_made(transport)
        hello = frame(encode_body({"t": "h", "b": 1}))
        conn.data_received(hello + frame(encode_body({"t": "q", "i": 1, "m": "beat", "a": 5})))
        assert len(transport.writes) == 1
        got = FrameReader().feed(transport.writes[0])
        assert [decode_messages(f) for f in got] == [
            [{"t": "h", "b": 1}, {"t": "r", "i": 1, "r": 5}]
        ]
        conn.data_received(
            b"".join(frame(encode_body({"t": "q", "i": i, "m": "beat", "a": i})) for i in (2, 3))
        )
        assert len(transport.writes) == 2
        (batch,) = FrameReader().feed(transport.writes[1])
        assert decode_messages(batch) == [{"t": "r", "i": 2, "r": 2}, {"t": "r", "i": 3, "r": 3}]
        conn.connection_lost(None)

    asyncio.run(body())
