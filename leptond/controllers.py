"""Leader-only reconcile loops: liveness, scheduling, membership upkeep.

They start when this master becomes leader (after its log is applied) and stop
when it is not; each loop logs, counts and keeps going after its own errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import scheduler as sch
from raft.commands import BATCH_BUDGET_BYTES, encoded_size
from raft.model import LIVE_TASK_STATES

from . import views
from .wire.errors import RpcError

if TYPE_CHECKING:
    from .master import Master

log = logging.getLogger("lepton.master")
FULL_PASS_EVERY_S = 5.0  # look at every pending task again at least this often
DRAIN_CHECK_EVERY_S = 0.5  # how late after its drain deadline a node's tasks get their stop


class Controllers:
    def __init__(self, master: Master) -> None:
        self.m = master
        self.active = False
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self.reasons: dict[str, str] = {}
        self.preempting: dict[str, set[str]] = {}  # pending task -> victims still stopping
        self._stuck: set[str] = set()  # left pending by the passes since the last full one
        self._epoch = -1  # ClusterState.capacity_epoch at the last pass
        self._last_full = 0.0
        self.errors = 0
        self.plans = 0
        self.start_latencies: list[float] = []
        self.policy = sch.Policy(
            preemption=master.cfg.preemption,
            quotas=dict(master.cfg.quotas),
            no_preempt_only_within_quota=master.cfg.no_preempt != "always",
        )

    async def start(self) -> None:
        if self.active:
            return
        assert self.m.raft is not None
        with self.m.raft.lock:
            node_ids = list(self.m.state.nodes)
        self.m.agents.reset(node_ids)
        self.active = True
        loop = asyncio.get_running_loop()
        for name, fn in (
            ("liveness", self._liveness),
            ("drains", self._drain_deadlines),
            ("scheduler", self._scheduling),
            ("members", self._members),
        ):
            self._tasks.append(loop.create_task(self._forever(name, fn)))
        self.wake()

    async def stop(self) -> None:
        self.active = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.m.agents.stop()

    def wake(self) -> None:
        self._wake.set()

    async def _forever(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        while self.active:
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except RpcError as exc:
                self.errors += 1
                log.warning("%s: %s", name, exc)
                await asyncio.sleep(0.5)
            except Exception:
                self.errors += 1
                log.exception("%s loop failed; restarting it", name)
                await asyncio.sleep(0.5)

    # -- liveness ---------------------------------------------------------------
    async def _liveness(self) -> None:
        ttl = self.m.cfg.heartbeat_ttl_s
        await asyncio.sleep(min(0.5, ttl / 4))
        now = time.monotonic()
        assert self.m.raft is not None
        with self.m.raft.lock:
            nodes = [(n.id, n.name) for n in self.m.state.nodes.values() if n.state != "down"]
        for nid, name in nodes:
            seen = self.m.agents.last_seen.setdefault(nid, now)
            if now - seen > ttl:
                log.warning("node %s silent for %.1fs: marking it down", name, now - seen)
                res = await self.m.propose(
                    "node_down",
                    {"node_id": nid, "now": time.time(), "reason": f"no heartbeat for {ttl:g}s"},
                )
                if res.get("lost"):
                    log.warning("node %s down: %d task(s) lost", name, len(res["lost"]))
                self.wake()

    # -- drain deadlines ----------------------------------------------------------
    async def _drain_deadlines(self) -> None:
        """Stop what still runs on a draining node once its deadline has passed.

        The stops travel like a preemption's (SIGTERM, the kill grace, SIGKILL,
        through the agent) and each task goes back to pending without spending
        a retry. Apply checks the deadline again with the `now` proposed here.
        """
        await asyncio.sleep(DRAIN_CHECK_EVERY_S)
        now = time.time()
        assert self.m.raft is not None
        s = self.m.state
        with self.m.raft.lock:
            due = [
                (n.id, n.name)
                for n in s.nodes.values()
                if n.state == "draining"
                and n.drain_deadline is not None
                and n.drain_deadline <= now
                and s.stoppable_tasks(n.id)
            ]
        for nid, name in due:
            try:
                res = await self.m.propose("drain_expired", {"node_id": nid, "now": now})
            except RpcError as exc:
                if exc.code != "conflict":  # undrained meanwhile: nothing to do
                    raise
                continue
            if res["stopping"]:
                log.warning(
                    "node %s: drain deadline passed; stopping %d task(s) to run elsewhere",
                    name,
                    len(res["stopping"]),
                )
        if due:
            self.wake()  # the scheduling pass pushes the stops to the agents

    # -- membership ---------------------------------------------------------------
    async def _members(self) -> None:
        cfg = self.m.cfg
        assert self.m.raft is not None
        with self.m.raft.lock:
            mine = self.m.state.members.get(cfg.raft_addr)
        if mine is None or mine.rpc_addr != cfg.rpc_addr or mine.http_addr != cfg.http_addr:
            await self.m.propose(
                "member_info",
                {"raft_addr": cfg.raft_addr, "rpc_addr": cfg.rpc_addr, "http_addr": cfg.http_addr},
            )
        # Forget finished jobs past their retention, now and then.
        await self.m.propose("gc_jobs", {"before": time.time() - cfg.job_retention_s})
        await asyncio.sleep(60)

    # -- scheduling -----------------------------------------------------------------
    async def _scheduling(self) -> None:
        full = False
        try:
            await asyncio.wait_for(self._wake.wait(), 2.0)
        except TimeoutError:
            full = True  # now and then, look at everything again
        self._wake.clear()
        assert self.m.raft is not None
        with self.m.raft.lock:
            if not self.m.state.pending and not self._stops_outstanding():
                return
            epoch = self.m.state.capacity_epoch
            # Tasks that did not fit last pass cannot fit now unless something
            # freed capacity since: with thousands pending, a pass per submit
            # batch would otherwise cost O(pending) each time.
            full = full or time.monotonic() - self._last_full > FULL_PASS_EVERY_S
            skip = self._stuck if epoch == self._epoch and not full else set()
            if not skip:
                self._last_full = time.monotonic()
            nodes, allocs, pending = views.scheduler_inputs(
                self.m.state, self.m.cached_sets(), self.m.block_sets(), skip=skip
            )
            stopping = {t.id for t in self._live_tasks() if t.stop == "preempt"}
        self._epoch = epoch
        # A task whose victims are still stopping waits for them rather than
        # evicting more work: it is placed once their resources are free.
        self.preempting = {p: v & stopping for p, v in self.preempting.items() if v & stopping}
        pending = [r for r in pending if r.task_id not in self.preempting]
        if len(pending) > 2000:
            plan = await asyncio.to_thread(sch.schedule, nodes, allocs, pending, self.policy)
        else:
            plan = sch.schedule(nodes, allocs, pending, self.policy)
        for pr in plan.preemptions:
            self.preempting.setdefault(pr.for_task, set()).add(pr.task_id)
        # Waiting gang tasks are never skipped: the oldest one gets nodes held
        # back in every pass, and without it in the pass newer small work
        # would take what the gang waits for (it would starve).
        gangs = {r.task_id for r in pending if r.gang_size > 1}
        if skip:
            # Incremental pass: add to what is known not to fit. Ids of tasks
            # that left pending meanwhile are harmless here and go at the next
            # full pass, so this stays O(new tasks), not O(all pending).
            self._stuck.update(t for t in plan.reasons if t not in gangs)
            self.reasons.update(plan.reasons)
        else:
            self._stuck = {t for t in plan.reasons if t not in gangs}
            self.reasons = dict(plan.reasons)
        for tid, victims in self.preempting.items():
            self.reasons[tid] = f"waiting for {len(victims)} preempted task(s) to stop"
        if plan.placements or plan.preemptions:
            await self._commit(plan)
        self._dispatch_stops()

    def _stops_outstanding(self) -> bool:
        return any(t.stop is not None for t in self._live_tasks())

    def _live_tasks(self) -> list[Any]:
        s = self.m.state
        return [
            s.tasks[tid]
            for tids in s.node_tasks.values()
            for tid in tids
            if s.tasks[tid].state in LIVE_TASK_STATES
        ]

    async def _commit(self, plan: sch.Plan) -> None:
        dropped: list[dict[str, str]] = []
        preempting = False
        for args in plan_commands(plan, time.time()):
            res = await self.m.propose("plan", args)
            dropped += res["dropped"]
            preempting = preempting or bool(res["preempting"])
            # Each part's placements start as soon as it commits: should a
            # later part fail, these run anyway.
            assert self.m.raft is not None
            with self.m.raft.lock:
                specs = [
                    views.launch_spec(
                        self.m.state, self.m.state.tasks[tid], self.m.cfg.allow_root_tasks
                    )
                    for tid in res["placed"]
                ]
            self.m.agents.push_start(specs)
        self.plans += 1
        if dropped:
            log.info(
                "plan: %d placement(s) dropped at apply: %s", len(dropped), dropped[0]["reason"]
            )
            self.wake()
        if preempting:
            self.wake()

    def _dispatch_stops(self) -> None:
        assert self.m.raft is not None
        by_node: dict[str, list[str]] = {}
        with self.m.raft.lock:
            for t in self._live_tasks():
                if t.stop is not None and t.node_id:
                    by_node.setdefault(t.node_id, []).append(t.id)
        for nid, tids in by_node.items():
            self.m.agents.push_stop(nid, tids)


def plan_commands(plan: sch.Plan, now: float) -> list[dict[str, Any]]:
    """The plan as `plan` commands, each within one Raft entry.

    A job's placements stay in one command (apply places a gang whole or not
    at all); apart from that the parts are independent, and apply re-checks
    each against the state it meets, as it does a whole plan.
    """
    units: list[tuple[str, list[dict[str, Any]]]] = [
        ("preemptions", [{"task_id": p.task_id, "for_task": p.for_task}]) for p in plan.preemptions
    ]
    by_job: dict[str, list[dict[str, Any]]] = {}
    for p in plan.placements:
        job = p.task_id.rsplit(".", 1)[0]  # task ids are JOB.RANK (raft/state.py)
        by_job.setdefault(job, []).append(
            {"task_id": p.task_id, "node_id": p.node_id, "gpus": list(p.gpus)}
        )
    units.extend(("placements", group) for group in by_job.values())
    out: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    used = 0
    for key, items in units:
        size = encoded_size(items)
        if cur and used + size > BATCH_BUDGET_BYTES:
            out.append(cur)
            cur, used = {}, 0
        if not cur:
            cur = {"now": now, "placements": [], "preemptions": []}
        cur[key].extend(items)
        used += size
    if cur:
        out.append(cur)
    return out
