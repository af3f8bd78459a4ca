"""Client side: one connection to the cluster that follows the leader.

Masters answer writes on a follower with `not_leader` and the leader's RPC
address; `ClusterClient` reconnects there and retries. Every attempt has a
timeout and the whole call has a deadline, so a caller never hangs.

Retries are safe for writes: one logical call has one request id (`rid` in
its arguments), the same on every attempt, and the masters apply a write with
a given id once and answer every attempt with that first result.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol

from ..clock import REAL, Clock
from .connection import Connection, Handler, open_connection
from .errors import NO_QUORUM, NOT_LEADER, UNAVAILABLE, RpcError

RETRYABLE = frozenset({NOT_LEADER, UNAVAILABLE, NO_QUORUM, "busy", "leader_starting"})


def parse_addr(addr: str, default_port: int = 7441) -> tuple[str, int]:
    """'host:port', '[v6]:port' or 'host' -> (host, port); ValueError on nonsense."""
    addr = addr.strip()
    if not addr:
        raise ValueError("empty address")
    _, sep, rest = addr.partition("://")
    if sep:
        # A URL, most likely the HTTP port's: RPC addresses are HOST:PORT.
        hostport = rest.split("/", 1)[0]
        host = hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport
        raise ValueError(
            f"{addr!r} is a URL; give HOST:PORT of the RPC port (7441 by default), "
            f"e.g. {host or 'HOST'}:{default_port}"
        )
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif addr.count(":") == 1:
        host, port_s = addr.split(":")
    else:
        host, port_s = addr, ""
    if not host:
        raise ValueError(f"address {addr!r} has no host")
    try:
        port = int(port_s) if port_s else default_port
    except ValueError:
        raise ValueError(f"address {addr!r} has a bad port") from None
    if not 0 < port < 65536:
        raise ValueError(f"address {addr!r} has a port out of range")
    return host, port


def parse_addrs(spec: str | Sequence[str], default_port: int = 7441) -> list[tuple[str, int]]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = [parse_addr(a, default_port) for a in items if a.strip()]
    if not out:
        raise ValueError("no master address given")
    return out


class Dial(Protocol):
    """Opens an authenticated connection to a master (`open_connection`)."""

    async def __call__(
        self,
        host: str,
        port: int,
        *,
        key_id: str,
        psk: bytes,
        handlers: Mapping[str, Handler] | None = None,
        timeout_s: float = 5.0,
        on_local_close: Callable[[Connection], None] | None = None,
    ) -> Connection: ...


class ClusterClient:
    """Calls the cluster through whichever master leads, reconnecting as needed.

    `dial` opens each connection and `clock` times the retries: the real
    ones by default; a simulation (leptond/sim) passes its own."""

    def __init__(
        self,
        addrs: Sequence[tuple[str, int]],
        *,
        key_id: str,
        psk: bytes,
        handlers: Mapping[str, Handler] | None = None,
        connect_timeout_s: float = 3.0,
        clock: Clock = REAL,
        dial: Dial = open_connection,
        on_local_close: Callable[[Connection], None] | None = None,
    ) -> None:
        """`on_local_close` runs on every connection this client opens, just
        before the client's side starts closing it (Connection.on_local_close)."""
        self.on_local_close = on_local_close
        self.addrs = list(addrs)
        self.key_id = key_id
        self.psk = psk
        self.handlers = handlers
        self.connect_timeout_s = connect_timeout_s
        self.conn: Connection | None = None
        self.current: tuple[str, int] | None = None
        self._next = 0
        self._lock = asyncio.Lock()
        self.bytes_hint: dict[str, int] = {}
        self._clock = clock
        self._dial = dial

    def _open_connection(self, prefer: tuple[str, int] | None) -> Connection | None:
        """The connection `connection(prefer)` would return at once, if there
        is one and nobody is dialling: most calls take it without the task
        and the timer that a wait for a dial costs."""
        conn = self.conn
        if (
            conn is not None
            and not conn.is_closing()
            and prefer in (None, self.current)
            and not self._lock.locked()
        ):
            return conn
        return None

    async def connection(self, prefer: tuple[str, int] | None = None) -> Connection:
        async with self._lock:
            if (
                self.conn is not None
                and not self.conn.is_closing()
                and prefer in (None, self.current)
            ):
                return self.conn
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            candidates: list[tuple[str, int]] = []
            if prefer is not None:
                candidates.append(prefer)
            n = len(self.addrs)
            candidates += [self.addrs[(self._next + k) % n] for k in range(n)]
            last: RpcError | None = None
            for addr in candidates:
                try:
                    self.conn = await self._dial(
                        addr[0],
                        addr[1],
                        key_id=self.key_id,
                        psk=self.psk,
                        handlers=self.handlers,
                        timeout_s=self.connect_timeout_s,
                        on_local_close=self.on_local_close,
                    )
                    self.current = addr
                    return self.conn
                except RpcError as exc:
                    # Another master would not help: followers send us back.
                    if exc.code in ("unauthenticated", "too_many_connections"):
                        raise
                    last = exc
                    self._next = (self._next + 1) % n
            raise last or RpcError(UNAVAILABLE, "no master address")

    async def call(
        self,
        method: str,
        args: Any = None,
        *,
        timeout_s: float = 15.0,
        attempt_timeout_s: float = 6.0,
        tag: str | None = None,
    ) -> Any:
        """Call on the leader, following redirects and retrying until the deadline.

        Map arguments get a request id (`rid`) unless they carry one: made once
        here, it is the same on every retry, so a write whose answer was lost
        is not applied twice. `tag`: set to True in the context of every
        connection the call is sent on (before it is sent).
        """
        if isinstance(args, dict) and "rid" not in args:
            # 128 random bits in hex (uuid4().hex without the UUID object).
            args = {**args, "rid": os.urandom(16).hex()}
        clock = self._clock
        deadline = clock.monotonic() + timeout_s
        prefer: tuple[str, int] | None = None
        delay = 0.05
        last: RpcError | None = None
        while True:
            left = deadline - clock.monotonic()
            if left <= 0:
                raise last or RpcError("timeout", f"{method}: no answer within {timeout_s:g}s")
            try:
                conn = self._open_connection(prefer)
                if conn is None:
                    conn = await asyncio.wait_for(self.connection(prefer), left)
                prefer = None
                if tag is not None:
                    conn.context[tag] = True
                return await conn.call(
                    method, args, timeout_s=min(attempt_timeout_s, max(left, 0.01))
                )
            except TimeoutError:
                last = RpcError(UNAVAILABLE, f"{method}: could not reach a master in time")
            except RpcError as exc:
                if exc.code not in RETRYABLE and exc.code != "timeout":
                    raise
                last = exc
                if exc.code == NOT_LEADER:
                    leader = exc.extra.get("leader")
                    if isinstance(leader, str) and leader:
                        prefer = parse_addr(leader)
                        continue
                elif exc.code in (UNAVAILABLE, "timeout") and self.conn is not None:
                    self.conn.close()
                    self.conn = None
                    self._next = (self._next + 1) % len(self.addrs)
            await clock.sleep(
                min(delay, max(deadline - clock.monotonic(), 0)) * (0.5 + random.random())
            )
            # Capped low: while a new leader is elected, a long backoff would add
            # straight onto the failover time people see.
            delay = min(delay * 2, 0.25)

    async def stream(
        self, method: str, args: Any = None, *, item_timeout_s: float | None = None
    ) -> AsyncIterator[Any]:
        """Stream from the leader; only the connection set-up is retried."""
        conn = await self.connection()
        try:
            async for item in conn.stream(method, args, item_timeout_s=item_timeout_s):
                yield item
        except RpcError as exc:
            leader = exc.extra.get("leader")
            if exc.code != NOT_LEADER or not isinstance(leader, str):
                raise
            conn = await self.connection(parse_addr(leader))
            async for item in conn.stream(method, args, item_timeout_s=item_timeout_s):
                yield item

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
