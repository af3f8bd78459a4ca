"""The masters' HTTP port: /healthz, /metrics (Prometheus), a read-only JSON API
for scripts (Bearer tokens), and the web UI (leptond/web/)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from raft.errors import RaftError

from . import views
from .auth import ROLE_RANK, KeyStore
from .clock import Clock
from .config import MasterConfig
from .disk import DiskGuard
from .gcpolicy import GcStats
from .httplog import quiet_bad_requests
from .liveness import NodeLiveness
from .metrics import (
    TEXT_FORMAT,
    ClusterCollector,
    GcPauseCollector,
    MemberCollector,
    RaftMember,
)
from .ports import LeaderStatus, StateReader
from .rpcstats import RpcStats
from .web import WebUI
from .wire.client import parse_addr
from .wire.server import RpcServer
from .wire.tokens import SecretError, parse_token


class HttpDeps:
    """What the HTTP port reads; each a narrow piece of the master."""

    def __init__(
        self,
        cfg: MasterConfig,
        reader: StateReader,
        raft: RaftMember,
        leader: LeaderStatus,
        disk: DiskGuard,
        liveness: NodeLiveness,
        keys: KeyStore,
        health: Callable[[dict[str, Any]], dict[str, Any]],
        rpc: RpcServer,
        rpc_stats: RpcStats,
        loop_errors: Callable[[], int],
        started_at: float,
        clock: Clock,
        gc_stats: GcStats | None = None,
    ) -> None:
        self.cfg = cfg
        self.reader = reader
        self.raft = raft
        self.leader = leader
        self.disk = disk
        self.liveness = liveness
        self.keys = keys
        self.health = health
        self.rpc = rpc
        self.rpc_stats = rpc_stats
        self.loop_errors = loop_errors
        self.started_at = started_at
        self.clock = clock
        self.gc_stats = gc_stats
        self.auth_failures = 0  # bearer tokens and sign-ins refused


def registry_for(m: HttpDeps) -> CollectorRegistry:
    """The master's own series, the cluster's (leader only), and the process's."""
    reg = CollectorRegistry()
    reg.register(
        MemberCollector(
            m.raft,
            m.leader,
            m.reader,
            m.disk,
            m.rpc_stats,
            lambda: m.rpc.counters,
            lambda: len(m.rpc.connections),
            lambda: m.auth_failures,
            m.loop_errors,
        )
    )
    reg.register(ClusterCollector(m.reader, m.leader, m.liveness, m.cfg.heartbeat_ttl_s, m.clock))
    # These register themselves with the registry they are given.
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    if m.gc_stats is not None:
        reg.register(GcPauseCollector(m.gc_stats))
    reg.register(RpcBudgetCollector(m.rpc, m.liveness))
    return reg


class RpcBudgetCollector(Collector):
    """What this master's connections hold in memory: partly received RPC
    frames (--max-buffered-bytes), unread replies, and what it dropped from
    agents' heartbeats."""

    def __init__(self, rpc: RpcServer, liveness: NodeLiveness) -> None:
        self.rpc = rpc
        self.liveness = liveness

    def collect(self) -> Iterator[Metric]:
        budget = self.rpc.budget
        yield GaugeMetricFamily(
            "lepton_rpc_partial_frame_bytes",
            "Bytes reserved for partly received RPC frames (--max-buffered-bytes)",
            value=budget.used,
        )
        yield GaugeMetricFamily(
            "lepton_rpc_partial_frame_waiting",
            "RPC connections waiting for room to receive a large frame",
            value=budget.waiting,
        )
        output = self.rpc.output
        yield GaugeMetricFamily(
            "lepton_rpc_unsent_reply_bytes",
            "Bytes of RPC replies waiting for their peers to read them",
            value=output.used,
        )
        yield CounterMetricFamily(
            "lepton_rpc_slow_readers_closed",
            "RPC connections closed for leaving too many replies unread",
            value=output.closed,
        )
        # Heartbeats come to the leader; each master counts what it dropped.
        yield CounterMetricFamily(
            "lepton_heartbeat_values_dropped",
            "Values in agents' heartbeats left out as malformed",
            value=self.liveness.dropped_values,
        )


class HttpServer:
    def __init__(self, m: HttpDeps) -> None:
        self.m = m
        self.registry = registry_for(m)
        self.ui = WebUI(self._rpc_addrs, m.clock, self._auth_failed)
        # Sign-in forms are small; nothing here takes a large body.
        self.app = web.Application(client_max_size=64 * 1024)
        self.app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/metrics", self.metrics),
                web.get("/api/jobs", self.jobs),
                web.get("/api/nodes", self.nodes),
                *self.ui.routes(),
            ]
        )
        self.runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        quiet_bad_requests()  # anyone may send this port anything
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()

    async def close(self) -> None:
        await self.ui.close()
        if self.runner is not None:
            await self.runner.cleanup()

    def _rpc_addrs(self) -> list[tuple[str, int]]:
        """This master's RPC address first, then the others': the web UI's
        calls start here and follow the leader."""
        mine = self.m.cfg.rpc_addr
        others = [mb.rpc_addr for mb in self.m.reader.view().members.values() if mb.rpc_addr]
        out = []
        for a in [mine, *others]:
            try:
                addr = parse_addr(a)
            except ValueError:
                continue
            if addr not in out:
                out.append(addr)
        return out

    def _auth_failed(self) -> None:
        self.m.auth_failures += 1

    async def healthz(self, request: web.Request) -> web.Response:
        """200 only when this master knows a leader, reaches a quorum, can write
        its journal and has its disk reserve (leptond/health.py); 503 with the
        reasons in `problems` otherwise."""
        m = self.m
        try:
            st = m.raft.status()
        except RaftError as exc:
            return web.json_response({"problems": [str(exc)]}, status=503)
        h = m.health(st)
        disk = h["disk"]
        body: dict[str, Any] = {
            "role": "leader" if m.leader.is_leader() else "follower",
            "leader": st.get("leader"),
            "quorum": h["quorum"],
            "reachable": h["reachable"],
            "members": h["members"],
            "unreachable": h["unreachable"],
            "journal_writable": disk["journal_writable"],
            "disk_low": disk["low"],
            "disk_free_bytes": disk["free_bytes"],
            "disk_reserve_bytes": disk["reserve_bytes"],
            "problems": h["problems"],
            "applied_index": m.reader.view().applied_index,
            "commit_index": st.get("commit_index"),
            "term": st.get("term"),
            "uptime_s": round(m.clock.now() - m.started_at, 1),
        }
        return web.json_response(body, status=200 if h["ok"] else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        # Off the event loop: a large cluster takes a while to describe, and
        # the collectors read only immutable views and copies.
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": TEXT_FORMAT})

    def _authorized(self, request: web.Request) -> bool:
        """/api/* shows users and commands: it needs a person's token
        (`Authorization: Bearer ltk_...`, any role). /healthz and /metrics stay
        open for load balancers and Prometheus."""
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return False
        try:
            tok = parse_token(header[7:])
        except SecretError:
            self.m.auth_failures += 1
            return False
        psk = self.m.keys.psk(tok.id)
        # People's tokens only: node credentials and join tokens are for agents.
        if psk is None or not hmac.compare_digest(psk, tok.psk):
            self.m.auth_failures += 1
            return False
        return self.m.keys.identity(tok.id)[1] in ROLE_RANK

    @staticmethod
    def _refuse() -> web.Response:
        return web.json_response(
            {"error": {"code": "unauthenticated", "message": "send Authorization: Bearer <token>"}},
            status=401,
        )

    async def jobs(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refuse()
        v = self.m.reader.view()
        # The newest thousand, summarised (commands cut short): not a summary
        # of every job in the state only to keep the last of them.
        recent = list(v.jobs.values())[-1000:]
        return web.json_response([views.job_summary(j, v) for j in recent])

    async def nodes(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refuse()
        s = self.m.reader.view()
        return web.json_response([views.node_summary(s, n, None) for n in s.nodes.values()])
