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
import os
from pathlib import Path
from typing import Any

import msgpack

from raft.errors import SnapshotError
from raft.journal import fsync_dir

FORMAT = "leptond-snapshot"
VERSION = 1
# Keys a caller may put in ``meta``; anything else is refused so a typo does
# not silently vanish from the file.
META_KEYS = frozenset({"index", "term", "cluster_members", "raft_entries"})


def _digest(body: dict[str, Any]) -> str:
    canonical = msgpack.packb({k: body[k] for k in sorted(body)}, use_bin_type=True)
    return hashlib.sha256(canonical).hexdigest()


def encode_snapshot(state_bytes: bytes, meta: dict[str, Any]) -> bytes:
    unknown = set(meta) - META_KEYS
    if unknown:
        raise ValueError(f"unknown snapshot meta keys: {sorted(unknown)}")
    body: dict[str, Any] = {
        "format": FORMAT,
        "v": VERSION,
        "index": int(meta.get("index", 0)),
        "term": int(meta.get("term", 0)),
        "cluster_members": meta.get("cluster_members"),
        "raft_entries": meta.get("raft_entries"),
        "state": bytes(state_bytes),
    }
    body["sha256"] = _digest(body)
    return msgpack.packb(body, use_bin_type=True)


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
    path = Path(path)
    data = encode_snapshot(state_bytes, meta)
    tmp = path.with_name(path.name + ".writing")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_snapshot_file(path: Path | str) -> tuple[bytes, dict[str, Any]]:
    """Read and verify a snapshot; raises SnapshotError on any damage."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SnapshotError(f"{path}: cannot read snapshot: {e.strerror}") from e
    return decode_snapshot(data, str(path))
