"""Test helpers for the wire protocol: a live server process and a raw client.

`RawPeer` drives the handshake itself with the pure functions from
`handshake` and `codec` over a blocking socket, so a test can send exactly the
bytes it wants: valid sealed frames, replays, bit flips, garbage.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leptond.wire import handshake as hs
from leptond.wire.codec import FrameReader, Opener, Sealer, decode_body, encode_body, frame

ROOT = Path(__file__).resolve().parent.parent
SERVER = Path(__file__).resolve().parent / "wire_server_proc.py"
PSK = bytes(range(32))
KEY_ID = "cluster"


def wait_until(cond: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.02) -> Any:
    """Polls `cond` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = cond()
        if out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(every_s)


@dataclass
class ServerProc:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def stats(self) -> dict[str, Any]:
        with RawPeer.connect(self.port) as peer:
            out = peer.call("stats")
        assert isinstance(out, dict)
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def server_process(tmp: Path, *flags: str, plain: bool = False) -> Iterator[ServerProc]:
    """Starts tests/wire_server_proc.py and kills it by pid on the way out, whatever happens."""
    psk_file = tmp / "psk"
    psk_file.write_text(PSK.hex())
    log_path = tmp / "server.log"
    args = [sys.executable, str(SERVER), "--psk-file", str(psk_file), *flags]
    if plain:
        args.append("--plain")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the server prints its port first, or dies
        if not line.strip():
            proc.wait(5)
            raise AssertionError(f"server did not start:\n{log_path.read_text()}")
        yield ServerProc(proc, int(line), log_path)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class RawPeer:
    """A client that speaks the protocol by hand over a blocking socket."""

    sock: socket.socket
    sealer: Sealer | None = None
    opener: Opener | None = None
    reader: FrameReader = field(default_factory=FrameReader)
    pending: list[bytes] = field(default_factory=list)
    next_id: int = 1

    @classmethod
    def open(cls, port: int, timeout_s: float = 30.0) -> RawPeer:
        # The socket's timeout bounds every wait for a reply: generous, since
        # a server busy with another peer's flood answers late on a loaded
        # machine (a test that expects silence or a close sets its own).
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    @classmethod
    def connect(
        cls, port: int, psk: bytes = PSK, key_id: str = KEY_ID, hello: bool = True
    ) -> RawPeer:
        """Opens a socket and runs the handshake; with `hello`, also the sealed hello."""
        peer = cls.open(port)
        try:
            peer.handshake(psk, key_id)
            if hello:
                peer.send_msg({"t": "h"})
                reply = peer.recv_msg()
                assert reply == {"t": "h"}, reply
        except BaseException:
            peer.close()
            raise
        return peer

    def handshake(self, psk: bytes = PSK, key_id: str = KEY_ID) -> int:
        """Exchanges hellos and installs keys; returns the server's status byte."""
        state = hs.HandshakeState()
        self.sock.sendall(frame(hs.client_hello(state, key_id)))
        status, nonce, pub = hs.parse_server_hello(self.recv_frame())
        if status == hs.STATUS_OK:
            keys = hs.derive_keys(state, pub, nonce, psk, is_client=True)
            self.sealer, self.opener = Sealer(keys.send), Opener(keys.recv)
        return status

    def seal(self, msg: dict[str, Any], compress: bool = True) -> bytes:
        """A framed, sealed message; advances the send counter."""
        return self.seal_plain(encode_body(msg, compress))

    def seal_plain(self, plain: bytes) -> bytes:
        assert self.sealer is not None
        return frame(self.sealer.seal(plain))

    def send_msg(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(self.seal(msg))

    def call(self, method: str, args: Any = None) -> Any:
        i = self.next_id
        self.next_id += 1
        self.send_msg({"t": "q", "i": i, "m": method, "a": args})
        while True:
            msg = self.recv_msg()
            if msg.get("t") == "r" and msg.get("i") == i:
                if msg.get("e") is not None:
                    raise AssertionError(f"{method} failed: {msg['e']}")
                return msg.get("r")

    def recv_frame(self) -> bytes:
        while not self.pending:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("server closed the connection")
            self.pending += self.reader.feed(data)
        return self.pending.pop(0)

    def recv_msg(self) -> dict[str, Any]:
        assert self.opener is not None
        return decode_body(self.opener.open(self.recv_frame()))

    def closed_by_server(self, timeout_s: float = 5.0) -> bool:
        """Reads until the server closes; False if it is still open at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(1 << 16):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def counter(stats: dict[str, Any], name: str) -> int:
    return int(stats["server"].get(name, 0))
