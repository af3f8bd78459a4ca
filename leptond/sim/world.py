"""One seeded run: the world, its phases, and the step loop.

A run alternates calm and stormy phases. It begins calm (the agents join);
in a storm, people submit, cancel and drain, and faults strike; a calm heals
every fault and stops people, and at its end the cluster must have settled
(checks.Checker.converged). After every step of 0.1 s of virtual time the
safety invariants are checked. The first violation ends the run.

Everything that varies comes from the seed: one generator per concern
(network, Raft, faults, people, each run's process), and the global
`random` module (the agents' and clients' backoff jitter) is seeded for
the run too. The same seed gives the same trace, line for line, in a
process with the same PYTHONHASHSEED (the command line pins it: some
iteration orders over sets of ids depend on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.daemon import AgentConfig
from raft.commands import encode
from raft.model import FINAL_JOB_STATES

from .checks import Checker
from .faults import Chaos
from .host import SHIM_TICK_S, Changes, SimHost
from .masters import SimMaster
from .net import Network
from .node import SimNode
from .people import People, token_commands
from .raftmodel import SimRaft, decoded
from .trace import Trace
from .vtime import HostClock, SimClock, SimDeadlock, VirtualLoop

GiB = 1 << 30


@dataclass(frozen=True)
class SimConfig:
    step_s: float = 0.05
    boot_s: float = 10.0  # the first calm, while the agents join
    storm_s: float = 60.0
    calm_s: float = 30.0
    masters: int = 3
    # (GPUs, CPUs, memory) of each node.
    nodes: tuple[tuple[int, float, int], ...] = (
        (4, 32.0, 128 * GiB),
        (4, 32.0, 128 * GiB),
        (8, 64.0, 256 * GiB),
        (0, 16.0, 64 * GiB),
    )
    ttl_s: float = 10.0
    kill_grace_s: float = 3.0
    retention_s: float = 120.0
    heartbeat_s: float = 1.0
    max_pending: int = 24  # people stop submitting while this many tasks wait
    # How often people do each thing in a storm, per second.
    submit_per_s: float = 0.5
    cancel_per_s: float = 0.12
    drain_per_s: float = 0.02
    undrain_per_s: float = 0.04
    # Check the invariants (False only to measure what checking costs).
    check: bool = True


@dataclass
class SimResult:
    seed: int
    steps: int  # steps run
    violation: str | None
    at_step: int | None
    at_s: float
    tail: list[str]
    digest: str
    trace: list[str] | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.violation is None


class _Bugs(logging.Handler):
    """Log records with a traceback are bugs: a loop that failed, a handler
    that raised. The run fails on the first one."""

    def __init__(self, world: World) -> None:
        super().__init__(logging.ERROR)
        self.world = world

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            exc = record.exc_info[1]
            self.world.violation(f"{record.getMessage()}: {type(exc).__name__}: {exc}")


class World:
    def __init__(self, seed: int, cfg: SimConfig, keep_trace: bool = False) -> None:
        self.seed = seed
        self.cfg = cfg
        self.loop = VirtualLoop()
        self.loop.set_exception_handler(self._loop_error)
        self.clock = SimClock(self.loop)
        self.trace = Trace(self.clock.monotonic, keep_all=keep_trace)
        self.problems: list[str] = []

        def rng(name: str) -> random.Random:
            return random.Random(f"{seed}:{name}")

        self.rng = rng("world")
        self.net = Network(self.clock, rng("net"))
        self.raft = SimRaft(self.clock, rng("raft"), self.trace)
        self.raft.describe = describe
        names = [f"m{i}" for i in range(cfg.masters)]
        settings = {
            "heartbeat_ttl_s": cfg.ttl_s,
            "kill_grace_s": cfg.kill_grace_s,
            "job_retention_s": cfg.retention_s,
        }
        self.masters = [
            SimMaster(
                name,
                tuple(f"{p}:7442" for p in names if p != name),
                self.raft,
                self.clock,
                settings,
                self.violation,
            )
            for name in names
        ]
        for m in self.masters:
            self.net.servers[m.name] = m
        addrs = ",".join(m.rpc_addr for m in self.masters)
        self.nodes: list[SimNode] = []
        changes = Changes()  # one for every host: the checker reads one count a step
        for i, (gpus, cpus, mem) in enumerate(cfg.nodes):
            name = f"n{i}"
            hclock = HostClock(self.loop)
            host = SimHost(
                f"node-{i}", name, gpus, cpus, mem, self.clock, hclock, seed, self.trace, changes
            )
            self.net.clocks[name] = hclock
            acfg = AgentConfig(
                masters=addrs,
                # A path that cannot exist: nothing of a simulated agent is on disk.
                data_dir=Path("/dev/null/leptond-sim") / name,
                node_name=name,
                heartbeat_s=cfg.heartbeat_s,
                kill_grace_s=cfg.kill_grace_s,
                # Old runs are forgotten within a run, as they are on a real host.
                task_retention_s=cfg.retention_s,
            )
            self.nodes.append(SimNode(host, acfg, self.net, addrs, self.trace))
        self.people = People(
            seed, rng("people"), self.net, self.clock, addrs, self.trace, self._busy, self.violation
        )
        self.chaos = Chaos(
            rng("faults"),
            self.clock,
            self.net,
            self.raft,
            self.masters,
            self.nodes,
            self.trace,
            cfg.step_s,
        )
        settle = cfg.kill_grace_s + 3 * cfg.heartbeat_s + 3.0
        self.checker = Checker(
            self.raft,
            self.masters,
            self.nodes,
            self.people.ledger,
            cfg.retention_s,
            settle,
            SHIM_TICK_S + 1e-6,
            self.masters[0].cfg.task_lease_s,
        )
        if cfg.check:
            self.raft.watchers.append(self.checker.committed)
        self.storm = False
        self.step_no = 0

    # -- problems -------------------------------------------------------------------
    def violation(self, text: str) -> None:
        if not self.problems:
            self.trace(f"VIOLATION {text}")
        self.problems.append(text)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        exc = ctx.get("exception")
        what = f"{type(exc).__name__}: {exc}" if exc is not None else ""
        self.violation(f"unhandled in the event loop: {ctx.get('message')} {what}")

    def _busy(self) -> bool:
        return len(self.raft.oracle.pending) >= self.cfg.max_pending

    # -- the run ----------------------------------------------------------------------
    def boot(self) -> None:
        members = [
            encode(
                "member_info",
                {"raft_addr": m.cfg.raft_addr, "rpc_addr": m.rpc_addr, "http_addr": ""},
            )
            for m in self.masters
        ]
        for data in members + token_commands():
            self.raft._commit(0, data)
        self.raft.start(self.masters[0].member)

        async def start() -> None:
            for m in self.masters:
                m.start()

        self.loop.run_until_complete(start())
        for n in self.nodes:
            self.clock.call_later(self.rng.uniform(0.0, 1.0), n.start)

    def run(self, steps: int) -> int:
        """Run up to `steps` steps; the number run (fewer after a violation)."""
        cfg = self.cfg
        phase_end = cfg.boot_s
        for step in range(steps):
            self.step_no = step
            now = self.clock.monotonic()
            if now >= phase_end - 1e-9:
                if not self.storm and cfg.check:
                    why = self.checker.converged(now)
                    if why:
                        self.violation(f"not settled after the calm: {why}")
                        return step
                self.storm = not self.storm
                if self.storm:
                    self.chaos.storm()
                else:
                    self.chaos.calm()
                phase_end = now + (cfg.storm_s if self.storm else cfg.calm_s)
            if self.storm:
                self.chaos.step()
                self._people()
            try:
                self.loop.run_until((step + 1) * cfg.step_s)
            except SimDeadlock as exc:
                self.violation(f"deadlock: {exc}")
            if not self.problems and cfg.check:
                why = self.checker.step(self.clock.monotonic())
                if why:
                    self.violation(why)
            if self.problems:
                return step + 1
        return steps

    def _people(self) -> None:
        cfg = self.cfg
        r = self.rng.random() / cfg.step_s  # at most one thing per step
        if r < cfg.submit_per_s:
            self.people.submit()
            return
        r -= cfg.submit_per_s
        if r >= cfg.cancel_per_s + cfg.drain_per_s + cfg.undrain_per_s:
            return  # most steps: nobody does anything (no view needed)
        v = self.raft.oracle.freeze()
        if r < cfg.cancel_per_s:
            mine = set(self.people.ledger.acked.values())
            jobs = [
                (j.id, j.user)
                for j in v.jobs.values()
                if j.id in mine and j.state not in FINAL_JOB_STATES
            ]
            self.people.cancel(jobs)
            return
        r -= cfg.cancel_per_s
        if r < cfg.drain_per_s:
            ready = [n.name for n in v.nodes.values() if n.drain_reason is None]
            if ready:
                node = self.rng.choice(ready)
                deadline = None if self.rng.random() < 0.4 else round(self.rng.uniform(2, 30), 1)
                self.people.drain(node, deadline)
            return
        r -= cfg.drain_per_s
        if r < cfg.undrain_per_s:
            drained = [n.name for n in v.nodes.values() if n.drain_reason is not None]
            if drained:
                self.people.undrain(self.rng.choice(drained))

    def close(self) -> None:
        self.people.close()
        loop = self.loop
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()

    def stats(self) -> dict[str, Any]:
        v = self.raft.oracle.freeze()
        return {
            "virtual_s": round(self.clock.monotonic(), 1),
            "commits": len(self.raft.log),
            "terms": self.raft.term,
            "jobs_acked": len(self.people.ledger.acked),
            "jobs": len(v.jobs),
            "runs": sum(len(n.host.procs) for n in self.nodes),
            "agent_starts": sum(n.lives for n in self.nodes),
            "messages": self.net.sent,
            "dropped": self.net.dropped,
            "faults": dict(sorted(self.chaos.counts.items())),
            "checks": self.checker.checks,
        }


def describe(data: bytes) -> str:
    """A committed command in a few words (no request ids: they are random)."""
    cmd = decoded(data)
    if isinstance(cmd, str):
        return f"? {cmd}"
    a = cmd.args
    op = cmd.op
    try:
        if op == "plan":
            placed = [f"{p['task_id']}@{p['node_id']}{p['gpus']}" for p in a.get("placements", [])]
            evict = [f"!{p['task_id']}" for p in a.get("preemptions", [])]
            return f"plan {' '.join(evict + placed)}"
        if op == "task_events":
            evs = [
                f"{e['task_id']}#{e['attempt']}:{e['state']}"
                + (f"={e.get('exit_code')}" if e["state"] == "exited" else "")
                for e in a.get("events", [])
            ]
            return f"task_events {' '.join(evs)}"
        if op == "submit_jobs":
            return f"submit_jobs {' '.join(str(j.get('id')) for j in a.get('jobs', []))}"
        if op == "register_node":
            return f"register_node {a['node'].get('id')}"
        if op in ("node_down", "drain_expired", "remove_node"):
            return f"{op} {a.get('node_id')}"
        if op == "node_state":
            return f"node_state {a.get('node_id')} {a.get('state')} {a.get('deadline')}"
        if op == "cancel_job":
            return f"cancel_job {a.get('job_id')}"
    except (KeyError, TypeError, AttributeError):
        return f"{op} (malformed)"
    return op


_frozen_start_up = False


def _freeze_start_up() -> None:
    """Freeze what the process holds before its first run, once: as a master
    does at start (leptond/gcpolicy.py), so that the collector's whole walks
    during runs walk the runs' objects, not every module, class and function
    imported (numpy, aiohttp, the product: most of the heap). A collection
    first frees the garbage there is, so only what lives is frozen; what a
    run makes is collected as before. Traces do not change: no finalizer of
    the simulation runs at another time (its objects are not frozen)."""
    global _frozen_start_up
    if _frozen_start_up:
        return
    _frozen_start_up = True
    gc.collect()
    gc.freeze()


def run(
    seed: int,
    steps: int,
    cfg: SimConfig | None = None,
    keep_trace: bool = False,
    inspect: Callable[[World], None] | None = None,
) -> SimResult:
    """Run the simulation of `seed` for `steps` steps (or to its first violation).

    `inspect`, when given, is called with the world where the run stopped,
    before it is closed: a replay to look into (docs/simulator.md)."""
    cfg = cfg or SimConfig()
    _freeze_start_up()
    saved = random.getstate()
    random.seed(f"{seed}:global")  # the agents' and clients' backoff jitter
    lepton = logging.getLogger("lepton")
    old_level, old_propagate = lepton.level, lepton.propagate
    world = World(seed, cfg, keep_trace)
    bugs = _Bugs(world)
    lepton.addHandler(bugs)
    lepton.setLevel(logging.ERROR)
    lepton.propagate = False
    try:
        world.boot()
        ran = world.run(steps)
        stats = world.stats()
        if inspect is not None:
            inspect(world)
    finally:
        world.close()
        lepton.removeHandler(bugs)
        lepton.setLevel(old_level)
        lepton.propagate = old_propagate
        random.setstate(saved)
    failed = bool(world.problems)
    return SimResult(
        seed=seed,
        steps=ran,
        violation=world.problems[0] if failed else None,
        at_step=world.step_no if failed else None,
        at_s=round(world.clock.monotonic(), 3),
        tail=list(world.trace.tail),
        digest=world.trace.digest(),
        trace=world.trace.lines,
        stats=stats,
    )
