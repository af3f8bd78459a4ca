"""One RPC connection over asyncio: handshake, sealed frames, multiplexing.

Both ends are symmetric after the handshake: either side may call methods the
other side registered, push notifications, or stream results. Messages:

  {"t": "q", "i": id, "m": method, "a": args}        request
  {"t": "r", "i": id, "r": result} | {..., "e": err}  response (ends a stream)
  {"t": "s", "i": id, "d": item}                      stream item
  {"t": "c", "i": id, "n": count}                     stream credit: n more items
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

Flow control: a stream request may carry a window, "w": n. The side serving
the stream then sends at most n items that the caller has not yet credited
("c" messages, sent as the caller consumes items), and the caller refuses a
stream that overruns its window. A relay (the leader passing an agent's log
stream to leptonctl) thereby holds at most one window of items per stream,
however slowly its reader reads.

A server-side connection also bounds what its peer can make it hold:
- frames over `UNCOUNTED_FRAME` are received, decompressed and served under
  reservations from the server-wide budget (budget.py), each held until the
  requests the frame carried have been answered;
- a frame unpacks into at most `REQUEST_MAX_ITEMS` msgpack items (codec.py);
- it serves as notifications only the methods it was told to (`notifications`;
  others are dropped, with a rate-limited log line), at most
  `MAX_NOTIFY_IN_FLIGHT` at a time: at that many it stops reading (the rest
  of the frame waits, decoded) until one ends;
- while its replies wait to be sent (the peer does not read them) it reads no
  new requests, and past `MAX_PENDING_OUTPUT` bytes waiting, or with the
  server-wide total of waiting replies over its cap, it is closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import itertools
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from typing import Any, cast

from ..clock import REAL, Timer
from . import handshake as hs
from .budget import UNCOUNTED_FRAME, BufferBudget, OutputMeter
from .codec import (
    BATCH_ITEM_MAX,
    MAX_BATCH_ITEMS,
    MAX_BODY,
    MAX_FRAME,
    TAG_LEN,
    BatchBuilder,
    FrameReader,
    Opener,
    PlainCodec,
    Sealer,
    decode_messages,
    decoded_size,
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
from .ratelog import RateLimitedLog

log = logging.getLogger("lepton.wire")
_dropped = RateLimitedLog(log)

# A handler is a coroutine function or an async generator function (a
# stream), called in its own task, or a plain function returning its answer:
# that one is called inline, in the read that brought its request, with no
# task of its own (no current task either, so no asyncio.timeout or
# TaskGroup in it). Cheap synchronous work that arrives often (agents'
# heartbeats) is served that way.
Handler = (
    Callable[["Connection", Any], Awaitable[Any]]
    | Callable[["Connection", Any], AsyncIterator[Any]]
    | Callable[["Connection", Any], dict[str, Any]]
)
PskLookup = Callable[[str], bytes | None]
# Before authentication a peer gets tiny frames only, so an unauthenticated
# client cannot make us buffer megabytes.
HANDSHAKE_MAX_FRAME = 256
MAX_IN_FLIGHT = 4096
# Notifications a connection serves at once. A notification has no reply, so
# nothing else slows a peer that sends them without end: at this many the
# connection stops reading until one ends. Keystrokes, the only kind the
# leader serves, take well under a millisecond each.
MAX_NOTIFY_IN_FLIGHT = 64
# Pending output beyond this is written at once instead of at the end of the
# loop iteration.
FLUSH_AT = 256 * 1024
BIG_FRAME = 64 * 1024
# What one frame from a peer may unpack into (codec.ItemCounter), on the
# server side. The largest legitimate requests (a 1 MB workdir manifest,
# 100k block ids) hold well under it; unpacking this many items takes a
# fraction of a second, not the seconds a frame of 16 million takes.
REQUEST_MAX_ITEMS = 1 << 20
# Bytes of replies a server-side connection may have waiting for its peer to
# read them before it is closed: a few of the largest frames.
MAX_PENDING_OUTPUT = 4 * MAX_FRAME
# Stream items a caller lets the server send ahead of its reading, by
# default, and the most a caller may ask for.
STREAM_WINDOW = 64
MAX_STREAM_WINDOW = 1024
TOO_LARGE = "too_large"
_STREAM_END = object()
_NOT_YET = object()


class FrameTooLarge(RpcError):
    """A message that would not fit in one frame; it is not sent."""

    def __init__(self, size: int) -> None:
        super().__init__(
            TOO_LARGE,
            f"the message is {size} bytes, over the {MAX_FRAME >> 20} MiB frame cap; "
            "ask for less at a time (a smaller page or limit)",
        )


class _Credit:
    """The items a stream's caller still lets us send (its window, topped up
    by its "c" messages)."""

    __slots__ = ("left", "waiter")

    def __init__(self, window: int) -> None:
        self.left = window
        self.waiter: asyncio.Future[None] | None = None

    def add(self, n: int) -> None:
        self.left = min(self.left + n, MAX_STREAM_WINDOW)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self, loop: asyncio.AbstractEventLoop) -> None:
        while self.left <= 0:
            self.waiter = loop.create_future()
            await self.waiter
        self.left -= 1


class _Inbound:
    """A stream this side called: items received and not yet consumed."""

    __slots__ = ("queue", "window")

    def __init__(self, window: int) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.window = window


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
        max_items: int | None = None,
        output: OutputMeter | None = None,
        max_pending_output: int | None = None,
        notifications: Collection[str] | None = None,
        admit_key: Callable[[str], bool] | None = None,
    ) -> None:
        self.is_client = is_client
        # Server side: whether a known key may open one more connection.
        self._admit_key = admit_key
        self.handlers: Mapping[str, Handler] = handlers or {}
        # The methods served when they come as notifications; None: any
        # handler (a client's, whose peer is the server it chose to trust).
        self._notifications = None if notifications is None else frozenset(notifications)
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
        # An opened frame waiting for a reservation before it is decoded, and
        # the reservation granted for it.
        self._stash: bytes | None = None
        self._decode_held = 0
        self._max_items = max_items
        # Why reading is paused: "budget" (waiting for a reservation) and
        # "output" (the peer does not read our replies; servers only).
        self._read_pauses: set[str] = set()
        self._output = output
        self._max_pending_output = max_pending_output
        self._out_counted = 0  # our write buffer's size as last told to `output`
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
        self._streams: dict[int, _Inbound] = {}
        self._credits: dict[int, _Credit] = {}
        self._served: dict[int, asyncio.Task[None]] = {}
        self._plain: dict[str, bool] = {}  # method -> handler is a plain function
        self._notified: set[asyncio.Task[None]] = set()
        # Notifications decoded while at MAX_NOTIFY_IN_FLIGHT, started as
        # others end (server side only).
        self._backlog: collections.deque[dict[str, Any]] = collections.deque()
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
        # Who ended the connection. `peer_closed`: we read the peer's
        # end-of-stream before closing our side (its process closed the
        # socket, or died and its kernel did); a reset is not counted, as
        # anything on the path can forge one. `on_local_close` runs once,
        # synchronously, before our side starts closing (and so before our
        # end-of-stream can reach the peer): agents cut their lease there.
        self.peer_closed = False
        self.closed_locally = False
        self.on_local_close: Callable[[Connection], None] | None = None

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
        if self._flush_scheduled:
            self._process()
            return
        # What this read's requests answer inline is written once, at the
        # end of the read, not from a callback scheduled for each of them.
        self._flush_scheduled = True
        try:
            self._process()
        finally:
            self._flush()

    def _process(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # closed while waiting for the budget (budget_granted's call_soon)
        reader = self._reader
        try:
            if self.is_client and self._opener is None and self._head.startswith(b"HTTP/"):
                raise ProtocolError("wrong_port", f"{self._where()} {WRONG_PORT_HTTP}")
            if self._stash is not None:
                if self._waiting_budget:
                    return
                plain, self._stash = self._stash, None
                held, self._decode_held = self._decode_held, 0
                self._deliver(plain, held)
                if self.transport is None or self.transport.is_closing():
                    return
            # One frame at a time: the handshake raises the frame cap, and a
            # frame right behind the hello in the same read must see the new cap.
            while True:
                if "notify" in self._read_pauses:
                    return  # resumed by _notify_done, which processes the rest
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
                    plain = self._opener.open(payload)
                    del payload
                    need = decoded_size(plain) if self._budget is not None else 0
                    if self._budget is not None and UNCOUNTED_FRAME < need <= MAX_BODY:
                        # Decoded, then held by its requests' handlers: reserve
                        # it first (the frame's own reservation went back above).
                        # A larger claim is refused by the decoder unreserved.
                        if not self._budget.reserve(self, need):
                            self._stash = plain
                            self._waiting_budget = True
                            self._pause_reading("budget")
                            return
                        self._deliver(plain, need)
                    else:
                        self._deliver(plain, 0)
                if self.transport is None or self.transport.is_closing():
                    return
        except ProtocolError as exc:
            self._protocol_error(exc)

    def _deliver(self, plain: bytes, held: int) -> None:
        """Decode one opened frame and act on its messages. `held`: bytes
        reserved for it, given back once the requests it carried are answered
        (their arguments live that long)."""
        try:
            msgs = decode_messages(plain, max_items=self._max_items)
        except ProtocolError:
            self._budget_release(held)
            raise
        del plain
        tasks: list[asyncio.Task[None]] = []
        try:
            for msg in msgs:
                task = self._message(msg, big=held > 0)
                if task is not None:
                    tasks.append(task)
                if self.transport is None or self.transport.is_closing():
                    break
        finally:
            if held:
                _release_when_done(self, tasks, held)

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
            self._pause_reading("budget")
            return False
        self._hold(n)
        return True

    def budget_granted(self, n: int) -> None:
        self._waiting_budget = False
        if self.transport is None or self.transport.is_closing():
            self._budget_release(n)
            return
        if self._stash is not None:
            self._decode_held = n  # for the opened frame waiting to be decoded
        else:
            self._hold(n)
        self._resume_reading("budget")
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
            self._budget.release(n, self.key_id)

    def _pause_reading(self, why: str) -> None:
        if not self._read_pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._read_pauses.add(why)

    def _resume_reading(self, why: str) -> None:
        if why not in self._read_pauses:
            return
        self._read_pauses.discard(why)
        if not self._read_pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        if not self.closed_locally:
            self.peer_closed = True
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
        if not self.is_client:
            # A peer that does not read our replies sends no new requests
            # either. Servers only: if both ends did this, two peers with full
            # buffers could each wait for the other to read first.
            self._pause_reading("output")
        # Called from inside transport.write: count, but close (if need be)
        # only once the write has returned (_send checks again).
        self._account_output(may_close=False)

    def resume_writing(self) -> None:
        if self._paused is not None:
            if not self._paused.done():
                self._paused.set_result(None)
            self._paused = None
        self._resume_reading("output")
        self._account_output(may_close=False)

    def _account_output(self, may_close: bool = True) -> None:
        """Tell the server-wide meter how much waits to be sent, and close a
        connection whose peer leaves too much unread (servers only)."""
        if self._max_pending_output is None:
            return
        t = self.transport
        if t is None or t.is_closing():
            return
        size = t.get_write_buffer_size()
        meter = self._output
        if meter is not None:
            meter.change(size - self._out_counted)
        self._out_counted = size
        if not may_close:
            return
        over_own = size > self._max_pending_output
        if over_own or (meter is not None and meter.over and self._paused is not None):
            if meter is not None:
                meter.closed += 1
            what = "its cap" if over_own else "the server's cap on unsent replies"
            self._protocol_error(
                ProtocolError(
                    "slow_reader",
                    f"the peer left {size} bytes of replies unread, over {what}",
                ),
                abort=True,
            )

    # -- handshake --------------------------------------------------------
    def _handshake_frame(self, payload: bytes) -> None:
        if self.is_client:
            status, nonce, pub = hs.parse_server_hello(payload)
            if status == hs.STATUS_UNKNOWN_KEY:
                self._fail_ready(
                    RpcError(
                        "unauthenticated",
                        f"the cluster does not know key id {self.key_id!r} "
                        "(it was revoked, has expired, or never existed)",
                    )
                )
                self.close()
                return
            if status == hs.STATUS_KEY_LIMIT:
                self._fail_ready(
                    RpcError(
                        "too_many_connections",
                        f"this master already has as many connections open with key id "
                        f"{self.key_id!r} as it allows one key; close some and try again",
                    )
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
            if self._admit_key is not None and not self._admit_key(key_id):
                self._write_raw(frame(hs.server_hello(self._hs, hs.STATUS_KEY_LIMIT)))
                self._protocol_error(
                    ProtocolError("key_limit", f"key id {key_id!r} has its most connections open")
                )
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
            if self.is_client:
                # A master too busy to answer in time (a leader serving
                # 10,000 agents on a loaded machine) is a transient state:
                # `unavailable`, which ClusterClient retries until the call's
                # deadline, not a protocol error that ends the call at once.
                self._fail_ready(handshake_late(self._where(), self._handshake_timeout_s))
            self._protocol_error(ProtocolError("handshake_timeout", "no handshake in time"))

    # -- messages ---------------------------------------------------------
    def _message(self, msg: dict[str, Any], big: bool = False) -> asyncio.Task[None] | None:
        """Act on one message; returns the task it started, if any (`big`:
        its frame holds a reservation until that task ends)."""
        t = msg["t"]
        if not self._authenticated:
            # The first sealed message proves the peer holds the key.
            if t != "h":
                raise ProtocolError("no_hello", "expected hello")
            self._hello(msg)
            self._opened()
            return None
        if t == "r":
            self._on_response(msg)
        elif t == "s":
            self._on_stream_item(_int(msg, "i"), msg.get("d"))
        elif t == "c":
            credit = self._credits.get(_int(msg, "i"))
            n = msg.get("n")
            if credit is not None and isinstance(n, int) and 0 < n <= MAX_STREAM_WINDOW:
                credit.add(n)
        elif t == "q":
            return self._on_request(msg, big)
        elif t == "n":
            return self._on_notify(msg)
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
        return None

    def _on_stream_item(self, i: int, item: Any) -> None:
        inbound = self._streams.get(i)
        if inbound is None:
            return
        if inbound.queue.qsize() >= inbound.window:
            # The peer sent more than we credited it: a relay must never buffer
            # without bound behind a slow reader. The stream ends in an error.
            del self._streams[i]
            inbound.queue.put_nowait(
                RpcError("protocol", f"the peer overran this stream's window of {inbound.window}")
            )
            self._cancel_remote(i)
            return
        inbound.queue.put_nowait(item)

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
        inbound = self._streams.get(i)
        if inbound is not None:
            inbound.queue.put_nowait(RpcError.from_wire(err) if err is not None else _STREAM_END)

    def _on_request(self, msg: dict[str, Any], big: bool = False) -> asyncio.Task[None] | None:
        i = _int(msg, "i")
        method = msg.get("m")
        if not isinstance(method, str):
            raise ProtocolError("bad_request", "request without a method name")
        if len(self._served) >= MAX_IN_FLIGHT:
            self._send(
                {"t": "r", "i": i, "e": {"code": "busy", "message": "too many requests in flight"}}
            )
            return None
        handler = self.handlers.get(method)
        if handler is None:
            self._send(
                {
                    "t": "r",
                    "i": i,
                    "e": {"code": UNKNOWN_METHOD, "message": f"unknown method {method!r}"},
                }
            )
            return None
        if i in self._served:
            raise ProtocolError("dup_id", "request id reused while in flight")
        args = msg.get("a")
        out: Any = _NOT_YET
        if self._is_plain(method, handler):
            try:
                out = handler(self, args)
            except RpcError as exc:
                self._answer(i, method, {"t": "r", "i": i, "e": exc.to_wire()})
                return None
            except Exception as exc:
                self._answer(i, method, _internal(i, method, exc))
                return None
            if type(out) is dict or not (inspect.isawaitable(out) or inspect.isasyncgen(out)):
                # A plain function's answer: sent now, no task (see Handler).
                self._answer(i, method, {"t": "r", "i": i, "r": out})
                return None
            # A plain function that returned an awaitable: served by a task.
        w = msg.get("w")
        window = w if isinstance(w, int) and 0 < w <= MAX_STREAM_WINDOW else None
        task = self.loop.create_task(
            self._serve(i, method, handler, args, window, big, out),
            name=f"rpc {method}",
        )
        self._served[i] = task
        return task

    def _is_plain(self, method: str, handler: Handler) -> bool:
        """Whether the handler is a plain function (answered inline), not a
        coroutine or async generator function (served by a task, which calls
        it). Asked once per method and connection."""
        plain = self._plain.get(method)
        if plain is None:
            kind = cast(Any, handler)
            plain = not (inspect.iscoroutinefunction(kind) or inspect.isasyncgenfunction(kind))
            self._plain[method] = plain
        return plain

    async def _serve(
        self,
        i: int,
        method: str,
        handler: Handler,
        args: Any,
        window: int | None = None,
        big: bool = False,
        out: Any = _NOT_YET,
    ) -> None:
        """Serve one request in its own task. `out`: what a plain function
        returned when it was an awaitable (the handler is not called again);
        _NOT_YET: call the handler here."""
        try:
            if out is _NOT_YET:
                out = handler(self, args)
            if inspect.isasyncgen(out):
                if big:
                    # A stream may run for hours: it must not hold a share of
                    # the server's buffer budget that long (its frame would).
                    await out.aclose()
                    raise RpcError(
                        "bad_request", f"{method}: the request is too large for a stream"
                    )
                credit = None if window is None else self._credits.setdefault(i, _Credit(window))
                async for item in out:
                    if credit is not None:
                        await credit.take(self.loop)
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
            self._credits.pop(i, None)
            raise
        except Exception as exc:
            reply = _internal(i, method, exc)
        self._served.pop(i, None)
        self._credits.pop(i, None)
        self._answer(i, method, reply)

    def _answer(self, i: int, method: str, reply: dict[str, Any]) -> None:
        if not self.is_closing():
            try:
                self._send(reply)
            except FrameTooLarge as exc:
                # Answer in words: dropping the connection would fail every
                # other call on it too.
                log.warning("reply to %s not sent: %s", method, exc)
                self._send({"t": "r", "i": i, "e": exc.to_wire()})

    def _on_notify(self, msg: dict[str, Any]) -> asyncio.Task[None] | None:
        method = msg.get("m")
        handler = self.handlers.get(method) if isinstance(method, str) else None
        if handler is None:
            return None
        if self._notifications is not None and method not in self._notifications:
            # Dropped, not served without a reply: a peer could otherwise make
            # us do any call's work (a `jobs` listing) while paying nothing.
            # The connection stays open, as an unknown notification's does.
            _dropped.warning(
                "notification",
                f"dropped notifications of {str(method)[:64]!r} from {self._where()}: "
                "not a method served as a notification",
            )
            return None
        if self._notifications is not None and (
            self._backlog or len(self._notified) >= MAX_NOTIFY_IN_FLIGHT
        ):
            # At the cap: the rest of this frame waits (it is decoded
            # already, so that costs nothing more) and no more is read.
            self._backlog.append(msg)
            self._pause_reading("notify")
            return None
        return self._start_notify(handler, msg)

    def _start_notify(self, handler: Handler, msg: dict[str, Any]) -> asyncio.Task[None] | None:
        method = str(msg.get("m"))
        coro = handler(self, msg.get("a"))
        if not inspect.isawaitable(coro):
            return None
        task = self.loop.create_task(_quiet(coro, method))
        self._notified.add(task)
        task.add_done_callback(self._notify_done)
        if self._notifications is not None and len(self._notified) >= MAX_NOTIFY_IN_FLIGHT:
            self._pause_reading("notify")
        return task

    def _notify_done(self, task: asyncio.Task[None]) -> None:
        self._notified.discard(task)
        if "notify" not in self._read_pauses or self.is_closing():
            return
        while self._backlog and len(self._notified) < MAX_NOTIFY_IN_FLIGHT:
            msg = self._backlog.popleft()
            handler = self.handlers.get(str(msg.get("m")))
            if handler is not None:
                self._start_notify(handler, msg)
        if not self._backlog and len(self._notified) < MAX_NOTIFY_IN_FLIGHT:
            self._resume_reading("notify")
            # What was read before the pause is processed now.
            self.loop.call_soon(self._process)

    # -- sending ----------------------------------------------------------
    def _send(self, msg: dict[str, Any], compress: bool = True) -> None:
        if self.transport is None or self.transport.is_closing() or self._sealer is None:
            raise ConnectionLost()
        body = encode_body(msg, compress)
        if len(body) + TAG_LEN > MAX_FRAME or decoded_size(body) > MAX_BODY:
            # Over the cap sealed, or once the peer decompresses it.
            raise FrameTooLarge(max(len(body), decoded_size(body)))
        if self._peer_batches and body[0] == 0 and len(body) <= BATCH_ITEM_MAX:
            # Sealed at the flush with whatever else this loop iteration
            # sends: one AEAD call for all of them.
            self._batch.add(body)
            if len(self._batch) >= FLUSH_AT or self._batch.count >= MAX_BATCH_ITEMS:
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
            self._account_output()
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
                self._account_output()

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
        self,
        method: str,
        args: Any = None,
        item_timeout_s: float | None = None,
        window: int = STREAM_WINDOW,
    ) -> AsyncIterator[Any]:
        """The items of a streaming call. At most `window` items are sent
        ahead of what the caller has consumed (module docstring)."""
        if not 0 < window <= MAX_STREAM_WINDOW:
            raise ValueError(f"a stream window is 1-{MAX_STREAM_WINDOW} items")
        i = next(self._ids)
        inbound = _Inbound(window)
        q = inbound.queue
        self._streams[i] = inbound
        # Credit goes back in steps of half a window, not item by item.
        step = max(1, window // 2)
        consumed = 0
        try:
            self._send({"t": "q", "i": i, "m": method, "a": args, "w": window})
            while True:
                item = await asyncio.wait_for(q.get(), item_timeout_s)
                if item is _STREAM_END:
                    return
                if isinstance(item, RpcError):
                    raise item
                yield item
                consumed += 1
                if consumed >= step and not self.is_closing() and i in self._streams:
                    self._send({"t": "c", "i": i, "n": consumed})
                    consumed = 0
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
    def queued_output(self) -> int:
        """Bytes sent on this connection that have not reached the socket yet:
        the transport's buffer and what waits for the next write."""
        t = self.transport
        return self.pending_output + (0 if t is None else t.get_write_buffer_size())

    @property
    def busy(self) -> bool:
        """Whether calls, streams or served requests are in flight on this connection."""
        return bool(self._calls or self._streams or self._served)

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._closing_here()
            self._flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self._closing_here()
            self.transport.abort()

    def reset_on_close(self) -> None:
        """Make our close send a reset (SO_LINGER 0) instead of an end-of-stream:
        a peer that acts on our end-of-stream (the leader on an agent's) must
        not see one."""
        if self.transport is None:
            return
        with contextlib.suppress(OSError):
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def reset(self) -> None:
        """End the connection now with a reset."""
        self.reset_on_close()
        self.abort()

    def _closing_here(self) -> None:
        """We are about to end the connection (not a reaction to the peer's end)."""
        if self.closed_locally or self.peer_closed:
            return
        self.closed_locally = True
        if self.on_local_close is not None:
            try:
                self.on_local_close(self)
            except Exception:
                log.exception("on_local_close hook failed")

    # -- failure ----------------------------------------------------------
    def _protocol_error(self, exc: ProtocolError, abort: bool = False) -> None:
        """Close the connection for a broken rule. `abort`: drop what waits to
        be sent (a peer that does not read it), instead of flushing it."""
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
            self._closing_here()
            if abort:
                self.transport.abort()
            else:
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
            self._stash = None
            held, self._decode_held = self._decode_held, 0
            self._budget_release(held)
        if self._output is not None:
            self._output.change(-self._out_counted)
            self._out_counted = 0
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
        for inbound in self._streams.values():
            inbound.queue.put_nowait(err)
        for task in [*self._served.values(), *self._notified]:
            task.cancel()
        self._backlog.clear()
        self._served.clear()
        self._credits.clear()
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


def _release_when_done(conn: Connection, tasks: list[asyncio.Task[None]], n: int) -> None:
    """Give `n` reserved bytes back once every task has ended (now, if none)."""
    left = [t for t in tasks if not t.done()]
    if not left:
        conn._budget_release(n)
        return
    pending = len(left)

    def one_done(_: asyncio.Task[None]) -> None:
        nonlocal pending
        pending -= 1
        if pending == 0:
            conn._budget_release(n)

    for t in left:
        t.add_done_callback(one_done)


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(_CallTimeout())


def _internal(i: int, method: str, exc: Exception) -> dict[str, Any]:
    """The answer to a request whose handler failed: a bug, logged in full."""
    log.error("handler %s failed", method, exc_info=exc)
    return {
        "t": "r",
        "i": i,
        "e": {"code": INTERNAL, "message": f"internal error in {method}: {exc}"[:1024]},
    }


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


def handshake_late(where: str, timeout_s: float) -> RpcError:
    """The client's error for a handshake not finished in time. Retryable
    (`unavailable`): the usual cause is a busy master; the hint covers the
    other one, a port whose listener never answers."""
    return RpcError(
        "unavailable",
        f"{where} did not complete the handshake in {timeout_s:g}s (a busy master, "
        "or not leptond's RPC port: 7441 by default)",
    )


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
    on_local_close: Callable[[Connection], None] | None = None,
) -> Connection:
    """Connect and complete the handshake, or raise RpcError with a clear message."""
    loop = asyncio.get_running_loop()

    def make() -> Connection:
        conn = Connection(
            is_client=True,
            handlers=handlers,
            psk=psk,
            key_id=key_id,
            handshake_timeout_s=timeout_s,
            sealed=sealed,
            on_close=on_close,
        )
        conn.on_local_close = on_local_close
        return conn

    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                make,
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
        raise handshake_late(f"{host}:{port}", timeout_s) from None
    except RpcError:
        conn.abort()
        raise
    return conn
