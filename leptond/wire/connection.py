"""One RPC connection over asyncio: handshake, sealed frames, multiplexing.

Both ends are symmetric after the handshake: either side may call methods the
other side registered, push notifications, or stream results. Messages:

  {"t": "q", "i": id, "m": method, "a": args}        request
  {"t": "r", "i": id, "r": result} | {..., "e": err}  response (ends a stream)
  {"t": "s", "i": id, "d": item}                      stream item
  {"t": "x", "i": id}                                 cancel a call or stream
  {"t": "n", "m": method, "a": args}                  notification, no reply
  {"t": "p"} / {"t": "o"}                              ping / pong
  {"t": "h", "b": 1}                                  hello, first sealed message

The client's hello comes first; the server answers with its own.  "b": 1 in a
hello says "I read batches" (several small messages sealed as one frame, see
`codec`): a side sends batches only once the peer's hello said so, and the
server says so only to a client that did, so either side may be older.  A
plain (unsealed) connection, the benchmark's baseline, exchanges the same
hellos right after connecting.

A frame that breaks any rule closes the connection and is counted; it never
raises out of the event loop and never reaches a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, cast

from ..clock import REAL, Timer
from . import handshake as hs
from .budget import UNCOUNTED_FRAME, BufferBudget
from .codec import (
    BATCH_ITEM_MAX,
    MAX_FRAME,
    BatchBuilder,
    FrameReader,
    Opener,
    PlainCodec,
    Sealer,
    decode_messages,
    encode_body,
    frame,
)
from .errors import (
    INTERNAL,
    UNKNOWN_METHOD,
    WRONG_PORT,
    WRONG_PORT_HTTP,
    WRONG_PORT_OTHER,
    WRONG_PORT_SILENT,
    ConnectionLost,
    ProtocolError,
    RpcError,
)

log = logging.getLogger("lepton.wire")

Handler = (
    Callable[["Connection", Any], Awaitable[Any]]
    | Callable[["Connection", Any], AsyncIterator[Any]]
)
PskLookup = Callable[[str], bytes | None]
# Before authentication a peer gets tiny frames only, so an unauthenticated
# client cannot make us buffer megabytes.
HANDSHAKE_MAX_FRAME = 256
MAX_IN_FLIGHT = 4096
# Pending output beyond this is written at once instead of at the end of the
# loop iteration.
FLUSH_AT = 256 * 1024
BIG_FRAME = 64 * 1024
_STREAM_END = object()


class Connection(asyncio.Protocol):
    """A sealed, multiplexed RPC connection (client or server side)."""

    def __init__(
        self,
        *,
        is_client: bool,
        handlers: Mapping[str, Handler] | None = None,
        psk: bytes | None = None,
        key_id: str = "",
        psk_lookup: PskLookup | None = None,
        on_error: Callable[[Connection, ProtocolError], None] | None = None,
        on_close: Callable[[Connection], None] | None = None,
        handshake_timeout_s: float = 5.0,
        sealed: bool = True,
        budget: BufferBudget | None = None,
        frame_timeout_s: float = 60.0,
    ) -> None:
        self.is_client = is_client
        self.handlers: Mapping[str, Handler] = handlers or {}
        self.key_id = key_id
        self._psk = psk
        self._psk_lookup = psk_lookup
        self._on_error = on_error
        self._on_close = on_close
        self._handshake_timeout_s = handshake_timeout_s
        self._sealed = sealed
        self._reader = FrameReader(HANDSHAKE_MAX_FRAME if sealed else MAX_FRAME)
        # Server side: bytes of a large frame are buffered only under a
        # reservation from the server-wide budget (see budget.py).
        self._budget = budget
        self._frame_timeout_s = frame_timeout_s
        self._held = 0  # bytes reserved for the frame being received
        self._waiting_budget = False
        self._frame_timer: Timer | None = None
        self._hs = hs.HandshakeState()
        self._sealer: Sealer | PlainCodec | None = None if sealed else PlainCodec()
        self._opener: Opener | PlainCodec | None = None if sealed else PlainCodec()
        self._authenticated = not sealed
        # The first bytes the peer sent, to tell a wrong port from a wrong key.
        self._head = b""
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[int, asyncio.Queue[Any]] = {}
        self._served: dict[int, asyncio.Task[None]] = {}
        self._notified: set[asyncio.Task[None]] = set()
        self._out = bytearray()
        # Small bodies gathered for the next write, sealed there as one frame
        # (once the peer's hello said it reads batches).
        self._batch = BatchBuilder()
        self._peer_batches = False
        self._said_hello = False
        self._flush_scheduled = False
        self._paused: asyncio.Future[None] | None = None
        self._hs_timer: Timer | None = None
        self._clock = REAL
        self.last_activity = self._clock.monotonic()
        self.peer: tuple[str, int] | None = None
        self.context: dict[str, Any] = {}  # application data: token, node id...
        self.error_reason: str | None = None

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        self._hs_timer = self._clock.call_later(self._handshake_timeout_s, self._handshake_expired)
        if self.is_client:
            if self._sealed:
                self._write_raw(frame(hs.client_hello(self._hs, self.key_id)))
            else:
                self._opened()
                self._say_hello()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self._clock.monotonic()
        if len(self._head) < 8:
            self._head += data[: 8 - len(self._head)]
        self._reader.append(data)
        self._process()

    def _process(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # closed while waiting for the budget (budget_granted's call_soon)
        reader = self._reader
        try:
            if self.is_client and self._opener is None and self._head.startswith(b"HTTP/"):
                raise ProtocolError("wrong_port", f"{self._where()} {WRONG_PORT_HTTP}")
            # One frame at a time: the handshake raises the frame cap, and a
            # frame right behind the hello in the same read must see the new cap.
            while True:
                if self._budget is not None and not self._held and not self._reserve():
                    return  # reading paused until the budget grants the frame
                payload = reader.next()
                if payload is None:
                    return
                if self._held:
                    self._release_budget()
                if self._opener is None:
                    self._handshake_frame(payload)
                else:
                    for msg in decode_messages(self._opener.open(payload)):
                        self._message(msg)
                        if self.transport is None or self.transport.is_closing():
                            return
                if self.transport is None or self.transport.is_closing():
                    return
        except ProtocolError as exc:
            self._protocol_error(exc)

    # -- the server-wide budget for partial frames --------------------------
    def _reserve(self) -> bool:
        """Reserve room for a large frame that has begun, before buffering it.

        False: the budget is spent; reading is paused and resumes in
        `budget_granted`.
        """
        assert self._budget is not None
        if self._waiting_budget:
            return False
        n = self._reader.partial_frame_length()
        if n is None or n <= UNCOUNTED_FRAME:
            return True
        if not self._budget.reserve(self, n):
            self._waiting_budget = True
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()
            return False
        self._hold(n)
        return True

    def budget_granted(self, n: int) -> None:
        self._waiting_budget = False
        if self.transport is None or self.transport.is_closing():
            self._budget_release(n)
            return
        self._hold(n)
        self.transport.resume_reading()
        # What was read before the pause (the frame's first bytes) is processed now.
        self.loop.call_soon(self._process)

    def _hold(self, n: int) -> None:
        self._held = n
        # A sender must finish a reserved frame in time: a reservation held
        # forever would make everyone else's large frames wait forever.
        self._frame_timer = self._clock.call_later(self._frame_timeout_s, self._frame_expired)

    def _frame_expired(self) -> None:
        self._frame_timer = None
        if self._held:
            self._protocol_error(
                ProtocolError(
                    "slow_frame",
                    f"a frame of {self._held} bytes was not completed within "
                    f"{self._frame_timeout_s:g}s",
                )
            )

    def _release_budget(self) -> None:
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None
        held, self._held = self._held, 0
        self._budget_release(held)

    def _budget_release(self, n: int) -> None:
        if self._budget is not None and n:
            self._budget.release(n)

    def eof_received(self) -> bool | None:
        if self._reader.buffered:
            self._protocol_error(
                ProtocolError(
                    "truncated",
                    f"connection ended inside a frame ({self._reader.buffered} bytes buffered)",
                )
            )
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._teardown(ConnectionLost("connection closed by peer"))

    def pause_writing(self) -> None:
        if self._paused is None:
            self._paused = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._paused is not None:
            if not self._paused.done():
                self._paused.set_result(None)
            self._paused = None

    # -- handshake --------------------------------------------------------
    def _handshake_frame(self, payload: bytes) -> None:
        if self.is_client:
            status, nonce, pub = hs.parse_server_hello(payload)
            if status == hs.STATUS_UNKNOWN_KEY:
                self._fail_ready(
                    RpcError("unauthenticated", f"the cluster does not know key id {self.key_id!r}")
                )
                self.close()
                return
            if status != hs.STATUS_OK:
                self._fail_ready(RpcError("unavailable", "server is busy, try again"))
                self.close()
                return
            assert self._psk is not None
            keys = hs.derive_keys(self._hs, pub, nonce, self._psk, is_client=True)
            self._install(keys)
            self._say_hello()
        else:
            key_id, nonce, pub = hs.parse_client_hello(payload)
            psk = self._psk_lookup(key_id) if self._psk_lookup else None
            if psk is None:
                self._write_raw(frame(hs.server_hello(self._hs, hs.STATUS_UNKNOWN_KEY)))
                self._protocol_error(ProtocolError("unknown_key", f"unknown key id {key_id!r}"))
                return
            self.key_id = key_id
            keys = hs.derive_keys(self._hs, pub, nonce, psk, is_client=False)
            self._write_raw(frame(hs.server_hello(self._hs)))
            self._install(keys)

    def _install(self, keys: hs.Keys) -> None:
        self._sealer = Sealer(keys.send)
        self._opener = Opener(keys.recv)

    def _opened(self) -> None:
        self._authenticated = True
        self._reader.max_frame = MAX_FRAME
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        if not self.ready.done():
            self.ready.set_result(None)

    def _say_hello(self) -> None:
        self._said_hello = True
        self._send({"t": "h", "b": 1})

    def _hello(self, msg: dict[str, Any]) -> None:
        """The peer's hello: note whether it reads batches; a server answers
        with its own, saying it does only to a client that did."""
        if msg.get("b") == 1:
            self._peer_batches = True
        if not self.is_client and not self._said_hello:
            self._said_hello = True
            self._send({"t": "h", "b": 1} if self._peer_batches else {"t": "h"})

    def _handshake_expired(self) -> None:
        if not self._authenticated:
            self._protocol_error(ProtocolError("handshake_timeout", "no handshake in time"))

    # -- messages ---------------------------------------------------------
    def _message(self, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if not self._authenticated:
            # The first sealed message proves the peer holds the key.
            if t != "h":
                raise ProtocolError("no_hello", "expected hello")
            self._hello(msg)
            self._opened()
            return
        if t == "r":
            self._on_response(msg)
        elif t == "s":
            q = self._streams.get(_int(msg, "i"))
            if q is not None:
                q.put_nowait(msg.get("d"))
        elif t == "q":
            self._on_request(msg)
        elif t == "n":
            self._on_notify(msg)
        elif t == "x":
            task = self._served.pop(_int(msg, "i"), None)
            if task is not None:
                task.cancel()
        elif t == "p":
            self._send({"t": "o"})
        elif t == "h":
            self._hello(msg)  # a plain connection's, or a repeated one
        elif t == "o":
            pass
        else:
            raise ProtocolError("bad_type", f"unknown message type {t!r}")

    def _on_response(self, msg: dict[str, Any]) -> None:
        i = _int(msg, "i")
        err = msg.get("e")
        fut = self._calls.pop(i, None)
        if fut is not None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(RpcError.from_wire(err))
            else:
                fut.set_result(msg.get("r"))
            return
        q = self._streams.get(i)
        if q is not None:
            q.put_nowait(RpcError.from_wire(err) if err is not None else _STREAM_END)

    def _on_request(self, msg: dict[str, Any]) -> None:
        i = _int(msg, "i")
        method = msg.get("m")
        if not isinstance(method, str):
            raise ProtocolError("bad_request", "request without a method name")
        if len(self._served) >= MAX_IN_FLIGHT:
            self._send(
                {"t": "r", "i": i, "e": {"code": "busy", "message": "too many requests in flight"}}
            )
            return
        handler = self.handlers.get(method)
        if handler is None:
            self._send(
                {
                    "t": "r",
                    "i": i,
                    "e": {"code": UNKNOWN_METHOD, "message": f"unknown method {method!r}"},
                }
            )
            return
        if i in self._served:
            raise ProtocolError("dup_id", "request id reused while in flight")
        self._served[i] = self.loop.create_task(self._serve(i, method, handler, msg.get("a")))

    async def _serve(self, i: int, method: str, handler: Handler, args: Any) -> None:
        try:
            out = handler(self, args)
            if inspect.isasyncgen(out):
                async for item in out:
                    self._send({"t": "s", "i": i, "d": item})
                    if self._paused is not None:
                        await self._paused
                reply: dict[str, Any] = {"t": "r", "i": i, "r": None}
            else:
                assert inspect.isawaitable(out)
                reply = {"t": "r", "i": i, "r": await out}
        except RpcError as exc:
            reply = {"t": "r", "i": i, "e": exc.to_wire()}
        except asyncio.CancelledError:
            self._served.pop(i, None)
            raise
        except Exception as exc:
            log.exception("handler %s failed", method)
            reply = {
                "t": "r",
                "i": i,
                "e": {"code": INTERNAL, "message": f"internal error in {method}: {exc}"},
            }
        self._served.pop(i, None)
        if not self.is_closing():
            self._send(reply)

    def _on_notify(self, msg: dict[str, Any]) -> None:
        method = msg.get("m")
        handler = self.handlers.get(method) if isinstance(method, str) else None
        if handler is None:
            return
        coro = handler(self, msg.get("a"))
        if inspect.isawaitable(coro):
            task = self.loop.create_task(_quiet(coro, str(method)))
            self._notified.add(task)
            task.add_done_callback(self._notified.discard)

    # -- sending ----------------------------------------------------------
    def _send(self, msg: dict[str, Any], compress: bool = True) -> None:
        if self.transport is None or self.transport.is_closing() or self._sealer is None:
            raise ConnectionLost()
        body = encode_body(msg, compress)
        if self._peer_batches and body[0] == 0 and len(body) <= BATCH_ITEM_MAX:
            # Sealed at the flush with whatever else this loop iteration
            # sends: one AEAD call for all of them.
            self._batch.add(body)
            if len(self._batch) >= FLUSH_AT:
                self._flush()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)
            return
        self._seal_batch()  # what was sent before goes first
        framed = self._sealer.seal_frame(body)
        if len(framed) >= BIG_FRAME:
            # Big frames go to the transport as they are: copying them into
            # the output buffer would cost more than the extra write.
            self._flush()
            self.transport.write(framed)
            return
        # Small frames are gathered into one buffer and written once per loop
        # iteration: one send() for many replies, not one per frame.
        self._out += framed
        if len(self._out) >= FLUSH_AT:
            # A handler that produces much without awaiting must not pile up
            # output here: hand it to the transport, which applies flow control.
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _seal_batch(self) -> None:
        if self._batch.count:
            assert self._sealer is not None
            self._out += self._sealer.seal_frame(self._batch.take())

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._batch.count and self._sealer is not None:
            self._seal_batch()
        out = self._out
        if out:
            self._out = bytearray()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(out)

    def _write_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self._paused is not None:
            await self._paused

    # -- public API -------------------------------------------------------
    async def call(self, method: str, args: Any = None, timeout_s: float = 30.0) -> Any:
        i = next(self._ids)
        fut: asyncio.Future[Any] = self.loop.create_future()
        self._calls[i] = fut
        # A timer on the future itself, not asyncio.wait_for: that wraps every
        # call in more futures and callbacks, and calls are the hot path.
        timer = self._clock.call_later(timeout_s, _expire, fut)
        try:
            self._send({"t": "q", "i": i, "m": method, "a": args})
            return await fut
        except _CallTimeout:
            self._cancel_remote(i)
            raise RpcError("timeout", f"{method} got no answer within {timeout_s:g}s") from None
        finally:
            timer.cancel()
            self._calls.pop(i, None)

    async def stream(
        self, method: str, args: Any = None, item_timeout_s: float | None = None
    ) -> AsyncIterator[Any]:
        i = next(self._ids)
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[i] = q
        try:
            self._send({"t": "q", "i": i, "m": method, "a": args})
            while True:
                item = await asyncio.wait_for(q.get(), item_timeout_s)
                if item is _STREAM_END:
                    return
                if isinstance(item, RpcError):
                    raise item
                yield item
        except TimeoutError:
            raise RpcError("timeout", f"{method} stream stalled") from None
        finally:
            self._streams.pop(i, None)
            self._cancel_remote(i)

    def notify(self, method: str, args: Any = None) -> None:
        self._send({"t": "n", "m": method, "a": args})

    def ping(self) -> None:
        self._send({"t": "p"})

    def _cancel_remote(self, i: int) -> None:
        if not self.is_closing():
            with contextlib.suppress(ConnectionLost):
                self._send({"t": "x", "i": i})

    @property
    def pending_output(self) -> int:
        """Bytes gathered for the next write (sealed frames, and small bodies
        to be sealed as one)."""
        return len(self._out) + (len(self._batch) if self._batch.count else 0)

    @property
    def busy(self) -> bool:
        """Whether calls, streams or served requests are in flight on this connection."""
        return bool(self._calls or self._streams or self._served)

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- failure ----------------------------------------------------------
    def _protocol_error(self, exc: ProtocolError) -> None:
        self.error_reason = exc.reason
        if self._on_error is not None:
            self._on_error(self, exc)
        if not self.ready.done():
            msg = exc.args[0] if exc.args else exc.reason
            code = "unauthenticated" if exc.reason == "bad_seal" else "protocol"
            if exc.reason == "bad_seal" and self.is_client:
                msg = "authentication failed: the server rejected our key (wrong token or cluster secret)"
            elif self.is_client and self._opener is None and exc.reason != "handshake_timeout":
                # No leptond server hello came back: whatever answered is
                # something else, on the wrong port.
                code = WRONG_PORT
                if exc.reason != "wrong_port":
                    msg = f"{self._where()} {WRONG_PORT_OTHER} (it sent {self._head!r})"
            self._fail_ready(RpcError(code, msg))
        if self.transport is not None:
            # A server hello sent just before must still go out; close flushes it.
            self.transport.close()

    def _where(self) -> str:
        if self.peer is None:
            return "the peer"
        host, port = self.peer[0], self.peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    def _fail_ready(self, err: RpcError) -> None:
        if not self.ready.done():
            self.ready.set_exception(err)
            self.ready.exception()  # mark retrieved: nobody may be waiting

    def _teardown(self, err: RpcError) -> None:
        if self._hs_timer is not None:
            self._hs_timer.cancel()
        if self._budget is not None:
            self._budget.forget(self)
            self._waiting_budget = False
            self._release_budget()
        if self.is_client and not self._head:
            # Closed without a byte, not even a refusal: not a leptond RPC port.
            self._fail_ready(RpcError(WRONG_PORT, f"{self._where()} {WRONG_PORT_SILENT}"))
        self._fail_ready(
            RpcError(
                "unauthenticated", "connection closed during the handshake: wrong key or token?"
            )
        )
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(err)
        self._calls.clear()
        for q in self._streams.values():
            q.put_nowait(err)
        for task in [*self._served.values(), *self._notified]:
            task.cancel()
        self._served.clear()
        if self._paused is not None and not self._paused.done():
            self._paused.set_exception(err)
            self._paused.exception()
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        if self._on_close is not None:
            self._on_close(self)


class _CallTimeout(Exception):
    pass


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(_CallTimeout())


def _int(msg: dict[str, Any], key: str) -> int:
    v = msg.get(key)
    if not isinstance(v, int):
        raise ProtocolError("bad_id", f"message field {key!r} is not an integer")
    return v


async def _quiet(coro: Awaitable[Any], method: str) -> None:
    try:
        await coro
    except Exception:
        log.exception("notification handler %s failed", method)


async def open_connection(
    host: str,
    port: int,
    *,
    key_id: str,
    psk: bytes,
    handlers: Mapping[str, Handler] | None = None,
    timeout_s: float = 5.0,
    sealed: bool = True,
    on_close: Callable[[Connection], None] | None = None,
) -> Connection:
    """Connect and complete the handshake, or raise RpcError with a clear message."""
    loop = asyncio.get_running_loop()
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                lambda: Connection(
                    is_client=True,
                    handlers=handlers,
                    psk=psk,
                    key_id=key_id,
                    handshake_timeout_s=timeout_s,
                    sealed=sealed,
                    on_close=on_close,
                ),
                host,
                port,
            ),
            timeout_s,
        )
    except TimeoutError:
        raise RpcError("unavailable", f"cannot reach {host}:{port}: timed out") from None
    except OSError as exc:
        raise RpcError(
            "unavailable", f"cannot reach {host}:{port}: {exc.strerror or exc}"
        ) from None
    try:
        await asyncio.wait_for(asyncio.shield(conn.ready), timeout_s)
    except TimeoutError:
        conn.abort()
        raise RpcError(
            "unavailable",
            f"{host}:{port} did not complete the handshake in {timeout_s:g}s "
            "(is it leptond's RPC port, 7441 by default?)",
        ) from None
    except RpcError:
        conn.abort()
        raise
    return conn
