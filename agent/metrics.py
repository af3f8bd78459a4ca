"""The agent's own HTTP port (`--http-port`, default 7443): /metrics, /healthz.

What only the host knows, for Prometheus to scrape from every GPU host:

- per GPU (labels gpu, uuid, model): utilisation, memory, temperature,
  power, ECC errors by type, Xid errors by code, and whether it is healthy;
- per running task (labels job, user, task): CPU time, memory, the memory
  of its GPUs (each GPU belongs to one task), processes;
- the workdir block cache: hits, misses, bytes, evictions;
- the process itself (process_*, python_*).

Names follow the Prometheus conventions; tests/test_metrics_e2e.py runs
`promtool check metrics` on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

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

from leptond.httplog import quiet_bad_requests
from leptond.stats import TEXT_FORMAT

from .health import GpuHealth
from .ports import Runner
from .probes import GpuProbe, GpuStat
from .taskdir import SPEC, read_json

log = logging.getLogger("lepton.agent")
GPU_LABELS = ["gpu", "uuid", "model"]
TASK_LABELS = ["job", "user", "task"]


class AgentView(Protocol):
    """What the agent's metrics read (agent.daemon.Agent)."""

    name: str
    probe: GpuProbe
    health: GpuHealth
    runner: Runner
    state: str

    def cache_stats(self) -> dict[str, Any]: ...


def task_labels(runner: Runner, run_id: str) -> tuple[list[str], list[int]]:
    """[job, user, task] and the GPU indexes of a running task, from its spec."""
    env = (read_json(runner.task_dir(run_id) / SPEC) or {}).get("env") or {}
    gpus = [int(x) for x in str(env.get("LEPTON_GPUS", "")).split(",") if x.isdigit()]
    job = str(env.get("LEPTON_JOB_ID", ""))
    return [job, str(env.get("LEPTON_USER", "")), str(env.get("LEPTON_TASK_ID", run_id))], gpus


class AgentCollector(Collector):
    def __init__(self, agent: AgentView) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        stats = a.probe.gpus()
        yield from self._gpus(stats)
        yield from self._tasks({g.index: g for g in stats})
        yield from self._cache()
        yield GaugeMetricFamily(
            "lepton_agent_registered",
            "1 while the agent is registered with the leader",
            value=1 if a.state in ("ready", "draining") else 0,
        )

    def _gpus(self, stats: list[GpuStat]) -> Iterator[Metric]:
        a = self.agent
        faults = {f["index"]: f for f in a.health.report()}
        xids, ecc = a.health.counts()
        g = {
            "util": GaugeMetricFamily(
                "lepton_agent_gpu_utilization_ratio", "GPU busy time, 0 to 1", labels=GPU_LABELS
            ),
            "mem": GaugeMetricFamily(
                "lepton_agent_gpu_memory_used_bytes", "GPU memory in use", labels=GPU_LABELS
            ),
            "total": GaugeMetricFamily(
                "lepton_agent_gpu_memory_total_bytes", "GPU memory", labels=GPU_LABELS
            ),
            "temp": GaugeMetricFamily(
                "lepton_agent_gpu_temperature_celsius", "GPU temperature", labels=GPU_LABELS
            ),
            "power": GaugeMetricFamily(
                "lepton_agent_gpu_power_watts", "GPU power draw", labels=GPU_LABELS
            ),
            "healthy": GaugeMetricFamily(
                "lepton_agent_gpu_healthy",
                "0 once the GPU is marked unhealthy (until a reset passes its burn-in)",
                labels=GPU_LABELS,
            ),
        }
        ecc_f = CounterMetricFamily(
            "lepton_agent_gpu_ecc_errors",
            "ECC errors (volatile, since the driver loaded), by type",
            labels=[*GPU_LABELS, "type"],
        )
        xid_f = CounterMetricFamily(
            "lepton_agent_gpu_xid_errors",
            "Xid errors the driver reported since the agent started, by Xid code",
            labels=[*GPU_LABELS, "xid"],
        )
        for s in stats:
            labels = [str(s.index), s.uuid, s.name]
            for key, v in (
                ("util", s.util_pct / 100),
                ("mem", s.mem_used_bytes),
                ("total", s.mem_total_bytes),
                ("temp", s.temperature_c),
                ("power", s.power_w),
            ):
                if v >= 0:  # -1: NVML could not tell
                    g[key].add_metric(labels, v)
            g["healthy"].add_metric(labels, 0 if s.index in faults else 1)
            for kind, probe_count in (
                ("corrected", s.ecc_corrected),
                ("uncorrected", s.ecc_uncorrected),
            ):
                n = max(probe_count, ecc.get((s.index, kind), 0))
                ecc_f.add_metric([*labels, kind], n)
            for (gpu, code), n in sorted(xids.items()):
                if gpu == s.index:
                    xid_f.add_metric([*labels, str(code)], n)
        yield from g.values()
        yield ecc_f
        yield xid_f

    def _tasks(self, gpus: dict[int, GpuStat]) -> Iterator[Metric]:
        runner = self.agent.runner
        cpu = CounterMetricFamily(
            "lepton_agent_task_cpu_seconds",
            "CPU time (user and system) of a running task's processes",
            labels=TASK_LABELS,
        )
        mem = GaugeMetricFamily(
            "lepton_agent_task_memory_bytes",
            "Memory of a running task (its cgroup's, or its processes' resident set)",
            labels=TASK_LABELS,
        )
        gmem = GaugeMetricFamily(
            "lepton_agent_task_gpu_memory_bytes",
            "Memory in use on a running task's GPUs",
            labels=TASK_LABELS,
        )
        procs = GaugeMetricFamily(
            "lepton_agent_task_processes", "Processes of a running task", labels=TASK_LABELS
        )
        usage = runner.usage()
        for run_id in sorted(usage):
            u = usage[run_id]
            labels, task_gpus = task_labels(runner, run_id)
            cpu.add_metric(labels, u.cpu_s)
            mem.add_metric(labels, u.rss_bytes)
            procs.add_metric(labels, u.processes)
            used = [gpus[i].mem_used_bytes for i in task_gpus if i in gpus]
            gmem.add_metric(labels, sum(x for x in used if x > 0))
        yield from (cpu, mem, gmem, procs)
        yield GaugeMetricFamily(
            "lepton_agent_tasks_running", "Tasks running on this host", value=len(usage)
        )

    def _cache(self) -> Iterator[Metric]:
        c = self.agent.cache_stats()  # agent/workdir.py: WorkdirCache.stats
        disk = c.get("disk") or {}
        for name, doc, v in (
            ("hits", "Blocks tasks needed that the workdir cache had", c.get("hits")),
            ("misses", "Blocks tasks needed that were fetched from the masters", c.get("misses")),
            ("fetched_bytes", "Bytes of blocks fetched from the masters", c.get("fetched_bytes")),
            ("evictions", "Blocks the workdir cache evicted", disk.get("evictions")),
            ("evicted_bytes", "Bytes the workdir cache evicted", disk.get("evicted_bytes")),
        ):
            yield CounterMetricFamily(f"lepton_agent_block_cache_{name}", doc, value=float(v or 0))
        yield GaugeMetricFamily(
            "lepton_agent_block_cache_bytes",
            "Bytes in the workdir block cache",
            value=c.get("bytes_on_disk") or 0,
        )
        yield GaugeMetricFamily(
            "lepton_agent_block_cache_capacity_bytes",
            "The workdir block cache's budget (--cache-bytes)",
            value=c.get("disk_budget_bytes") or 0,
        )
        yield GaugeMetricFamily(
            "lepton_agent_block_cache_blocks",
            "Blocks in the workdir block cache",
            value=c.get("blocks") or 0,
        )


class AgentHttp:
    """The agent's HTTP port; `start` raises OSError (one line) when it is taken."""

    def __init__(self, agent: AgentView, healthy: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(AgentCollector(agent))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._healthy = healthy
        self.app = web.Application()
        self.app.add_routes([web.get("/metrics", self.metrics), web.get("/healthz", self.healthz)])
        self.runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        quiet_bad_requests()  # anyone may send this port anything
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        try:
            await web.TCPSite(self.runner, host, port).start()
        except OSError:
            await self.runner.cleanup()
            self.runner = None
            raise

    async def close(self) -> None:
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await self.runner.cleanup()

    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": TEXT_FORMAT})

    async def healthz(self, request: web.Request) -> web.Response:
        body = self._healthy()
        return web.json_response(body, status=200 if body.get("ok") else 503)
