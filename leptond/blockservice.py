"""The masters' block store: uploads from leptonctl, replication to a majority
of masters before a manifest commits, and blocks served to agents.

Blocks never enter the Raft log; only manifests (paths, modes, block ids) do.

The store shares the data disk with the Raft journal, so uploads are bounded
three ways, each refused with one line: the store's limit
(`--block-store-bytes`), each user's quota (`--upload-quota-bytes`, charged
to each user who uploaded a block: leptond/uploads.py), and the disk's
reserve (`--min-free-disk`, leptond/disk.py).

A user's workdir may name only blocks that user uploaded, and each manifest
records who committed it: a submit may use only its own user's manifests
(admins any), checked here and again at apply (raft/state.py).

Memory: a block is decompressed, checked and stored on the block-store
worker, one at a time, never on the event loop; its declared size and the
uploader's quota are checked before that. Copies to the other masters that
start during the upload hold at most `EARLY_PUSH_BYTES` in all.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Protocol, TypeVar

from raft.model import LIVE_TASK_STATES
from raft.view import StateView

from .auth import require
from .blocks import (
    BlockCorrupt,
    BlockStore,
    StoreFull,
    WorkdirError,
    manifest_blocks,
    manifest_id,
    pack_block,
    unpack_block,
    validate_manifest,
)
from .blocks.manifest import MAX_BLOCK_SIZE, check_manifest_size, is_block_id
from .clock import Clock
from .config import MasterConfig
from .disk import DiskGuard, mib
from .ports import LeaderStatus, Proposer, StateReader
from .uploads import UploadLedger
from .wire.client import parse_addr
from .wire.connection import Connection, Handler, open_connection
from .wire.errors import BAD_REQUEST, FORBIDDEN, NO_QUORUM, RpcError
from .wire.tokens import CLUSTER_KEY_ID, cluster_psk

log = logging.getLogger("lepton.master")
MAX_IDS = 100_000
# Unreferenced blocks stay this long: an upload in progress has no manifest yet.
BLOCK_RETENTION_S = 24 * 3600.0
BLOCK_GC_INTERVAL_S = 600.0
# Uploaded payloads held for copies to the other masters made during the
# upload; past this, a block waits for manifest_put to copy it.
EARLY_PUSH_BYTES = 64 << 20
T = TypeVar("T")


class Peers(Protocol):
    """The other masters (members.Members)."""

    def raft_peers(self) -> list[str]: ...

    def peer_rpc_addrs(self) -> list[str]: ...


class BlockService:
    def __init__(
        self,
        cfg: MasterConfig,
        secret: bytes,
        proposer: Proposer,
        reader: StateReader,
        leader: LeaderStatus,
        disk: DiskGuard,
        peers: Peers,
        clock: Clock,
    ) -> None:
        self._proposer = proposer
        self._reader = reader
        self._leader = leader
        self._disk = disk
        self._peers_of = peers
        self._clock = clock
        self.store = BlockStore(
            cfg.data_dir / "blocks",
            cache_bytes=cfg.block_cache_bytes,
            policy=cfg.block_cache_policy,
            limit_bytes=cfg.block_store_bytes,
        )
        self.quota_bytes = cfg.upload_quota_bytes
        self.ledger = UploadLedger(cfg.data_dir / "block-owners.log", set(self.store.ids()))
        self._psk = cluster_psk(secret)
        self._peers: dict[str, Connection] = {}
        self._pushes: set[asyncio.Task[None]] = set()
        # BlockStore is single-owner: its disk I/O runs on one worker thread,
        # off the event loop but never concurrently with itself.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="blockstore")
        self._push_slots = asyncio.Semaphore(4)
        self._push_bytes = 0
        self.counters: Counter[str] = Counter()
        # node id -> blocks the leader served it: what its cache likely holds,
        # for cache-aware placement. Leader memory only; a guess, never a promise.
        self.node_blocks: dict[str, set[str]] = {}
        # manifest id -> its block ids, computed once per manifest (a
        # manifest id fixes its content).
        self._block_sets: dict[str, frozenset[str]] = {}

    def handlers(self) -> dict[str, Handler]:
        return {
            "blocks_missing": self.blocks_missing,
            "block_put": self.block_put,
            "manifest_put": self.manifest_put,
            "block_get": self.block_get,
            "peer_blocks_missing": self.peer_blocks_missing,
            "peer_block_put": self.peer_block_put,
            "peer_block_get": self.peer_block_get,
        }

    # -- from leptonctl -------------------------------------------------------------
    def _role(self, conn: Connection, role: str) -> None:
        require(conn.context, role)

    def _unheld(self, conn: Connection, ids: list[str]) -> set[str]:
        """The blocks among `ids` the caller may not name: those it did not
        upload (an admin may name any stored block)."""
        if conn.context.get("role") == "admin":
            return set()
        user = str(conn.context.get("user") or "")
        return {b for b in ids if not self.ledger.holds(user, b)}

    async def blocks_missing(self, conn: Connection, a: Any) -> dict[str, Any]:
        """The blocks the caller must upload: those not stored, and those it
        has not uploaded itself (so the answer says nothing of other users'
        blocks)."""
        self._role(conn, "submit")
        self._leader.ensure_leader()
        ids = _ids(a)
        want = set(self.store.missing(ids)) | self._unheld(conn, ids)
        return {"missing": [b for b in dict.fromkeys(ids) if b in want]}

    async def block_put(self, conn: Connection, a: Any) -> dict[str, Any]:
        self._role(conn, "submit")
        self._leader.ensure_leader()
        self._disk.check_new_work()
        bid, payload, compressed, size = _declared(a)
        user = str(conn.context.get("user") or "?")
        # Before anything is decompressed: what the block says it will take.
        self._check_quota(user, bid, size)
        await self._io(self._put_payload, bid, payload, compressed, user, True)
        self.counters["upload_blocks"] += 1
        self.counters["upload_bytes"] += size
        # Start copying to the other masters now, overlapping the rest of the
        # upload; manifest_put later checks what is still missing and waits.
        if self._push_bytes + len(payload) <= EARLY_PUSH_BYTES:
            self._push_bytes += len(payload)
            task = asyncio.get_running_loop().create_task(
                self._early_push(bid, payload, compressed, user)
            )
            self._pushes.add(task)
            task.add_done_callback(self._pushes.discard)
        return {"ok": True}

    async def _early_push(self, bid: str, payload: bytes, compressed: bool, user: str) -> None:
        try:
            async with self._push_slots:
                for addr in self._peers_of.peer_rpc_addrs():
                    try:
                        conn = await self._peer(addr)
                        await conn.call(
                            "peer_block_put",
                            {"id": bid, "data": payload, "z": compressed, "user": user},
                            timeout_s=60,
                        )
                    except RpcError as exc:
                        log.debug("early copy of %s to %s: %s", bid[:12], addr, exc)
        finally:
            self._push_bytes -= len(payload)

    async def manifest_put(self, conn: Connection, a: Any) -> dict[str, Any]:
        self._role(conn, "submit")
        self._leader.ensure_leader()
        self._disk.check_new_work()
        try:
            manifest = validate_manifest(a.get("manifest") if isinstance(a, dict) else None)
            check_manifest_size(manifest)  # it must fit in one Raft entry
        except WorkdirError as exc:
            raise RpcError(BAD_REQUEST, f"workdir manifest refused: {exc}") from None
        ids = manifest_blocks(manifest)
        # Not stored, or stored for others only: the same answer, so that a
        # manifest is no probe of other users' blocks.
        missing = set(self.store.missing(ids)) | self._unheld(conn, ids)
        if missing:
            raise RpcError(BAD_REQUEST, f"{len(missing)} block(s) of the workdir were not uploaded")
        if self._pushes:
            await asyncio.wait(list(self._pushes), timeout=60)
        await self._replicate(ids)
        mid = manifest_id(manifest)
        user = str(conn.context.get("user") or "")
        await self._proposer.propose(
            "put_manifest", {"id": mid, "manifest": dict(manifest), "user": user}, timeout_s=30
        )
        return {"id": mid, "blocks": len(ids)}

    async def _replicate(self, ids: list[str]) -> None:
        """Each block on a majority of masters (this one included) before the manifest commits."""
        # The majority is of the Raft members, whether or not their RPC
        # addresses are known yet: a follower that has not announced one
        # cannot count towards it.
        total = len(self._peers_of.raft_peers()) + 1
        need = total // 2  # peers besides this master that must hold every block
        if need <= 0:
            return
        peers = self._peers_of.peer_rpc_addrs()
        results = await asyncio.gather(
            *(self._push_to(addr, ids) for addr in peers), return_exceptions=True
        )
        ok = sum(1 for r in results if r is True)
        if ok < need:
            errs = [str(r) for r in results if isinstance(r, BaseException)]
            raise RpcError(
                NO_QUORUM,
                f"workdir blocks reached {ok + 1} of {total} masters; "
                f"a majority is needed ({'; '.join(errs[:2]) or 'peers unreachable'})",
            )

    async def _push_to(self, addr: str, ids: list[str]) -> bool:
        conn = await self._peer(addr)
        missing: list[str] = []
        for i in range(0, len(ids), 10_000):
            res = await conn.call("peer_blocks_missing", {"ids": ids[i : i + 10_000]}, timeout_s=30)
            missing += res["missing"]
        sem = asyncio.Semaphore(8)

        async def one(bid: str) -> None:
            data = self.store.get(bid)
            if data is None:
                raise RpcError("internal", f"block {bid[:12]} vanished from this master")
            payload, compressed = pack_block(data)
            args = {"id": bid, "data": payload, "z": compressed, "users": self.ledger.holders(bid)}
            async with sem:
                await conn.call("peer_block_put", args, timeout_s=60)

        await asyncio.gather(*(one(b) for b in missing))
        return True

    async def _peer(self, addr: str) -> Connection:
        conn = self._peers.get(addr)
        if conn is None or conn.is_closing():
            host, port = parse_addr(addr)
            conn = await open_connection(
                host, port, key_id=CLUSTER_KEY_ID, psk=self._psk, timeout_s=3
            )
            self._peers[addr] = conn
        return conn

    # -- between masters ---------------------------------------------------------------
    async def peer_blocks_missing(self, conn: Connection, a: Any) -> dict[str, Any]:
        self._role(conn, "cluster")
        return {"missing": self.store.missing(_ids(a))}

    async def peer_block_put(self, conn: Connection, a: Any) -> dict[str, Any]:
        self._role(conn, "cluster")
        self._disk.check_new_work()
        bid, payload, compressed, _ = _declared(a)
        # The leader checked the uploader's quota; here the upload is charged
        # to them too, so that whichever master leads next knows their usage
        # and what their manifests may name.
        users = a.get("users")
        if not isinstance(users, list):
            users = [a.get("user")]
        users = [u for u in users[:10_000] if isinstance(u, str) and 0 < len(u) <= 256]
        await self._io(self._put_payload, bid, payload, compressed, None, False)
        if users:
            await self._io(self._charge_all, bid, users)
        return {"ok": True}

    async def peer_block_get(self, conn: Connection, a: Any) -> dict[str, Any]:
        self._role(conn, "cluster")
        bid = _one_id(a)
        data = self.store.get(bid)
        if data is None:
            return {"found": False}
        payload, compressed = pack_block(data)
        return {"found": True, "data": payload, "z": compressed}

    # -- to agents -------------------------------------------------------------------
    async def block_get(self, conn: Connection, a: Any) -> dict[str, Any]:
        self._role(conn, "node")
        bid = _one_id(a)
        nid = str(conn.context.get("user"))  # the node its credential speaks for
        if not self._for_own_task(nid, bid):
            raise RpcError(FORBIDDEN, f"block {bid[:12]} is in no workdir of a task on this node")
        data = await self._io(self.store.get, bid)
        if data is None:
            data = await self._fetch_from_peers(bid)
        self.node_blocks.setdefault(nid, set()).add(bid)
        self.counters["served_blocks"] += 1
        self.counters["served_bytes"] += len(data)
        payload, compressed = pack_block(data)
        return {"data": payload, "z": compressed}

    def _for_own_task(self, nid: str, bid: str) -> bool:
        """Whether the block is in the workdir of a live task placed on the node:
        an agent reads its own tasks' files, never another node's."""
        s = self._reader.view()
        manifests = {}
        for tid in s.node_tasks.get(nid, ()):
            t = s.tasks[tid]
            mid = s.jobs[t.job_id].spec.get("workdir") if t.state in LIVE_TASK_STATES else None
            if mid and mid in s.manifests:
                manifests[mid] = s.manifests[mid]
        return any(bid in self.blocks_of(mid, man) for mid, man in manifests.items())

    async def _fetch_from_peers(self, bid: str) -> bytes:
        """A master missing a block (say, a new leader outside the upload's majority) asks its peers."""
        for addr in self._peers_of.peer_rpc_addrs():
            try:
                conn = await self._peer(addr)
                res = await conn.call("peer_block_get", {"id": bid}, timeout_s=30)
            except RpcError:
                continue
            if res.get("found"):
                data = unpack_block(res["data"], bool(res.get("z")), MAX_BLOCK_SIZE)
                await self._io(self._put, bid, data, None, False)
                self.counters["peer_fetched"] += 1
                return data
        raise RpcError("not_found", f"block {bid[:12]} is on no reachable master")

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- helpers ---------------------------------------------------------------------
    def _check_quota(self, user: str, bid: str, size: int) -> None:
        """Refuse a block that would take `user` over their upload quota."""
        quota = self.quota_bytes
        if quota <= 0 or self.ledger.holds(user, bid):
            return
        held = self.ledger.usage[user]
        if held + size > quota:
            self.counters["refused_quota"] += 1
            raise RpcError(
                "quota",
                f"upload quota used up: {user}'s workdir blocks hold {mib(held)} of "
                f"{mib(quota)}; blocks no job uses are removed after a day",
            )

    def _put_payload(
        self, bid: str, payload: bytes, compressed: bool, user: str | None, check_quota: bool
    ) -> None:
        """Decompress, check and store a block (block-store thread only: one
        block at a time is ever decompressed)."""
        try:
            data = unpack_block(payload, compressed, MAX_BLOCK_SIZE)
        except BlockCorrupt as exc:
            raise RpcError(BAD_REQUEST, f"block {bid[:12]} refused: {exc}") from None
        self._put(bid, data, user, check_quota)

    def _charge_all(self, bid: str, users: list[str]) -> None:
        size = self.store.size_of(bid)
        if size is None:
            return
        for user in users:
            self.ledger.charge(bid, user, size)

    def _put(self, bid: str, data: bytes, user: str | None, check_quota: bool) -> None:
        """Store a block and charge it to `user` (block-store thread only, so the
        quota check and the charge are one step)."""
        if check_quota and user is not None:
            self._check_quota(user, bid, len(data))
        try:
            self.store.put(bid, data)
        except BlockCorrupt as exc:
            self.counters["corrupt_blocks"] += 1
            raise RpcError(BAD_REQUEST, f"block refused: {exc}") from None
        except StoreFull as exc:
            self.counters["refused_full"] += 1
            raise RpcError("store_full", f"master cannot store the block: {exc}") from None
        except OSError as exc:
            raise RpcError("unavailable", f"master cannot store the block: {exc}") from None
        if user is not None:
            self.ledger.charge(bid, user, len(data))

    async def collect_garbage(self, retention_s: float) -> int:
        keep: set[str] = set()
        for man in self._reader.view().manifests.values():
            keep.update(manifest_blocks(man))  # type: ignore[arg-type]
        return await self._io(self._collect, keep, retention_s, self._clock.now())

    async def collect_garbage_forever(self) -> None:
        """Every master, now and then: drop blocks no workdir needs any more."""
        while True:
            await self._clock.sleep(BLOCK_GC_INTERVAL_S)
            try:
                removed = await self.collect_garbage(BLOCK_RETENTION_S)
                if removed:
                    log.info("removed %d block(s) no workdir needs", removed)
            except OSError as exc:
                log.warning("block garbage collection: %s", exc)

    # -- what the scheduler knows of blocks (controllers.BlockInfo) -------------------
    def cached_sets(self) -> dict[str, frozenset[str]]:
        return {nid: frozenset(b) for nid, b in self.node_blocks.items()}

    def block_sets(self, view: StateView) -> dict[str, frozenset[str]]:
        """Block ids of each manifest in the view, computed once per manifest."""
        for mid, man in view.manifests.items():
            self.blocks_of(mid, man)
        return self._block_sets

    def blocks_of(self, mid: str, manifest: Any) -> frozenset[str]:
        """Block ids of one manifest (content-addressed: the id fixes the content)."""
        ids = self._block_sets.get(mid)
        if ids is None:
            ids = self._block_sets[mid] = frozenset(manifest_blocks(manifest))
        return ids

    def _collect(self, keep: set[str], retention_s: float, now: float) -> int:
        removed = self.store.collect_garbage(keep, retention_s, now)
        if removed:
            self.ledger.retain(set(self.store.ids()))
        return removed

    def stats(self) -> dict[str, Any]:
        return {**asdict(self.store.stats()), **self.counters, "quota_bytes": self.quota_bytes}

    async def close(self) -> None:
        for t in list(self._pushes):
            t.cancel()
        await self._io(self.ledger.close)
        for c in self._peers.values():
            c.close()
        self._peers.clear()


def _ids(a: Any) -> list[str]:
    ids = a.get("ids") if isinstance(a, dict) else None
    if not isinstance(ids, list) or len(ids) > MAX_IDS or not all(is_block_id(x) for x in ids):
        raise RpcError(BAD_REQUEST, f"ids must be a list of at most {MAX_IDS} block ids")
    return ids


def _declared(a: Any) -> tuple[str, bytes, bool, int]:
    """(id, payload, compressed, size) of a block upload, its size as the
    payload declares it (lz4's size header): checked before anything is
    decompressed."""
    if not isinstance(a, dict) or not isinstance(a.get("data"), bytes):
        raise RpcError(BAD_REQUEST, "block_put needs id and data")
    bid = _one_id(a)
    payload = a["data"]
    compressed = bool(a.get("z"))
    size = len(payload)
    if compressed:
        if len(payload) < 4:
            raise RpcError(BAD_REQUEST, f"block {bid[:12]} refused: too short to hold its size")
        size = int.from_bytes(payload[:4], "little")
    if size > MAX_BLOCK_SIZE:
        raise RpcError(
            BAD_REQUEST,
            f"block {bid[:12]} refused: it declares {size} bytes, over the "
            f"{MAX_BLOCK_SIZE >> 20} MiB cap",
        )
    return bid, payload, compressed, size


def _one_id(a: Any) -> str:
    bid = a.get("id") if isinstance(a, dict) else None
    if not is_block_id(bid):
        raise RpcError(BAD_REQUEST, "not a block id")
    assert isinstance(bid, str)
    return bid
