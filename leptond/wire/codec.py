"""The sans-I/O half of the RPC protocol: frames, bodies and sealing.

Nothing here touches a socket or a clock, so every rule of the wire format can
be tested by feeding bytes in and reading values out.

Frame:     u32 big-endian length | payload            (length <= max_frame)
Handshake: client hello and server hello frames, in the clear (see `handshake`)
Sealed:    payload = AEAD(key_dir, nonce=counter_dir, plaintext)
Plaintext: flags byte | body; flags bit 0 = body is lz4 (size-prefixed block)
Body:      msgpack map
Batch:     flags byte 0x02, then for each message: u32 big-endian length |
           flags byte 0 | msgpack map.  Several small messages in one sealed
           frame: one AEAD call for all of them.  Sent only to a peer that
           said in its hello that it reads them (see `connection`).

What one frame may cost its receiver is bounded, not only its size: a 66 KB
lz4 frame of msgpack empty arrays unpacks into 16 million Python lists (1.2
GiB, seconds of CPU). A receiver that does not trust its peer passes
`max_items`: the msgpack containers and their elements in one frame, all its
messages together, may not pass it (counted as they are built, so unpacking
stops at the cap), and a batch holds at most `MAX_BATCH_ITEMS` messages.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import lz4.block
import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ProtocolError

MAX_FRAME = 16 * 1024 * 1024
MAX_BODY = 16 * 1024 * 1024
COMPRESS_MIN = 1024
# Compressing a large incompressible body costs more than sending it; we try a
# sample first and only compress the whole body when the sample shrinks well.
COMPRESS_SAMPLE = 16 * 1024
FLAG_LZ4 = 0x01
FLAG_BATCH = 0x02
# Bodies up to this size (and never compressed ones) may travel in a batch.
BATCH_ITEM_MAX = 16 * 1024
# Messages in one batch frame: a sender starts a new batch at this count, a
# receiver refuses more (each message costs a dispatch on its event loop).
MAX_BATCH_ITEMS = 1024
# Bodies up to this size are unpacked without counting their items: they
# cannot hold more than this many, and counting costs a call per container.
COUNT_ITEMS_ABOVE = 64 * 1024
_LEN = struct.Struct(">I")
TAG_LEN = 16
# cryptography >= 45 can seal into a caller's buffer, which saves a copy of
# every large frame.
_HAS_INTO = hasattr(AESGCM, "encrypt_into")


class FrameReader:
    """Splits a byte stream into frames: `append` bytes, then take frames with `next`.

    Frames come out one at a time so that the caller can tighten or relax
    `max_frame` between two frames that arrived in the same read (the cap rises
    when the handshake completes). Large frames are kept as a list of chunks
    until complete, so a 16 MiB frame arriving in 64 KiB pieces costs one join,
    not quadratic copying.
    """

    __slots__ = ("_buf", "_chunks", "_chunks_len", "_need", "_pos", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # start of unread bytes in _buf
        self._need = -1  # body length of the frame being collected in _chunks
        self._chunks: list[bytes] = []
        self._chunks_len = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Appends `data` and returns every frame now complete."""
        self.append(data)
        frames: list[bytes] = []
        while (payload := self.next()) is not None:
            frames.append(payload)
        return frames

    def append(self, data: bytes) -> None:
        if self._need >= 0:
            self._chunks.append(data)
            self._chunks_len += len(data)
        else:
            self._buf += data

    def next(self) -> bytes | None:
        """The next complete frame's payload, or None until more bytes arrive.

        Raises ProtocolError when a length is over `max_frame`.
        """
        if self._need >= 0:
            return self._next_chunked()
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 4:
            self._compact()
            return None
        (length,) = _LEN.unpack_from(buf, pos)
        if length > self.max_frame:
            raise ProtocolError("frame_too_large", f"frame of {length} bytes over the cap")
        start = pos + 4
        if avail - 4 < length:
            if length > 65536:
                # Collect the rest of a big frame as a list of chunks.
                with memoryview(buf) as view:
                    first = bytes(view[start:])
                self._need = length
                self._chunks = [first]
                self._chunks_len = len(first)
                buf.clear()
                self._pos = 0
            else:
                self._compact()
            return None
        end = start + length
        if length > 4096:
            with memoryview(buf) as view:
                payload = bytes(view[start:end])
        else:
            payload = bytes(buf[start:end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return payload

    def partial_frame_length(self) -> int | None:
        """The declared length of a frame that has begun but is not complete.

        None when no frame header is buffered, when the next frame is already
        complete (``next`` returns it), or when its length is over the cap
        (``next`` raises). A server uses it to reserve room for a frame before
        buffering the rest of it.
        """
        if self._need >= 0:
            return self._need if self._chunks_len < self._need else None
        avail = len(self._buf) - self._pos
        if avail < 4:
            return None
        (length,) = _LEN.unpack_from(self._buf, self._pos)
        if length > self.max_frame or avail - 4 >= length:
            return None
        return int(length)

    def _next_chunked(self) -> bytes | None:
        need = self._need
        if self._chunks_len < need:
            return None
        chunks = self._chunks
        extra = self._chunks_len - need
        rest = b""
        if extra:
            # Split only the last chunk, not the joined frame.
            last = chunks[-1]
            cut = len(last) - extra
            chunks[-1] = last[:cut]
            rest = last[cut:]
        payload = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._chunks_len = 0
        self._need = -1
        self._buf += rest
        return payload

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received that are not yet part of a returned frame."""
        return len(self._buf) - self._pos + self._chunks_len


def frame(payload: bytes) -> bytes:
    return _LEN.pack(len(payload)) + payload


def encode_body(msg: dict[str, Any], compress: bool = True) -> bytes:
    """msgpack, then lz4 when that makes it smaller; returns flags byte + body."""
    raw = msgpack.packb(msg, use_bin_type=True)
    n = len(raw)
    if compress and n > COMPRESS_MIN:
        if n > 4 * COMPRESS_SAMPLE:
            sample = raw[:COMPRESS_SAMPLE]
            if len(lz4.block.compress(sample, store_size=False)) > COMPRESS_SAMPLE * 0.9:
                return b"\x00" + raw
        packed = lz4.block.compress(raw, store_size=True)
        if len(packed) < n:
            return b"\x01" + packed
    return b"\x00" + raw


def decoded_size(plain: bytes | memoryview) -> int:
    """The bytes a frame's body takes once decompressed (what its lz4 header
    claims; checked against the cap when it is decoded), read before any
    decompression, so that a receiver can reserve room for it first."""
    if len(plain) >= 5 and plain[0] == FLAG_LZ4:
        return max(len(plain), int.from_bytes(plain[1:5], "little"))
    return len(plain)


class _TooManyItems(Exception):
    pass


class ItemCounter:
    """Counts msgpack containers and their elements as they are unpacked, and
    stops the unpacking once they pass `limit` (one counter per frame: the
    messages of a batch share it)."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def list_hook(self, v: list[Any]) -> list[Any]:
        self.left -= 1 + len(v)
        if self.left < 0:
            raise _TooManyItems
        return v

    def object_hook(self, v: dict[Any, Any]) -> dict[Any, Any]:
        self.left -= 1 + len(v)
        if self.left < 0:
            raise _TooManyItems
        return v


def _unpack(body: memoryview, items: ItemCounter | None) -> Any:
    n = len(body)
    if items is None or n <= COUNT_ITEMS_ABOVE:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    # Each element takes at least one byte, and no single container may hold
    # more than the whole frame may: both bound the work done before a hook
    # runs (hooks run as each container is complete, innermost first).
    most = min(n, items.left + 1)
    return msgpack.unpackb(
        body,
        raw=False,
        strict_map_key=False,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=most,
        max_map_len=min(n // 2, most),
        max_ext_len=0,
        list_hook=items.list_hook,
        object_hook=items.object_hook,
    )


def decode_body(
    plain: bytes | memoryview, max_body: int = MAX_BODY, items: ItemCounter | None = None
) -> dict[str, Any]:
    """Inverse of encode_body. Any defect is a ProtocolError, never anything else.

    `items`: a counter that bounds the msgpack items unpacked (see the module
    docstring); None: unbounded, for peers that are trusted."""
    if not plain:
        raise ProtocolError("empty_body", "empty frame body")
    flags = plain[0]
    if flags & ~FLAG_LZ4:
        raise ProtocolError("bad_flags", f"unknown flags 0x{flags:02x}")
    body = memoryview(plain)[1:]
    if flags & FLAG_LZ4:
        if len(body) < 4:
            raise ProtocolError("bad_lz4", "lz4 body too short")
        claimed = int.from_bytes(body[:4], "little")
        # Check the claimed size before lz4 allocates it: a 20-byte frame must
        # not make us reserve gigabytes.
        if claimed > max_body:
            raise ProtocolError("lz4_bomb", f"lz4 body claims {claimed} bytes, over the cap")
        try:
            body = memoryview(lz4.block.decompress(body))
        except Exception as exc:  # lz4 raises LZ4BlockError or ValueError
            raise ProtocolError("bad_lz4", f"lz4 body does not decompress: {exc}") from None
    try:
        msg = _unpack(body, items)
    except _TooManyItems:
        raise ProtocolError(
            "too_many_items", "frame holds too many msgpack items for this receiver"
        ) from None
    except Exception as exc:  # msgpack raises several unrelated types
        if isinstance(exc, ValueError) and "exceeds max_" in str(exc):
            # A container longer than the counter allows: msgpack's own check.
            raise ProtocolError(
                "too_many_items", "frame holds too many msgpack items for this receiver"
            ) from None
        raise ProtocolError("bad_msgpack", f"body is not msgpack: {type(exc).__name__}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("not_a_map", "body is not a map")
    if "t" not in msg:
        raise ProtocolError("no_type", "message has no type")
    return msg


def decode_messages(
    plain: bytes, max_body: int = MAX_BODY, max_items: int | None = None
) -> list[dict[str, Any]]:
    """The messages of one opened frame: one, or a batch's several, in order.
    Any defect in any of them is a ProtocolError, never anything else.
    `max_items`: the most msgpack items the whole frame may unpack into."""
    items = None if max_items is None else ItemCounter(max_items)
    if not plain or plain[0] != FLAG_BATCH:
        return [decode_body(plain, max_body, items)]
    out: list[dict[str, Any]] = []
    n = len(plain)
    pos = 1
    view = memoryview(plain)
    while pos < n:
        if n - pos < 4:
            raise ProtocolError("bad_batch", "batch entry cut short")
        (length,) = _LEN.unpack_from(plain, pos)
        start = pos + 4
        pos = start + length
        if length == 0 or pos > n:
            raise ProtocolError("bad_batch", "batch entry length out of range")
        if plain[start] != 0:
            # Compressed bodies never travel in a batch: one frame can then
            # never expand into many decompressions.
            raise ProtocolError("bad_batch", "batch entry with flags set")
        if len(out) >= MAX_BATCH_ITEMS:
            raise ProtocolError("bad_batch", f"batch of more than {MAX_BATCH_ITEMS} messages")
        if items is not None and n > COUNT_ITEMS_ABOVE and length <= COUNT_ITEMS_ABOVE:
            # Small entries are not counted one by one, but the whole batch is.
            msg = decode_body(view[start:pos], max_body, None)
            items.left -= length
            if items.left < 0:
                raise ProtocolError(
                    "too_many_items", "frame holds too many msgpack items for this receiver"
                )
            out.append(msg)
            continue
        out.append(decode_body(view[start:pos], max_body, items))
    if not out:
        raise ProtocolError("bad_batch", "empty batch")
    return out


class BatchBuilder:
    """Gathers small encoded bodies (flags byte 0 | msgpack) for one sealed frame."""

    __slots__ = ("_buf", "_first", "count")

    def __init__(self) -> None:
        # A lone body (the usual case: one reply per read) is kept as it is
        # and sealed as it is; a batch is built once a second one comes.
        self._first = b""
        self._buf: bytearray | None = None
        self.count = 0

    def add(self, body: bytes) -> None:
        if self.count == 0:
            self._first = body
        else:
            if self._buf is None:
                first = self._first
                self._buf = bytearray(b"\x02")
                self._buf += _LEN.pack(len(first))
                self._buf += first
            self._buf += _LEN.pack(len(body))
            self._buf += body
        self.count += 1

    def __len__(self) -> int:
        """The bytes of the batch frame's plaintext so far."""
        if self._buf is not None:
            return len(self._buf)
        return 5 + len(self._first) if self.count else 1

    def take(self) -> bytes | bytearray:
        """The plaintext to seal (a lone body goes as it is, not as a batch of
        one), and the builder starts afresh."""
        out: bytes | bytearray = self._first if self._buf is None else self._buf
        self._first, self._buf, self.count = b"", None, 0
        return out


class Sealer:
    """Seals outgoing payloads for one direction; the nonce is a counter."""

    __slots__ = ("_aead", "_ctr")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._ctr = 0

    def seal(self, plain: bytes | bytearray) -> bytes:
        nonce = self._ctr.to_bytes(12, "big")  # 4 zero bytes, then the counter
        self._ctr += 1
        return self._aead.encrypt(nonce, plain, None)

    def seal_frame(self, plain: bytes | bytearray) -> bytes | bytearray:
        """`frame(self.seal(plain))`, sealing straight into the framed buffer."""
        n = len(plain) + TAG_LEN
        if not _HAS_INTO or n < 4096:
            return _LEN.pack(n) + self.seal(plain)
        nonce = self._ctr.to_bytes(12, "big")
        self._ctr += 1
        out = bytearray(4 + n)
        _LEN.pack_into(out, 0, n)
        with memoryview(out) as view:
            self._aead.encrypt_into(nonce, plain, None, view[4:])
        return out


class Opener:
    """Opens incoming payloads; the expected counter makes replays and reorders fail."""

    __slots__ = ("_aead", "_ctr")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._ctr = 0

    def open(self, sealed: bytes) -> bytes:
        nonce = self._ctr.to_bytes(12, "big")
        try:
            plain = self._aead.decrypt(nonce, sealed, None)
        except (InvalidTag, ValueError):
            raise ProtocolError(
                "bad_seal", "frame failed authentication (wrong key, replay or tampering)"
            ) from None
        self._ctr += 1
        return plain


class PlainCodec:
    """The same framing without sealing; used by the benchmark's baseline only."""

    def seal(self, plain: bytes | bytearray) -> bytes:
        return bytes(plain)

    def seal_frame(self, plain: bytes | bytearray) -> bytes:
        return _LEN.pack(len(plain)) + plain

    def open(self, sealed: bytes) -> bytes:
        return sealed


SealFn = Callable[[bytes], bytes]
