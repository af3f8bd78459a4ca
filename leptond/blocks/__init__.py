"""Working directories as content-addressed blocks, and the caches that keep
them (DESIGN.md §8).  Shared by the master daemon and the host agent, so it
imports only the standard library, msgpack and lz4.

- ``cache``: ``ByteCache`` (LRU / LFU, byte budget, pins), ``make_policy_cache``
- ``ignore``: ``.leptonignore`` rules (gitignore syntax)
- ``manifest``: the manifest format, ``validate_manifest``, ``manifest_id``
- ``scan``: ``scan_workdir`` -> manifest + ``BlockRef`` per block, ``read_block``
- ``store``: ``BlockStore`` on disk, ``pack_block`` / ``unpack_block`` (lz4)
- ``materialize``: write a manifest's tree safely into a fresh directory

The flow these pieces are made for (the RPC in between lives elsewhere):

1. submitter: ``manifest, refs = scan_workdir(dir)``; ask the masters which
   of ``manifest_blocks(manifest)`` they lack; for each,
   ``pack_block(read_block(refs[id]))`` and send; then commit the manifest.
2. master: ``store.put(id, unpack_block(payload, compressed, block_size))``
   (``put`` re-checks the hash); ``store.missing(ids)`` answers step 1.
3. agent: ``validate_manifest(m)``; ``store.pin(manifest_blocks(m))``;
   fetch and ``put`` what ``store.missing`` lists;
   ``materialize(m, dest, store.get)``; ``store.unpin(...)`` when the task ends.
"""

from .cache import POLICIES, ByteCache, CacheStats, LFUByteCache, LRUByteCache, make_policy_cache
from .ignore import IGNORE_FILE, IgnoreRules
from .manifest import (
    DEFAULT_BLOCK_SIZE,
    MANIFEST_VERSION,
    FileEntry,
    LinkEntry,
    Manifest,
    WorkdirError,
    block_id,
    manifest_blocks,
    manifest_id,
    validate_manifest,
)
from .materialize import materialize
from .scan import DEFAULT_MAX_BYTES, BlockRef, read_block, scan_workdir
from .store import BlockCorrupt, BlockStore, StoreFull, StoreStats, pack_block, unpack_block

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MAX_BYTES",
    "IGNORE_FILE",
    "MANIFEST_VERSION",
    "POLICIES",
    "BlockCorrupt",
    "BlockRef",
    "BlockStore",
    "ByteCache",
    "CacheStats",
    "FileEntry",
    "IgnoreRules",
    "LFUByteCache",
    "LRUByteCache",
    "LinkEntry",
    "Manifest",
    "StoreFull",
    "StoreStats",
    "WorkdirError",
    "block_id",
    "make_policy_cache",
    "manifest_blocks",
    "manifest_id",
    "materialize",
    "pack_block",
    "read_block",
    "scan_workdir",
    "unpack_block",
    "validate_manifest",
]
