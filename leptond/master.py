"""The master daemon: Raft shell, RPC and HTTP servers, leader-only controllers."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from raft import commands
from raft.errors import EntryTooLarge, NoQuorum, NotLeader, ProposeTimeout
from raft.node import RaftNode
from raft.state import ClusterState

from . import agents, api, faults, health, http
from .auth import AuditLog, KeyStore
from .batcher import Batcher
from .blockservice import BlockService
from .config import MasterConfig
from .controllers import Controllers
from .disk import DiskGuard
from .wire.errors import NO_QUORUM, NOT_LEADER, TIMEOUT, RpcError
from .wire.server import RpcServer
from .wire.tokens import read_secret_file, read_token_file

log = logging.getLogger("lepton.master")
# Unreferenced blocks stay this long: an upload in progress has no manifest yet.
BLOCK_RETENTION_S = 24 * 3600.0
BLOCK_GC_INTERVAL_S = 600.0
# Error code of a command over the Raft entry limit (never proposed).
TOO_LARGE = "too_large"


class Master:
    def __init__(self, cfg: MasterConfig) -> None:
        self.cfg = cfg
        self.secret = read_secret_file(cfg.secret_file)
        self.admin = read_token_file(cfg.admin_token_file)
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state = ClusterState()
        self.raft: RaftNode | None = None
        self.disk = DiskGuard(
            cfg.data_dir,
            cfg.min_free_disk_bytes,
            lambda: self.raft.journal.write_error if self.raft is not None else None,
        )
        self.keys: KeyStore | None = None
        self.audit = AuditLog(cfg.data_dir / "audit.log")
        self.rpc: RpcServer | None = None
        self.http: http.HttpServer | None = None
        self.controllers: Controllers | None = None
        self.agents = agents.AgentRegistry(self)
        self.blocks = BlockService(self)
        self._block_sets: dict[str, frozenset[str]] = {}
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._leader_events: asyncio.Queue[bool] = asyncio.Queue()
        self.submits: Batcher[dict[str, Any], dict[str, Any]] | None = None
        self.faults = faults.from_env()  # test builds only; inert otherwise
        self._bg: asyncio.Task[None] | None = None
        self._announcer: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        peers = [p for p in cfg.peers if p and p != cfg.raft_addr]
        self.raft = RaftNode(
            self.state,
            cfg.raft_addr,
            peers,
            cfg.data_dir / "raft",
            self.secret,
            on_leadership=self._leader_events.put_nowait,
            loop=loop,
            raft_min_timeout_s=cfg.raft_min_timeout_s,
            raft_max_timeout_s=cfg.raft_max_timeout_s,
            log_compaction_min_entries=cfg.snapshot_every,
        )
        self.keys = KeyStore(self.secret, self.admin, self.state, self.raft.lock)
        handlers = {
            **api.handlers(self),
            **self.agents.handlers(),
            **self.blocks.handlers(),
            "member_hello": self._member_hello,
            "member_health": self._member_health,
        }
        self.rpc = RpcServer(
            handlers,
            self.keys.psk,
            on_connect=self._on_connect,
            on_disconnect=self.agents.on_disconnect,
            max_buffered_bytes=cfg.max_buffered_bytes,
        )
        await self.rpc.start(cfg.bind, cfg.rpc_port)
        self.http = http.HttpServer(self)
        await self.http.start(cfg.bind, cfg.http_port)
        self.controllers = Controllers(self)
        self.submits = Batcher(
            self._flush_submits,
            max_batch=5000,
            size_of=commands.encoded_size,
            max_bytes=commands.BATCH_BUDGET_BYTES,
        )
        self.submits.start()
        self._bg = loop.create_task(self._leadership_loop())
        self._announcer = loop.create_task(self._announce_loop())
        log.info(
            "master %s: rpc %s, http %s, raft %s, peers %s",
            cfg.host,
            cfg.rpc_addr,
            cfg.http_addr,
            cfg.raft_addr,
            ",".join(peers) or "-",
        )

    async def _leadership_loop(self) -> None:
        # Leader-only work starts and stops here, in one place (Nomad's leader.go).
        while True:
            is_leader = await self._leader_events.get()
            assert self.controllers is not None
            if is_leader:
                log.info("became leader")
                await self.controllers.start()
            else:
                log.info("no longer leader")
                await self.controllers.stop()

    async def run_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()
        await self.close()

    async def _flush_submits(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        res = await self.propose("submit_jobs", {"jobs": jobs}, wake=True)
        return list(res["results"])

    async def close(self) -> None:
        for t in (self._bg, self._announcer):
            if t is not None:
                t.cancel()
        await self.blocks.close()
        if self.submits is not None:
            await self.submits.close()
        if self.controllers is not None:
            await self.controllers.stop()
        if self.rpc is not None:
            await self.rpc.close()
        if self.http is not None:
            await self.http.close()
        if self.raft is not None:
            await asyncio.to_thread(self.raft.close)
        self.audit.close()

    def _on_connect(self, conn: Any) -> None:
        assert self.keys is not None
        user, role = self.keys.identity(conn.key_id)
        conn.context["user"], conn.context["role"] = user, role

    # -- Raft -----------------------------------------------------------------
    def is_leader(self) -> bool:
        return (
            self.raft is not None
            and self.raft.is_leader()
            and bool(self.controllers and self.controllers.active)
        )

    def leader_rpc_addr(self) -> str | None:
        assert self.raft is not None
        leader = self.raft.leader()
        if leader is None:
            return None
        if leader == self.cfg.raft_addr:
            return self.cfg.rpc_addr
        with self.raft.lock:
            m = self.state.members.get(leader)
            return m.rpc_addr if m else None

    def not_leader(self) -> RpcError:
        assert self.raft is not None
        reachable, members = self.raft.reachable()
        addr = self.leader_rpc_addr()
        if addr and addr != self.cfg.rpc_addr and reachable * 2 > members:
            return RpcError(NOT_LEADER, f"not the leader; the leader is {addr}", leader=addr)
        if reachable * 2 <= members:
            return RpcError(
                NOT_LEADER,
                f"no leader: no quorum, {reachable} of {members} masters reachable; "
                "start or reconnect the others",
                leader="",
            )
        return RpcError(NOT_LEADER, "no leader elected yet; try again in a moment", leader="")

    def ensure_leader(self) -> None:
        if not self.is_leader():
            raise self.not_leader()

    async def propose(
        self,
        op: str,
        args: dict[str, Any],
        rid: str | None = None,
        timeout_s: float | None = None,
        wake: bool = False,
    ) -> dict[str, Any]:
        """Commit one command on this (leader) master and return its result.

        `rid`: the request id of the client's call (api._rid); a command that
        commits with an id already applied returns the first result. Without
        one the command gets a fresh id. wake=True nudges the scheduling loop
        afterwards (the command may have freed capacity or added work)."""
        assert self.raft is not None
        # The proposer's time ages the table of remembered results (raft/dedupe.py).
        data = commands.encode(op, args, rid, at=time.time())
        try:
            result = await self.raft.propose(data, timeout_s or self.cfg.commit_timeout_s)
        except NotLeader:
            raise self.not_leader() from None
        except NoQuorum as exc:
            raise RpcError(NO_QUORUM, str(exc)) from None
        except EntryTooLarge as exc:
            # Callers split their work below the limit, so this is a bug or
            # an input no check caught; either way nothing was proposed.
            log.error("%s: %s", op, exc)
            raise RpcError(TOO_LARGE, f"{op}: {exc}") from None
        except ProposeTimeout as exc:
            raise RpcError(TIMEOUT, str(exc)) from None
        if isinstance(result, dict) and "error" in result:
            err = result["error"]
            raise RpcError(str(err.get("code")), str(err.get("message")))
        if not isinstance(result, dict):
            raise RpcError("internal", f"{op}: unexpected result {result!r}")
        if wake and self.controllers is not None:
            self.controllers.wake()
        return result

    def answered(self, rid: str) -> bool:
        """Whether a command with this request id was applied here recently."""
        assert self.raft is not None
        with self.raft.lock:
            return rid in self.state.recent

    # -- membership addresses ----------------------------------------------------
    def raft_peers(self) -> list[str]:
        """Raft addresses of the other current members."""
        assert self.raft is not None
        return [
            m["addr"]
            for m in self.raft.status().get("members", [])
            if isinstance(m, dict) and m.get("addr") != self.cfg.raft_addr
        ]

    def peer_rpc_addrs(self) -> list[str]:
        """RPC addresses of the other current Raft members (those that announced one)."""
        peers = set(self.raft_peers())
        assert self.raft is not None
        with self.raft.lock:
            return [m.rpc_addr for addr, m in self.state.members.items() if addr in peers]

    async def _member_hello(self, conn: Any, a: Any) -> dict[str, Any]:
        from .auth import require

        require(conn.context, "cluster")
        self.ensure_leader()
        if not isinstance(a, dict):
            raise RpcError("bad_request", "member_hello needs addresses")
        info = {k: str(a.get(k, "")) for k in ("raft_addr", "rpc_addr", "http_addr")}
        assert self.raft is not None
        with self.raft.lock:
            cur = self.state.members.get(info["raft_addr"])
        if cur is None or cur.to_wire() != info:
            await self.propose("member_info", info)
        return {"ok": True}

    def health(self, raft_status: dict[str, Any] | None = None) -> dict[str, Any]:
        """This master's health (leptond/health.py)."""
        assert self.raft is not None
        st = raft_status if raft_status is not None else self.raft.status()
        return health.assess(st, self.disk.state())

    async def _member_health(self, conn: Any, a: Any) -> dict[str, Any]:
        from .auth import require

        require(conn.context, "cluster")
        return self.health()

    async def _announce_loop(self) -> None:
        """Followers tell the leader their RPC address, so redirects and block
        replication can reach them."""
        from .wire.client import parse_addr
        from .wire.connection import open_connection
        from .wire.tokens import CLUSTER_KEY_ID, cluster_psk

        psk = cluster_psk(self.secret)
        last_gc = time.monotonic()
        info = {
            "raft_addr": self.cfg.raft_addr,
            "rpc_addr": self.cfg.rpc_addr,
            "http_addr": self.cfg.http_addr,
        }
        while True:
            await asyncio.sleep(2.0)
            assert self.raft is not None
            with self.raft.lock:
                cur = self.state.members.get(self.cfg.raft_addr)
            if time.monotonic() - last_gc > BLOCK_GC_INTERVAL_S:
                last_gc = time.monotonic()
                try:
                    removed = await self.blocks.collect_garbage(BLOCK_RETENTION_S)
                    if removed:
                        log.info("removed %d block(s) no workdir needs", removed)
                except OSError as exc:
                    log.warning("block garbage collection: %s", exc)
            if (cur is not None and cur.to_wire() == info) or self.is_leader():
                continue
            leader = self.leader_rpc_addr()
            if not leader:
                continue
            try:
                host, port = parse_addr(leader)
                conn = await open_connection(
                    host, port, key_id=CLUSTER_KEY_ID, psk=psk, timeout_s=3
                )
                try:
                    await conn.call("member_hello", info, timeout_s=10)
                finally:
                    conn.close()
            except RpcError as exc:
                log.debug("member_hello to %s: %s", leader, exc)

    def block_sets(self) -> dict[str, frozenset[str]]:
        """Block ids of each manifest, computed once per manifest."""
        assert self.raft is not None
        for mid, man in self.state.manifests.items():
            self.blocks_of(mid, man)
        return self._block_sets

    def blocks_of(self, mid: str, manifest: Any) -> frozenset[str]:
        """Block ids of one manifest (content-addressed: the id fixes the content)."""
        from .blocks import manifest_blocks

        ids = self._block_sets.get(mid)
        if ids is None:
            ids = self._block_sets[mid] = frozenset(manifest_blocks(manifest))
        return ids

    def cached_sets(self) -> dict[str, frozenset[str]]:
        return {nid: frozenset(b) for nid, b in self.blocks.node_blocks.items()}
