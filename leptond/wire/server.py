"""The RPC server: accepts connections, enforces limits, counts bad input."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Collection, Mapping

from ..clock import REAL
from .budget import BufferBudget, OutputMeter
from .codec import MAX_FRAME
from .connection import MAX_PENDING_OUTPUT, REQUEST_MAX_ITEMS, Connection, Handler, PskLookup
from .errors import ProtocolError
from .ratelog import RateLimitedLog

log = logging.getLogger("lepton.wire")


class RpcServer:
    """Serves sealed RPC on one TCP port.

    Limits: a handshake must finish within `handshake_timeout_s`; a connection
    with no traffic for `idle_timeout_s` is closed; at most `max_connections`
    are open at once (the next one is closed at accept), and at most
    `max_connections_per_key` of them authenticated with one key (0: no such
    cap), so that one token cannot take every slot from the others, agents'
    included: the next one with that key is refused in the handshake, in words
    its client shows. Only authenticated connections count, so a peer that
    knows a key id but not its secret cannot use up that key's share. At most
    `max_handshakes` connections are still in their handshake: past that the
    oldest of them is dropped to make room (as a SYN queue drops its oldest
    embryonic entry), so a flood of connections that never authenticate holds
    only that many slots, and a real peer, whose handshake takes a round trip
    or two, gets in unless the flood turns over that whole pool in that time.
    Partly received large
    frames hold at most `max_buffered_bytes` in all: a connection whose frame
    does not fit stops reading until it does, and one that does not finish a
    reserved frame within `frame_timeout_s` is closed (see budget.py); the
    same budget holds large frames while their requests are served. Replies
    waiting for a peer that does not read them hold at most
    `max_pending_output` per connection and `max_buffered_bytes` in all
    (connection.py). A frame unpacks into at most `max_items` msgpack items.
    Only the methods in `notifications` are served when sent as notifications,
    at most `MAX_NOTIFY_IN_FLIGHT` at a time per connection (connection.py).
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        psk_lookup: PskLookup,
        *,
        max_connections: int = 4096,
        max_connections_per_key: int = 0,
        max_handshakes: int | None = None,
        handshake_timeout_s: float = 5.0,
        idle_timeout_s: float = 120.0,
        on_connect: Callable[[Connection], None] | None = None,
        on_disconnect: Callable[[Connection], None] | None = None,
        sealed: bool = True,
        max_buffered_bytes: int = 256 * 1024 * 1024,
        frame_timeout_s: float = 60.0,
        max_pending_output: int = MAX_PENDING_OUTPUT,
        max_items: int = REQUEST_MAX_ITEMS,
        notifications: Collection[str] = (),
    ) -> None:
        if max_buffered_bytes < MAX_FRAME:
            raise ValueError(
                f"the buffer budget ({max_buffered_bytes} bytes) must hold at least one "
                f"frame of the largest size ({MAX_FRAME} bytes)"
            )
        self.handlers = handlers
        self.psk_lookup = psk_lookup
        self.max_connections = max_connections
        self.max_connections_per_key = max_connections_per_key
        # Authenticated connections per key id (those in `_keyed`).
        self._per_key: Counter[str] = Counter()
        self._keyed: set[Connection] = set()
        # Connections still in their handshake, oldest first (a dict keeps
        # insertion order and removes in O(1)).
        self.max_handshakes = (
            max(64, max_connections // 4) if max_handshakes is None else max_handshakes
        )
        self._handshaking: dict[Connection, None] = {}
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.sealed = sealed
        self.budget = BufferBudget(max_buffered_bytes)
        self.output = OutputMeter(max_buffered_bytes)
        self.max_pending_output = max_pending_output
        self.max_items = max_items
        # The only methods a client may send as notifications (no reply):
        # anything else sent that way is dropped (connection.py).
        self.notifications = frozenset(notifications)
        self.frame_timeout_s = frame_timeout_s
        self.connections: set[Connection] = set()
        self.counters: Counter[str] = Counter()
        self._log = RateLimitedLog(log)
        self._server: asyncio.Server | None = None
        self._reaper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._make, host, port, backlog=1024, reuse_address=True
        )
        self._reaper = loop.create_task(self._reap_idle())
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    def _make(self) -> Connection:
        conn = Connection(
            is_client=False,
            handlers=self.handlers,
            psk_lookup=self.psk_lookup,
            on_error=self._on_error,
            on_close=self._on_close,
            handshake_timeout_s=self.handshake_timeout_s,
            sealed=self.sealed,
            budget=self.budget,
            frame_timeout_s=self.frame_timeout_s,
            max_items=self.max_items,
            output=self.output,
            max_pending_output=self.max_pending_output,
            notifications=self.notifications,
            admit_key=self._admit_key if self.max_connections_per_key else None,
        )
        if self._handshaking and (
            len(self._handshaking) >= self.max_handshakes
            or len(self.connections) >= self.max_connections
        ):
            self._drop_oldest_handshake()
        if len(self.connections) >= self.max_connections:
            self.counters["over_capacity"] += 1
            self._log.warning(
                "over_capacity", f"refusing connection: {self.max_connections} already open"
            )
            conn.ready.add_done_callback(lambda _: None)
            asyncio.get_running_loop().call_soon(conn.abort)
        else:
            self.connections.add(conn)
            self._handshaking[conn] = None
            conn.ready.add_done_callback(lambda fut: self._on_ready(conn, fut))
        self.counters["accepted"] += 1
        return conn

    def _drop_oldest_handshake(self) -> None:
        oldest = next(iter(self._handshaking))
        del self._handshaking[oldest]
        self.connections.discard(oldest)
        self.counters["handshakes_dropped"] += 1
        self._log.warning(
            "handshakes_dropped",
            f"dropping the oldest unfinished handshake: {self.max_handshakes} "
            "connections are in their handshake at once",
        )
        asyncio.get_running_loop().call_soon(oldest.abort)

    def _admit_key(self, key_id: str) -> bool:
        return self._per_key[key_id] < self.max_connections_per_key

    def _on_ready(self, conn: Connection, fut: asyncio.Future[None]) -> None:
        self._handshaking.pop(conn, None)
        if fut.cancelled() or fut.exception() is not None or conn not in self.connections:
            return
        if self.max_connections_per_key:
            # Several handshakes of one key may pass the check at the hello
            # before any of them is counted: the count is settled here.
            if not self._admit_key(conn.key_id):
                self.counters["over_key_capacity"] += 1
                self._log.warning(
                    "over_key_capacity",
                    f"closing a connection with key id {conn.key_id!r}: "
                    f"{self.max_connections_per_key} already open with it",
                )
                self.connections.discard(conn)
                conn.abort()
                return
            self._per_key[conn.key_id] += 1
            self._keyed.add(conn)
        self.counters["authenticated"] += 1
        if self.on_connect is not None:
            self.on_connect(conn)

    def _on_error(self, conn: Connection, exc: ProtocolError) -> None:
        self.counters[f"rejected_{exc.reason}"] += 1
        self.counters["rejected"] += 1
        peer = f"{conn.peer[0]}:{conn.peer[1]}" if conn.peer else "?"
        self._log.warning(exc.reason, f"closed connection from {peer} [{exc.reason}]: {exc}")

    def _on_close(self, conn: Connection) -> None:
        self._handshaking.pop(conn, None)
        if conn in self._keyed:
            self._keyed.discard(conn)
            self._per_key[conn.key_id] -= 1
            if self._per_key[conn.key_id] <= 0:
                del self._per_key[conn.key_id]
        if conn in self.connections:
            self.connections.discard(conn)
            if (
                self.on_disconnect is not None
                and conn.ready.done()
                and conn.ready.exception() is None
            ):
                self.on_disconnect(conn)

    async def _reap_idle(self) -> None:
        interval = max(0.5, min(self.idle_timeout_s / 4, 10.0))
        while True:
            await REAL.sleep(interval)
            deadline = REAL.monotonic() - self.idle_timeout_s
            # A connection with work in flight (a long stream, a slow call) is
            # not idle even when the peer has nothing to say.
            for conn in [c for c in self.connections if c.last_activity < deadline and not c.busy]:
                self.counters["idle_closed"] += 1
                conn.close()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self.connections),
            "buffered_bytes_reserved": self.budget.used,
            "buffer_waiting": self.budget.waiting,
            "buffer_waits": self.budget.waits,
            "unsent_reply_bytes": self.output.used,
            "closed_slow_readers": self.output.closed,
            **self.counters,
        }
