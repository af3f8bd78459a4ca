"""Snapshot files: msgpack, versioned, checksummed, written atomically.

The same format serves pysyncobj's log compaction (through the
``serializer``/``deserializer`` hooks of ``SyncObjConf``, which replace its
gzip+pickle full dump) and ``leptonctl snapshot save/restore``.

A file is one msgpack map::

    {"format": "leptond-snapshot", "v": 1, "index": int, "term": int,
     "cluster_members": [addr, ...] | None, "raft_entries": [...] | None,
     "state": bytes, "sha256": hex}

``sha256`` covers the msgpack encoding of every other key, packed in sorted
key order, so the check does not depend on how the map was written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from leptond.fsutil import atomic_write
from raft.errors import SnapshotError

FORMAT = "leptond-snapshot"
VERSION = 1
# Keys a caller may put in ``meta``; anything else is refused so a typo does
# not silently vanish from the file.
META_KEYS = frozenset({"index", "term", "cluster_members", "raft_entries"})


def _digest(body: dict[str, Any]) -> str:
    canonical = msgpack.packb({k: body[k] for k in sorted(body)}, use_bin_type=True)
    return hashlib.sha256(canonical).hexdigest()


def _bin_header(n: int) -> bytes:
    """msgpack's header of a bin of n bytes (msgpack.Packer has no call for it)."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 1 << 32:
        return b"\xc6" + n.to_bytes(4, "big")
    raise SnapshotError(f"a state of {n} bytes is too large for a snapshot file")


def _head(meta: dict[str, Any]) -> dict[str, Any]:
    unknown = set(meta) - META_KEYS
    if unknown:
        raise ValueError(f"unknown snapshot meta keys: {sorted(unknown)}")
    return {
        "format": FORMAT,
        "v": VERSION,
        "index": int(meta.get("index", 0)),
        "term": int(meta.get("term", 0)),
        "cluster_members": meta.get("cluster_members"),
        "raft_entries": meta.get("raft_entries"),
    }


def snapshot_chunks(state_chunks: list[bytes], meta: dict[str, Any]) -> Iterator[bytes]:
    """The snapshot file, in pieces: the state is never joined into one
    buffer (and hashlib lets other threads run while it hashes the pieces).

    Byte for byte what `encode_snapshot` returns for the joined state."""
    head = _head(meta)
    size = sum(len(c) for c in state_chunks)
    state_header = _bin_header(size)
    pack = msgpack.Packer(use_bin_type=True).pack
    h = hashlib.sha256()
    keys = sorted([*head, "state"])
    h.update(_map_header(len(keys)))
    for k in keys:
        h.update(pack(k))
        if k == "state":
            h.update(state_header)
            for c in state_chunks:
                h.update(c)
        else:
            h.update(pack(head[k]))
    yield _map_header(len(head) + 2) + b"".join(pack(k) + pack(v) for k, v in head.items())
    yield pack("state") + state_header
    yield from state_chunks
    yield pack("sha256") + pack(h.hexdigest())


def _map_header(n: int) -> bytes:
    return bytes(msgpack.Packer().pack_map_header(n))


def encode_snapshot(state_bytes: bytes, meta: dict[str, Any]) -> bytes:
    return b"".join(snapshot_chunks([bytes(state_bytes)], meta))


def decode_snapshot(data: bytes, source: str = "snapshot") -> tuple[bytes, dict[str, Any]]:
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:
        raise SnapshotError(f"{source}: not a leptond snapshot (cannot decode: {e})") from e
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise SnapshotError(f"{source}: not a leptond snapshot (format marker missing)")
    if body.get("v") != VERSION:
        raise SnapshotError(
            f"{source}: snapshot format version {body.get('v')!r} is not supported "
            f"(this build reads version {VERSION}); use a matching leptond"
        )
    claimed = body.pop("sha256", None)
    if claimed != _digest(body):
        raise SnapshotError(
            f"{source}: checksum mismatch, the snapshot is damaged; restore another copy"
        )
    state = body.pop("state")
    if not isinstance(state, bytes):
        raise SnapshotError(f"{source}: state is not bytes")
    meta = {k: body[k] for k in ("index", "term", "cluster_members", "raft_entries")}
    return state, meta


def write_snapshot_file(path: Path | str, state_bytes: bytes, meta: dict[str, Any]) -> None:
    """Write a snapshot durably: temp file, fsync, rename, fsync the directory.

    A crash leaves either the old file or the new one, never a mix.
    """
    atomic_write(path, snapshot_chunks([state_bytes], meta), tmp_suffix=".writing")


def read_snapshot_file(path: Path | str) -> tuple[bytes, dict[str, Any]]:
    """Read and verify a snapshot; raises SnapshotError on any damage."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SnapshotError(f"{path}: cannot read snapshot: {e.strerror}") from e
    return decode_snapshot(data, str(path))
