"""Materialize a task's working directory from the block cache.

Blocks the cache lacks are fetched from the leader in parallel and verified
against their ids; blocks of tasks being prepared or running are pinned so the
cache cannot evict them from under a task.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from leptond.blocks import (
    BlockCorrupt,
    BlockStore,
    StoreFull,
    WorkdirError,
    manifest_blocks,
    materialize,
    unpack_block,
)
from leptond.blocks.manifest import MAX_BLOCK_SIZE, Manifest, validate_manifest
from leptond.wire.connection import Connection
from leptond.wire.errors import RpcError

log = logging.getLogger("lepton.agent")
PARALLEL = 8
RETRIES = 3


class WorkdirCache:
    def __init__(self, root: Path, budget_bytes: int, policy: str = "lru") -> None:
        if policy not in ("lru", "lfu"):
            raise ValueError(f"cache policy must be lru or lfu, not {policy!r}")
        self.store = BlockStore(root, disk_budget_bytes=budget_bytes, policy=policy)  # type: ignore[arg-type]
        self.pins: dict[str, list[str]] = {}  # run id -> pinned blocks
        # Blocks tasks needed that were here (hits) or had to be fetched
        # (misses), and the bytes fetched: the cache's worth, on /metrics.
        self.hits = 0
        self.misses = 0
        self.fetched_bytes = 0

    async def prepare(self, run_id: str, manifest_obj: Any, dest: Path, conn: Connection) -> None:
        """Fetch what is missing and write the tree into dest. WorkdirError on any problem."""
        manifest: Manifest = validate_manifest(manifest_obj)
        ids = manifest_blocks(manifest)
        self.store.pin(ids)
        self.pins[run_id] = ids
        missing = self.store.missing(ids)
        unique = len(set(ids))
        self.hits += unique - len(missing)
        self.misses += len(missing)
        sem = asyncio.Semaphore(PARALLEL)

        async def fetch(bid: str) -> None:
            async with sem:
                for attempt in range(RETRIES):
                    try:
                        res = await conn.call("block_get", {"id": bid}, timeout_s=120)
                        data = unpack_block(res["data"], bool(res.get("z")), MAX_BLOCK_SIZE)
                        self.store.put(bid, data)  # verifies the hash
                        self.fetched_bytes += len(data)
                        return
                    except BlockCorrupt as exc:
                        log.warning(
                            "block %s failed verification (%s); fetching it again", bid[:12], exc
                        )
                    except StoreFull as exc:
                        raise WorkdirError(f"block cache is full: {exc}") from None
                    except OSError as exc:
                        raise WorkdirError(f"cannot store block: {exc.strerror or exc}") from None
                    except RpcError as exc:
                        if attempt == RETRIES - 1:
                            raise WorkdirError(f"cannot fetch block {bid[:12]}: {exc}") from None
                raise WorkdirError(f"block {bid[:12]} kept failing verification")

        await asyncio.gather(*(fetch(b) for b in missing))

        def get(bid: str) -> bytes:
            data = self.store.get(bid)
            if data is None:
                raise WorkdirError(f"block {bid[:12]} vanished from the cache")
            return data

        # Private until the agent hands it to the task's user: one task's
        # files are never readable by another account on the host.
        dest.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        dest.mkdir(mode=0o700, exist_ok=True)
        os.chmod(dest, 0o700)
        await asyncio.to_thread(materialize, manifest, dest, get)

    def release(self, run_id: str) -> None:
        ids = self.pins.pop(run_id, None)
        if ids:
            self.store.unpin(ids)

    def stats(self) -> dict[str, Any]:
        """The store's figures (its tiers as maps) and the workdir counters."""
        return {
            **asdict(self.store.stats()),
            "hits": self.hits,
            "misses": self.misses,
            "fetched_bytes": self.fetched_bytes,
        }
