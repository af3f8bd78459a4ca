"""pysyncobj TCP transport: fsync before send, and a cap on what a peer can buffer.

Ordering (etcd's rule): whatever a message implies about this node's log (an
acknowledgement, entries a leader asks others to store, a vote) must be on
disk before the message leaves. pysyncobj sends every Raft message through
``Transport.send`` (``pysyncobj/transport.py``, ``TCPTransport.send``), so one
fsync here, only when the journal holds unsynced entries, covers a whole
batch of appends that a tick produced.

Memory: pysyncobj's ``TcpConnection`` reads a 4-byte length, then buffers
until it has that many bytes, whoever sent them, and reads everything the
socket holds before it parses anything, by repeated ``bytes`` concatenation.
A 2 GiB length prefix followed by zeros grew a master by hundreds of MiB and
stalled its Raft thread long enough to cost a leader change. Here every
connection refuses a length over its cap before buffering a byte of the
frame, and never holds more than the one frame it is reading:

* before the peer has proven the cluster password (its first frame, the
  handshake, decrypted), the cap is ``UNAUTHENTICATED_FRAME_BYTES`` and it
  reads exactly one frame at a time;
* afterwards it is ``frame_cap(conf)``, above the largest message pysyncobj
  can build from our entry and batch sizes, and a bounded queue of whole
  frames lets one poll carry many small messages.

Buffers are ``bytearray``s and whole frames, so reading a large frame is
linear, not the quadratic concatenation of the original.
"""

from __future__ import annotations

import collections
import errno
import logging
import socket
import struct
from typing import Any, Protocol

from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.transport import TCPTransport

from leptond.clock import REAL

log = logging.getLogger(__name__)

# The handshake frames (a 32-byte random key, a node address) and the admin
# tool's utility commands are a few hundred bytes once encrypted.
UNAUTHENTICATED_FRAME_BYTES = 64 * 1024
# Incoming connections not yet known as a member: at most this many, so
# strangers hold at most this many times a small frame or two.
MAX_UNKNOWN_CONNECTIONS = 64
# Whole frames waiting to be parsed; reading pauses above this.
QUEUED_FRAME_BYTES = 1024 * 1024
_READ_CHUNK = 1024 * 1024
_READ_AHEAD = 64 * 1024
_LENGTH = struct.Struct("i")  # pysyncobj's prefix: native, signed
_LOG_EVERY_S = 10.0


def frame_cap(append_batch_bytes: int, snapshot_chunk_bytes: int) -> int:
    """The largest frame a peer of ours can send, with room to spare.

    An append_entries message holds entries adding up to less than twice the
    batch size (pysyncobj adds entries until the batch size is reached, and
    a single stored entry is below it). Pickle protocol 2 writes each byte
    >= 0x80 as two, plus tens of bytes per entry (at most one more stored
    size for entries of 30 bytes or more); zlib adds a little to data that
    does not compress; Fernet adds base64 (4/3) and a header.
    """
    pickled = 3 * 2 * max(append_batch_bytes, snapshot_chunk_bytes) + 64 * 1024
    return pickled * 4 // 3 + 1024 * 1024


class Syncable(Protocol):
    def sync_if_needed(self) -> None: ...


class _Refusals:
    """Counts refused frames; logs one line per peer now and then, not per frame."""

    def __init__(self) -> None:
        self.count = 0
        self._last_log = 0.0

    def refused(self, peer: str, length: int, cap: int) -> None:
        self.count += 1
        now = REAL.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            log.warning(
                "raft port: refused a frame of %d bytes from %s (limit %d); connection "
                "closed (%d refused so far)",
                length,
                peer,
                cap,
                self.count,
            )


class CappedTcpConnection(TcpConnection):
    """TcpConnection that checks every length prefix before buffering its frame.

    pysyncobj creates plain TcpConnections in two places (its TcpServer and
    ``TCPTransport.addNode``); ``cap_connection`` turns one into this class
    right after it is made, before it has read anything. Raw bytes collect
    in ``_partial`` (at most one frame under the cap, plus one read ahead once
    the peer is authenticated); whole frames queue in ``_frames`` (reading
    pauses past ``QUEUED_FRAME_BYTES``), and pysyncobj's own parser, which
    decrypts and unpickles, is handed one frame at a time.
    """

    _TcpConnection__readBuffer: bytes  # pysyncobj's: one frame for its parser
    _partial: bytearray
    _frames: collections.deque[bytes]
    _queued: int
    _authenticated: bool
    _caps: tuple[int, int]
    _refusals: _Refusals

    def _reset_reading(self) -> None:
        self._partial = bytearray()
        self._frames = collections.deque()
        self._queued = 0
        self._authenticated = False

    def connect(self, host: str, port: int) -> bool:
        self._reset_reading()
        return bool(super().connect(host, port))

    def disconnect(self) -> None:
        self._reset_reading()
        super().disconnect()

    def _TcpConnection__processRead(self) -> bool:  # pysyncobj's private name
        # Returning False ends pysyncobj's read loop; what is left stays in
        # the socket until the next poll (level-triggered).
        if self._queued >= QUEUED_FRAME_BYTES:
            return False
        want = _LENGTH.size - len(self._partial)
        if want <= 0:
            want = _LENGTH.size + int(_LENGTH.unpack_from(self._partial)[0]) - len(self._partial)
        if self._authenticated:
            want = max(want, _READ_AHEAD)  # fewer reads; never past one chunk
        sock = self._TcpConnection__socket
        try:
            incoming = sock.recv(min(want, _READ_CHUNK))
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or not incoming:
            self.disconnect()
            return False
        self._partial += incoming
        return self._take_frames(sock)

    def _take_frames(self, sock: socket.socket) -> bool:
        """Queue every whole frame in `_partial`; refuse a length over the cap
        as soon as its 4 bytes are in. False: stop reading for now."""
        while len(self._partial) >= _LENGTH.size:
            length = int(_LENGTH.unpack_from(self._partial)[0])
            cap = self._caps[1] if self._authenticated else self._caps[0]
            if not 0 <= length <= cap:
                self._refusals.refused(self._peer(sock), length, cap)
                self.disconnect()
                return False
            end = _LENGTH.size + length
            if len(self._partial) < end:
                return True
            self._frames.append(bytes(self._partial[:end]))
            self._queued += end
            del self._partial[:end]
            if not self._authenticated:
                return False  # one frame at a time until the handshake decrypts
        return True

    def _TcpConnection__processParseMessage(self) -> Any:
        if not self._TcpConnection__readBuffer:
            if not self._frames:
                return None
            frame = self._frames.popleft()
            self._queued -= len(frame)
            self._TcpConnection__readBuffer = frame
        message = TcpConnection._TcpConnection__processParseMessage(self)
        if message is not None:
            # It decrypted: the peer holds the cluster password.
            self._authenticated = True
        return message

    @staticmethod
    def _peer(sock: socket.socket | None) -> str:
        try:
            host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
        except OSError:
            return "a closed connection"
        return f"{host}:{port}"


def cap_connection(conn: TcpConnection, caps: tuple[int, int], refusals: _Refusals) -> None:
    """Make a fresh TcpConnection a CappedTcpConnection (before its first read)."""
    conn.__class__ = CappedTcpConnection
    capped: CappedTcpConnection = conn
    capped._caps = caps
    capped._refusals = refusals
    capped._reset_reading()


class SyncBeforeSendTransport(TCPTransport):
    """``TCPTransport`` whose ``send`` first makes the journal durable, and
    whose connections cap what a peer can make them buffer.

    The owning SyncObj must expose the journal as ``raft_journal`` before it
    constructs its transport (``SyncObj.__init__`` builds the journal first,
    then the transport).
    """

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        self._journal: Syncable = syncObj.raft_journal
        conf = syncObj.conf
        self.frame_caps = (
            UNAUTHENTICATED_FRAME_BYTES,
            frame_cap(conf.appendEntriesBatchSizeBytes, conf.logCompactionBatchSize),
        )
        self.refusals = _Refusals()
        self._pending_incoming: dict[TcpConnection, None] = {}
        super().__init__(syncObj, selfNode, otherNodes)

    def setOnNodeDisconnectedCallback(self, callback: Any) -> None:
        # SyncObj registers its own callback here; `on_peer_lost` (set by
        # the owner afterwards) runs after it, on the Raft thread.
        def both(node: Any) -> None:
            if callback is not None:
                callback(node)
            hook = getattr(self, "on_peer_lost", None)
            if hook is not None:
                hook(node)

        super().setOnNodeDisconnectedCallback(both)

    def send(self, node: Any, message: Any) -> bool:
        # Ordering rule: fsync BEFORE the message is queued on the socket.
        self._journal.sync_if_needed()
        return bool(super().send(node, message))

    def _onNewIncomingConnection(self, conn: TcpConnection) -> None:
        # Called by pysyncobj's TcpServer right after it made `conn`.
        cap_connection(conn, self.frame_caps, self.refusals)
        # Connections that have not said which member they are yet (pysyncobj
        # keeps them in _unknownConnections) are bounded in number too: the
        # oldest makes room, so idle strangers cannot hold memory or every slot.
        pending = self._pending_incoming
        for old in [c for c in pending if c not in self._unknownConnections]:
            del pending[old]
        while len(pending) >= MAX_UNKNOWN_CONNECTIONS:
            oldest = next(iter(pending))
            del pending[oldest]
            oldest.disconnect()
        pending[conn] = None
        super()._onNewIncomingConnection(conn)

    def addNode(self, node: Any) -> None:
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is not None and not isinstance(conn, CappedTcpConnection):
            cap_connection(conn, self.frame_caps, self.refusals)
