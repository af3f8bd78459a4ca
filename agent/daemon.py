"""lepton-agent: registers the host, heartbeats, and runs the tasks placed on it.

The agent holds one RPC connection to the leader. Assignments arrive as pushes
(fast path) and in every heartbeat's answer (repair path), so a lost push or a
leader change costs at most one heartbeat. Task exits are reported until the
leader has committed them; only then are they acknowledged to the runner, so
an exit is never lost to an agent crash or a leader change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leptond.blocks import WorkdirError
from leptond.blocks.manifest import check_relative_path
from leptond.clock import REAL, Clock, wait_event
from leptond.wire import pacing
from leptond.wire.client import ClusterClient, parse_addrs
from leptond.wire.connection import Connection
from leptond.wire.errors import RpcError

from . import credential, gpudev, identity, lease, logserve, stalls, taskns
from .cgroup_task import CgroupError
from .cgroups import DEFAULT_TASK_PIDS_MAX, CgroupManager, default_tasks_mem_bytes, detect
from .diskwatch import DiskWatch
from .health import GpuHealth
from .metrics import AgentHttp
from .ports import Lease, Runner
from .probes import (
    GpuProbe,
    NvmlEventWatcher,
    NvmlProbe,
    SimulatedGpuProbe,
    host_stats,
    make_gpu_probe,
)
from .runner import RunnerError, TaskRunner, TaskSpec
from .sessions import SessionError, Sessions
from .shim import LEASE_RAN_OUT
from .taskdir import SPEC, read_json, warn_signum
from .workdir import WorkdirCache

log = logging.getLogger("lepton.agent")
# Directories below the data dir that tasks pass through (mode 0711).
PASSABLE = frozenset({"tasks", "workdirs", "dev"})
# At most this long between sweeps of the directories of runs long over.
GC_INTERVAL_S = 60.0
# A simulated GPU's burn-in made slow (`burnin-slow gpu=I`): longer than a
# client's usual attempt (6 s), which a reset must outwait, not retry.
SLOW_BURN_IN_S = 8.0
# Context tag of the connections a registration was sent on (heartbeats
# follow on the same one): the leader may hold any of them as the node's, so
# closing one cuts the lease first (_closing_connection). A connection that
# never carried a registration is no node's to the leader: closing it cuts
# nothing (such as one to a new leader that answered "unregistered").
LEASED = "leased"


@dataclass(frozen=True)
class AgentConfig:
    masters: str
    data_dir: Path
    # Needed only until the node has its credential (the first registration).
    join_token_file: Path | None = None
    node_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    advertise_addr: str = ""
    simulate_gpus: str | None = None
    heartbeat_s: float = 1.0
    # Host and GPU figures travel in one heartbeat every stats_s seconds (and
    # in the first after each registration); the others carry liveness, tasks
    # and GPU faults only, and the leader keeps the last figures. Decoding
    # and checking the figures was about 40 % of a leader's work per
    # heartbeat (docs/benchmarks.md, 10,000 hosts).
    stats_s: float = 10.0
    leave_on_stop: bool = False
    log_cap_bytes: int = 64 << 20
    kill_grace_s: float = 10.0
    cache_bytes: int = 10 << 30
    cache_policy: str = "lru"
    # Task cgroups: "auto" (v2 if usable, else v1), "v1", "v2" or "off".
    cgroups: str = "auto"
    task_pids_max: int = DEFAULT_TASK_PIDS_MAX
    # Memory all tasks may use together, and the limit of a task that gives
    # none; 0: the host's memory less a reserve (default_tasks_mem_bytes).
    tasks_mem_max: int = 0
    # How long a run's directory (output, working directory) is kept after
    # the leader has its exit.
    task_retention_s: float = 86400.0
    # Directories under /tmp or /dev/shm that tasks still see at their paths
    # through their private ones (a shared scratch or software directory).
    keep_visible: tuple[Path, ...] = ()
    # The agent's own HTTP port (/metrics, /healthz); 0: none.
    http_port: int = 7443
    http_bind: str = "0.0.0.0"
    # How long a GPU's burn-in may take before the reset is refused.
    burn_in_timeout_s: float = 300.0
    # Free space kept on the data dir's disk: under it, the task whose files
    # take the most is evicted and no new task comes (agent/diskguard.py).
    # None: 5 % of the disk, at least 1 GiB, at most 10 GiB and a quarter of it.
    # Inodes have a reserve of their own (agent/diskguard.py), always the default.
    disk_reserve_bytes: int | None = None


def run_id(task_id: str, attempt: int) -> str:
    """The runner's id for one attempt, so a retry on the same host gets a fresh dir."""
    return f"{task_id}_a{attempt}"


def split_run_id(rid: str) -> tuple[str, int]:
    tid, _, a = rid.rpartition("_a")
    return tid, int(a) if a.isdigit() else 0


def stable_node_id(data_dir: Path) -> str:
    """The node id lives in the data dir: a reboot is the same node coming back."""
    p = data_dir / "node_id"
    try:
        nid = p.read_text().strip()
        if nid:
            return nid
    except FileNotFoundError:
        pass
    nid = "n-" + uuid.uuid4().hex[:12]
    tmp = p.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(nid + "\n")
    os.replace(tmp, p)
    return nid


class Agent:
    # The host as the control logic below sees it (agent/ports.py): real
    # shims and the lease file here, simulated ones in leptond/sim.
    runner: Runner
    fence: Lease
    # The disk watchdog (agent/diskwatch.py); None where there is no real disk.
    disk: DiskWatch | None = None

    def __init__(self, cfg: AgentConfig, clock: Clock = REAL) -> None:
        self.cfg = cfg
        self.clock = clock
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.node_id = stable_node_id(cfg.data_dir)
        cred = credential.load_credential(cfg.data_dir)
        # Without a credential yet, the join token is traded for one in run().
        self._join = None if cred is not None else credential.read_join_token(cfg.join_token_file)
        if cred is not None and cfg.join_token_file is not None:
            # Died between saving the credential and deleting the token file?
            credential.discard_join_token(
                cfg.join_token_file, credential.joined_with(cfg.data_dir) or ""
            )
        key = cred or self._join
        assert key is not None
        self.name = cfg.node_name or socket.gethostname()
        # Root runs each task as its user, in its own cgroup, with only its own
        # GPUs' device files; any other account runs tasks as itself (dev use).
        self.switch_users = identity.can_switch_users()
        if self.switch_users:
            identity.open_path_for_others(cfg.data_dir)  # tasks reach their dirs below
        self.cgroups = self._cgroups()
        self.tasks_mem = self._tasks_mem()
        # Each task's own IPC namespace, /dev/shm and /tmp: None when tasks
        # can have them, else why not (said once, in _log_isolation).
        self.no_private_tmp = (
            taskns.probe() if self.switch_users else "the agent is not root (mounts need root)"
        )
        # Shims end their tasks when the node's lease runs out (agent/lease.py).
        self.lease_path = cfg.data_dir / lease.LEASE_FILE
        self.lease_s: float | None = None
        self.fence = lease.LeaseFile(self.lease_path)
        # Whether the shims here see this agent die at once: only then may
        # the leader judge this node by the fast path.
        self.fences_disconnect = lease.can_watch_agents()
        self.runner = TaskRunner(
            cfg.data_dir / "tasks",
            self.cgroups,
            lease_file=self.lease_path,
            # The agent's own Python installation too: the shim runs from it,
            # and a dev cluster's tasks run its `python` (say from a clone in /tmp).
            keep_visible=(cfg.data_dir, Path(sys.prefix), *cfg.keep_visible),
            clock=clock,
        )
        self.disk = DiskWatch(cfg.data_dir, cfg.disk_reserve_bytes, self.runner)
        self._next_gc = 0.0  # monotonic time of the next sweep of old task dirs
        self._gc: asyncio.Task[None] | None = None  # the sweep under way
        self._staller: asyncio.Task[None] | None = None  # test stalls (agent/stalls.py)
        # The block cache is the agent's alone (0700) before the store opens it.
        (cfg.data_dir / "blocks").mkdir(mode=0o700, exist_ok=True)
        self.workdirs = WorkdirCache(cfg.data_dir / "blocks", cfg.cache_bytes, cfg.cache_policy)
        # Simulated GPUs take injected faults from a file (agent/health.py).
        faults = cfg.data_dir / "simulate" / "faults"
        if cfg.simulate_gpus:
            faults.parent.mkdir(mode=0o700, exist_ok=True)
        self.probe: GpuProbe = make_gpu_probe(
            cfg.simulate_gpus, seed=self.name + self.node_id, fault_file=faults
        )
        self.health = GpuHealth(cfg.data_dir, clock)
        self.nvml_events = (
            NvmlEventWatcher(self.probe, self.health.record)
            if isinstance(self.probe, NvmlProbe)
            else None
        )
        self.gpu_devices = self._gpu_devices()
        # Tasks pass through tasks/, workdirs/ and dev/ to their own files;
        # nothing else below the data dir is theirs to list or read.
        identity.close_to_others(
            cfg.data_dir,
            PASSABLE if self.switch_users else frozenset(),
        )
        self._log_isolation()
        self.client = ClusterClient(
            parse_addrs(cfg.masters),
            key_id=key.id,
            psk=key.psk,
            handlers={
                "start": self._on_start,
                "stop": self._on_stop,
                "warn": self._on_warn,
                "logs": self._on_logs,
                "attach": self._on_attach,
                "exec": self._on_exec,
                "tty_input": self._on_tty_input,
                "gpu_reset": self._on_gpu_reset,
            },
            clock=clock,
        )
        self.sessions = Sessions()  # interactive sessions (agent/sessions.py)
        self.http = AgentHttp(self, self._healthz)
        self._init_loop_state()

    def _init_loop_state(self) -> None:
        """What the register/heartbeat/start logic keeps in memory (lost with
        the agent; the runner and the leader hold the rest)."""
        self.events: list[dict[str, Any]] = []  # reported until committed
        self._flusher: asyncio.Task[None] | None = None  # task events being reported
        # The leader's disconnect confirm window (agent/lease.py), once known.
        self.confirm_s: float | None = None
        self._handing_over = False  # a planned stop is under way (_hand_over)
        # Closing a connection a registration went out on cuts the lease first.
        self.client.on_local_close = self._closing_connection
        self.registered_on: Connection | None = None
        self.state = "unknown"
        # When the next heartbeat carries host and GPU figures (clock.monotonic()).
        self._stats_next = float("-inf")
        # Seconds between heartbeats: our own, or longer when the leader paces
        # its agents (leptond/wire/pacing.py); what was last logged about it.
        self.heartbeat_every_s = self._pace_logged_s = self.cfg.heartbeat_s
        self._pace_bad = False
        self._stopping = asyncio.Event()
        self._workdir_lock = asyncio.Lock()
        self._preparing: set[str] = set()  # run ids being prepared or started
        self._starting: set[asyncio.Task[None]] = set()

    # -- isolation -----------------------------------------------------------------
    def _cgroups(self) -> CgroupManager | None:
        """Raises CgroupError when cgroups were asked for and cannot be had."""
        if self.cfg.cgroups == "off" or not self.switch_users:
            return None
        mgr = detect(self.node_id, self.cfg.cgroups)
        for c in getattr(mgr, "missing", ()):
            log.warning("cgroup v2 has no %s controller here: that limit is not enforced", c)
        note = getattr(mgr, "device_note", "")
        if note:
            log.warning("no eBPF device program (%s): tasks get a mount namespace instead", note)
        return mgr

    def _tasks_mem(self) -> int:
        """Memory for all tasks together, held to it by their parent cgroup;
        also the limit of a task that gives none. ValueError for a figure
        over the host's memory."""
        total = host_stats(self.cfg.data_dir).mem_total_bytes
        want = self.cfg.tasks_mem_max
        if want > total:
            raise ValueError(
                f"--tasks-mem-max {want} is more than this host's memory ({total} bytes)"
            )
        mem = want or default_tasks_mem_bytes(total)
        if self.cgroups is not None:
            try:
                self.cgroups.limit_tasks(mem)
            except CgroupError as exc:
                log.warning("%s: tasks are held only to their own limits", exc)
        return mem

    def _gpu_devices(self) -> gpudev.GpuDevices:
        if isinstance(self.probe, SimulatedGpuProbe):
            if not self.switch_users:
                return gpudev.GpuDevices(None, {})  # mknod needs root
            return gpudev.simulated(self.cfg.data_dir, self.probe.count)
        return gpudev.nvml(self.probe)

    def _log_isolation(self) -> None:
        if not self.switch_users:
            me = identity.agent_user()
            log.warning(
                "running as %s (uid %d), not root: tasks run as %s, without cgroup limits "
                "or GPU device rules, and share /tmp, /dev/shm and IPC with the host",
                me.name,
                me.uid,
                me.name,
            )
            return
        where = f"cgroup v{self.cgroups.version} under {self.cgroups.base}" if self.cgroups else ""
        log.info(
            "isolation: tasks run as their users; %s; GPU device rules: %s; tasks together "
            "may use %d bytes of memory, as may one without --mem",
            where or "no cgroups (--cgroups off): limits are not enforced",
            "cgroup"
            if self.cgroups is not None and self.cgroups.filters_devices
            else "private mount namespace",
            self.tasks_mem,
        )
        if self.no_private_tmp is not None:
            log.warning(
                "tasks cannot get their own /tmp, /dev/shm and IPC namespace here (%s): "
                "they share the host's, and what they leave there outlives them",
                self.no_private_tmp,
            )

    def _task_user(self, sp: dict[str, Any]) -> identity.TaskUser | None:
        if not self.switch_users:
            return None  # the agent's own account
        return identity.resolve(sp.get("unix_user"), bool(sp.get("allow_root")), self.name)

    # -- description ------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        hs = host_stats(self.cfg.data_dir)
        gpus = self.probe.gpus()
        return {
            "id": self.node_id,
            "name": self.name,
            "addr": self.cfg.advertise_addr or _guess_addr(),
            "cpus": float(hs.cpu_count),
            # What tasks may have, not all the host has (the rest is kept
            # for the system and this agent): what the scheduler places.
            "mem_bytes": self.tasks_mem,
            "labels": self.cfg.labels,
            "gpus": [
                {
                    "index": g.index,
                    "uuid": g.uuid,
                    "model": g.name,
                    "mem_bytes": g.mem_total_bytes,
                    "domain": g.domain,
                }
                for g in gpus
            ],
        }

    def running(self) -> list[dict[str, Any]]:
        out = []
        for rid in self.runner.running():
            tid, attempt = split_run_id(rid)
            out.append({"task_id": tid, "attempt": attempt})
        return out

    def cache_stats(self) -> dict[str, Any]:
        return self.workdirs.stats()

    def _healthz(self) -> dict[str, Any]:
        registered = self.state in ("ready", "draining")
        return {
            "ok": registered,
            "node": self.name,
            "node_id": self.node_id,
            "state": self.state,
            "gpu_faults": self.health.report(),
        }

    # -- main loop ----------------------------------------------------------------
    async def start_http(self) -> None:
        """Serve /metrics and /healthz; OSError when the port is taken."""
        if self.cfg.http_port:
            await self.http.start(self.cfg.http_bind, self.cfg.http_port)

    async def run(self) -> None:
        if self.nvml_events is not None:
            self.nvml_events.start()
        try:
            await self._run()
        finally:
            if self.nvml_events is not None:
                self.nvml_events.close()
            await self.http.close()
            self.runner.close()  # the spare shim goes with the agent
            if self.cgroups is not None and not self.runner.running():
                self.cgroups.close()

    async def _run(self) -> None:
        self._start_test_stalls()
        running, exits = self.runner.adopt()
        if running or exits:
            log.info(
                "adopted %d running task(s) and %d unreported exit(s)", len(running), len(exits)
            )
        self._collect_exits(exits)
        self.runner.keep_spare()
        if self._join is not None:
            cred = await credential.trade(
                self.client.addrs,
                self._join,
                self.node_id,
                self.cfg.data_dir,
                self._stopping,
                join_file=self.cfg.join_token_file,
            )
            if cred is None:
                return  # stopped before it joined
            self.client.key_id, self.client.psk, self._join = cred.id, cred.psk, None
        delay = 0.2
        refused = False  # the refusal is logged once, not once per retry
        while not self._stopping.is_set():
            try:
                await self._register()
                delay, refused = 0.2, False
                await self._heartbeat_loop()
            except RpcError as exc:
                if exc.code == "unauthenticated":
                    if not refused:
                        log.error(
                            "the masters refused this node's credential (%s); if the node was "
                            "removed, delete %s and join again with a new join token",
                            exc,
                            credential.credential_path(self.cfg.data_dir),
                        )
                    refused = True
                elif exc.code == "unregistered":
                    log.warning("registering again: %s", exc)
                else:
                    log.warning("lost the leader (%s); reconnecting", exc)
                self.registered_on = None
                await self.client.close()
                # Backoff with jitter so a restarted leader is not hit by every agent at once.
                await self.clock.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
        if self.cfg.leave_on_stop:
            await self._leave_if_asked()
        else:
            self._hand_over()

    async def _register(self) -> None:
        sent = self.fence.now()
        res = await self.client.call(
            "agent_register",
            {
                "node": self.describe(),
                "running": self.running(),
                "fences_disconnect": self.fences_disconnect,
            },
            timeout_s=30,
            tag=LEASED,
        )
        self._renew_lease(sent, res)
        self._adopt_pace(res)
        self._stats_next = float("-inf")  # a new leader may have no figures yet
        self.registered_on = self.client.conn
        self.state = res.get("state", "ready")
        masters = [a for a in res.get("masters", []) if isinstance(a, str) and a]
        if masters:
            known = {f"{h}:{p}" for h, p in self.client.addrs}
            for a in masters:
                if a not in known:
                    self.client.addrs.extend(parse_addrs(a))
        should = {t["task_id"]: t for t in res.get("tasks", [])}
        # Reconcile before new work: kill what the leader no longer wants here.
        keep = {run_id(tid, int(t["attempt"])) for tid, t in should.items() if not t.get("stop")}
        killed = self.runner.kill_all_not_in(keep)
        if killed:
            log.warning("stopped %d task(s) the leader no longer places here", len(killed))
        await self._start_tasks([t for t in should.values() if not t.get("stop")])
        log.info("registered as %s (%s), state %s", self.name, self.node_id, self.state)

    async def _heartbeat_loop(self) -> None:
        while not self._stopping.is_set():
            self._collect_exits(self.runner.poll())
            self._flush_soon()
            self._collect_garbage()
            if self.disk is not None:
                self.disk.check()
            sent = self.fence.now()
            with_stats = self.clock.monotonic() >= self._stats_next
            res = await self.client.call(
                "heartbeat",
                self._heartbeat_body(with_stats),
                timeout_s=10,
                attempt_timeout_s=self._heartbeat_attempt_s(),
            )
            self._renew_lease(sent, res)
            self._adopt_pace(res)
            if with_stats:
                self._stats_next = self.clock.monotonic() + self.cfg.stats_s
            self.state = res.get("state", self.state)
            for item in res.get("stop", []):
                if isinstance(item, list) and len(item) == 2:
                    self._stop_task(str(item[0]), res.get("grace_s"), attempt=int(item[1]))
            if res.get("start"):
                await self._start_tasks(res["start"])
            pause = pacing.sleep_s(self.heartbeat_every_s, self.cfg.heartbeat_s, random.random)
            await wait_event(self.clock, self._stopping, pause)

    def _adopt_pace(self, res: Any) -> None:
        """Heartbeat as often as the leader's answer asks (after the lease in
        it is taken: the lease bounds the interval), or at our own interval
        when it asks nothing (an older leader). A bad value is ignored or
        clamped, with one log line until the answers are good again; a good
        one is logged when it moves by a fifth or more (it follows the number
        of nodes, a little with each one that comes or goes)."""
        asked = res.get("heartbeat_s") if isinstance(res, dict) else None
        every, why = pacing.adopt(asked, self.cfg.heartbeat_s, self.lease_s)
        if why and not self._pace_bad:
            log.warning("%s", why)
        self._pace_bad = bool(why)
        if abs(every - self._pace_logged_s) >= 0.2 * self._pace_logged_s:
            log.info("heartbeating every %gs, as the leader asks", every)
            self._pace_logged_s = every
        self.heartbeat_every_s = every

    def _start_test_stalls(self) -> None:
        """Benchmarks only: stall our own event loop now and then (agent/stalls.py)."""
        stall_s = stalls.from_env()
        if stall_s is not None:
            log.warning("test stalls of up to %gs are on (%s)", stall_s, stalls.ENV)
            self._staller = asyncio.get_running_loop().create_task(
                stalls.stall_now_and_then(self.clock, stall_s)
            )

    def _flush_soon(self) -> None:
        """Report task events in the background: a commit that takes a while
        must not hold up the heartbeat, or a TTL of a few seconds would judge
        this node silent. One flush at a time; what fails is sent again."""
        if self._flusher is not None and not self._flusher.done():
            return
        if not self.events or self.registered_on is None:
            return  # nothing to report (most heartbeats): no task for it

        async def flush() -> None:
            try:
                await self._flush_events()
            except RpcError as exc:
                log.debug("task events not reported yet: %s", exc)  # sent again next time

        self._flusher = asyncio.get_running_loop().create_task(flush())

    def _collect_garbage(self) -> None:
        """Now and then, delete the directories of runs acked longer ago than
        --task-retention: in a thread and in the background, as a big tree
        takes a while and heartbeats must not wait for it. One at a time."""
        now = self.clock.monotonic()
        if now < self._next_gc or (self._gc is not None and not self._gc.done()):
            return
        self._next_gc = now + min(GC_INTERVAL_S, max(1.0, self.cfg.task_retention_s / 2))
        before = self.clock.now() - self.cfg.task_retention_s

        async def sweep() -> None:
            try:
                gone = await asyncio.to_thread(self.runner.collect_garbage, before)
            except Exception:
                log.exception("deleting old task directories failed")  # tried again later
                return
            if gone:
                log.info("deleted the directories of %d run(s) that ended long ago", len(gone))

        self._gc = asyncio.get_running_loop().create_task(sweep())

    def _renew_lease(self, sent: float, res: Any) -> None:
        """The leader's answer renewed the node's lease: it runs until `lease_s`
        after the request was sent (agent/lease.py)."""
        lease_s = res.get("lease_s") if isinstance(res, dict) else None
        if isinstance(lease_s, bool) or not isinstance(lease_s, int | float) or lease_s <= 0:
            return  # no renewal in this answer
        self.lease_s = float(lease_s)
        confirm = res.get("confirm_s")
        ok = isinstance(confirm, int | float) and not isinstance(confirm, bool) and confirm > 0
        self.confirm_s = float(confirm) if ok and self.fences_disconnect else None
        try:
            self.fence.write(sent + lease_s, lease_s, sent=sent, confirm_s=self.confirm_s)
        except OSError as exc:
            # The shims see the old lease run out: the tasks stop, as they must
            # when this host cannot show that the leader still wants them.
            log.error("cannot write the node's lease to %s: %s", self.lease_path, exc)

    def _hand_over(self) -> None:
        """A planned stop (`systemctl restart`): the next agent is to adopt
        the tasks. Its start-up may take longer than the disconnect window,
        so this stop must not look like a death to the leader or the shims:
        the lease file says the exit is planned (shims then keep the lease
        as it is, agent/lease.py), and the registered connection ends with a
        reset, on which the leader does not act. Only the TTL and the lease,
        which the next agent renews when it registers, apply, as for a
        stopped host. Order: the mark first, then the reset."""
        self._handing_over = True
        try:
            self.fence.mark_handover()
        except OSError as exc:
            log.error("cannot mark the lease in %s as handed over: %s", self.lease_path, exc)
            return  # the shims treat the exit as a death: safe, if costly
        conn = self.client.conn
        if conn is not None and conn.context.get(LEASED):
            conn.reset()  # without a cut: the lease stands for the next agent
        self.client.conn = None
        log.info("stopping: the node's tasks keep running for the next agent to adopt")

    def _closing_connection(self, conn: Connection) -> None:
        """We are about to close a connection a registration was sent on:
        the leader, reading its end, declares this node down `confirm_s` (and
        a margin) later unless we register again in time. Cut the lease to
        end by then, before the end can reach the leader (agent/lease.py)."""
        if not conn.context.get(LEASED) or self.confirm_s is None or self._handing_over:
            return
        try:
            if self.fence.cap(self.fence.now() + self.confirm_s):
                log.warning(
                    "closing the connection to the leader: tasks here stop in %gs "
                    "unless this agent registers again",
                    self.confirm_s,
                )
        except OSError as exc:
            # Cannot cut it: the old lease stands, so the leader must not see
            # this connection end. Drop it without a word (a reset, which the
            # leader does not act on) and let the TTL judge the node.
            log.error("cannot cut the node's lease in %s: %s", self.lease_path, exc)
            conn.reset_on_close()

    def _heartbeat_attempt_s(self) -> float:
        """How long one heartbeat attempt may wait for an answer: a leader that
        went silent (stopped, cut off) must be given up on well within the
        lease, so that the next one renews it before the tasks are killed."""
        if self.lease_s is None:
            return 6.0
        return min(6.0, max(1.0, self.lease_s / 3))

    def _heartbeat_body(self, with_stats: bool = True) -> dict[str, Any]:
        report = self.host_report() if with_stats else {"gpu_faults": self.gpu_faults()}
        body = {
            **report,
            "running": self.running(),
            "exited": sorted({e["task_id"] for e in self.events if e["state"] == "exited"}),
        }
        low = self.disk.condition() if self.disk is not None else None
        if low is not None:
            body["disk_low"] = low  # the leader places nothing here meanwhile
        return body

    def host_report(self) -> dict[str, Any]:
        """What a heartbeat says of the host itself: its load, its GPUs and
        their faults, its block cache."""
        faults = self.gpu_faults()
        gpus = self.probe.gpus()
        return {
            "host": asdict(host_stats(self.cfg.data_dir)),
            "gpus": [asdict(g) for g in gpus],
            "gpu_faults": faults,
            "cache": self.workdirs.stats(),
        }

    def gpu_faults(self) -> list[dict[str, Any]]:
        """The GPUs found faulty, polled at every heartbeat (agent/health.py)."""
        for ev in self.probe.poll_health():
            self.health.record(ev)
        return self.health.report()

    # -- tasks -------------------------------------------------------------------
    async def _start_tasks(self, specs: list[dict[str, Any]]) -> None:
        """Start what is not already running or being prepared, in the background.

        Preparing a workdir can take minutes (a large download); it must never
        hold up heartbeats, or the leader would judge this host dead meanwhile.
        """
        have = set(self.runner.running())
        for sp in specs:
            rid = run_id(sp["task_id"], int(sp["attempt"]))
            if rid in have or rid in self._preparing or self.runner.finished(rid):
                continue
            self._preparing.add(rid)
            task = asyncio.get_running_loop().create_task(self._start_one(rid, sp))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)
        if not self._starting:
            await self._flush_events()

    async def _start_one(self, rid: str, sp: dict[str, Any]) -> None:
        try:
            await self._prepare_and_start(rid, sp)
            await self._flush_events()
        except RpcError as exc:
            log.debug("events of %s not reported yet: %s", rid, exc)  # the heartbeat loop retries
        except Exception:
            log.exception("starting %s failed", rid)
            self.events.append(
                _exit_event(
                    sp["task_id"],
                    int(sp["attempt"]),
                    1,
                    "agent error while starting",
                    self.clock.now(),
                )
            )
        finally:
            self._preparing.discard(rid)

    async def _prepare_and_start(self, rid: str, sp: dict[str, Any]) -> None:
        attempt = int(sp["attempt"])
        try:
            user = self._task_user(sp)
        except identity.IdentityError as exc:
            log.error("cannot start %s: %s", rid, exc)
            self.events.append(
                _exit_event(sp["task_id"], attempt, None, str(exc), self.clock.now())
            )
            return
        env = dict(sp.get("env") or {})
        gpus = [int(g) for g in sp.get("gpus") or []]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["LEPTON_GPUS"] = env["CUDA_VISIBLE_DEVICES"]
        if self.gpu_devices.dir is not None:
            env["LEPTON_GPU_DEVICE_DIR"] = str(self.gpu_devices.dir)
        cwd = sp.get("cwd")
        if sp.get("manifest") is not None:
            dest = self.cfg.data_dir / "workdirs" / rid
            try:
                if cwd:
                    cwd = check_relative_path(cwd, "cwd")  # stays inside the workdir
                conn = await self.client.connection()
                # One workdir at a time: the block store has a single owner.
                async with self._workdir_lock:
                    await self.workdirs.prepare(rid, sp["manifest"], dest, conn)
                if user is not None and user.uid != os.geteuid():
                    identity.open_path_for_others(dest.parent)
                    identity.give_tree(dest, user)
            except OSError as exc:
                self.workdirs.release(rid)
                msg = f"workdir: cannot hand {dest} to {user.name if user else '?'}: {exc.strerror}"
                log.error("%s: %s", rid, msg)
                self.events.append(_exit_event(sp["task_id"], attempt, 1, msg, self.clock.now()))
                return
            except (WorkdirError, RpcError) as exc:
                self.workdirs.release(rid)
                log.error("cannot prepare the workdir of %s: %s", rid, exc)
                self.events.append(
                    _exit_event(sp["task_id"], attempt, 1, f"workdir: {exc}", self.clock.now())
                )
                return
            cwd = str(dest / cwd) if cwd else str(dest)
        # Every task has a memory limit: its own, else what all tasks may use.
        mem_bytes = _whole(sp.get("mem_bytes")) or self.tasks_mem
        spec = TaskSpec(
            task_id=rid,
            argv=list(sp["argv"]),
            env=env,
            cwd=cwd,
            time_limit_s=sp.get("time_limit_s"),
            warn_signal=warn_signum(sp.get("signal")),
            warn_before_s=_seconds(sp.get("signal_before_s")),
            tty=sp.get("tty") is True,
            tty_size=tty_size(sp.get("tty_size")),
            log_cap_bytes=self.cfg.log_cap_bytes,
            kill_grace_s=self.cfg.kill_grace_s,
            user=user,
            mem_bytes=mem_bytes,
            cpus=_cpus(sp.get("cpus")),
            pids_max=self.cfg.task_pids_max,
            denied_devices=self.gpu_devices.others(gpus) if user is not None else [],
            # Sized to the task's memory limit; its pages count against it too.
            private_tmp_bytes=mem_bytes if self.no_private_tmp is None else 0,
        )
        busy = await self._wait_for_gpus(rid, gpus)
        if busy:
            msg = f"not started: GPU {busy} still in use by another run on this host"
            log.warning("%s: %s", rid, msg)
            self.events.append(_exit_event(sp["task_id"], attempt, None, msg, self.clock.now()))
            return
        try:
            self.runner.start(spec)
        except RunnerError as exc:
            log.error("cannot start %s: %s", rid, exc)
            self.events.append(_exit_event(sp["task_id"], attempt, 127, str(exc), self.clock.now()))
            return
        self._mark_busy()
        self.events.append(
            {
                "task_id": sp["task_id"],
                "attempt": attempt,
                "state": "running",
                "at": self.clock.now(),
            }
        )
        log.info("started %s on GPUs [%s]", rid, env["CUDA_VISIBLE_DEVICES"])

    async def _wait_for_gpus(self, rid: str, gpus: list[int]) -> str:
        """Wait until no other run here uses any of `gpus`; '' then, else the
        GPUs still in use when the wait ends.

        The leader never gives a GPU to two live tasks, but a task stopped
        before it started ends at once in the state (raft/tasks.py,
        request_stop), and its GPUs may be given to another task while this
        agent is still starting the first one. That run is no live task any
        more: the next heartbeat's reconcile stops it, and its GPUs are free
        once it exits, within the kill grace. Should a run still hold them
        after that, the leader wants it there, so this start is the stale one.
        """
        want = set(gpus)
        if not want:
            return ""
        deadline = self.clock.monotonic() + self.cfg.kill_grace_s + 3 * self.heartbeat_every_s + 2
        while True:
            busy: set[int] = set()
            for r in self.runner.running():
                if r != rid:
                    busy |= want.intersection(self.runner.gpus(r))
            if not busy:
                return ""
            if self.clock.monotonic() >= deadline:
                return ",".join(map(str, sorted(busy)))
            await self.clock.sleep(0.1)

    def _stop_task(
        self, task_id: str, grace_s: Any = None, attempt: int | None = None, warn: bool = False
    ) -> None:
        """Stop a task's runs here: one attempt, or every attempt when none is given."""
        for rid in self.runner.running():
            tid, a = split_run_id(rid)
            if tid == task_id and (attempt is None or a == attempt):
                try:
                    self.runner.stop(rid, float(grace_s) if grace_s is not None else None, warn)
                except RunnerError as exc:
                    log.warning("cannot stop %s: %s", rid, exc)

    def _collect_exits(self, exits: list[Any]) -> None:
        for ex in exits:
            if self.disk is not None:
                self.disk.ended(ex.task_id)
            tid, attempt = split_run_id(ex.task_id)
            if any(
                e["task_id"] == tid and e["attempt"] == attempt and e["state"] == "exited"
                for e in self.events
            ):
                continue
            ev = _exit_event(
                tid, attempt, ex.exit_code, ex.message, ex.finished_at or self.clock.now()
            )
            if ex.warned:
                ev["warned"] = True  # exit 0 after a warning asks to run again
            if ex.message == LEASE_RAN_OUT:
                # Killed because the node's lease ran out (the host could not
                # renew it): lost with the node, not a failure of the task.
                ev["lost"] = True
            ev["rid"] = ex.task_id
            self.events.append(ev)
        if exits:
            self._mark_busy()

    async def _flush_events(self) -> None:
        if not self.events or self.registered_on is None:
            return
        batch = list(self.events)
        await self.client.call(
            "task_events",
            {"events": [{k: v for k, v in e.items() if k != "rid"} for e in batch]},
            timeout_s=10,
        )
        # Committed: now the runner may forget these exits.
        for e in batch:
            if e in self.events:
                self.events.remove(e)
            if e["state"] == "exited" and e.get("rid"):
                self.runner.ack(e["rid"])
                self.workdirs.release(e["rid"])
                shutil.rmtree(self.cfg.data_dir / "workdirs" / e["rid"], ignore_errors=True)

    def _mark_busy(self) -> None:
        if isinstance(self.probe, SimulatedGpuProbe):
            busy: set[int] = set()
            for rid in self.runner.running():
                spec = read_json(self.runner.task_dir(rid) / SPEC) or {}
                gpus = str((spec.get("env") or {}).get("LEPTON_GPUS", ""))
                busy.update(int(x) for x in gpus.split(",") if x.isdigit())
            self.probe.set_busy(busy)

    # -- pushes from the leader ----------------------------------------------------
    async def _on_start(self, conn: Connection, a: Any) -> None:
        if isinstance(a, dict):
            await self._start_tasks([t for t in a.get("tasks", []) if isinstance(t, dict)])

    async def _on_stop(self, conn: Connection, a: Any) -> None:
        if isinstance(a, dict):
            # `warned`: {task id: grace} of tasks preempted with a warning
            # signal: they get it, and that grace, instead of SIGTERM.
            warned = a.get("warned")
            warned = warned if isinstance(warned, dict) else {}
            for tid in a.get("tasks", []):
                grace = warned.get(tid)
                if isinstance(grace, int | float) and not isinstance(grace, bool) and grace >= 0:
                    self._stop_task(str(tid), grace, warn=True)
                else:
                    self._stop_task(str(tid), a.get("grace_s"))

    async def _on_warn(self, conn: Connection, a: Any) -> None:
        """The leader asks for tasks' warning signals now (a drain deadline is near)."""
        if not isinstance(a, dict) or not isinstance(a.get("tasks"), list):
            return
        for tid in a["tasks"]:
            for rid in self.runner.running():
                if split_run_id(rid)[0] == str(tid):
                    try:
                        self.runner.warn(rid)
                    except RunnerError as exc:
                        log.warning("cannot warn %s: %s", rid, exc)

    async def _on_logs(self, conn: Connection, a: Any) -> AsyncIterator[Any]:
        if not isinstance(a, dict):
            raise RpcError("bad_request", "logs needs a task id")
        tid = str(a.get("task_id", ""))
        rid = self._latest_run(tid, a.get("attempt"))
        if rid is None:
            raise RpcError(
                "not_found",
                f"no output for task {tid} on this host (a run's output is kept for "
                f"{_duration_text(self.cfg.task_retention_s)} after it ends)",
            )
        tdir = self.runner.task_dir(rid)
        async for item in logserve.serve(
            tdir, a, lambda: rid in self.runner.running(), self._exited, self.clock
        ):
            yield item

    def _running_dir(self, a: Any) -> tuple[str, Path]:
        """The task id and directory of the running attempt a session names."""
        if not isinstance(a, dict):
            raise RpcError("bad_request", "a session needs a task id")
        tid = str(a.get("task_id", ""))
        attempt = a.get("attempt")
        rid = self._latest_run(tid, attempt)
        if rid is None or rid not in self.runner.running():
            raise RpcError("not_found", f"task {tid} is not running on this host")
        return tid, self.runner.task_dir(rid)

    async def _on_attach(self, conn: Connection, a: Any) -> AsyncIterator[Any]:
        tid, tdir = self._running_dir(a)
        rows, cols = _size(a)
        try:
            async for item in self.sessions.attach(tdir, tid, _session(a), rows, cols):
                yield item
        except SessionError as exc:
            raise RpcError("conflict", str(exc)) from None

    async def _on_exec(self, conn: Connection, a: Any) -> AsyncIterator[Any]:
        tid, tdir = self._running_dir(a)
        argv = a.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(x, str) for x in argv):
            raise RpcError("bad_request", "exec needs a command")
        rows, cols = _size(a)
        log.info("exec in %s: %s", tid, argv[:8])
        try:
            async for item in self.sessions.exec(
                tdir, tid, _session(a), argv, a.get("tty") is True, rows, cols
            ):
                yield item
        except SessionError as exc:
            raise RpcError("conflict", str(exc)) from None

    async def _on_tty_input(self, conn: Connection, a: Any) -> None:
        if not isinstance(a, dict):
            return
        data = a.get("data") or b""
        if not isinstance(data, bytes):
            return
        rows, cols = _size(a, default=(0, 0))
        self.sessions.input(str(a.get("task_id", "")), _session(a), data, rows, cols)

    async def _on_gpu_reset(self, conn: Connection, a: Any) -> dict[str, Any]:
        """The leader asks to put a GPU back in service (`leptonctl node gpu
        reset`): it must pass a burn-in first (agent/burnin.py)."""
        index = a.get("gpu") if isinstance(a, dict) else None
        count = len(self.probe.gpus())
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise RpcError("bad_request", f"{self.name} has GPUs 0-{count - 1}, not {index!r}")
        ok, note = await self._burn_in(index)
        if not ok:
            log.error("GPU %d failed its burn-in: %s; it stays unhealthy", index, note)
            raise RpcError(
                "conflict",
                f"GPU {index} of {self.name} failed its burn-in ({note}); it stays unhealthy",
            )
        self.health.clear(index)
        log.info("GPU %d is back in service: %s", index, note)
        return {"gpu": index, "note": note}

    async def _burn_in(self, index: int) -> tuple[bool, str]:
        argv = [sys.executable, "-m", "agent.burnin"]
        env = dict(os.environ)
        if isinstance(self.probe, SimulatedGpuProbe):
            self.probe.reset(index)
            if index in self.probe.fail_burnin:
                self.probe.fail_burnin.discard(index)
                return False, "an injected burn-in fault (simulated GPU)"
            if index in self.probe.slow_burnin:
                # Slow until one burn-in gets past it: one cancelled meanwhile
                # (its caller gave up) leaves the next one as slow.
                await self.clock.sleep(SLOW_BURN_IN_S)
                self.probe.slow_burnin.discard(index)
            argv += ["--device", "cpu", "--matmul", "256", "--pattern-bytes", str(16 << 20)]
        else:
            env.update(CUDA_VISIBLE_DEVICES=str(index), CUDA_DEVICE_ORDER="PCI_BUS_ID")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.cfg.burn_in_timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return False, f"it did not finish within {self.cfg.burn_in_timeout_s:g}s"
        lines = out.decode("utf-8", "replace").strip().splitlines()
        try:
            res = json.loads(lines[-1])
            return bool(res["ok"]), str(res["note"])
        except (IndexError, ValueError, KeyError, TypeError):
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            return False, f"the burn-in exited {proc.returncode}: {tail[0][:300]}"

    async def _exited(self) -> None:
        """A followed task ended: report its exit now rather than at the next
        heartbeat, so `logs -f` returns with the job's final state committed."""
        self._collect_exits(self.runner.poll())
        with contextlib.suppress(RpcError):
            await self._flush_events()

    def _latest_run(self, task_id: str, attempt: Any) -> str | None:
        if isinstance(attempt, int) and attempt > 0:
            rid = run_id(task_id, attempt)
            return rid if self.runner.task_dir(rid).exists() else None
        best: tuple[int, str] | None = None
        root = self.runner.root
        if root.exists():
            for p in root.iterdir():
                tid, a = split_run_id(p.name)
                if tid == task_id and (best is None or a > best[0]):
                    best = (a, p.name)
        return best[1] if best else None

    # -- leaving -----------------------------------------------------------------
    def request_stop(self) -> None:
        self._stopping.set()

    async def _leave_if_asked(self) -> None:
        if not self.cfg.leave_on_stop:
            return
        try:
            await self.client.call("agent_leave", {"node_id": self.node_id}, timeout_s=10)
            for rid in self.runner.running():
                self.runner.stop(rid)
            deadline = self.clock.monotonic() + self.cfg.kill_grace_s + 5
            while self.runner.running() and self.clock.monotonic() < deadline:
                await self.clock.sleep(0.2)
            self._collect_exits(self.runner.poll())
            await self._flush_events()
            await self.client.call("agent_deregister", {"node_id": self.node_id}, timeout_s=10)
            log.info("left the cluster")
        except RpcError as exc:
            log.warning("could not leave the cluster cleanly: %s", exc)
        finally:
            await self.client.close()


def _exit_event(
    task_id: str, attempt: int, code: int | None, message: str, at: float
) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "attempt": attempt,
        "state": "exited",
        "exit_code": code,
        "message": message,
        "at": at,
    }


def _session(a: dict[str, Any]) -> str:
    s = a.get("session")
    if not isinstance(s, str) or not 8 <= len(s) <= 64:
        raise RpcError("bad_request", "a session id is 8-64 characters")
    return s


def _size(a: dict[str, Any], default: tuple[int, int] = (24, 80)) -> tuple[int, int]:
    """A terminal's [rows, cols] from a session's arguments."""
    rows, cols = a.get("rows"), a.get("cols")
    ok = all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 10_000 for v in (rows, cols)
    )
    return (int(rows), int(cols)) if ok else default  # type: ignore[arg-type]


def tty_size(v: Any) -> list[int] | None:
    """A launch spec's tty_size, checked: [rows, cols] or None."""
    if isinstance(v, list) and len(v) == 2:
        rows, cols = v
        if all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 10_000 for x in v):
            return [rows, cols]
    return None


def _seconds(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v > 0 else 0.0


def _whole(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def _cpus(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v > 0 else 0.0


def _duration_text(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{seconds / n:g}{unit}"
    return f"{seconds:g}s"


def _guess_addr() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
