"""The masters' HTTP port: /healthz, /metrics (Prometheus) and a read-only JSON API."""

from __future__ import annotations

import hmac
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from raft.errors import RaftError
from raft.model import JOB_STATES, NODE_STATES, TASK_STATES
from raft.node import TickStats
from raft.snapwriter import SnapshotStats

from . import views
from .auth import ROLE_RANK, KeyStore
from .clock import Clock
from .disk import DiskGuard
from .liveness import NodeLiveness
from .ports import LeaderStatus, StateReader
from .wire.budget import BufferBudget, OutputMeter
from .wire.tokens import SecretError, parse_token

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RaftInfo(Protocol):
    """What this master's Raft member reports (raft.node.RaftNode)."""

    ticks: TickStats

    def status(self) -> dict[str, Any]: ...

    @property
    def snapshot_stats(self) -> SnapshotStats: ...


class HttpDeps:
    """What the HTTP port reads; each a narrow piece of the master."""

    def __init__(
        self,
        reader: StateReader,
        raft: RaftInfo,
        leader: LeaderStatus,
        disk: DiskGuard,
        liveness: NodeLiveness,
        keys: KeyStore,
        health: Callable[[dict[str, Any]], dict[str, Any]],
        rpc_budget: BufferBudget | None,
        started_at: float,
        clock: Clock,
        rpc_output: OutputMeter | None = None,
    ) -> None:
        self.reader = reader
        self.raft = raft
        self.leader = leader
        self.disk = disk
        self.liveness = liveness
        self.keys = keys
        self.health = health
        self.rpc_budget = rpc_budget
        self.rpc_output = rpc_output
        self.started_at = started_at
        self.clock = clock


class StateCollector(Collector):
    """Reads a view of the replicated state at scrape time; nothing is kept twice."""

    def __init__(self, m: HttpDeps) -> None:
        self.m = m

    def collect(self) -> Iterator[Any]:
        m = self.m
        st = m.raft.status()
        s = m.reader.view()
        node_states = Counter(n.state for n in s.nodes.values())
        job_states = Counter(j.state for j in s.jobs.values())
        task_states = Counter(t.state for t in s.tasks.values())
        gpus_total = sum(len(n.gpus) for n in s.nodes.values())
        gpus_alloc = len(s.gpu_owner)
        names = {n.id: n.name for n in s.nodes.values()}
        latencies = [
            t.started_at - j.submitted_at
            for t in s.tasks.values()
            if t.started_at is not None and t.attempt == 1
            for j in (s.jobs[t.job_id],)
        ]
        g = GaugeMetricFamily("lepton_nodes", "Nodes by state", labels=["state"])
        for state in NODE_STATES:
            g.add_metric([state], node_states.get(state, 0))
        yield g
        yield GaugeMetricFamily("lepton_gpus_total", "GPUs registered", value=gpus_total)
        yield GaugeMetricFamily(
            "lepton_gpus_allocated", "GPUs held by live tasks", value=gpus_alloc
        )
        g = GaugeMetricFamily("lepton_jobs", "Jobs by state", labels=["state"])
        for state in JOB_STATES:
            g.add_metric([state], job_states.get(state, 0))
        yield g
        g = GaugeMetricFamily("lepton_tasks", "Tasks by state", labels=["state"])
        for state in TASK_STATES:
            g.add_metric([state], task_states.get(state, 0))
        yield g
        yield GaugeMetricFamily("lepton_raft_term", "Raft term", value=st.get("term", 0))
        yield GaugeMetricFamily(
            "lepton_raft_commit_index", "Raft commit index", value=st.get("commit_index", 0)
        )
        yield GaugeMetricFamily(
            "lepton_raft_leader", "1 if this master leads", value=1 if m.leader.is_leader() else 0
        )
        yield from raft_metrics(m.raft.ticks, m.raft.snapshot_stats)
        disk = m.disk.state()
        yield GaugeMetricFamily(
            "lepton_data_disk_free_bytes", "Free space on this master's data disk",
            value=disk.free_bytes,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "lepton_data_disk_low", "1 if the free space is under --min-free-disk",
            value=1 if disk.low else 0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "lepton_raft_journal_writable", "1 if this master can write its Raft journal",
            value=1 if disk.journal_writable else 0,
        )  # fmt: skip
        if m.rpc_budget is not None:
            yield GaugeMetricFamily(
                "lepton_rpc_partial_frame_bytes",
                "Bytes reserved for partly received RPC frames (--max-buffered-bytes)",
                value=m.rpc_budget.used,
            )
            yield GaugeMetricFamily(
                "lepton_rpc_partial_frame_waiting",
                "RPC connections waiting for room to receive a large frame",
                value=m.rpc_budget.waiting,
            )
        if m.rpc_output is not None:
            yield GaugeMetricFamily(
                "lepton_rpc_unsent_reply_bytes",
                "Bytes of RPC replies waiting for their peers to read them",
                value=m.rpc_output.used,
            )
            yield CounterMetricFamily(
                "lepton_rpc_slow_readers_closed",
                "RPC connections closed for leaving too many replies unread",
                value=m.rpc_output.closed,
            )
        per_gpu = {
            "lepton_gpu_utilization_pct": ("GPU utilisation", "util_pct"),
            "lepton_gpu_memory_used_bytes": ("GPU memory used", "mem_used_bytes"),
            "lepton_gpu_memory_total_bytes": ("GPU memory total", "mem_total_bytes"),
            "lepton_gpu_temperature_celsius": ("GPU temperature", "temperature_c"),
            "lepton_gpu_power_watts": ("GPU power draw", "power_w"),
        }
        fams = {k: GaugeMetricFamily(k, d, labels=["node", "gpu"]) for k, (d, _) in per_gpu.items()}
        for nid, live in list(m.liveness.live.items()):
            # Checked at arrival (nodestats.py); still, a scrape must never
            # fail over one host's report.
            gpus = live.get("gpus") if isinstance(live, dict) else None
            for gpu in gpus if isinstance(gpus, list) else []:
                if not isinstance(gpu, dict):
                    continue
                for k, (_, field) in per_gpu.items():
                    v = gpu.get(field)
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        fams[k].add_metric([names.get(nid, nid), str(gpu.get("index"))], v)
        yield from fams.values()
        yield CounterMetricFamily(
            "lepton_heartbeat_values_dropped",
            "Values in agents' heartbeats left out as malformed",
            value=m.liveness.dropped_values,
        )
        buckets = []
        acc = 0
        for b in LATENCY_BUCKETS:
            acc = sum(1 for x in latencies if x <= b)
            buckets.append((str(b), acc))
        buckets.append(("+Inf", len(latencies)))
        yield HistogramMetricFamily(
            "lepton_submit_to_start_seconds",
            "Submit to task start latency",
            buckets=buckets,
            sum_value=sum(latencies),
        )


def raft_metrics(ticks: TickStats, snaps: SnapshotStats) -> Iterator[Any]:
    """How regularly the Raft thread runs, and what snapshots cost it."""
    yield GaugeMetricFamily(
        "lepton_raft_tick_gap_max_seconds",
        "Longest gap between two passes of the Raft loop since start",
        value=ticks.max_gap_s,
    )
    yield CounterMetricFamily(
        "lepton_raft_slow_ticks", "Raft loop gaps over 100 ms", value=ticks.slow
    )
    yield CounterMetricFamily(
        "lepton_raft_snapshots", "Log compaction snapshots written", value=snaps.written
    )
    yield CounterMetricFamily(
        "lepton_raft_snapshot_failures", "Snapshots that failed or were dropped", value=snaps.failed
    )
    yield GaugeMetricFamily(
        "lepton_raft_snapshot_seconds",
        "The last snapshot: from the Raft thread taking its view to the file being durable",
        value=snaps.last_total_s,
    )
    yield GaugeMetricFamily(
        "lepton_raft_snapshot_freeze_seconds",
        "The last snapshot: time the Raft thread spent taking its view",
        value=snaps.last_freeze_s,
    )
    yield GaugeMetricFamily(
        "lepton_raft_snapshot_tick_gap_max_seconds",
        "The last snapshot: longest gap between two passes of the Raft loop while it was made",
        value=snaps.last_tick_gap_max_s,
    )
    yield GaugeMetricFamily(
        "lepton_raft_snapshot_bytes", "Size of the last snapshot", value=snaps.last_bytes
    )


class HttpServer:
    def __init__(self, m: HttpDeps) -> None:
        self.m = m
        self.registry = CollectorRegistry()
        self.registry.register(StateCollector(m))
        self.app = web.Application()
        self.app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/metrics", self.metrics),
                web.get("/api/jobs", self.jobs),
                web.get("/api/nodes", self.nodes),
            ]
        )
        self.runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

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
        return web.Response(
            body=generate_latest(self.registry), content_type="text/plain", charset="utf-8"
        )

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
            return False
        psk = self.m.keys.psk(tok.id)
        if psk is None or not hmac.compare_digest(psk, tok.psk):
            return False
        # People's tokens only: node credentials and join tokens are for agents.
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
