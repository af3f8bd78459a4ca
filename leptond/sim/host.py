"""A simulated GPU host: its task processes, their supervisors, and its lease.

`SimHost` is what outlives the agent on a real host: the runs (each a
process under its own supervisor, agent/shim.py), their recorded exits, and
the lease file. `SimRunner` is the agent's view of them, the agent/ports.py
`Runner` that agent/runner.py's TaskRunner is on a real host: it knows only
the runs it started or adopted, and forgets them when the agent dies.

A run does what its command says. Jobs in the simulation run
`sim-task KIND SECONDS TERM_S`: after SECONDS it exits 0 (ok), 1 (fail),
is killed by the OOM killer (oom), fails or not by the draw of each attempt
(flaky), or never ends by itself (hang); after SIGTERM it exits within
TERM_S seconds, or is killed at the end of the grace ("ignore"). The
supervisor ends the run as shim.py does: on a stop request, at the time
limit, and at once (SIGKILL) when the node's lease runs out; it never
starts a run without a lease, nor one asked to stop before it started.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.runner import RunnerError, TaskExit, TaskSpec, TaskUsage
from agent.shim import LEASE_RAN_OUT, describe_exit

from .trace import Trace
from .vtime import HostClock, SimClock

SHIM_START_S = (0.01, 0.3)  # spec written -> task started (a spare shim is quick)
SHIM_TICK_S = 0.1  # shim.TICK_S: how late a supervisor notices a lease ran out
SUPERVISOR_LOST = "supervisor lost"  # agent/runner.py
SHIM_DEATH = 0.01  # a run's supervisor dies before the run ends (it happens)
GiB = 1 << 30


@dataclass
class Fate:
    kind: str  # ok, fail, oom, hang (flaky is settled per attempt)
    seconds: float
    term_s: float | None  # None: ignores SIGTERM
    start_s: float
    shim_dies_at: float | None  # seconds after start, or None


def fate_of(argv: list[str], rng: random.Random) -> Fate:
    """What a run of `argv` does; `rng` is the run's own (one per run id)."""
    kind, seconds, term = "ok", 5.0, "1"
    if len(argv) >= 4 and argv[0] == "sim-task":
        kind, seconds, term = argv[1], float(argv[2]), argv[3]
    if kind == "flaky":
        kind = "fail" if rng.random() < 0.5 else "ok"
    start_s = rng.uniform(*SHIM_START_S)
    dies = rng.uniform(0.0, max(seconds, 1.0)) if rng.random() < SHIM_DEATH else None
    return Fate(kind, seconds, None if term == "ignore" else float(term), start_s, dies)


class SimProc:
    """One run: a task attempt under its supervisor."""

    __slots__ = (
        "attempt",
        "exit",
        "fate",
        "gpus",
        "pid",
        "rid",
        "spec",
        "started_at",
        "state",
        "stop",
        "task_id",
        "timers",
    )

    def __init__(self, spec: TaskSpec, fate: Fate, pid: int) -> None:
        self.rid = spec.task_id
        tid, _, a = self.rid.rpartition("_a")
        self.task_id, self.attempt = tid, int(a) if a.isdigit() else 0
        self.spec = spec
        gpus = spec.env.get("CUDA_VISIBLE_DEVICES", "")
        self.gpus = tuple(int(g) for g in gpus.split(",") if g.isdigit())
        self.fate = fate
        self.pid = pid
        self.state = "starting"  # starting, running, exited
        self.started_at: float | None = None  # wall clock of the host
        self.stop: tuple[str, float] | None = None  # (reason, grace) once asked
        self.exit: dict[str, Any] | None = None
        self.timers: list[Any] = []

    @property
    def alive(self) -> bool:
        return self.state != "exited"


class Changes:
    """A count that moves whenever the runs or the lease of any host sharing
    it change: the checker looks at the hosts again only then (or when the
    time passes a lease's end), not at every step."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class SimHost:
    def __init__(
        self,
        node_id: str,
        name: str,
        gpus: int,
        cpus: float,
        mem_bytes: int,
        world: SimClock,
        clock: HostClock,
        seed: int,
        trace: Trace,
        changes: Changes | None = None,
    ) -> None:
        self.changes = changes or Changes()
        self.node_id = node_id
        self.name = name
        self.gpus = gpus
        self.cpus = cpus
        self.mem_bytes = mem_bytes
        self.world_clock = world  # processes run on it whatever the agent does
        self.clock = clock  # the agent's (its wall clock may jump)
        self.seed = seed
        self.trace = trace
        self.procs: dict[str, SimProc] = {}  # every run, ended ones too (their dirs stay)
        self.live: dict[str, SimProc] = {}  # runs not ended
        self.version = 0  # moves whenever a run starts, runs or ends
        self.acked: dict[str, float] = {}  # run id -> when acked (the agent's wall clock)
        self.unacked: dict[str, SimProc] = {}  # ended runs whose exit the leader lacks
        # The lease file (agent/lease.py): when it runs out, when the request
        # that renewed it went out, the leader's disconnect confirm window
        # (None: the fast path is off), the agent that wrote it (its life
        # number, SimNode.lives), and whether that agent handed over.
        self.lease_expires: float | None = None
        self.lease_sent: float | None = None
        self.lease_confirm_s: float | None = None
        self.lease_agent: int | None = None
        self.lease_handover = False
        # What the supervisors see of the agent (LeaseReader): the agent
        # process now running (None: none), and when the one the lease names
        # died, and which one it was.
        self.agent: int | None = None
        self.agent_gone_at: float | None = None
        self.agent_gone: int | None = None
        # Moves whenever what lease_ends() answers may have changed (the
        # fields above are written only by write, cap, mark_handover and
        # agent_died): the checker looks at the lease again only then, or
        # when the time passes when it ends.
        self.lease_version = 0
        self._lease_timer: Any = None
        self._lease_timer_at = 0.0  # when it fires
        self._lease_look_at = 0.0  # when the supervisors look at the lease next
        self._pids = itertools.count(1000)
        self._rng = random.Random(f"{seed}:{node_id}")  # when supervisors look at the lease

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "name": self.name,
            "addr": f"{self.name}.sim",
            "cpus": self.cpus,
            "mem_bytes": self.mem_bytes,
            "labels": {},
            "gpus": [
                {
                    "index": i,
                    "uuid": f"GPU-{self.node_id}-{i}",
                    "model": "H100",
                    "mem_bytes": 80 * GiB,
                    "domain": i // 4,
                }
                for i in range(self.gpus)
            ],
        }

    # -- the lease (agent/ports.py Lease) ---------------------------------------------
    def now(self) -> float:
        """CLOCK_BOOTTIME: it does not jump with the wall clock."""
        return self.world_clock.monotonic()

    def write(
        self,
        expires: float,
        lease_s: float,
        *,
        sent: float | None = None,
        confirm_s: float | None = None,
    ) -> None:
        """The running agent renews the lease (agent.lease.write_lease)."""
        self.lease_expires = expires
        self.lease_sent = sent
        fast = confirm_s is not None and confirm_s > 0
        self.lease_confirm_s = confirm_s if fast else None
        self.lease_agent = self.agent if fast else None
        self.lease_handover = False
        self.lease_version += 1
        self.changes.count += 1
        self._watch_lease()

    def cap(self, until: float) -> bool:
        """agent.lease.cap_lease: only the expiry changes."""
        if self.lease_expires is None or self.lease_expires <= until:
            return False
        self.lease_expires = until
        self.lease_version += 1
        self.changes.count += 1
        self._watch_lease()
        return True

    def mark_handover(self) -> None:
        """agent.lease.mark_handover: only a lease the running agent wrote."""
        if self.lease_agent is not None and self.lease_agent == self.agent:
            self.lease_handover = True
            self.lease_version += 1
            self.changes.count += 1

    def agent_started(self, life: int) -> None:
        self.agent = life

    def agent_died(self) -> None:
        """The agent process is gone: each supervisor watching it (a pidfd)
        sees that at once, and, unless it handed over, ends its run
        `confirm_s` later (LeaseReader.expires) unless the next agent renews
        the lease first."""
        life, self.agent = self.agent, None
        if life is not None and life == self.lease_agent and self.agent_gone_at is None:
            self.agent_gone_at, self.agent_gone = self.now(), life
            self.lease_version += 1
            self.changes.count += 1
            self._watch_lease()

    def lease_ends(self) -> float | None:
        """When the supervisors take the lease to run out (LeaseReader.expires)."""
        exp = self.lease_expires
        confirm = self.lease_confirm_s
        if exp is None or confirm is None or self.lease_agent is None or self.lease_handover:
            return exp
        gone = self.agent_gone_at
        if gone is not None:
            sent = self.lease_sent
            if self.lease_agent != self.agent_gone and sent is not None and sent > gone:
                # The next agent registered and the leader renewed the lease.
                # (Forgotten when first asked: write() asks at once, through
                # _watch_lease; the answer is the same before and after.)
                self.agent_gone_at = self.agent_gone = None
            else:
                return min(exp, gone + confirm)
        return exp

    def lease_valid(self) -> bool:
        ends = self.lease_ends()
        return ends is not None and self.now() < ends

    def _watch_lease(self) -> None:
        """The supervisors look at the lease again when it runs out (each
        within a tick of it).

        Every heartbeat renews the lease a little later: a timer already set
        for earlier stays, and when it fires it only sets itself again for
        the latest time (`_lease_check`), instead of a timer set and
        cancelled for every renewal. The look happens at the same time."""
        ends = self.lease_ends()
        if ends is None:
            if self._lease_timer is not None:
                self._lease_timer.cancel()
            self._lease_timer = None
            return
        now = self.now()
        wait = ends - now + self._rng.uniform(0.0, SHIM_TICK_S)
        at = now + (wait if wait > 0.0 else 0.0)  # as call_later would set it
        self._lease_look_at = at
        timer = self._lease_timer
        if timer is not None:
            if self._lease_timer_at < at and at > now:
                return
            timer.cancel()
        self._lease_timer = self.world_clock.call_at(at, self._lease_check)
        self._lease_timer_at = at

    def _lease_check(self) -> None:
        at = self._lease_look_at
        if self.now() < at:  # renewed since this timer was set: look later
            self._lease_timer = self.world_clock.call_at(at, self._lease_check)
            self._lease_timer_at = at
            return
        self._lease_timer = None
        if self.lease_valid():
            return
        for p in sorted(self.live.values(), key=lambda p: p.rid):
            if p.state == "running":
                self.finish(p, 137, 9, LEASE_RAN_OUT)

    # -- runs ----------------------------------------------------------------------
    def start(self, spec: TaskSpec) -> SimProc:
        rng = random.Random(f"{self.seed}:{self.node_id}:{spec.task_id}")
        p = SimProc(spec, fate_of(spec.argv, rng), next(self._pids))
        self.procs[p.rid] = p
        self.live[p.rid] = p
        self.version += 1
        self.changes.count += 1
        self.acked.pop(p.rid, None)
        p.timers.append(self.world_clock.call_later(p.fate.start_s, self._launch, p))
        return p

    def _launch(self, p: SimProc) -> None:
        if not p.alive:
            return
        if p.stop is not None:
            self.finish(p, None, None, "stopped before start")
            return
        if not self.lease_valid():
            self.finish(p, None, None, "not started: this node's lease from the leader ran out")
            return
        p.state = "running"
        self.version += 1
        self.changes.count += 1
        p.started_at = self.clock.now()
        self.trace(f"{self.name} run {p.rid} gpus {list(p.gpus)}")
        f = p.fate
        if f.kind != "hang":
            p.timers.append(self.world_clock.call_later(f.seconds, self._end, p))
        if p.spec.time_limit_s is not None:
            limit = p.spec.time_limit_s
            reason = f"time limit of {limit:g}s exceeded"
            p.timers.append(
                self.world_clock.call_later(
                    limit, self.request_stop, p, reason, p.spec.kill_grace_s
                )
            )
        if f.shim_dies_at is not None:
            p.timers.append(self.world_clock.call_later(f.shim_dies_at, self._shim_died, p))

    def _end(self, p: SimProc) -> None:
        kind = p.fate.kind
        if kind == "oom":
            self.finish(p, 137, 9, "out of memory (no task limit)")
        else:
            code = 0 if kind == "ok" else 1
            self.finish(p, code, None, describe_exit(code))

    def _shim_died(self, p: SimProc) -> None:
        # runner._supervisor_lost: the run is killed and recorded as lost.
        self.finish(p, None, None, SUPERVISOR_LOST)

    def request_stop(self, p: SimProc, reason: str, grace_s: float) -> None:
        """SIGTERM now, SIGKILL after the grace (shim.request_stop)."""
        if not p.alive or p.stop is not None:
            return
        p.stop = (reason, grace_s)
        if p.state == "starting":
            return  # the supervisor sees the stop file before it starts the run
        term = p.fate.term_s
        if term is not None and term < grace_s:
            p.timers.append(self.world_clock.call_later(term, self.finish, p, 143, 15, reason))
        else:
            killed = f"{reason}; killed after {grace_s:g}s grace"
            p.timers.append(self.world_clock.call_later(grace_s, self.finish, p, 137, 9, killed))

    def finish(self, p: SimProc, code: int | None, sig: int | None, message: str) -> None:
        if not p.alive:
            return
        for t in p.timers:
            t.cancel()
        p.timers.clear()
        p.state = "exited"
        del self.live[p.rid]
        self.unacked[p.rid] = p
        self.version += 1
        self.changes.count += 1
        p.exit = {
            "exit_code": code,
            "signal": sig,
            "message": message,
            "started_at": p.started_at,
            "finished_at": self.clock.now(),
        }
        self.trace(f"{self.name} exit {p.rid} {code} {message}")

    def running_gpus(self) -> list[tuple[int, str]]:
        return [(g, p.rid) for p in self.live.values() if p.state == "running" for g in p.gpus]


class SimRunner:
    """The agent/ports.py Runner over a SimHost: an agent process's own view."""

    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.root = Path("/sim") / host.name / "tasks"
        self._known: set[str] = set()  # runs believed running (TaskRunner._shims)
        # `running()` as of the host's `version` it was worked out at (-1:
        # none): a run dies only where the version moves, and `_known` grows
        # only in `start` and `adopt`, which drop it. Asked twice a heartbeat.
        self._listed: list[str] = []
        self._listed_at = -1

    def task_dir(self, task_id: str) -> Path:
        return self.root / task_id

    def start(self, spec: TaskSpec) -> int:
        if not spec.argv:
            raise RunnerError(f"task {spec.task_id}: argv must be a non-empty list of strings")
        p = self.host.procs.get(spec.task_id)
        if p is not None and p.alive:
            raise RunnerError(f"task {spec.task_id} is already running")
        if p is not None and spec.task_id not in self.host.acked:
            raise RunnerError(f"task {spec.task_id} has an unreported exit; ack it first")
        p = self.host.start(spec)
        self._known.add(spec.task_id)
        self._listed_at = -1
        return p.pid

    def warn(self, task_id: str) -> None:
        """Simulated tasks ask for no warning signal (the simulation's jobs
        set no --signal), so there is nothing to send."""

    def stop(self, task_id: str, grace_s: float | None = None, warn: bool = False) -> None:
        p = self.host.procs.get(task_id)
        if p is None or not p.alive:
            return
        grace = p.spec.kill_grace_s if grace_s is None else grace_s
        self.host.request_stop(p, "stopped by request", grace)

    def kill_all_not_in(self, keep: set[str]) -> list[str]:
        doomed = [t for t in self.running() if t not in keep]
        for rid in doomed:
            self.stop(rid)
        return doomed

    def running(self) -> list[str]:
        version = self.host.version
        if self._listed_at != version:
            procs = self.host.procs
            self._known = {r for r in self._known if r in procs and procs[r].alive}
            self._listed, self._listed_at = sorted(self._known), version
        return list(self._listed)

    def poll(self) -> list[TaskExit]:
        self.running()
        return self._unacked()

    def _unacked(self) -> list[TaskExit]:
        out = []
        for rid, p in self.host.unacked.items():
            if p.exit is None or rid in self._known:
                continue
            e = p.exit
            out.append(
                TaskExit(
                    rid,
                    e["exit_code"],
                    e["signal"],
                    e["message"],
                    e["started_at"],
                    e["finished_at"],
                )
            )
        out.sort(key=lambda e: (e.finished_at or 0.0, e.task_id))
        return out

    def ack(self, task_id: str) -> None:
        p = self.host.procs.get(task_id)
        if p is None:
            return
        if p.alive:
            raise RunnerError(f"task {task_id} has not finished; nothing to ack")
        self.host.acked[task_id] = self.host.clock.now()
        self.host.unacked.pop(task_id, None)

    def collect_garbage(self, acked_before: float) -> list[str]:
        # TaskRunner.collect_garbage: the run's directory goes, and with it
        # all the host knows of it (the same id may then start afresh).
        host = self.host
        done = sorted(r for r, at in host.acked.items() if at < acked_before)
        for rid in done:
            del host.acked[rid]
            del host.procs[rid]
        return done

    def gpus(self, task_id: str) -> list[int]:
        p = self.host.procs.get(task_id)
        return list(p.gpus) if p is not None else []

    def finished(self, task_id: str) -> bool:
        p = self.host.procs.get(task_id)
        return p is not None and not p.alive

    def adopt(self) -> tuple[list[str], list[TaskExit]]:
        self._known = set(self.host.live)
        self._listed_at = -1
        return sorted(self._known), self._unacked()

    def usage(self) -> dict[str, TaskUsage]:
        return {}  # simulated processes use nothing; nobody scrapes a simulated agent

    def keep_spare(self) -> None:
        pass  # spares only save the interpreter's start-up (SHIM_START_S covers it)

    def close(self) -> None:
        pass
