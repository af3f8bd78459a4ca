"""A simulated node: the real agent code on a simulated host.

`SimAgent` is agent.daemon.Agent with its host parts replaced: the runner
and the lease are the SimHost's (agent/ports.py), the RPC client is the
real ClusterClient dialling through the simulated network, on the host's
clock. Registration, heartbeats, reconcile, starting and stopping runs and
reporting exits are the agent's own code. (Agent.__init__ sets up a real
host: data dir, credential, cgroups, GPU probes; SimAgent sets the same
attributes to simulated ones instead, and runs the same loop state setup.)

`SimNode` is what happens to the agent process: it starts, crashes (kill -9:
its tasks run on under their supervisors, which cut their lease short
unless the next agent registers within the leader's confirm window, and its
kernel ends its connection with an end-of-stream), stops on purpose (SIGTERM,
as `systemctl restart` sends: it hands its tasks over to the next agent),
restarts, is paused (SIGSTOP: its connection stays open), and sees its
host's wall clock jump.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from agent import gpudev
from agent.daemon import Agent, AgentConfig
from agent.health import GpuHealth
from agent.metrics import AgentHttp
from agent.probes import GpuProbe
from agent.workdir import WorkdirCache

from ..wire.client import ClusterClient, parse_addrs
from .host import SimHost, SimRunner
from .net import ClientEnd, Network
from .trace import Trace
from .vtime import HostClock


class _NoBlocks:
    """Simulated jobs have no workdir: nothing is cached, nothing to release."""

    def release(self, run_id: str) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


class _NoGpuProbe:
    name = "simulated"

    def gpus(self) -> list[Any]:
        return []

    def close(self) -> None:
        pass


class SimAgent(Agent):
    def __init__(
        self, host: SimHost, cfg: AgentConfig, clock: HostClock, net: Network, masters: str
    ) -> None:
        # Not Agent.__init__: that one prepares a real host (see the module doc).
        self.cfg = cfg
        self.clock = clock
        self.host = host
        self.node_id = host.node_id
        self.name = host.name
        self._join = None
        self.switch_users = False
        self.cgroups = None
        self.tasks_mem = host.mem_bytes
        self.no_private_tmp = "simulated processes share the host's /tmp"
        self.lease_path = Path("/sim") / host.name / "lease.json"
        self.lease_s = None
        self.fence = host
        # The simulated supervisors watch their agent as shims do with a
        # pidfd (SimHost.agent_died), so these agents offer the leader's
        # disconnect fast path (agent/lease.py), as a real one does.
        self.fences_disconnect = True
        self._staller = None
        self.runner = SimRunner(host)
        self._next_gc = 0.0
        self._gc = None
        self.workdirs = cast(WorkdirCache, _NoBlocks())
        self.probe = cast(GpuProbe, _NoGpuProbe())
        # No fault is ever recorded here (its file would be under a path
        # that cannot exist), nor an NVML event; the HTTP port never opens.
        self.health = GpuHealth(cfg.data_dir, clock)
        self.nvml_events = None
        self.gpu_devices = gpudev.GpuDevices(None, {})
        self.client = ClusterClient(
            parse_addrs(masters),
            key_id=f"node-{host.node_id}",
            psk=b"",
            handlers={"start": self._on_start, "stop": self._on_stop},
            clock=clock,
            dial=net.dialer(host.name, clock),
        )
        self.http = AgentHttp(self, self._healthz)
        self._init_loop_state()

    def describe(self) -> dict[str, Any]:
        return self.host.describe()

    def host_report(self) -> dict[str, Any]:
        return {"host": {}, "gpus": [], "gpu_faults": [], "cache": {}}

    def gpu_faults(self) -> list[dict[str, Any]]:
        return []


class SimNode:
    """One host and the life of its agent process."""

    def __init__(
        self, host: SimHost, cfg: AgentConfig, net: Network, masters: str, trace: Trace
    ) -> None:
        self.host = host
        self.cfg = cfg
        self.net = net
        self.masters = masters
        self.trace = trace
        self.clock = host.clock
        self.agent: SimAgent | None = None
        self.task: asyncio.Task[None] | None = None
        self.lives = 0
        self._restart_in_s: float | None = None  # after a planned stop

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def up(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.lives += 1
        self.host.agent_started(self.lives)
        self.agent = SimAgent(self.host, self.cfg, self.clock, self.net, self.masters)
        self.task = self.clock.loop.create_task(self.agent.run())
        self.task.add_done_callback(self._exited)
        self.trace(f"{self.name} agent starts")

    def crash(self) -> None:
        """kill -9 of the agent: everything in it stops at once; the runs go
        on, and the kernel closes its connection (an end-of-stream)."""
        agent, task = self.agent, self.task
        if agent is None or task is None:
            return
        self.trace(f"{self.name} agent killed")
        conn = agent.client.conn
        if conn is not None:
            cast(ClientEnd, conn).died()
        for t in (task, *agent._starting, agent._flusher, agent._gc):
            if t is not None:
                t.cancel()
        self._restart_in_s = None
        self._gone()
        if self.clock.paused:
            self.clock.resume()

    def stop(self, restart_in_s: float) -> None:
        """SIGTERM without leave-on-stop (`systemctl restart`): the agent's
        own stop, which hands the node's tasks over to the next agent; that
        one starts `restart_in_s` after this one has exited."""
        if self.agent is not None and not self.clock.paused:
            self.trace(f"{self.name} agent stops (to hand over)")
            self._restart_in_s = restart_in_s
            self.agent.request_stop()

    def _exited(self, task: asyncio.Task[None]) -> None:
        """The agent's run ended by itself (a planned stop): the process exits."""
        if task is not self.task or task.cancelled():
            return  # killed (crash() has seen to it), or the run is over
        self.trace(f"{self.name} agent exited")
        self._gone()
        if self._restart_in_s is not None:
            self.host.world_clock.call_later(self._restart_in_s, self._respawn, self.lives)
            self._restart_in_s = None

    def _respawn(self, lives: int) -> None:
        if not self.up and self.lives == lives:
            self.start()

    def _gone(self) -> None:
        self.agent = self.task = None
        self.host.agent_died()

    def pause(self) -> None:
        if self.agent is not None and not self.clock.paused:
            self.trace(f"{self.name} agent paused")
            self.clock.pause()

    def resume(self) -> None:
        if self.clock.paused:
            self.trace(f"{self.name} agent resumed")
            self.clock.resume()

    def jump_clock(self, seconds: float) -> None:
        self.clock.offset_s += seconds
        self.trace(f"{self.name} wall clock jumps {seconds:+.1f}s")
