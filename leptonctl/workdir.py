"""Upload a working directory: only the blocks the cluster lacks, then the manifest."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from leptond.blocks import WorkdirError, pack_block, read_block, scan_workdir
from leptond.blocks.scan import DEFAULT_MAX_BYTES
from leptond.client import calls as api
from leptond.wire.client import ClusterClient
from leptond.wire.errors import RpcError

from .output import size

PARALLEL = 8


class Progress:
    """A one-line progress bar on a terminal, silence otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()

    def add(self, n: int) -> None:
        self.done += n
        if self.tty and self.total:
            width = 30
            filled = int(width * self.done / self.total)
            sys.stderr.write(
                f"\ruploading [{'#' * filled}{'.' * (width - filled)}] "
                f"{size(self.done)}/{size(self.total)}"
            )
            sys.stderr.flush()

    def finish(self) -> None:
        if self.tty and self.total:
            sys.stderr.write("\n")


async def upload_workdir(
    c: ClusterClient, path: Path, timeout_s: float = 600, stats: dict[str, Any] | None = None
) -> str:
    """Returns the manifest id to put in the job spec."""
    max_bytes = int(os.environ.get("LEPTON_WORKDIR_MAX_BYTES", DEFAULT_MAX_BYTES))
    try:
        manifest, refs = await asyncio.to_thread(scan_workdir, path, max_bytes=max_bytes)
    except WorkdirError as exc:
        raise RpcError("bad_request", f"workdir {path}: {exc}") from None
    ids = list(refs)
    missing: list[str] = []
    for i in range(0, len(ids), 10_000):
        missing += await api.blocks_missing(c, ids[i : i + 10_000], timeout_s)
    progress = Progress(sum(refs[b].length for b in missing))
    sent = {"blocks": 0, "bytes": 0, "wire_bytes": 0}
    sem = asyncio.Semaphore(PARALLEL)

    async def one(bid: str) -> None:
        async with sem:
            try:
                data = await asyncio.to_thread(read_block, refs[bid])
            except WorkdirError as exc:
                raise RpcError("bad_request", f"workdir {path}: {exc}") from None
            payload, compressed = pack_block(data)
            await api.block_put(c, bid, payload, compressed, timeout_s)
            sent["blocks"] += 1
            sent["bytes"] += len(data)
            sent["wire_bytes"] += len(payload)
            progress.add(len(data))

    try:
        await asyncio.gather(*(one(b) for b in missing))
    finally:
        progress.finish()
    mid = await api.manifest_put(c, dict(manifest), timeout_s)
    if stats is not None:
        stats.update(sent, total_blocks=len(ids), bytes_total=sum(r.length for r in refs.values()))
        stats["manifest"] = mid
    return mid
