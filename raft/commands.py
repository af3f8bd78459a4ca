"""Replicated commands: msgpack maps `{op, v, rid, args}`, and optionally
`at` (the proposer's wall-clock time) and `dedupe`.

Timestamps, ids and random choices are made by the proposer and travel in the
command, so every replica applies the same bytes to the same result.

A command proposed with the request id of a client's logical call carries
`dedupe`: apply remembers its result for a while (bounded by count and by
age, measured in `at`), so a retry of that call gets the first answer again.
A command with a fresh id of its own cannot be retried by anyone and is not
remembered.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any, NamedTuple

import msgpack

# Version 2: validation limits count bytes of the encoded command, not
# characters (raft/validate.py keeps version 1's limits for replaying old
# journals: a command applies the same way whatever release replays it).
# Version 3: a submit may use only a workdir manifest its own user committed
# (admins any), and register_node bounds what a host says about itself
# (raft.validate.validate_node).
# Version 4: job specs may carry an array and dependencies (after_ok,
# after_any), and a cancel may name one task of an array.
COMMAND_VERSION = 5
# The largest command apply will decode: a sanity bound, far above what any
# release proposes, so old journals with large entries still replay.
MAX_COMMAND_BYTES = 64 * 1024 * 1024
# The largest command a master proposes: one Raft entry. raft/node.py sizes
# pysyncobj's append-entries batches so that an entry this big never takes
# its chunked large-entry path (which corrupts entries with bytes >= 0x80);
# batchers and the plan committer split their work to stay under it.
MAX_ENTRY_BYTES = 1024 * 1024
# What a batch of items may add up to inside one command: the rest of the
# entry (op, version, request id, map headers) takes well under this margin.
BATCH_BUDGET_BYTES = MAX_ENTRY_BYTES - 4096


class Command(NamedTuple):
    """One decoded command. A named tuple, not a frozen dataclass: as
    immutable, and made in a third of the time (every replica decodes every
    committed entry)."""

    op: str
    v: int
    rid: str
    args: dict[str, Any]
    at: float | None = None
    dedupe: bool = False


class BadCommand(Exception):
    pass


def new_request_id() -> str:
    # 128 random bits in hex, as uuid4().hex but without building a UUID
    # object: every command proposed makes one.
    return os.urandom(16).hex()


def encode(op: str, args: dict[str, Any], rid: str | None = None, at: float | None = None) -> bytes:
    """A command; with `rid`, one whose result is remembered for retries of it."""
    cmd: dict[str, Any] = {"op": op, "v": COMMAND_VERSION, "rid": rid or new_request_id()}
    cmd["args"] = args
    if at is not None:
        cmd["at"] = float(at)
    if rid:
        cmd["dedupe"] = True
    return packb(cmd)


def encoded_size(value: Any) -> int:
    """Bytes `value` takes inside a command (msgpack, as `encode` packs it)."""
    return len(packb(value))


_local = threading.local()


def packb(value: Any) -> bytes:
    """msgpack.packb(value, use_bin_type=True), the same bytes and errors,
    with one Packer per thread: packb makes a new one (with a 256 KiB buffer)
    at each call, and every command proposed, every size checked and every
    spec validated packs. A Packer empties its buffer after each pack, one
    that raised included, but keeps its size: after a large value (a
    megabytes-long argv whose size is being checked) the Packer is let go,
    so no thread holds more than about an entry's worth."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    out: bytes = packer.pack(value)
    if len(out) > MAX_ENTRY_BYTES:
        _local.packer = None
    return out


def human_bytes(n: int) -> str:
    """1.2 MB, 256 KiB: sizes in the one-line errors people read."""
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n >> 20} MiB"
    if n >= 1024 and n % 1024 == 0 and n < 1024 * 1024:
        return f"{n >> 10} KiB"
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f} MB"
    if n >= 1000:
        return f"{n / 1000:.1f} kB"
    return f"{n} bytes"


# Tuples, not `bytes | bytearray`: a union is built anew at each call.
_BUFFERS = (bytes, bytearray, memoryview)
_NUMBERS = (int, float)


def decode(data: bytes) -> Command:
    """Parse command bytes; any defect is a BadCommand with a one-line reason."""
    if not isinstance(data, _BUFFERS):
        raise BadCommand("command is not bytes")
    if len(data) > MAX_COMMAND_BYTES:
        raise BadCommand("command too large")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadCommand(f"command is not msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise BadCommand("command is not a map")
    op, v, rid, args = obj.get("op"), obj.get("v"), obj.get("rid"), obj.get("args")
    if not isinstance(op, str) or not op:
        raise BadCommand("command has no op")
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadCommand("command has no version")
    if v > COMMAND_VERSION:
        raise BadCommand(
            f"command version {v} is newer than this master understands ({COMMAND_VERSION})"
        )
    if not isinstance(rid, str) or not rid or len(rid) > 128:
        raise BadCommand("command has no request id")
    if not isinstance(args, dict):
        raise BadCommand("command args are not a map")
    at = obj.get("at")
    if isinstance(at, bool) or not isinstance(at, _NUMBERS) or not math.isfinite(at):
        at = None  # optional: a command without a usable time ages by count alone
    return Command(op, v, rid, args, None if at is None else float(at), obj.get("dedupe") is True)
