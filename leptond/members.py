"""The other masters: their addresses, this master's health, and announcing
this master's own addresses to the leader.

Raft knows members by their Raft address only; redirects, block replication
and health checks need their RPC and HTTP addresses, which each follower
tells the leader (`member_hello`) and the leader commits (`member_info`).
"""

from __future__ import annotations

import logging
from typing import Any

from .auth import require
from .clock import Clock
from .config import MasterConfig
from .disk import DiskGuard
from .health import assess
from .ports import LeaderStatus, Proposer, RaftRole, StateReader
from .wire.client import parse_addr
from .wire.connection import Connection, Handler, open_connection
from .wire.errors import RpcError
from .wire.tokens import CLUSTER_KEY_ID, cluster_psk

log = logging.getLogger("lepton.master")
ANNOUNCE_EVERY_S = 2.0


class Members:
    def __init__(
        self,
        cfg: MasterConfig,
        secret: bytes,
        raft: RaftRole,
        reader: StateReader,
        proposer: Proposer,
        leader: LeaderStatus,
        disk: DiskGuard,
        clock: Clock,
    ) -> None:
        self._cfg = cfg
        self._psk = cluster_psk(secret)
        self._raft = raft
        self._reader = reader
        self._proposer = proposer
        self._leader = leader
        self._disk = disk
        self._clock = clock

    def handlers(self) -> dict[str, Handler]:
        return {"member_hello": self.member_hello, "member_health": self.member_health}

    # -- addresses -------------------------------------------------------------
    def raft_peers(self) -> list[str]:
        """Raft addresses of the other current members."""
        return [
            m["addr"]
            for m in self._raft.status().get("members", [])
            if isinstance(m, dict) and m.get("addr") != self._cfg.raft_addr
        ]

    def peer_rpc_addrs(self) -> list[str]:
        """RPC addresses of the other current Raft members (those that announced one)."""
        peers = set(self.raft_peers())
        return [m.rpc_addr for addr, m in self._reader.view().members.items() if addr in peers]

    def _own_info(self) -> dict[str, str]:
        cfg = self._cfg
        return {"raft_addr": cfg.raft_addr, "rpc_addr": cfg.rpc_addr, "http_addr": cfg.http_addr}

    # -- health --------------------------------------------------------------------
    def health(self, raft_status: dict[str, Any] | None = None) -> dict[str, Any]:
        """This master's health (leptond/health.py)."""
        st = raft_status if raft_status is not None else self._raft.status()
        return assess(st, self._disk.state())

    async def member_health(self, conn: Connection, a: Any) -> dict[str, Any]:
        require(conn.context, "cluster")
        return self.health()

    # -- announcing ------------------------------------------------------------------
    async def member_hello(self, conn: Connection, a: Any) -> dict[str, Any]:
        require(conn.context, "cluster")
        self._leader.ensure_leader()
        if not isinstance(a, dict):
            raise RpcError("bad_request", "member_hello needs addresses")
        info = {k: str(a.get(k, "")) for k in ("raft_addr", "rpc_addr", "http_addr")}
        cur = self._reader.view().members.get(info["raft_addr"])
        if cur is None or cur.to_wire() != info:
            await self._proposer.propose("member_info", info)
        return {"ok": True}

    async def announce_forever(self) -> None:
        """Followers tell the leader their RPC address, so redirects and block
        replication can reach them."""
        info = self._own_info()
        while True:
            await self._clock.sleep(ANNOUNCE_EVERY_S)
            cur = self._reader.view().members.get(self._cfg.raft_addr)
            if (cur is not None and cur.to_wire() == info) or self._leader.is_leader():
                continue
            leader = self._leader.leader_rpc_addr()
            if not leader:
                continue
            try:
                host, port = parse_addr(leader)
                conn = await open_connection(
                    host, port, key_id=CLUSTER_KEY_ID, psk=self._psk, timeout_s=3
                )
                try:
                    await conn.call("member_hello", info, timeout_s=10)
                finally:
                    conn.close()
            except RpcError as exc:
                log.debug("member_hello to %s: %s", leader, exc)
