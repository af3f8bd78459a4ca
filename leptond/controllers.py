"""Leader-only reconcile loops: liveness, scheduling, membership upkeep.

Each method named `*_pass` is one pass of a loop; leadership.py runs them,
only while this master leads (after its log is applied). A pass reads an
immutable view of the state (StateReader), decides, and commits through
the Proposer; it never holds the apply lock. Everything it needs comes in
as a port (leptond/ports.py), so a simulation can run the same passes on a
virtual clock against a model Raft log and simulated agents.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol

import scheduler as sch
from raft import accounting as acct
from raft.commands import BATCH_BUDGET_BYTES, encoded_size
from raft.model import Node
from raft.tasks import preempted_for
from raft.view import StateView

from . import usage, views
from .clock import Clock, wait_event
from .config import MasterConfig
from .holds import Holds
from .liveness import NodeLiveness
from .ports import NodeChannel, Proposer, StateReader
from .wire.errors import RpcError

log = logging.getLogger("lepton.master")
FULL_PASS_EVERY_S = 5.0  # look at every pending task again at least this often
# Pending tasks over which a full pass reads them in a worker thread.
FULL_PASS_IN_THREAD_PENDING = 2000
DRAIN_CHECK_EVERY_S = 0.5  # how late after its drain deadline a node's tasks get their stop
IDLE_PASS_EVERY_S = 2.0  # a scheduling pass with no wake-up, now and then
# A full pass (one that looks at every node and pending task) is followed by
# a gap of this many times what it took before a wake-up starts the next:
# full passes take at most 1/(1+3) of the leader's time however often
# commits wake them, and a burst of registrations or task exits meanwhile is
# one pass, not one each. A small cluster's passes take a millisecond, so
# the gap is a few milliseconds there.
FULL_PASS_GAP_FACTOR = 3.0
MAX_FULL_PASS_GAP_S = 1.0  # a pass slowed by a busy machine delays the next no more than this
# An incremental pass (what is new since the last one, after a submit batch
# commits) still costs O(pending): it sets aside the tasks known not to fit
# by set operations over all of them (views.scheduler_inputs). At 256 submits
# in flight a batch commits every few milliseconds, so with 100,000 pending a
# pass per batch took a quarter of the leader's CPU. The next one waits this
# many times what the last took: at most 1/(1+10) of the leader's time, and
# a stream of batches is taken a few at a time. A small queue's pass takes
# well under a millisecond, so the wait there is too.
INCR_PASS_GAP_FACTOR = 10.0
MAX_INCR_PASS_GAP_S = 0.25  # new work waits for a pass no more than this
MEMBERS_EVERY_S = 60.0
# Decayed usage for fair share is recomputed when runs ended since (at most
# every DECAY_MIN_GAP_S), and every DECAY_EVERY_S as the days age.
DECAY_EVERY_S = 60.0
DECAY_MIN_GAP_S = 2.0


class BlockInfo(Protocol):
    """What the scheduler knows of workdir blocks (blockservice.BlockService)."""

    def cached_sets(self) -> dict[str, frozenset[str]]:
        """Node id -> blocks its cache likely holds."""
        ...

    def block_sets(self, view: StateView) -> dict[str, frozenset[str]]:
        """Manifest id -> its block ids."""
        ...


# How often nodes whose agent went away are looked at (liveness_pass).
SUSPECT_TICK_S = 0.05


class Controllers:
    def __init__(
        self,
        cfg: MasterConfig,
        proposer: Proposer,
        reader: StateReader,
        channel: NodeChannel,
        liveness: NodeLiveness,
        blocks: BlockInfo,
        wakeup: asyncio.Event,
        clock: Clock,
    ) -> None:
        """`wakeup` is set by whoever committed something the scheduler should
        look at (the Proposer, with wake=True)."""
        self._cfg = cfg
        self._proposer = proposer
        self._reader = reader
        self._channel = channel
        self._liveness = liveness
        self._blocks = blocks
        self._wake = wakeup
        self._clock = clock
        self.reasons: dict[str, str] = {}
        self.preempting: dict[str, set[str]] = {}  # pending task -> victims still stopping
        self.holds = Holds()  # the room each preemptor preempted for
        self._learn_preemptions = True  # from the state, at the first pass of a term
        self._inputs = views.InputCache()  # what passes make of unchanged records
        # Held while a pass reads or updates _inputs: a full pass does so in a
        # worker thread, which a lost leadership's cancel does not stop.
        self._inputs_lock = threading.Lock()
        self._stuck: set[str] = set()  # left pending by the passes since the last full one
        self._epoch = -1  # ClusterState.capacity_epoch at the last pass
        self._last_full = 0.0
        self._settled = -1  # state generation of the last full pass that planned nothing
        self._disk_epoch = -1  # NodeLiveness.disk_epoch the last pass saw
        self._full_not_before = 0.0  # monotonic time before which a wake-up waits (pacing)
        self._incr_not_before = 0.0  # the same for an incremental pass
        self._next_liveness = 0.0  # monotonic time of the next look at every node
        # Per-node lists that depend on the nodes' records only, kept with the
        # (immutable) map of the view they were made from: heartbeats commit
        # nothing, so at 10,000 nodes the same map is looked at twice a second
        # by each of the liveness and drain loops for minutes on end, and a
        # Python walk of it each time was a cost that grew with the cluster,
        # not with the heartbeat rate.
        self._judged_of: Mapping[str, Node] | None = None
        self._judged: list[str] = []  # nodes not down, in that map
        self._draining_of: Mapping[str, Node] | None = None
        self._draining: list[Node] = []  # nodes draining, in that map
        self.plans = 0
        self._decayed_at = -DECAY_EVERY_S
        self._decayed_for: tuple[float, float] = (-1.0, -1.0)
        self.policy = sch.Policy(
            preemption=cfg.preemption,
            quotas=dict(cfg.quotas),
            no_preempt_only_within_quota=cfg.no_preempt != "always",
        )

    def reset(self) -> None:
        """A new term of leadership: nothing remembered from an earlier one
        (another leader may have placed, preempted or freed anything since)."""
        self.reasons, self.preempting, self._stuck = {}, {}, set()
        self.holds.reset()
        self._learn_preemptions = True
        self._epoch, self._last_full, self._settled = -1, 0.0, -1
        self._full_not_before = self._incr_not_before = 0.0
        self._next_liveness = 0.0
        self._judged_of = self._draining_of = None

    def wake(self) -> None:
        self._wake.set()

    # -- liveness ---------------------------------------------------------------
    async def liveness_pass(self) -> None:
        """Declare down the nodes silent for the TTL, and those whose agent
        closed its connection (or died) and did not register again within the
        confirm window plus its margin. Both wait longer than the node's lease
        can last in that case (agent/lease.py), so its tasks are dead first."""
        cfg, live = self._cfg, self._liveness
        ttl = cfg.heartbeat_ttl_s
        period = min(0.5, ttl / 4)
        # A suspect node is judged to within a tick of its deadline; the
        # other nodes are looked at every `period` only (there may be many).
        await self._clock.sleep(SUSPECT_TICK_S if live.suspects else period)
        fast = cfg.disconnect_down_s
        known = self._reader.view().nodes
        for nid in [x for x in live.suspects if x not in known or known[x].state == "down"]:
            del live.suspects[nid]  # down already (or removed): nothing to judge
        if self._clock.monotonic() >= self._next_liveness:
            self._next_liveness = self._clock.monotonic() + period
            if known is not self._judged_of:
                self._judged = [n.id for n in known.values() if n.state != "down"]
                self._judged_of = known
            judged = self._judged
        else:
            judged = list(live.suspects)
        # At 10,000 nodes this runs twice a second: the scan is one pass of
        # dict reads (NodeLiveness.overdue); only what it finds is looked at
        # again, one node at a time, with the clock read afresh.
        overdue = live.overdue(judged, ttl, fast)
        # A proposal that failed may still have been committed: a condemned
        # node gets no lease until that cannot happen.
        if live.condemned:
            looked_at, late = set(judged), set(overdue)
            for nid in [x for x in live.condemned if x in looked_at and x not in late]:
                if self._clock.monotonic() - live.condemned[nid] > 2 * cfg.commit_timeout_s:
                    del live.condemned[nid]
        for nid in overdue:
            node = known[nid]
            silent = live.silent_for(nid)
            suspect = live.suspect_for(nid)
            if fast is not None and suspect is not None and suspect > fast:
                why = f"its agent went away and was not back within {cfg.disconnect_confirm_s:g}s"
            elif silent > ttl:
                why = f"no heartbeat for {ttl:g}s"
            else:
                continue  # heard from (or registered again) since the scan
            log.warning("node %s: %s: marking it down", node.name, why)
            live.condemned[nid] = self._clock.monotonic()
            res = await self._proposer.propose(
                "node_down",
                {
                    "node_id": nid,
                    "now": self._clock.now(),
                    "reason": why,
                    # Void if the node registered again since this view.
                    "if_updated_at": node.updated_at,
                },
                wake=True,
            )
            # Applied (or void): a heartbeat now meets the node down, or
            # registered again, so its answers may renew the lease again.
            live.condemned.pop(nid, None)
            if res.get("stale"):
                log.info("node %s registered again meanwhile: not down", node.name)
                continue
            live.suspects.pop(nid, None)
            if res.get("lost"):
                log.warning("node %s down: %d task(s) lost", node.name, len(res["lost"]))

    # -- drain deadlines ----------------------------------------------------------
    async def drain_pass(self) -> None:
        """Stop what still runs on a draining node once its deadline has passed.

        The stops travel like a preemption's (SIGTERM, the kill grace, SIGKILL,
        through the agent) and each task goes back to pending without spending
        a retry. Apply checks the deadline again with the `now` proposed here.
        """
        await self._clock.sleep(DRAIN_CHECK_EVERY_S)
        now = self._clock.now()
        s = self._reader.view()
        if s.nodes is not self._draining_of:
            self._draining = [n for n in s.nodes.values() if n.state == "draining"]
            self._draining_of = s.nodes
        if not self._draining:
            return
        self._warn_before_drain(s, self._draining, now)
        due = [
            (n.id, n.name)
            for n in self._draining
            if n.drain_deadline is not None and n.drain_deadline <= now and s.stoppable_tasks(n.id)
        ]
        for nid, name in due:
            try:
                res = await self._proposer.propose("drain_expired", {"node_id": nid, "now": now})
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

    def _warn_before_drain(self, s: StateView, draining: list[Node], now: float) -> None:
        """Tasks that asked for a warning signal get it signal_before_s ahead
        of their node's drain deadline (`draining`: the view's draining
        nodes). Pushed again every pass until the deadline (the agent's shim
        sends it once), so a lost push or a new leader costs at most one pass
        of lateness."""
        for n in draining:
            if n.drain_deadline is None:
                continue
            due = []
            for t in s.stoppable_tasks(n.id):
                sp = s.jobs[t.job_id].spec
                lead = sp.get("signal_before_s") if sp.get("signal") is not None else None
                if lead is not None and n.drain_deadline - float(lead) <= now:
                    due.append(t.id)
            if due:
                self._channel.push_warn(n.id, due)

    # -- membership ---------------------------------------------------------------
    async def members_pass(self) -> None:
        cfg = self._cfg
        mine = self._reader.view().members.get(cfg.raft_addr)
        if mine is None or mine.rpc_addr != cfg.rpc_addr or mine.http_addr != cfg.http_addr:
            await self._proposer.propose(
                "member_info",
                {"raft_addr": cfg.raft_addr, "rpc_addr": cfg.rpc_addr, "http_addr": cfg.http_addr},
            )
        # Forget finished jobs past their retention, now and then, and usage
        # records past theirs.
        now = self._clock.now()
        await self._proposer.propose(
            "gc_jobs",
            {"before": now - cfg.job_retention_s, "usage_before": now - cfg.usage_retention_s},
        )
        await self._clock.sleep(MEMBERS_EVERY_S)

    # -- scheduling -----------------------------------------------------------------
    async def scheduling_pass(self) -> None:
        # Now and then, look at everything again even with no wake-up.
        full = not await wait_event(self._clock, self._wake, IDLE_PASS_EVERY_S)
        if self._reader.view().capacity_epoch != self._epoch:
            wait_s = self._full_not_before - self._clock.monotonic()
        else:
            wait_s = 0.0 if full else self._incr_not_before - self._clock.monotonic()
        if wait_s > 0:
            # The last pass was recent: the commits that wake this one
            # meanwhile (each registration, each submit batch) are taken by
            # one pass at the end of the gap.
            await self._clock.sleep(wait_s)
        self._wake.clear()
        s = self._reader.view()
        if not s.pending and not self._stops_outstanding(s):
            return
        epoch = s.capacity_epoch
        if self._liveness.disk_epoch != self._disk_epoch:
            # A node's disk went under its reserve or came back: what did not
            # fit may now, so every pending task is looked at again.
            self._disk_epoch = self._liveness.disk_epoch
            self._epoch, self._settled = -1, -1
        # Tasks that did not fit last pass cannot fit now unless something
        # freed capacity since: with thousands pending, a pass per submit
        # batch would otherwise cost O(pending) each time.
        now = self._clock.monotonic()
        full = full or now - self._last_full > FULL_PASS_EVERY_S
        skip = self._stuck if epoch == self._epoch and not full else set()
        if not skip and s.generation == self._settled:
            # A full pass over this very state planned nothing; the scheduler
            # is deterministic, so it would again (an idle cluster with work
            # that fits nowhere would pay a whole pass every few seconds).
            self._dispatch_stops()
            return
        if not skip:
            self._last_full = now
        started = self._clock.monotonic()
        held: dict[str, str] = {}  # tasks not offered: dependencies, array limits
        cached, block_sets = self._blocks.cached_sets(), self._blocks.block_sets(s)

        def inputs() -> tuple[list[sch.NodeView], list[sch.Allocation], list[sch.TaskRequest]]:
            with self._inputs_lock:
                return views.scheduler_inputs(
                    s, cached, block_sets, skip=skip, cache=self._inputs, held=held
                )

        if not skip and len(s.pending) > FULL_PASS_IN_THREAD_PENDING:
            # A full pass reads every pending task (135 ms at 20,000 on a
            # loaded 2-core VM, every FULL_PASS_EVERY_S under a stream of
            # submits): in a thread, the event loop and the RPCs it answers
            # take turns with it (GIL_SWITCH_INTERVAL_S) instead of waiting.
            nodes, allocs, pending = await asyncio.to_thread(inputs)
        else:
            nodes, allocs, pending = inputs()
        low = self._liveness.disk_low
        if low:
            # Nodes whose data disk is under its reserve take nothing new.
            nodes = [replace(n, schedulable=False) if n.node_id in low else n for n in nodes]
        self._decay_usage(s)
        stopping = {t.id for t in s.stopping_tasks() if t.stop == "preempt"}
        self._epoch = epoch
        if self._learn_preemptions:
            # Preemptions an earlier leader made may still be under way: their
            # preemptors wait for them here too, instead of stopping more work.
            self._learn_preemptions = False
            self.preempting = _preemptions_under_way(s)
        # A task whose victims are still stopping waits for them rather than
        # evicting more work: it is placed once their resources are free.
        self.preempting = {p: v & stopping for p, v in self.preempting.items() if v & stopping}
        pending = [r for r in pending if r.task_id not in self.preempting]
        # What preemptors preempted for stays theirs (holds.py): held while
        # their victims stop, and theirs first once they are gone.
        nominated, pending = self.holds.prepare(s, self.preempting, allocs, pending)
        # A gang is placed whole or not at all (apply drops a part of one):
        # ranks whose others still run, stopping to restart with them, wait.
        gang_waits = _gang_waits(s, pending)
        if gang_waits:
            pending = [r for r in pending if r.task_id not in gang_waits]
        if len(pending) > 2000:
            plan = await asyncio.to_thread(sch.schedule, nodes, allocs, pending, self.policy)
        else:
            plan = sch.schedule(nodes, allocs, pending, self.policy)
        took = self._clock.monotonic() - started
        if not skip:
            gap = min(MAX_FULL_PASS_GAP_S, FULL_PASS_GAP_FACTOR * took)
            self._full_not_before = self._clock.monotonic() + gap
        else:
            gap = min(MAX_INCR_PASS_GAP_S, INCR_PASS_GAP_FACTOR * took)
            self._incr_not_before = self._clock.monotonic() + gap
        if nominated:
            plan = replace(plan, placements=(*nominated, *plan.placements))
        for pr in plan.preemptions:
            self.preempting.setdefault(pr.for_task, set()).add(pr.task_id)
        self.holds.record(plan)
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
        self.reasons.update(held)
        for tid, victims in self.preempting.items():
            self.reasons[tid] = f"waiting for {len(victims)} preempted task(s) to stop"
        self.reasons.update(gang_waits)
        if not skip:
            self._settled = -1 if plan.placements or plan.preemptions else s.generation
        if plan.placements or plan.preemptions:
            await self._commit(plan)
        self._dispatch_stops()

    def _decay_usage(self, s: StateView) -> None:
        """With --fair-share-half-life, the policy carries each user's decayed
        share of recent usage (leptond/usage.py), refreshed now and then:
        usage changes only when runs end, and days decay slowly."""
        half_life = self._cfg.fair_share_half_life_s
        if half_life <= 0:
            return
        now = self._clock.monotonic()
        used = (s.counters.get(acct.GPU_SECONDS, 0), s.counters.get(acct.CPU_SECONDS, 0))
        since = now - self._decayed_at
        if since < DECAY_EVERY_S and (used == self._decayed_for or since < DECAY_MIN_GAP_S):
            return
        self._decayed_at, self._decayed_for = now, used
        shares = usage.past_shares(s, self._clock.now(), half_life)
        if shares != self.policy.past_shares:
            self.policy = replace(self.policy, past_shares=shares)
            self._stuck = set()  # the order changed: look at everything again

    @staticmethod
    def _stops_outstanding(s: StateView) -> bool:
        # From the state's index of stops, not a walk over every node's
        # tasks: each registration wakes this pass, and with N nodes that
        # walk made registering N nodes cost O(N^2).
        return bool(s.stopping_tasks())

    async def _commit(self, plan: sch.Plan) -> None:
        dropped: list[dict[str, str]] = []
        preempting = False
        for args in plan_commands(plan, self._clock.now()):
            res = await self._proposer.propose("plan", args)
            dropped += res["dropped"]
            preempting = preempting or bool(res["preempting"])
            # Each part's placements start as soon as it commits: should a
            # later part fail, these run anyway. The view includes the part.
            s = self._reader.view()
            by_node: dict[str, list[dict[str, Any]]] = {}
            for tid in res["placed"]:
                t = s.tasks.get(tid)
                if t is not None and t.node_id:
                    spec = views.launch_spec(s, t, self._cfg.allow_root_tasks)
                    by_node.setdefault(t.node_id, []).append(spec)
            for nid, specs in by_node.items():
                self._channel.push_start(nid, specs)
        self.plans += 1
        if dropped:
            log.info(
                "plan: %d placement(s) dropped at apply: %s", len(dropped), dropped[0]["reason"]
            )
            # Until the next pass, that is why they still wait: the state
            # changed under the plan (a node left, another placement won).
            for d in dropped:
                self.reasons[d["task_id"]] = f"its placement was dropped: {d['reason']}"
            self.wake()
        if preempting:
            self.wake()

    def _dispatch_stops(self) -> None:
        by_node: dict[str, list[str]] = {}
        warned: dict[str, dict[str, float]] = {}
        s = self._reader.view()
        for t in s.stopping_tasks():
            if t.node_id:
                by_node.setdefault(t.node_id, []).append(t.id)
                grace = (
                    self._preempt_grace_s(s.jobs[t.job_id].spec) if t.stop == "preempt" else None
                )
                if grace is not None:
                    warned.setdefault(t.node_id, {})[t.id] = grace
        for nid, tids in by_node.items():
            self._channel.push_stop(nid, tids, warned.get(nid))

    def _preempt_grace_s(self, spec: dict[str, Any]) -> float | None:
        """How long a preempted task of this spec has after its warning signal
        (None: it asked for none, and is stopped as any other). Its own
        --preempt-grace, else its --signal lead time, at most the maximum."""
        if spec.get("signal") is None:
            return None
        want = spec.get("preempt_grace_s")
        if want is None:
            want = spec.get("signal_before_s") or self._cfg.kill_grace_s
        return min(float(want), self._cfg.max_preempt_grace_s)


def _preemptions_under_way(s: StateView) -> dict[str, set[str]]:
    """Pending task -> its victims that still stop, as the state tells it."""
    out: dict[str, set[str]] = {}
    for t in s.stopping_tasks():  # a preemption's victims carry its stop
        for_task = preempted_for(t)
        if for_task is not None and for_task in s.pending:
            out.setdefault(for_task, set()).add(t.id)
    return out


def _gang_waits(s: StateView, pending: list[sch.TaskRequest]) -> dict[str, str]:
    """Pending gang ranks whose job still has ranks that are not pending
    (live, stopping to restart with the gang): why each waits."""
    out: dict[str, str] = {}
    why: dict[str, str | None] = {}  # per gang job, counted once (not once per rank)
    for r in pending:
        if r.gang_size > 1:
            if r.job_id not in why:
                tasks = s.tasks
                others = sum(1 for tid in s.jobs[r.job_id].tasks if tasks[tid].state != "pending")
                why[r.job_id] = (
                    f"waiting for {others} other task(s) of its gang to stop" if others else None
                )
            reason = why[r.job_id]
            if reason is not None:
                out[r.task_id] = reason
    return out


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
