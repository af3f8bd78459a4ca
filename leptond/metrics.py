"""What a master's /metrics says (Prometheus text format).

Two collectors, so that `sum()` across the masters is right:

- `MemberCollector`: this master's own series, on every master: its Raft
  role, term, commit and applied index, elections and leader changes it saw,
  apply and fsync latency, the Raft loop's regularity and snapshots, its
  disk, RPC requests and errors by method, authentication failures. The
  leader adds each follower's lag.
- `ClusterCollector`: the cluster's series (nodes, GPUs, jobs, tasks, the
  queue, users), on the leader only. Counters and the submit-to-start
  histogram come from the replicated state (raft/accounting.py), so a new
  leader goes on from where the old one was.

Names follow the Prometheus conventions (base units, `_total` only on
counters) and `promtool check metrics` finds nothing to say
(tests/test_metrics_e2e.py). Both collectors read immutable state views and
copies of in-memory tables: /metrics collects on a worker thread.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from raft import accounting as acct
from raft.model import NODE_STATES
from raft.node import RaftCounters, TickStats
from raft.snapwriter import SnapshotStats
from raft.view import StateView

from .clock import Clock
from .disk import DiskGuard
from .gcpolicy import GcStats
from .liveness import NodeLiveness
from .ports import LeaderStatus, StateReader
from .rpcstats import RpcStats
from .stats import TEXT_FORMAT, Histogram

# Per-GPU figures from the agents' heartbeats: metric -> (help, field, scale).
GPU_FIELDS = {
    "lepton_gpu_utilization_ratio": ("GPU busy time over the last sample, 0 to 1", "util_pct", 0.01),
    "lepton_gpu_memory_used_bytes": ("GPU memory in use", "mem_used_bytes", 1.0),
    "lepton_gpu_memory_total_bytes": ("GPU memory", "mem_total_bytes", 1.0),
    "lepton_gpu_temperature_celsius": ("GPU temperature", "temperature_c", 1.0),
    "lepton_gpu_power_watts": ("GPU power draw", "power_w", 1.0),
}  # fmt: skip
# Auth failures counted by the RPC server when a handshake's key is unknown
# or its first sealed frame does not open (a wrong secret).
RPC_AUTH_REJECTS = ("rejected_unknown_key", "rejected_bad_seal")
NODE = ["node", "node_id"]
__all__ = ["TEXT_FORMAT", "ClusterCollector", "GcPauseCollector", "MemberCollector"]


class RaftMember(Protocol):
    """What this master's Raft member reports (raft.node.RaftNode)."""

    ticks: TickStats
    counters: RaftCounters

    def status(self) -> dict[str, Any]: ...

    @property
    def snapshot_stats(self) -> SnapshotStats: ...

    @property
    def fsync_seconds(self) -> Histogram: ...


def histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets, total = h.cumulative()
    return HistogramMetricFamily(
        name,
        doc,
        buckets=[(_le(b), n) for b, n in buckets],
        sum_value=total,
    )


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    # The client adds "_total" to the sample's name.
    return CounterMetricFamily(name, doc, value=value)


class MemberCollector(Collector):
    def __init__(
        self,
        raft: RaftMember,
        leader: LeaderStatus,
        reader: StateReader,
        disk: DiskGuard,
        rpc: RpcStats,
        rpc_counters: Callable[[], Mapping[str, int]],
        rpc_connections: Callable[[], int],
        http_auth_failures: Callable[[], int],
        loop_errors: Callable[[], int],
    ) -> None:
        self.raft = raft
        self.leader = leader
        self.reader = reader
        self.disk = disk
        self.rpc = rpc
        self.rpc_counters = rpc_counters
        self.rpc_connections = rpc_connections
        self.http_auth_failures = http_auth_failures
        self.loop_errors = loop_errors

    def collect(self) -> Iterator[Metric]:
        st = self.raft.status()
        leads = self.leader.is_leader()
        yield gauge("lepton_raft_leader", "1 if this master leads the cluster", 1 if leads else 0)
        yield gauge("lepton_raft_term", "This master's Raft term", st.get("term", 0))
        yield gauge(
            "lepton_raft_commit_index", "Raft log index known committed", st.get("commit_index", 0)
        )
        yield gauge(
            "lepton_raft_applied_index",
            "Raft log index applied to this master's state",
            self.reader.view().applied_index,
        )
        yield gauge("lepton_raft_log_entries", "Entries in this master's Raft log", st["log_len"])
        members = st.get("members", [])
        yield gauge("lepton_raft_members", "Masters in the Raft membership", 1 + len(members))
        yield gauge(
            "lepton_raft_members_reachable",
            "Masters this one is connected to, itself included",
            1 + sum(1 for m in members if m.get("connected")),
        )
        c = self.raft.counters
        yield counter(
            "lepton_raft_elections", "Elections this master stood in (as a candidate)", c.elections
        )
        yield counter(
            "lepton_raft_leader_changes",
            "Times the leader this master knows changed (to another master or to none)",
            c.leader_changes,
        )
        yield histogram(
            "lepton_raft_apply_duration_seconds",
            "Time to apply one committed entry to the state",
            c.apply_seconds,
        )
        yield histogram(
            "lepton_raft_fsync_duration_seconds",
            "Time to write and fsync the Raft journal's appended records",
            self.raft.fsync_seconds,
        )
        if leads:
            lag = GaugeMetricFamily(
                "lepton_raft_follower_lag_entries",
                "Entries a follower's log is behind the leader's commit index",
                labels=["member"],
            )
            up = GaugeMetricFamily(
                "lepton_raft_follower_connected",
                "1 if the leader is connected to this follower",
                labels=["member"],
            )
            for m in members:
                if m.get("lag") is not None:
                    lag.add_metric([m["addr"]], m["lag"])
                up.add_metric([m["addr"]], 1 if m.get("connected") else 0)
            yield lag
            yield up
        yield from raft_loop_metrics(self.raft.ticks, self.raft.snapshot_stats)
        yield from self._disk()
        yield from self._rpc()
        yield counter(
            "lepton_leader_loop_errors",
            "Errors in this master's leader-only loops (each loop goes on after one)",
            self.loop_errors(),
        )

    def _disk(self) -> Iterator[Metric]:
        disk = self.disk.state()
        yield gauge(
            "lepton_data_disk_free_bytes", "Free space on this master's data disk", disk.free_bytes
        )
        yield gauge(
            "lepton_data_disk_reserve_bytes",
            "Free space this master keeps (--min-free-disk)",
            disk.reserve_bytes,
        )
        yield gauge(
            "lepton_data_disk_low",
            "1 if the free space is under --min-free-disk",
            1 if disk.low else 0,
        )
        yield gauge(
            "lepton_raft_journal_writable",
            "1 if this master can write its Raft journal",
            1 if disk.journal_writable else 0,
        )

    def _rpc(self) -> Iterator[Metric]:
        reqs = CounterMetricFamily(
            "lepton_rpc_requests", "RPC requests this master served, by method", labels=["method"]
        )
        for method, n in sorted(list(self.rpc.requests.items())):
            reqs.add_metric([method], n)
        yield reqs
        errs = CounterMetricFamily(
            "lepton_rpc_errors",
            "RPC requests that ended in an error, by method and error code",
            labels=["method", "code"],
        )
        for (method, code), n in sorted(list(self.rpc.errors.items())):
            errs.add_metric([method, code], n)
        yield errs
        counts = dict(self.rpc_counters())
        yield gauge("lepton_rpc_connections", "Open RPC connections", self.rpc_connections())
        rejected = CounterMetricFamily(
            "lepton_rpc_rejected_connections",
            "RPC connections closed for a protocol error, by reason",
            labels=["reason"],
        )
        for key, n in sorted(counts.items()):
            if key.startswith("rejected_"):
                rejected.add_metric([key.removeprefix("rejected_")], n)
        yield rejected
        auth = CounterMetricFamily(
            "lepton_auth_failures",
            "Refused credentials: RPC handshakes with an unknown or wrong key and calls "
            "with a revoked token (rpc); HTTP and web UI sign-ins (http)",
            labels=["via"],
        )
        rpc_fails = sum(counts.get(k, 0) for k in RPC_AUTH_REJECTS)
        auth.add_metric(["rpc"], rpc_fails + self.rpc.failures("unauthenticated"))
        auth.add_metric(["http"], self.http_auth_failures())
        yield auth


class GcPauseCollector(Collector):
    """How long this process's garbage collections stopped it (every thread
    waits for one), by generation, and the freezing policy's state
    (leptond/gcpolicy.py). prometheus_client's GCCollector counts the
    collections and the objects; it has no durations."""

    def __init__(self, stats: GcStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        snap = self.stats.snapshot()
        pauses = HistogramMetricFamily(
            "lepton_gc_pause_seconds",
            "Time each garbage collection held this process, by generation (2: full)",
            labels=["generation"],
        )
        longest = GaugeMetricFamily(
            "lepton_gc_pause_max_seconds",
            "Longest garbage collection pause since start, by generation",
            labels=["generation"],
        )
        for gen, h in snap["pauses"].items():
            buckets, total = h.cumulative()
            pauses.add_metric([str(gen)], [(_le(b), n) for b, n in buckets], total)
            longest.add_metric([str(gen)], snap["max_pause_s"][gen])
        yield pauses
        yield longest
        yield gauge(
            "lepton_gc_frozen_objects",
            "Objects frozen out of the collector's walks after the last full collection "
            "(0 with --gc-policy stock)",
            snap["frozen"],
        )
        yield counter(
            "lepton_gc_unfreezes",
            "Full collections that walked every object again, to free cycles among frozen objects",
            snap["unfreezes"],
        )


def raft_loop_metrics(ticks: TickStats, snaps: SnapshotStats) -> Iterator[Metric]:
    """How regularly the Raft thread runs, and what snapshots cost it."""
    yield gauge(
        "lepton_raft_tick_gap_max_seconds",
        "Longest gap between two passes of the Raft loop since start",
        ticks.max_gap_s,
    )
    yield counter("lepton_raft_slow_ticks", "Raft loop gaps over 100 ms", ticks.slow)
    yield counter("lepton_raft_snapshots", "Log compaction snapshots written", snaps.written)
    yield counter(
        "lepton_raft_snapshot_failures", "Snapshots that failed or were dropped", snaps.failed
    )
    yield gauge(
        "lepton_raft_snapshot_seconds",
        "The last snapshot: from the Raft thread taking its view to the file being durable",
        snaps.last_total_s,
    )
    yield gauge(
        "lepton_raft_snapshot_freeze_seconds",
        "The last snapshot: time the Raft thread spent taking its view",
        snaps.last_freeze_s,
    )
    yield gauge(
        "lepton_raft_snapshot_tick_gap_max_seconds",
        "The last snapshot: longest gap between two passes of the Raft loop while it was made",
        snaps.last_tick_gap_max_s,
    )
    yield gauge("lepton_raft_snapshot_bytes", "Size of the last snapshot", snaps.last_bytes)


class ClusterCollector(Collector):
    """The cluster as the leader sees it; nothing on a follower (its view may
    lag, and three masters exporting it would triple every sum)."""

    def __init__(
        self,
        reader: StateReader,
        leader: LeaderStatus,
        liveness: NodeLiveness,
        heartbeat_ttl_s: float,
        clock: Clock,
    ) -> None:
        self.reader = reader
        self.leader = leader
        self.liveness = liveness
        self.ttl_s = heartbeat_ttl_s
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        if not self.leader.is_leader():
            return
        s = self.reader.view()
        yield from self._nodes(s)
        yield from self._work(s)
        yield from self._counters(s)
        yield from self._users(s)

    # -- nodes and GPUs ---------------------------------------------------------------
    def _nodes(self, s: StateView) -> Iterator[Metric]:
        by_state = Counter(n.state for n in s.nodes.values())
        g = GaugeMetricFamily("lepton_nodes", "Nodes by state", labels=["state"])
        for state in NODE_STATES:
            g.add_metric([state], by_state.get(state, 0))
        yield g
        # Labels: the node's name for people, and its id, which is unique
        # (two nodes may share a name; a duplicate series would fail the scrape).
        node_state = GaugeMetricFamily(
            "lepton_node_state", "1 for the state each node is in, 0 for the others",
            labels=[*NODE, "state"],
        )  # fmt: skip
        gpus = GaugeMetricFamily("lepton_node_gpus", "GPUs a node has", labels=NODE)
        held = GaugeMetricFamily(
            "lepton_node_gpus_allocated", "GPUs of a node held by live tasks", labels=NODE
        )
        bad = GaugeMetricFamily(
            "lepton_node_gpus_unhealthy",
            "GPUs of a node marked unhealthy (no work is placed on them)",
            labels=NODE,
        )
        age = GaugeMetricFamily(
            "lepton_node_heartbeat_age_seconds",
            "Time since the leader last heard from a node",
            labels=NODE,
        )
        fams = {k: GaugeMetricFamily(k, d, labels=[*NODE, "gpu"]) for k, (d, _, _) in GPU_FIELDS.items()}  # fmt: skip
        usable = allocated = unhealthy = 0
        now = self.clock.monotonic()
        seen = dict(self.liveness.last_seen)
        live = dict(self.liveness.live)
        for n in s.nodes.values():
            who = [n.name, n.id]
            for state in NODE_STATES:
                node_state.add_metric([*who, state], 1 if n.state == state else 0)
            n_held = len(s.node_usage(n.id)[0])
            n_bad = len(n.gpu_faults)
            gpus.add_metric(who, len(n.gpus))
            held.add_metric(who, n_held)
            bad.add_metric(who, n_bad)
            allocated += n_held
            unhealthy += n_bad
            if n.state != "down":
                usable += len(n.gpus) - n_bad
            if n.id in seen:
                age.add_metric(who, max(0.0, now - seen[n.id]))
            # A down node's last figures are stale, and so are those of a node
            # not heard from within the TTL: better no series than a wrong one.
            # (Figures come every few seconds, liveness every second.)
            stats = live.get(n.id)
            heard = seen.get(n.id, stats["at"] if stats is not None else 0.0)
            if n.state == "down" or stats is None or now - heard > self.ttl_s:
                continue
            # Checked at arrival (nodestats.py); still, a scrape must never
            # fail over one host's report.
            gpu_stats = stats.get("gpus")
            for gpu in gpu_stats if isinstance(gpu_stats, list) else []:
                if not isinstance(gpu, dict):
                    continue
                for name, (_, key, scale) in GPU_FIELDS.items():
                    v = gpu.get(key)
                    if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
                        fams[name].add_metric([*who, str(gpu.get("index"))], v * scale)
        yield from (node_state, gpus, held, bad, age)
        yield gauge(
            "lepton_gpus",
            "GPUs on nodes that are up (ready or draining), less those marked unhealthy",
            usable,
        )
        yield gauge("lepton_gpus_allocated", "GPUs held by live tasks", allocated)
        yield gauge("lepton_gpus_unhealthy", "GPUs marked unhealthy", unhealthy)
        yield from fams.values()

    # -- jobs, tasks and the queue --------------------------------------------------------
    def _work(self, s: StateView) -> Iterator[Metric]:
        jobs = Counter(j.state for j in s.jobs.values() if j.state in ("pending", "running"))
        g = GaugeMetricFamily("lepton_jobs", "Jobs waiting or running now", labels=["state"])
        for state in ("pending", "running"):
            g.add_metric([state], jobs.get(state, 0))
        yield g
        live = Counter(t.state for t in s.live_tasks())
        g = GaugeMetricFamily("lepton_tasks", "Tasks waiting or running now", labels=["state"])
        g.add_metric(["pending"], len(s.pending))
        for state in ("assigned", "running"):
            g.add_metric([state], live.get(state, 0))
        yield g
        oldest = min((s.jobs[s.tasks[tid].job_id].submitted_at for tid in s.pending), default=None)
        yield gauge(
            "lepton_queue_oldest_pending_seconds",
            "How long the longest-waiting pending task has waited since its submit (0: none)",
            0.0 if oldest is None else max(0.0, self.clock.now() - oldest),
        )

    def _counters(self, s: StateView) -> Iterator[Metric]:
        c = s.counters
        yield counter("lepton_jobs_submitted", "Jobs accepted", c.get(acct.JOBS_SUBMITTED, 0))
        ended = CounterMetricFamily(
            "lepton_jobs_ended", "Jobs that reached a final state, by state", labels=["state"]
        )
        for state in ("succeeded", "failed", "cancelled"):
            ended.add_metric([state], c.get(acct.job_ended_key(state), 0))
        yield ended
        yield counter(
            "lepton_tasks_started", "Task runs that started (every attempt)", c.get(acct.TASKS_STARTED, 0)
        )  # fmt: skip
        ended = CounterMetricFamily(
            "lepton_tasks_ended",
            "Task runs that ended, by reason (evicted: stopped to run again elsewhere "
            "at no cost to its retries: a drain deadline, a faulty GPU, a gang restart; "
            "requeued: it asked to run again from its checkpoint)",
            labels=["reason"],
        )
        for reason in acct.END_REASONS:
            ended.add_metric([reason], c.get(acct.ended_key(reason), 0))
        yield ended
        yield counter("lepton_preemptions", "Tasks preempted", c.get(acct.PREEMPTIONS, 0))
        yield counter(
            "lepton_reschedules", "Tasks put back in the queue to run again", c.get(acct.RESCHEDULES, 0)
        )  # fmt: skip
        yield counter(
            "lepton_gpu_usage_seconds", "GPU-seconds of task runs that ended", c.get(acct.GPU_SECONDS, 0)
        )  # fmt: skip
        yield counter(
            "lepton_cpu_usage_seconds", "CPU-seconds (as requested) of task runs that ended", c.get(acct.CPU_SECONDS, 0)
        )  # fmt: skip
        buckets = []
        acc = 0.0
        for i, bound in enumerate(acct.START_BUCKETS_S):
            acc += c.get(acct.bucket_key(i), 0)
            buckets.append((_le(bound), acc))
        buckets.append(("+Inf", c.get(acct.START_COUNT, 0)))
        yield HistogramMetricFamily(
            "lepton_submit_to_start_seconds",
            "From a job's submit to each of its tasks' first start (each task once)",
            buckets=buckets,
            sum_value=c.get(acct.START_SUM, 0.0),
        )

    def _users(self, s: StateView) -> Iterator[Metric]:
        # What `leptonctl queue` reports (scheduler.queue_report), counted
        # straight from the view: building the scheduler's inputs for every
        # pending task would cost a second per scrape at 100,000 of them.
        held: dict[str, list[float]] = {}  # user -> [gpus, cpus, mem]
        live_of: dict[str, int] = {}  # live tasks per job
        for t in s.live_tasks():
            h = held.setdefault(s.jobs[t.job_id].user, [0.0, 0.0, 0.0])
            h[0] += len(t.gpus)
            h[1] += t.cpus
            h[2] += t.mem_bytes
            live_of[t.job_id] = live_of.get(t.job_id, 0) + 1
        waiting: dict[str, list[int]] = {}  # user -> [tasks, gpus]
        jobs, tasks = s.jobs, s.tasks
        room: dict[str, int] = {}  # tasks each --max-running array may still start
        for tid in s.pending:
            j = jobs[tasks[tid].job_id]
            # As views.scheduler_inputs: a job waiting for others, and an
            # array's tasks over its --max-running, are not offered yet.
            if j.state not in ("pending", "running") or j.waiting_on:
                continue
            limit = j.spec.get("max_running")
            if limit is not None:
                left = room.setdefault(j.id, limit - live_of.get(j.id, 0))
                if left <= 0:
                    continue
                room[j.id] = left - 1
            w = waiting.setdefault(j.user, [0, 0])
            w[0] += 1
            w[1] += int(j.spec.get("gpus", 0))
        # Shares are of what can be scheduled: ready nodes, healthy GPUs (as
        # scheduler.FairShare counts them).
        ready = [n for n in s.nodes.values() if n.state == "ready"]
        totals = (
            float(sum(len(n.gpus) - len(n.gpu_faults) for n in ready)),
            float(sum(n.cpus for n in ready)),
            float(sum(n.mem_bytes for n in ready)),
        )
        fams = {
            "gpus": GaugeMetricFamily("lepton_user_gpus", "GPUs a user's tasks hold", labels=["user"]),
            "pending_gpus": GaugeMetricFamily(
                "lepton_user_pending_gpus",
                "GPUs a user's pending tasks ask for (those the scheduler may place now)",
                labels=["user"],
            ),
            "pending_tasks": GaugeMetricFamily(
                "lepton_user_pending_tasks",
                "A user's pending tasks that the scheduler may place now (not those of a job "
                "waiting for another, nor an array's over its --max-running)",
                labels=["user"],
            ),
            "dominant_share": GaugeMetricFamily(
                "lepton_user_dominant_share",
                "A user's largest share of the cluster's GPUs, CPUs or memory (DRF)",
                labels=["user"],
            ),
        }  # fmt: skip
        for user in sorted(set(held) | set(waiting)):
            h = held.get(user, [0.0, 0.0, 0.0])
            w = waiting.get(user, [0, 0])
            share = max((x / t if t > 0 else 0.0) for x, t in zip(h, totals, strict=True))
            fams["gpus"].add_metric([user], h[0])
            fams["pending_gpus"].add_metric([user], w[1])
            fams["pending_tasks"].add_metric([user], w[0])
            fams["dominant_share"].add_metric([user], share)
        yield from fams.values()
