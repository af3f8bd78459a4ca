"""The leader's side of the agents: registration, heartbeats, task events,
and pushing assignments and stops to each agent's connection (the
NodeChannel port, leptond/ports.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from raft.commands import BATCH_BUDGET_BYTES, encoded_size
from raft.model import LIVE_TASK_STATES, Task
from raft.validate import SpecError, validate_node

from . import views
from .auth import require
from .batcher import Batcher
from .clock import Clock
from .config import MasterConfig
from .liveness import NodeLiveness
from .nodestats import Cleaner
from .ports import LeaderStatus, Proposer, StateReader
from .wire import pacing
from .wire.connection import Connection, Handler
from .wire.errors import BAD_REQUEST, FORBIDDEN, RpcError

log = logging.getLogger("lepton.master")
# One task event in a task_events command; apply keeps 1024 characters of
# its message, and nothing else in an event is long.
MAX_EVENT_BYTES = 16 * 1024
# Items of a relayed stream (task output) the leader lets an agent send ahead.
RELAY_WINDOW = 4
# Users' keystrokes are forwarded to an agent only while its connection has
# less than this queued: far under the cap that closes a connection whose
# peer does not read (wire MAX_PENDING_OUTPUT), so a user flooding input at
# their own session gets `busy` and the host's connection stays up.
MAX_QUEUED_FOR_INPUT = 1024 * 1024
STATS_KEYS = ("host", "gpus", "cache")  # what nodestats.Cleaner.heartbeat reads
MAX_GPU_FAULTS = 1024  # GPUs one heartbeat may report faulty
MAX_FAULT_REASON_CHARS = 256


def _host_words(v: Any, default: str, limit: int = MAX_FAULT_REASON_CHARS) -> str:
    """A host's words (why a GPU is faulty, why its disk is full), as every
    listing, log line and page shows them: short, on one line, printable
    (the host may be compromised); `default` when it gave none."""
    if not isinstance(v, str) or not v.strip():
        return default
    return "".join(c if c.isprintable() else " " for c in v[:limit]).strip()


def _disk_low(v: Any) -> str | None:
    """Why the node's data disk is under its reserve (agent/diskwatch.py), or
    None when the heartbeat says nothing of it."""
    if not isinstance(v, dict):
        return None
    return _host_words(v.get("reason"), "disk full", 200)


def _bounded_event(e: dict[str, Any], node_id: str) -> dict[str, Any]:
    """The event as proposed: its message cut as apply would cut it, so a
    batch of events stays within one Raft entry; refused when still large."""
    ev = dict(e, node_id=node_id)
    if isinstance(ev.get("message"), str):
        ev["message"] = ev["message"][:1024]
    try:
        size = encoded_size(ev)
    except (TypeError, ValueError, OverflowError):
        raise RpcError(BAD_REQUEST, "task event cannot be encoded") from None
    if size > MAX_EVENT_BYTES:
        raise RpcError(BAD_REQUEST, f"task event is {size} bytes; the limit is {MAX_EVENT_BYTES}")
    return ev


class AgentRegistry:
    def __init__(
        self,
        cfg: MasterConfig,
        proposer: Proposer,
        reader: StateReader,
        leader: LeaderStatus,
        liveness: NodeLiveness,
        may_renew_leases: Callable[[float], bool],
        clock: Clock,
    ) -> None:
        """`may_renew_leases(window_s)`: whether a majority answered this
        leader within the window (raft.node.RaftNode.heard_from_majority_within)."""
        self._cfg = cfg
        self._proposer = proposer
        self._reader = reader
        self._leader = leader
        self.liveness = liveness
        self._may_renew_leases = may_renew_leases
        self._clock = clock
        self.conns: dict[str, Connection] = {}  # node id -> agent connection (leader only)
        # Node id -> the commit of GPU faults it reported, while one is under way.
        self._marking: dict[str, asyncio.Task[None]] = {}
        self.events: Batcher[dict[str, Any], int] | None = None
        # Heartbeat pacing (leptond/wire/pacing.py): fixed by the settings.
        self._pace_cap_s = cfg.heartbeat_cap_s
        # The interval last asked and the number of connections it was for:
        # every heartbeat's answer carries it, and it moves only with them.
        self._paced_for, self._paced_s = -1, 0.0
        # Lease settings every heartbeat's answer reads, fixed by the settings
        # (each is a property of MasterConfig, worked out at each read).
        self._lease_contact_s = cfg.lease_contact_s
        self._task_lease_s = cfg.task_lease_s

    def handlers(self) -> dict[str, Handler]:
        return {
            "agent_register": self.register,
            "heartbeat": self.heartbeat,
            "task_events": self.task_events,
            "agent_leave": self.leave,
            "agent_deregister": self.deregister,
        }

    def lead(self, node_ids: list[str]) -> None:
        """A new leader gives every node a full TTL before judging it, and the
        time in which a deposed leader may still have renewed its lease."""
        self.liveness.reset(node_ids, self._lease_contact_s)
        self.events = Batcher(
            self._flush_events,
            max_batch=2000,
            size_of=encoded_size,
            max_bytes=BATCH_BUDGET_BYTES,
        )
        self.events.start()

    async def step_down(self) -> None:
        for task in list(self._marking.values()):
            task.cancel()
        await asyncio.gather(*self._marking.values(), return_exceptions=True)
        self._marking.clear()
        if self.events is not None:
            await self.events.close()
            self.events = None
        for conn in list(self.conns.values()):
            conn.close()
        self.conns.clear()

    def on_disconnect(self, conn: Connection) -> None:
        nid = conn.context.get("node_id")
        if nid and self.conns.get(nid) is conn:
            del self.conns[nid]
            # We read the agent's end-of-stream: its process closed the
            # connection (and cut its lease first) or died (and its shims cut
            # the lease when they saw it go). Not our own close, not a reset.
            if (
                conn.peer_closed
                and conn.context.get("fences_disconnect")
                and self._cfg.disconnect_down_s is not None
            ):
                self.liveness.suspect(nid)
                log.warning(
                    "node %s closed its connection: down in %gs unless it registers again",
                    nid,
                    self._cfg.disconnect_down_s,
                )

    # -- handlers ---------------------------------------------------------------
    async def register(self, conn: Connection, a: Any) -> dict[str, Any]:
        require(conn.context, "node")
        self._leader.ensure_leader()
        if not isinstance(a, dict) or not isinstance(a.get("node"), dict):
            raise RpcError(BAD_REQUEST, "register needs a node description")
        # A node credential speaks for one node: the one it was issued to.
        own = conn.context.get("user")
        if a["node"].get("id") != own:
            raise RpcError(
                FORBIDDEN, f"this node credential is node {own}'s; it cannot register another node"
            )
        try:
            # What a host may say about itself is bounded (apply checks it too).
            node = validate_node(a["node"])
        except SpecError as exc:
            raise RpcError(BAD_REQUEST, f"node refused: {exc}") from None
        res = await self._proposer.propose(
            "register_node", {"node": node, "now": self._clock.now()}, wake=True
        )
        nid = res["node_id"]
        old = self.conns.get(nid)
        # Only an agent that cuts its own lease when its connection ends (and
        # whose shims do when it dies) may be judged by the fast path.
        conn.context["fences_disconnect"] = a.get("fences_disconnect") is True
        self.conns[nid] = conn
        if old is not None and old is not conn:
            old.close()  # ours, and no longer the node's: no suspicion from it
        conn.context["node_id"] = nid
        self.liveness.registered(nid)
        v = self._reader.view()
        allow_root = self._cfg.allow_root_tasks
        should_run = [views.launch_spec(v, v.tasks[x["task_id"]], allow_root) for x in res["tasks"]]
        masters = [mb.rpc_addr for mb in v.members.values()]
        log.info(
            "node %s (%s) registered with %d GPUs", node.get("name"), nid, len(node.get("gpus", []))
        )
        requeued = res.get("requeued") or []
        if requeued:
            log.warning(
                "node %s registered with less than its tasks held: %d task(s) back to pending (%s: %s)",
                node.get("name"),
                len(requeued),
                ", ".join(r["task_id"] for r in requeued[:5])
                + (", ..." if len(requeued) > 5 else ""),
                requeued[0]["reason"],
            )
        out = {"node_id": nid, "state": res["state"], "tasks": should_run, "masters": masters}
        return self._with_lease(self._paced(out), nid)

    def _paced(self, answer: dict[str, Any]) -> dict[str, Any]:
        """Ask the agent for the interval that keeps all agents together at
        or under --max-heartbeats-per-second (leptond/wire/pacing.py): every
        agent connection to this leader counts as a live node."""
        rate = self._cfg.max_heartbeats_per_s
        if rate > 0:
            n = len(self.conns)
            if n != self._paced_for:
                self._paced_for, self._paced_s = n, pacing.interval_s(n, rate, self._pace_cap_s)
            answer["heartbeat_s"] = self._paced_s
        return answer

    def _with_lease(self, answer: dict[str, Any], nid: str) -> dict[str, Any]:
        """Renew the node's lease in this answer (agent/lease.py), if this
        master may: a leader that has not heard from a majority lately may
        already be deposed, and the new one counts the node's TTL without it.
        Nor is a node's lease renewed while it is being declared down."""
        if nid in self.liveness.condemned:
            return answer
        if self._may_renew_leases(self._lease_contact_s):
            answer["lease_s"] = self._task_lease_s
            if self._cfg.disconnect_confirm_s > 0:
                # How soon the lease must end once the agent's connection does.
                answer["confirm_s"] = self._cfg.disconnect_confirm_s
        return answer

    def _registered(self, conn: Connection, what: str) -> str:
        """The node id of an agent connection on the leader, or a clear error."""
        require(conn.context, "node")
        self._leader.ensure_leader()
        nid = conn.context.get("node_id")
        if not nid:
            raise RpcError("unregistered", f"register before {what}")
        return str(nid)

    def heartbeat(self, conn: Connection, a: Any) -> dict[str, Any]:
        """A plain function, so the connection serves it inline, without a
        task of its own: every agent sends one a second, and at thousands of
        agents the task per request was a good part of the leader's work."""
        nid = self._registered(conn, "sending heartbeats")
        if not isinstance(a, dict):
            raise RpcError(BAD_REQUEST, "a heartbeat is a map")
        clean = Cleaner()
        # A heartbeat without host, GPU and cache figures (agents send them
        # every few seconds) keeps the last ones; it still counts as heard.
        stats = clean.heartbeat(a) if not a.keys().isdisjoint(STATS_KEYS) else None
        running = clean.runs(a.get("running"))
        exited = clean.task_ids(a.get("exited"))
        if clean.dropped:
            self.liveness.dropped(nid, clean.dropped)
        self.liveness.heard(nid, stats)
        self.liveness.report_disk(nid, _disk_low(a.get("disk_low")))
        self._gpu_faults(nid, a.get("gpu_faults"))
        return self.reconcile(nid, running, exited)

    def _gpu_faults(self, nid: str, reported: Any) -> None:
        """Commit the GPUs the agent found faulty that the state does not
        mark yet (raft/gpuhealth.py), in the background: the heartbeat is
        answered at once. Only a reset clears a mark, so what the agent no
        longer reports changes nothing here."""
        if not isinstance(reported, list) or not reported or nid in self._marking:
            return
        task = asyncio.get_running_loop().create_task(self._mark_faulty(nid, reported))
        self._marking[nid] = task
        task.add_done_callback(lambda _: self._marking.pop(nid, None))

    async def _mark_faulty(self, nid: str, reported: list[Any]) -> None:
        node = self._reader.view().nodes.get(nid)
        if node is None:
            return
        have = {int(f["index"]) for f in node.gpu_faults}
        valid = {g["index"] for g in node.gpus}
        new = []
        for f in reported[:MAX_GPU_FAULTS]:
            idx = f.get("index") if isinstance(f, dict) else None
            if isinstance(idx, int) and not isinstance(idx, bool) and idx in valid - have:
                new.append({"index": idx, "reason": _host_words(f.get("reason"), "unhealthy")})
        if not new:
            return
        try:
            res = await self._proposer.propose(
                "gpu_health",
                {"node_id": nid, "unhealthy": new, "now": self._clock.now()},
                wake=True,  # the scheduling pass pushes the stops
            )
        except RpcError as exc:
            log.warning("node %s: GPU faults not recorded yet: %s", node.name, exc)
            return
        for f in new:
            log.error("node %s: GPU %d marked unhealthy: %s", node.name, f["index"], f["reason"])
        if res.get("stopping"):
            log.warning(
                "node %s: stopping %d task(s) on unhealthy GPUs to run them elsewhere",
                node.name,
                len(res["stopping"]),
            )

    def reconcile(
        self, nid: str, running: set[tuple[str, int]], exited: set[str]
    ) -> dict[str, Any]:
        """Compare what the agent runs with what it should; answer the difference."""
        s = self._reader.view()
        start: list[dict[str, Any]] = []
        stop: list[list[Any]] = []
        node = s.nodes.get(nid)
        if node is None:
            return {"start": [], "stop": [[tid, a] for tid, a in running], "state": "unknown"}
        if node.state == "down":
            # Judged down while its connection lived on (a pause, a network
            # blip): registering again is how a returning node reconciles.
            raise RpcError("unregistered", f"node {node.name} was marked down; register again")
        # The node's live tasks, each record read once (this runs per heartbeat).
        tasks = s.tasks
        should: dict[str, Task] = {}
        for tid in s.node_tasks.get(nid, ()):
            t = tasks[tid]
            if t.state in LIVE_TASK_STATES:
                should[tid] = t
        # Runs are (task, attempt): a stale attempt is stopped without
        # touching the current one of the same task.
        for tid, attempt in running:
            cur = should.get(tid)
            if cur is None or cur.attempt != attempt or cur.stop is not None:
                stop.append([tid, attempt])
        for tid, t in should.items():
            if (tid, t.attempt) not in running and tid not in exited and t.stop is None:
                start.append(views.launch_spec(s, t, self._cfg.allow_root_tasks))
        answer = {
            "start": start,
            "stop": stop,
            "state": node.state,
            "grace_s": self._cfg.kill_grace_s,
        }
        return self._with_lease(self._paced(answer), nid)

    async def task_events(self, conn: Connection, a: Any) -> dict[str, Any]:
        nid = self._registered(conn, "reporting task events")
        if not isinstance(a, dict) or not isinstance(a.get("events"), list):
            raise RpcError(BAD_REQUEST, "task_events needs a list of events")
        assert self.events is not None
        evs = [_bounded_event(e, nid) for e in a["events"] if isinstance(e, dict)]
        await asyncio.gather(*(self.events.submit(e) for e in evs))
        return {"ok": True, "count": len(evs)}

    async def leave(self, conn: Connection, a: Any) -> dict[str, Any]:
        """An agent stopping with leave-on-stop: no new work is placed on it.

        A drain that already holds (an admin's, maybe with a deadline) is left
        as it is: `leave` drains only a node that is not drained yet.
        """
        nid = self._registered(conn, "leaving")
        return await self._proposer.propose(
            "node_state",
            {
                "node_id": nid,
                "state": "draining",
                "now": self._clock.now(),
                "reason": "agent leaving",
                "leave": True,
            },
        )

    async def deregister(self, conn: Connection, a: Any) -> dict[str, Any]:
        nid = self._registered(conn, "deregistering")
        res = await self._proposer.propose(
            "remove_node", {"node_id": nid, "now": self._clock.now(), "force": True}
        )
        self.conns.pop(nid, None)
        return res

    async def _flush_events(self, evs: list[dict[str, Any]]) -> list[int]:
        # `now`: apply keeps the jobs' times on this clock, not the hosts' (raft/tasks.py).
        # Only an end wakes the scheduling pass: a start frees nothing and
        # sets no stop (a stop on a task not yet started ends it at apply),
        # so the pass it woke planned what the last one did. Starts are the
        # bulk of these commands: each placement reports one.
        ended = any(e.get("state") != "running" for e in evs)
        await self._proposer.propose(
            "task_events", {"events": evs, "now": self._clock.now()}, wake=ended
        )
        return [0] * len(evs)

    # -- pushes (the NodeChannel port) ----------------------------------------------
    def push_start(self, node_id: str, specs: list[dict[str, Any]]) -> None:
        self._notify(node_id, "start", {"tasks": specs})

    def push_stop(
        self, node_id: str, task_ids: list[str], warned: dict[str, float] | None = None
    ) -> None:
        args: dict[str, Any] = {"tasks": task_ids, "grace_s": self._cfg.kill_grace_s}
        if warned:
            args["warned"] = warned
        self._notify(node_id, "stop", args)

    def push_input(self, node_id: str, args: dict[str, Any]) -> bool:
        conn = self.conns.get(node_id)
        if conn is not None and conn.queued_output > MAX_QUEUED_FOR_INPUT:
            return False
        self._notify(node_id, "tty_input", args)
        return True

    def push_warn(self, node_id: str, task_ids: list[str]) -> None:
        self._notify(node_id, "warn", {"tasks": task_ids})

    def is_connected(self, node_id: str) -> bool:
        conn = self.conns.get(node_id)
        return conn is not None and not conn.is_closing()

    async def call(self, node_id: str, method: str, args: dict[str, Any], timeout_s: float) -> Any:
        agent = self.conns.get(node_id)
        if agent is None or agent.is_closing():
            raise RpcError("unavailable", "the host is not connected")
        return await agent.call(method, args, timeout_s=timeout_s)

    async def stream(self, node_id: str, method: str, args: dict[str, Any]) -> AsyncIterator[Any]:
        agent = self.conns.get(node_id)
        if agent is None or agent.is_closing():
            raise RpcError("unavailable", "the host is not connected")
        # A small window: the leader holds at most this many of the agent's
        # items (256 KiB of output each) for a reader that reads slowly.
        async for item in agent.stream(method, args, window=RELAY_WINDOW):
            yield item

    def _notify(self, nid: str, method: str, args: dict[str, Any]) -> None:
        conn = self.conns.get(nid)
        if conn is None or conn.is_closing():
            return  # the next heartbeat's reconcile repairs it
        try:
            conn.notify(method, args)
        except RpcError:
            pass
