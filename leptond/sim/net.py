"""A simulated network of RPC connections between agents, people and masters.

Messages, not bytes: a connection carries requests, answers, pushes and
its closing, each delivered after a latency drawn from the run's generator.
Faults (etcd raft's in-memory network: drop, cut, isolate):

- a cut link loses everything sent over it, and a new connection across it
  times out, as a partition does;
- a message may be lost (the call it belongs to times out and is retried
  with the same request id), delivered twice (a retry that got through
  twice), or late enough to overtake later ones.

The two ends stand in for leptond.wire.connection.Connection where the
services use one: the agent side is what ClusterClient calls through (its
`dial` comes from here), the master side is what the RPC handlers get as
`conn` (its context, `notify`, `close`). Handlers run as tasks, one per
request, and are cancelled when their connection closes, as there.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import random
from collections.abc import Callable, Mapping
from types import CoroutineType
from typing import Any, Protocol, cast

from ..wire.connection import Connection, Handler
from ..wire.errors import INTERNAL, UNKNOWN_METHOD, ConnectionLost, RpcError
from .vtime import SimClock

LATENCY_S = (0.0002, 0.003)
LATE_S = (0.01, 0.4)  # a late message: it overtakes, or is overtaken
HANDSHAKE_RTTS = 2


class Server(Protocol):
    """A master as its connections see it."""

    name: str

    def accept(self, conn: ServerEnd) -> dict[str, Handler]:
        """Set the connection's identity (context); its handlers."""
        ...

    def closed(self, conn: ServerEnd) -> None: ...

    def on_error(self, what: str) -> None:
        """A handler raised something other than RpcError: a bug."""
        ...


class Network:
    def __init__(self, clock: SimClock, rng: random.Random) -> None:
        self.clock = clock
        self.rng = rng
        self.cut: set[frozenset[str]] = set()
        self.loss = 0.0
        self.dup = 0.0
        self.late = 0.0
        self.servers: dict[str, Server] = {}
        self.clocks: dict[str, SimClock] = {}  # endpoint -> what delivers to it
        self.sent = self.dropped = 0

    def linked(self, a: str, b: str) -> bool:
        # Most of a run has no link cut: no frozenset to make for each message.
        return not self.cut or frozenset((a, b)) not in self.cut

    def send(
        self, src: str, dst: str, fn: Callable[..., Any], *args: Any, sure: bool = False
    ) -> None:
        """Deliver `fn(*args)` at `dst` after a latency, unless the message is
        lost. `sure`: only a cut link loses it (a connection's close, which
        TCP retransmits)."""
        self.sent += 1
        rng = self.rng
        cut = self.cut  # linked(), in line: most of a run has no link cut
        if (cut and frozenset((src, dst)) in cut) or (
            not sure and self.loss and rng.random() < self.loss
        ):
            self.dropped += 1
            return
        copies = 2 if not sure and self.dup and rng.random() < self.dup else 1
        clock = self.clocks.get(dst, self.clock)
        lo, hi = LATENCY_S
        while copies:
            copies -= 1
            delay = lo + (hi - lo) * rng.random()  # rng.uniform(lo, hi), in line
            if self.late and rng.random() < self.late:
                delay += rng.uniform(*LATE_S)
            clock.call_later(delay, self._arrive, src, dst, fn, args)

    def _arrive(self, src: str, dst: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        # A link cut while the message was on its way loses it too.
        cut = self.cut
        if not cut or frozenset((src, dst)) not in cut:
            fn(*args)

    def dialer(self, me: str, clock: SimClock) -> Callable[..., Any]:
        """The `dial` of a ClusterClient at endpoint `me` (wire/client.py)."""

        async def dial(
            host: str,
            port: int,
            *,
            key_id: str,
            psk: bytes,
            handlers: Mapping[str, Handler] | None = None,
            timeout_s: float = 5.0,
            on_local_close: Callable[[Connection], None] | None = None,
        ) -> Connection:
            server = self.servers.get(host)
            if server is None:
                raise RpcError("unavailable", f"cannot reach {host}:{port}: no such host")
            rtt = 2 * self.rng.uniform(*LATENCY_S) * HANDSHAKE_RTTS
            if not self.linked(me, host):
                await clock.sleep(timeout_s)
                raise RpcError("unavailable", f"cannot reach {host}:{port}: timed out")
            await clock.sleep(rtt)
            if not self.linked(me, host):
                await clock.sleep(max(0.0, timeout_s - rtt))
                raise RpcError("unavailable", f"cannot reach {host}:{port}: timed out")
            client = ClientEnd(self, me, host, clock, dict(handlers or {}))
            client.on_local_close = on_local_close
            server_end = ServerEnd(self, host, me, key_id, server, client)
            client.peer_end = server_end
            server_end.handlers = server.accept(server_end)
            return cast(Connection, client)

        return dial


class _CallTimeout(Exception):
    pass


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(_CallTimeout())


class ClientEnd:
    """The calling side of a connection (an agent's or a person's).

    How it ends matters to the master (leptond.wire.connection): a close
    from this side, or the death of its process (whose kernel closes the
    socket), reaches the master as an end-of-stream (`peer_closed` there); a
    reset (`reset`, or a close after `reset_on_close`) does not count as
    one. `on_local_close` runs just before this side closes or resets, as
    Connection's does, but not when the process dies (`died`): a dead agent
    runs nothing."""

    def __init__(
        self, net: Network, me: str, peer: str, clock: SimClock, handlers: dict[str, Handler]
    ) -> None:
        self.net = net
        self.me = me
        self.peer = peer
        self.clock = clock
        self.handlers = handlers
        self.peer_end: ServerEnd | None = None
        self.closed = False
        self.closed_locally = False
        self.on_local_close: Callable[[Connection], None] | None = None
        self._rst = False  # this side's close sends a reset
        self.context: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._pushed: set[asyncio.Task[Any]] = set()

    def is_closing(self) -> bool:
        return self.closed

    async def call(self, method: str, args: Any = None, timeout_s: float = 30.0) -> Any:
        if self.closed or self.peer_end is None:
            raise ConnectionLost()
        i = next(self._ids)
        fut: asyncio.Future[Any] = self.clock.loop.create_future()
        self._calls[i] = fut
        timer = self.clock.call_later(timeout_s, _expire, fut)
        try:
            self.net.send(self.me, self.peer, self.peer_end.request, i, method, args)
            return await fut
        except _CallTimeout:
            raise RpcError("timeout", f"{method} got no answer within {timeout_s:g}s") from None
        finally:
            timer.cancel()
            self._calls.pop(i, None)

    def answer(self, i: int, err: dict[str, Any] | None, result: Any) -> None:
        fut = self._calls.pop(i, None)
        if fut is None or fut.done():
            return
        if err is not None:
            fut.set_exception(RpcError.from_wire(err))
        else:
            fut.set_result(result)

    def push(self, method: str, args: Any) -> None:
        """A notification from the master (start, stop)."""
        if self.closed:
            return
        handler = self.handlers.get(method)
        if handler is None:
            return
        task = self.clock.loop.create_task(_quiet(handler, cast(Connection, self), args))
        self._pushed.add(task)
        task.add_done_callback(self._pushed.discard)

    def close(self) -> None:
        if self.closed:
            return
        self._closing_here()
        self._end(fin=not self._rst)

    def reset(self) -> None:
        """End the connection now with a reset (a planned stop's)."""
        self._rst = True
        self.close()

    def abort(self) -> None:
        """Connection.abort: this side ends it at once (with an end-of-stream
        unless `reset_on_close` was asked)."""
        self.close()

    def reset_on_close(self) -> None:
        """Make this side's close send a reset instead of an end-of-stream."""
        self._rst = True

    def died(self) -> None:
        """The process died (kill -9): nothing of it runs, and its kernel
        closes the socket, which the master reads as an end-of-stream."""
        if not self.closed:
            self._end(fin=True)

    def _closing_here(self) -> None:
        if self.closed_locally:
            return
        self.closed_locally = True
        if self.on_local_close is not None:
            self.on_local_close(cast(Connection, self))

    def _end(self, fin: bool) -> None:
        self._teardown()
        if self.peer_end is not None:
            self.net.send(self.me, self.peer, self.peer_end.ended_by_peer, fin, sure=True)

    def ended_by_peer(self) -> None:
        self._teardown()

    def _teardown(self) -> None:
        self.closed = True
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(ConnectionLost("connection closed by peer"))
        self._calls.clear()
        for t in list(self._pushed):
            t.cancel()


class ServerEnd:
    """The master's side of a connection: the `conn` its handlers get."""

    def __init__(
        self, net: Network, me: str, peer: str, key_id: str, server: Server, client: ClientEnd
    ) -> None:
        self.net = net
        self.me = me
        self.peer = peer
        self.key_id = key_id
        self.server = server
        self.client = client
        self.context: dict[str, Any] = {}
        self.handlers: dict[str, Handler] = {}
        self.closed = False
        # Connection.peer_closed: the agent's end-of-stream was read here
        # (not a reset, not our own close).
        self.peer_closed = False
        self._served: dict[int, asyncio.Task[None]] = {}

    def is_closing(self) -> bool:
        return self.closed

    def request(self, i: int, method: str, args: Any) -> None:
        if self.closed or i in self._served:
            return  # a duplicate of a request still being served is dropped
        handler = self.handlers.get(method)
        if handler is None:
            err = {"code": UNKNOWN_METHOD, "message": f"unknown method {method!r}"}
            self.net.send(self.me, self.peer, self.client.answer, i, err, None)
            return
        loop = self.net.clock.loop
        self._served[i] = loop.create_task(self._serve(i, method, handler, args))

    async def _serve(self, i: int, method: str, handler: Handler, args: Any) -> None:
        err: dict[str, Any] | None = None
        result: Any = None
        try:
            out = handler(cast(Connection, self), args)
            # A plain function's answer is the result (the real connection
            # serves those inline; here they run in this task's first step,
            # as a coroutine that never waits would). Most handlers are
            # coroutines: told apart by their type before inspect's checks.
            if type(out) is CoroutineType:
                result = await out
            elif type(out) is dict:  # a heartbeat's answer: no awaitable to look for
                result = out
            else:
                assert not inspect.isasyncgen(out), f"{method} is a stream; the simulation has none"
                result = await out if inspect.isawaitable(out) else out
        except RpcError as exc:
            err = exc.to_wire()
        except asyncio.CancelledError:
            self._served.pop(i, None)
            raise
        except Exception as exc:
            self.server.on_error(f"handler {method} raised {type(exc).__name__}: {exc}")
            err = {"code": INTERNAL, "message": f"internal error in {method}: {exc}"}
        self._served.pop(i, None)
        if not self.closed:
            self.net.send(self.me, self.peer, self.client.answer, i, err, result)

    def notify(self, method: str, args: Any = None) -> None:
        if self.closed:
            raise ConnectionLost()
        self.net.send(self.me, self.peer, self.client.push, method, args)

    def close(self) -> None:
        if self.closed:
            return
        self._teardown()
        self.net.send(self.me, self.peer, self.client.ended_by_peer, sure=True)

    def abort(self) -> None:
        self.close()

    def ended_by_peer(self, fin: bool) -> None:
        """The other side ended the connection: with an end-of-stream (`fin`)
        or a reset."""
        if not self.closed:
            self.peer_closed = fin
            self._teardown()

    def _teardown(self) -> None:
        self.closed = True
        for t in list(self._served.values()):
            t.cancel()
        self._served.clear()
        self.server.closed(self)


async def _quiet(handler: Handler, conn: Connection, args: Any) -> None:
    """A notification's handler, run as its own task (Connection._on_notify);
    what it raises, other than a lost call, is a bug the run reports."""
    out = handler(conn, args)
    if inspect.isawaitable(out):
        try:
            await out
        except RpcError:
            pass
