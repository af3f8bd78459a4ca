"""Raft membership: checks before a change is proposed, and offline recovery.

A membership change is proposed only when (``RaftNode.add_member`` and
``remove_member`` run these checks in this order):

1. the address parses (``parse_member``): HOST:PORT, an IP literal that is
   one, or a name that resolves;
2. no other change is still committing (one change at a time);
3. for an add, the address answers the cluster's Raft handshake
   (``probe_member``): the new master is already running, with this
   cluster's password. An RPC port, a closed port or another program fails;
4. the change leaves at least a quorum of the members reachable
   (``quorum_after``): adding a stranger to 3 masters would need 3 of 4.

``recover_data_dir`` is ``leptond recover``: like etcd's
``--force-new-cluster``, it rewrites one stopped master's membership to a
given list, for a cluster that lost its quorum for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import ipaddress
import os
import pickle
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from leptond.clock import REAL
from leptond.fsutil import atomic_write
from raft.errors import JournalError, MembershipError
from raft.journal import DurableJournal
from raft.snapshot import read_snapshot_file, write_snapshot_file

MEMBERS_NAME = "raft.members"
LOCK_NAME = "raft.lock"
# pysyncobj's entry types (syncobj.py _COMMAND_TYPE): the first byte of a
# stored entry.
_NO_OP = b"\x01"
MEMBERSHIP_ENTRY = b"\x02"
_HANDSHAKE_REPLY_BYTES = 64 * 1024


def parse_member(addr: str) -> tuple[str, int]:
    """(host, port) of a Raft member address, or MembershipError with one line."""
    host, sep, port_s = addr.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise MembershipError(f"expected HOST:RAFTPORT, got {addr!r}")
    if any(c.isspace() for c in host) or len(host) > 253:
        raise MembershipError(f"{addr!r} is not a valid address")
    looks_numeric = all(c.isdigit() or c == "." for c in host) or ":" in host
    if looks_numeric:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise MembershipError(f"{host!r} is not a valid IP address") from None
    return host, int(port_s)


def quorum_after(members: int, reachable: int) -> bool:
    """Would a cluster of `members`, `reachable` of them up, have a quorum?"""
    return reachable * 2 > members


class _HandshakeUnpickler(pickle.Unpickler):
    """pysyncobj's handshake reply is a tuple of two byte strings, which pickle
    protocol 2 writes with ``_codecs.encode``; nothing else is let in."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            import _codecs

            return _codecs.encode
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")


def _frame(encryptor: Any, message: Any) -> bytes:
    # As pysyncobj's TcpConnection.send: pickle (protocol 2), zlib, Fernet, length.
    data = zlib.compress(pickle.dumps(message, protocol=2), 3)
    token = encryptor.encrypt_at_time(data, int(REAL.monotonic()))
    return struct.pack("i", len(token)) + token


async def probe_member(addr: str, encryptor: Any, timeout_s: float) -> None:
    """Return when `addr` answers this cluster's Raft handshake; else raise
    MembershipError saying what answered instead.

    A master that was just started may not listen yet: a refused connection
    is retried until `timeout_s`; anything else that answers fails at once.
    """
    host, port = parse_member(addr)
    deadline = REAL.monotonic() + timeout_s
    while True:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), max(0.1, deadline - REAL.monotonic())
            )
            break
        except (ConnectionRefusedError, TimeoutError) as exc:
            if REAL.monotonic() >= deadline:
                why = "connection refused" if isinstance(exc, OSError) else "no answer"
                raise MembershipError(
                    f"nothing answers at {addr} ({why}); start the new master first, "
                    "with --peers naming the current masters and itself"
                ) from None
            await REAL.sleep(0.2)
        except OSError as exc:  # unresolvable name, unreachable network
            raise MembershipError(f"cannot reach {addr}: {exc.strerror or exc}") from None
    try:
        key = os.urandom(32)
        writer.write(_frame(encryptor, key))
        await writer.drain()
        left = max(0.1, deadline - REAL.monotonic())
        head = await asyncio.wait_for(reader.readexactly(4), left)
        (length,) = struct.unpack("i", head)
        if not 0 < length <= _HANDSHAKE_REPLY_BYTES:
            raise ValueError("bad length")
        body = await asyncio.wait_for(reader.readexactly(length), left)
        data = zlib.decompress(encryptor.decrypt(body))
        reply = _HandshakeUnpickler(io.BytesIO(data)).load()
        if not (isinstance(reply, tuple) and len(reply) == 2 and reply[0] == key):
            raise ValueError("unexpected reply")
    except Exception:  # closed on us, a bad token, pickle or zlib: not one of ours
        raise MembershipError(
            f"{addr} does not answer this cluster's Raft handshake: it is not a master's "
            "Raft port, or its cluster secret differs"
        ) from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# -- the data dir lock ---------------------------------------------------------


@contextlib.contextmanager
def data_dir_lock(raft_dir: Path) -> Iterator[None]:
    """Hold the data dir's lock, or raise RaftError: one process at a time."""
    fd = lock_data_dir(raft_dir)
    try:
        yield
    finally:
        os.close(fd)


def lock_data_dir(raft_dir: Path) -> int:
    """Take the lock for as long as the returned fd stays open."""
    raft_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(raft_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalError(f"{raft_dir} is in use by a running master; stop it first") from None
    return fd


# -- recovery ----------------------------------------------------------------------


def read_members_file(raft_dir: Path) -> list[str] | None:
    """Members written by `leptond recover`, or None when there is no such file."""
    path = raft_dir / MEMBERS_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _write_members_file(raft_dir: Path, members: Sequence[str]) -> None:
    atomic_write(raft_dir / MEMBERS_NAME, "".join(m + "\n" for m in members).encode())


def recover_data_dir(raft_dir: Path, members: Sequence[str]) -> dict[str, int]:
    """Make `members` this stopped master's whole Raft membership.

    * ``raft.members`` lists them; the master uses it instead of ``--peers``
      as the membership its log starts from;
    * membership changes in the journal become no-ops (same index and term),
      so replaying the log does not bring the old members back;
    * the snapshot, if any, names the new members.

    Every acknowledged entry in this master's log is kept and, once the new
    members elect a leader, committed. Run it on every survivor with the
    same list; the lost masters must never come back with their old data.
    """
    for m in members:
        parse_member(m)
    if not members:
        raise MembershipError("--members needs at least this master's own Raft address")
    journal_path = raft_dir / "raft.journal"
    if not journal_path.exists():
        raise JournalError(f"{raft_dir} holds no Raft journal: is it a master's data dir?")
    with data_dir_lock(raft_dir):
        journal = DurableJournal(journal_path)
        try:
            changed = journal.neutralize(lambda cmd: cmd[:1] == MEMBERSHIP_ENTRY, _NO_OP)
        finally:
            journal.close()
        snap = raft_dir / "raft.snapshot"
        if snap.exists():
            state, meta = read_snapshot_file(snap)
            meta["cluster_members"] = sorted(members)
            # The two entries the snapshot ends with must stay equal to the
            # journal's copies, or pysyncobj would clear the journal on load.
            meta["raft_entries"] = [
                [_NO_OP if bytes(e[0])[:1] == MEMBERSHIP_ENTRY else bytes(e[0]), e[1], e[2]]
                for e in meta.get("raft_entries") or []
            ]
            write_snapshot_file(snap, state, meta)
        _write_members_file(raft_dir, members)
    return {"membership_entries": changed, "members": len(members)}
