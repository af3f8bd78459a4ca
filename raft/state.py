"""ClusterState: the pure, deterministic replicated state machine.

Rules (DESIGN §4): apply never reads a clock, never does I/O and never raises;
an invalid command is a no-op that returns an error value; a command that
carries the request id of a client call applied recently returns the first
result again (raft/dedupe.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
from operator import attrgetter
from typing import Any

import msgpack

from . import accounting as acct
from . import gpuhealth
from . import nodecreds as nc
from . import tasks as tl
from . import workloads as wl
from .commands import COMMAND_VERSION, BadCommand, Command, decode
from .cow import CowMap, discard_from, frozen_all
from .dedupe import RecentResults
from .errors import ArgError
from .model import (
    FINAL_JOB_STATES,
    FINAL_TASK_STATES,
    LIVE_TASK_STATES,
    NODE_STATES,
    ROLES,
    Job,
    JoinToken,
    Member,
    Node,
    NodeCredential,
    Record,
    Task,
    Token,
    UsageDay,
)
from .validate import (
    SpecError,
    spec_bytes,
    spec_tasks,
    validate_labels,
    validate_name,
    validate_node,
    validate_stored_spec,
    validate_unix_user,
)
from .view import READABLE_SNAPSHOT_VERSIONS, StateReads, StateView

log = logging.getLogger("lepton.raft")

# A restore's parts: with 1 MiB entries, far more than an RPC frame can carry.
MAX_RESTORE_PARTS = 4096
Result = dict[str, Any]


def error(code: str, message: str) -> Result:
    return {"error": {"code": code, "message": message}}


def _records() -> CowMap[Any, Any]:
    return _cow({})


class ClusterState(StateReads):
    """The live state, written only by apply (and restore).

    Every map is a CowMap and apply follows raft/cow.py's rule (take a
    writable record before changing it), so the views `freeze()` publishes
    never change after the fact.
    """

    def __init__(self) -> None:
        self.nodes: CowMap[str, Node] = _records()
        self.jobs: CowMap[str, Job] = _records()
        self.tasks: CowMap[str, Task] = _records()
        self.tokens: CowMap[str, Token] = _records()
        self.members: CowMap[str, Member] = _records()
        self.join_tokens: CowMap[str, JoinToken] = _records()
        self.node_creds: CowMap[str, NodeCredential] = _records()  # by handshake key id
        self.manifests: CowMap[str, dict[str, Any]] = CowMap()  # never changed once put
        # Cumulative counters and usage by (user, day) (raft/accounting.py).
        self.counters: CowMap[str, float] = CowMap()
        self.usage: CowMap[tuple[str, int], UsageDay] = _records()
        # manifest id -> the users who committed it (sorted): a submit may use
        # only its own user's (raft/commands.py, version 3).
        self.manifest_owners: CowMap[str, tuple[str, ...]] = CowMap()
        self.recent = RecentResults()
        # Parts of a snapshot being restored (apply_restore), or None. Replaced,
        # never mutated in place: views share it.
        self.restoring: dict[str, Any] | None = None
        self.applied_index = 0
        # Derived indexes, rebuilt from the records on restore.
        self.gpu_owner: CowMap[tuple[str, int], str] = CowMap()
        self.node_tasks: CowMap[str, set[str]] = CowMap(clone=set.copy)
        self.pending: CowMap[str, None] = CowMap()  # insertion-ordered set of pending task ids
        # Tasks carrying a stop (all live: an ended task never carries one),
        # kept by raft.tasks.note_stop: the leader pushes stops from it
        # without walking every node's tasks.
        self.stopping: CowMap[str, None] = CowMap()
        self.node_cred_of: CowMap[str, str] = CowMap()  # node id -> its credential's key id
        # user -> tasks of theirs in state pending (an array's count), kept by
        # raft.tasks.set_state: what a submit's task cap is checked against.
        self.user_pending_tasks: dict[str, int] = {}
        # job id -> {task state: how many of its tasks are in it}, kept by
        # raft.tasks.set_state: an array's state without a look at each task.
        self.job_counts: dict[str, dict[str, int]] = {}
        # job id -> the jobs whose waiting_on names it (raft/workloads.py).
        # Only apply reads it, never a view, so a plain dict of sets.
        self.dependents: dict[str, set[str]] = {}
        # Removed node id -> the (ended) tasks that still name it, for when
        # it joins again. Only apply reads it: a plain dict of sets.
        self.removed_node_tasks: dict[str, set[str]] = {}
        # user -> (jobs waiting to start, bytes of their specs): what the
        # per-user caps a submit carries are checked against.
        self.user_pending: CowMap[str, tuple[int, int]] = CowMap()
        # job id -> spec_bytes of its spec, which never changes: what it
        # weighs in user_pending, encoded once at submit instead of at each
        # change of its pending state. Only apply reads it; rebuilt lazily.
        self.spec_sizes: dict[str, int] = {}
        # Bumped by every command that can free capacity or change nodes (and
        # by task_events only when a task ended: a task that starts holds what
        # it held when placed). Local (not in snapshots): the leader's
        # scheduler uses it to skip tasks that did not fit last time when
        # nothing could have made room since.
        self.capacity_epoch = 0
        # Local count of applies and restores, moved after each one's writes:
        # a reader whose view has this generation needs no newer one.
        self.generation = 0
        self._view: StateView | None = None

    # -- entry point --------------------------------------------------------
    def apply(self, command: bytes, index: int) -> Any:
        """Apply one committed command. Never raises."""
        try:
            cmd = decode(command)
        except BadCommand as exc:
            self.applied_index = max(self.applied_index, index)
            self.generation += 1
            return error("bad_command", str(exc))
        found, first = self.recent.get(cmd.rid)
        if found:
            self.applied_index = max(self.applied_index, index)
            self.generation += 1
            return first
        result = self._dispatch(cmd, index)
        if cmd.op in CAPACITY_OPS:
            self.capacity_epoch += 1
        self.applied_index = max(self.applied_index, index)
        self.recent.tick(cmd.at)
        if cmd.dedupe:
            self.recent.remember(cmd.rid, result, cmd.at)
        self.generation += 1
        return result

    def _dispatch(self, cmd: Command, index: int) -> Any:
        name = _HANDLERS.get(cmd.op)
        fn = None if name is None else getattr(self, name, None)
        if fn is None:
            return error("unknown_op", f"unknown command op {cmd.op!r}")
        try:
            if cmd.op in VERSIONED_OPS:
                # Validation limits belong to the command's format version.
                return fn(cmd.args, index, cmd.v)
            return fn(cmd.args, index)
        except ArgError as exc:
            return error(exc.code, str(exc))
        except SpecError as exc:
            return error("bad_request", str(exc))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            # OverflowError: int() of an infinite float, e.g. a corrupt attempt or mem_bytes.
            return error("bad_command", f"malformed {cmd.op} command: {type(exc).__name__}: {exc}")
        except Exception as exc:  # apply must never raise: pysyncobj would stall
            log.exception("apply %s failed", cmd.op)
            return error("internal", f"{cmd.op} failed: {exc}")

    # -- nodes ----------------------------------------------------------------
    def apply_register_node(
        self, a: dict[str, Any], index: int, version: int = COMMAND_VERSION
    ) -> Result:
        # Version 3 on: bounded GPUs, CPUs, memory and labels (raft/validate.py).
        n = validate_node(a["node"]) if version >= 3 else a["node"]
        node_id = _str(n, "id")
        if version >= 3:
            # validate_node made them afresh: GPUs in the form _gpu gives
            # (distinct indexes) and labels of strings, kept as they are.
            gpus, labels = n["gpus"], n["labels"]
        else:
            gpus = [_gpu(g) for g in n.get("gpus", [])]
            if len({g["index"] for g in gpus}) != len(gpus):
                raise ArgError("bad_request", "node GPU indexes must be distinct")
            labels = {str(k): str(v) for k, v in (n.get("labels") or {}).items()}
        now = float(a["now"])
        cpus, mem_bytes = float(n["cpus"]), _int64(n["mem_bytes"])
        # NaN or negative capacity would defeat the capacity check in apply_plan.
        if not (0 <= cpus <= 1e6 and mem_bytes >= 0):
            raise ArgError("bad_request", "node cpus and mem_bytes must be finite and not negative")
        node = self.nodes.get(node_id)
        if node is None:
            node = Node(
                id=node_id,
                name=validate_name(n.get("name"), "node name"),
                addr=str(n.get("addr", "")),
                cpus=cpus,
                mem_bytes=mem_bytes,
                gpus=gpus,
                labels=labels,
                registered_at=now,
                updated_at=now,
            )
            self.nodes[node_id] = node
            # A node removed and joining again may still be named by finished
            # tasks; index them as _reindex would (kept at removal: a look at
            # every task here made each new node cost O(tasks) in apply).
            self.node_tasks[node_id] = self.removed_node_tasks.pop(node_id, set())
        else:
            # Everything that can fail comes before the first write.
            name = validate_name(n.get("name"), "node name")
            node = self.nodes.writable(node_id)
            node.name = name
            node.addr = str(n.get("addr", node.addr))
            node.cpus, node.mem_bytes, node.labels = cpus, mem_bytes, labels
            node.gpus = gpus
            if node.state == "down":
                # A drain outlives the node going down: it comes back draining.
                node.state = "ready" if node.drain_reason is None else "draining"
            node.updated_at = now
            node.reason = node.drain_reason or ""
        requeued = self._fit_live_tasks(node, now)
        nc.note_registered(self, node_id)
        return {
            "node_id": node_id,
            "state": node.state,
            "tasks": self.node_assignments(node_id),
            "requeued": requeued,
        }

    def _fit_live_tasks(self, node: Node, now: float) -> list[dict[str, str]]:
        """A known node came back with less than its live tasks hold (a GPU gone,
        fewer CPUs or less memory): the node keeps its identity, and the tasks
        that no longer fit go back to pending without spending a retry.

        First every task on a GPU index that vanished; then, while the node is
        still over its CPUs or memory, the lowest priority, most recently
        placed. The agent is answered without them, so it stops their runs.
        """
        valid = {g["index"] for g in node.gpus}
        live = [
            self.tasks[tid]
            for tid in sorted(self.node_tasks.get(node.id, ()))
            if self.tasks[tid].state in LIVE_TASK_STATES
        ]
        out: list[tuple[Task, str]] = []
        keep: list[Task] = []
        for t in live:
            gone = sorted(set(t.gpus) - valid)
            if gone:
                lost = ",".join(map(str, gone))
                out.append((t, f"node {node.name} came back without GPU {lost}"))
            else:
                keep.append(t)
        cpus = sum(t.cpus for t in keep)
        mem = sum(t.mem_bytes for t in keep)
        for t in sorted(keep, key=lambda t: (t.priority, -(t.assigned_at or 0.0), t.id)):
            if cpus <= node.cpus + 1e-9 and mem <= node.mem_bytes:
                break
            cpus, mem = cpus - t.cpus, mem - t.mem_bytes
            out.append(
                (
                    t,
                    f"node {node.name} came back with {node.cpus:g} CPUs and "
                    f"{node.mem_bytes >> 20} MiB of memory, less than its tasks use",
                )
            )
        requeued = []
        for t, why in out:
            t = self.tasks.writable(t.id)  # copy on write (raft/cow.py)
            if t.state not in LIVE_TASK_STATES:
                continue  # already stopped with another member of its gang
            if t.stop is None:
                t.stop = "shrink"
                tl.note_stop(self, t)
            tl.task_exited(self, t, "lost", None, why, now)
            requeued.append({"task_id": t.id, "reason": why})
        return requeued

    def apply_node_state(self, a: dict[str, Any], index: int) -> Result:
        """Drain a node (state draining) or lift its drain (state ready).

        The drain is recorded whatever the node's liveness: a down node stays
        down until its agent returns, and then comes back draining (or ready,
        when its drain was lifted meanwhile). `leave` marks the drain of an
        agent stopping with leave-on-stop: it drains the node only when no
        drain holds yet, so an admin's drain keeps its reason and deadline;
        and since that agent stops every run it has, its live tasks are asked
        to stop as at a drain deadline: back to pending, no retry spent.
        """
        node = self._node(a)
        state = a["state"]
        if state not in ("ready", "draining"):
            raise ArgError("bad_request", f"node state must be ready or draining, not {state!r}")
        if node.state == "down" and state == "ready" and node.drain_reason is None:
            raise ArgError(
                "conflict", f"node {node.name} is down; it becomes ready when its agent returns"
            )
        # Each drain says the whole drain: one without a deadline clears an
        # earlier one. The deadline is the proposer's wall-clock time.
        deadline = a.get("deadline")
        if deadline is not None:
            if state != "draining":
                raise ArgError("bad_request", "only a drain takes a deadline")
            if isinstance(deadline, bool) or not isinstance(deadline, int | float):
                raise ArgError("bad_request", "drain deadline must be a time in seconds")
            if not math.isfinite(deadline):
                raise ArgError("bad_request", "drain deadline must be a finite time")
            deadline = float(deadline)
        now = float(a["now"])
        reason = str(a.get("reason", ""))
        node = self.nodes.writable(node.id)
        if not (a.get("leave") and node.drain_reason is not None):
            if state == "draining":
                node.drain_reason, node.drain_deadline = reason, deadline
            else:
                node.drain_reason, node.drain_deadline = None, None
            if node.state != "down":  # a down node keeps saying why it is down
                node.state, node.reason = state, reason
            node.updated_at = now
        if a.get("leave") and state == "draining":
            for t in self.stoppable_tasks(node.id):
                msg = f"stopping: the agent of node {node.name} is leaving"
                tl.evict(self, t, "drain", msg, now)
        return self._node_state_result(node)

    @staticmethod
    def _node_state_result(node: Node) -> Result:
        return {
            "node_id": node.id,
            "state": node.state,
            "drain_deadline": node.drain_deadline,
            "drained": node.drain_reason is not None,
        }

    def apply_node_labels(self, a: dict[str, Any], index: int) -> Result:
        """Set (`set`, a map) and remove (`unset`, a list) a node's admin labels."""
        node = self._node(a)
        add = validate_labels(a.get("set"), "admin labels")
        unset = a.get("unset") or []
        if not isinstance(unset, list) or not all(isinstance(k, str) for k in unset):
            raise ArgError("bad_request", "unset must be a list of label names")
        merged = {k: v for k, v in node.admin_labels.items() if k not in set(unset)}
        merged.update(add)
        validate_labels(merged, "admin labels")  # the whole set stays within the bounds
        node = self.nodes.writable(node.id)
        node.admin_labels = merged  # replaced, never changed in place (views share it)
        return {"node_id": node.id, "admin_labels": dict(merged)}

    def apply_drain_expired(self, a: dict[str, Any], index: int) -> Result:
        """The drain deadline of a node has passed (by the proposer's clock): ask
        every live task still on it to stop; each goes back to pending when it
        exits, without spending a retry, as after a preemption."""
        node = self._node(a)
        now = float(a["now"])
        if node.state != "draining" or node.drain_deadline is None:
            raise ArgError("conflict", f"node {node.name} is not draining with a deadline")
        if now < node.drain_deadline:
            raise ArgError("conflict", f"the drain deadline of node {node.name} has not passed")
        stopping = []
        for t in self.stoppable_tasks(node.id):
            stopping.append(t.id)
            msg = f"stopping: the drain deadline of node {node.name} passed"
            tl.evict(self, t, "drain", msg, now)
        return {"node_id": node.id, "stopping": stopping}

    def apply_node_down(self, a: dict[str, Any], index: int) -> Result:
        node = self._node(a)
        now = float(a["now"])
        if node.state == "down":
            return {"node_id": node.id, "lost": []}
        # The leader judged the node from a view in which it was last updated
        # at `if_updated_at`. A registration committed since (the agent came
        # back and got a fresh lease in its answer) makes that judgement
        # stale: downing it now would requeue tasks that still run there.
        seen = a.get("if_updated_at")
        stale = isinstance(seen, int | float) and not isinstance(seen, bool)
        if stale and node.updated_at != seen:
            return {"node_id": node.id, "lost": [], "stale": True}
        # Its drain, if any, stays (drain_reason, drain_deadline): it applies
        # again when the node comes back.
        node = self.nodes.writable(node.id)
        node.state = "down"
        node.reason = str(a.get("reason", "no heartbeat"))
        node.updated_at = now
        lost = []
        for tid in sorted(self.node_tasks.get(node.id, ())):
            if self.tasks[tid].state in LIVE_TASK_STATES:
                lost.append(tid)
                t = self.tasks.writable(tid)
                tl.task_exited(self, t, "lost", None, f"lost: node {node.name} went down", now)
        return {"node_id": node.id, "lost": lost}

    def apply_remove_node(self, a: dict[str, Any], index: int) -> Result:
        """Forget a node. With `revoke` (an admin's `node rm`) its credential is
        deleted too, also for a node id that only a credential still names (an
        agent that deregistered itself keeps its credential to come back)."""
        revoke = bool(a.get("revoke"))
        if revoke and _str(a, "node_id") not in self.nodes:
            cred = nc.revoke_node(self, a["node_id"])
            if cred is None:
                raise ArgError("not_found", f"no node {a['node_id']!r}")
            return {"node_id": a["node_id"], "removed": False, "revoked": cred}
        node = self._node(a)
        live = [
            tid
            for tid in self.node_tasks.get(node.id, ())
            if self.tasks[tid].state in LIVE_TASK_STATES
        ]
        if live and not a.get("force"):
            raise ArgError(
                "conflict", f"node {node.name} still runs {len(live)} task(s); drain it first"
            )
        now = float(a["now"])
        for tid in sorted(live):
            tl.task_exited(
                self, self.tasks.writable(tid), "lost", None, f"lost: node {node.name} removed", now
            )
        del self.nodes[node.id]
        named = self.node_tasks.pop(node.id, None)
        if named:
            # A copy: views may share the set. Only ended tasks are left in it.
            self.removed_node_tasks[node.id] = set(named)
        if not revoke:
            return {"node_id": node.id, "removed": True}
        return {"node_id": node.id, "removed": True, "revoked": nc.revoke_node(self, node.id)}

    def _node(self, a: dict[str, Any]) -> Node:
        node = self.nodes.get(_str(a, "node_id"))
        if node is None:
            raise ArgError("not_found", f"no node {a['node_id']!r}")
        return node

    # -- jobs -----------------------------------------------------------------
    def apply_submit_jobs(
        self, a: dict[str, Any], index: int, version: int = COMMAND_VERSION
    ) -> Result:
        out: list[Result] = []
        for j in a["jobs"]:
            try:
                out.append(self._submit(j, version))
            except ArgError as exc:
                out.append(error(exc.code, str(exc)))
            except SpecError as exc:
                out.append(error("bad_request", str(exc)))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                # One malformed job must not fail the batch after earlier jobs
                # were taken: _submit writes nothing until it cannot fail.
                out.append(error("bad_command", f"malformed job: {type(exc).__name__}: {exc}"))
        return {"results": out}

    def _submit(self, j: dict[str, Any], version: int) -> Result:
        job_id = _str(j, "id")
        if job_id in self.jobs:
            return {"id": job_id}
        spec, stored = validate_stored_spec(j["spec"], version)
        job = Job(
            id=job_id,
            name=str(j.get("name") or spec.argv[0].rsplit("/", 1)[-1])[:128],
            user=_str(j, "user"),
            spec=stored,
            submitted_at=float(j["submitted_at"]),
            retries_left=spec.retries,
            unix_user=validate_unix_user(j["unix_user"]) if j.get("unix_user") else "",
        )
        if spec.workdir is not None and spec.workdir not in self.manifests:
            raise ArgError(
                "bad_request", f"workdir manifest {spec.workdir} is not known to the cluster"
            )
        if (
            version >= 3
            and spec.workdir is not None
            and not j.get("admin")
            and job.user not in self.manifest_owners.get(spec.workdir, ())
        ):
            # Another user's manifest would give this job their files. The
            # same words as for an unknown one: no probe of who uploaded what.
            raise ArgError(
                "bad_request", f"workdir manifest {spec.workdir} is not known to the cluster"
            )
        size = spec_bytes(job.spec)
        self._check_pending_caps(job, j.get("caps"), spec_tasks(job.spec), size)
        job.waiting_on = wl.dependencies(self, job_id, job.spec)
        self.jobs[job_id] = job
        self.spec_sizes[job_id] = size
        acct.job_submitted(self)
        self._pending_changed(job, was_pending=False)
        wl.add_dependents(self, job)
        for t in wl.new_tasks(job_id, job.spec):
            self.tasks[t.id] = t
            job.tasks.append(t.id)
            self.pending[t.id] = None
        self.job_counts[job_id] = {"pending": len(job.tasks)}
        self.note_pending_tasks(job.user, len(job.tasks))
        return {"id": job_id}

    def unset_aside(self, node_id: str, tid: str) -> None:
        """`tid` no longer belongs to the removed node `node_id` (gone by gc,
        or sent to run again): a node that joins again must not get it back."""
        named = self.removed_node_tasks.get(node_id)
        if named is not None:
            named.discard(tid)
            if not named:
                del self.removed_node_tasks[node_id]

    def note_pending_tasks(self, user: str, delta: int) -> None:
        n = self.user_pending_tasks.get(user, 0) + delta
        if n > 0:
            self.user_pending_tasks[user] = n
        else:
            self.user_pending_tasks.pop(user, None)

    def _check_pending_caps(self, job: Job, caps: Any, tasks: int, size: int) -> None:
        """`caps` = [jobs, bytes] or [jobs, bytes, tasks] (0: no cap), decided
        by the proposer from its flags, so every replica refuses the same
        submits. The task cap (command format 4 on) bounds what arrays add:
        each counts as one job however many tasks it has."""
        if caps is None:
            return
        if not (
            isinstance(caps, list)
            and len(caps) in (2, 3)
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in caps)
        ):
            raise ArgError("bad_request", "caps must be [jobs, bytes] or [jobs, bytes, tasks]")
        max_tasks = caps[2] if len(caps) == 3 else 0
        waiting = self.user_pending_tasks.get(job.user, 0)
        if max_tasks and waiting + tasks > max_tasks:
            raise ArgError(
                "pending_limit",
                f"{job.user} has {waiting} tasks waiting to start; this job's {tasks} would "
                f"pass the limit of {max_tasks}; cancel some or wait for them to start",
            )
        max_jobs, max_bytes = caps[0], caps[1]
        n, held = self.user_pending.get(job.user, (0, 0))
        if max_jobs and n + 1 > max_jobs:
            raise ArgError(
                "pending_limit",
                f"{job.user} has {n} jobs waiting to start, the most one user may "
                f"({max_jobs}); cancel some or wait for them to start",
            )
        if max_bytes and held + size > max_bytes:
            raise ArgError(
                "pending_limit",
                f"{job.user}'s waiting jobs hold {held} bytes of specs; this one "
                f"({size} bytes) would pass the limit of {max_bytes}; cancel some or "
                "wait for them to start",
            )

    def _pending_changed(self, job: Job, was_pending: bool) -> None:
        """Keep user_pending in step with a job entering or leaving `pending`."""
        now_pending = job.state == "pending"
        if was_pending == now_pending:
            return
        n, held = self.user_pending.get(job.user, (0, 0))
        size = self.spec_sizes.get(job.id)
        if size is None:
            size = self.spec_sizes[job.id] = spec_bytes(job.spec)
        n, held = (n + 1, held + size) if now_pending else (n - 1, held - size)
        if n > 0:
            self.user_pending[job.user] = (n, held)
        else:
            self.user_pending.pop(job.user, None)

    def apply_cancel_job(self, a: dict[str, Any], index: int) -> Result:
        job = self.jobs.get(_str(a, "job_id"))
        if job is None:
            raise ArgError("not_found", f"no job {a['job_id']!r}")
        if not a.get("admin") and job.user != a.get("user"):
            raise ArgError(
                "forbidden",
                f"job {job.id} belongs to {job.user}; only its owner or an admin can cancel it",
            )
        if job.state in FINAL_JOB_STATES:
            raise ArgError("conflict", f"job {job.id} already {job.state}")
        now = float(a["now"])
        if a.get("index") is not None:
            return self._cancel_index(job, a["index"], str(a.get("user", "?")), now)
        job = self.jobs.writable(job.id)
        was_pending = job.state == "pending"
        job.state = "cancelled"
        self._pending_changed(job, was_pending)
        job.message = f"cancelled by {a.get('user', '?')}"
        for tid in job.tasks:
            state = self.tasks[tid].state
            if state == "pending":
                self.pending.pop(tid, None)
                t = self.tasks.writable(tid)
                tl.set_state(self, t, "cancelled")
                t.finished_at, t.message = now, "cancelled before it started"
            elif state in LIVE_TASK_STATES:
                tl.request_stop(self, self.tasks.writable(tid), "cancel", now)
        tl.refresh_job(self, job, now)
        return {"id": job.id, "state": job.state}

    def _cancel_index(self, job: Job, index: Any, user: str, now: float) -> Result:
        """Cancel one task of an array; the others go on."""
        t = wl.task_of(self, job, index)
        if t.state in FINAL_TASK_STATES:
            raise ArgError("conflict", f"task {index} of job {job.id} already {t.state}")
        if t.state == "pending":
            self.pending.pop(t.id, None)
            t = self.tasks.writable(t.id)
            tl.set_state(self, t, "cancelled")
            t.finished_at = now
            t.message = f"cancelled by {user} before it started"
        elif t.stop is None:
            tl.request_stop(self, self.tasks.writable(t.id), "cancel", now, f"cancelled by {user}")
        tl.refresh_job(self, job, now)
        return {"id": job.id, "index": index, "state": self.tasks[t.id].state}

    def apply_gc_jobs(self, a: dict[str, Any], index: int) -> Result:
        """Forget finished jobs older than `before` (the proposer's clock)."""
        before = float(a["before"])
        gone = [
            j.id
            for j in self.jobs.values()
            # finished_at is set only once every task is final: a cancelled job
            # whose tasks still run keeps them (and their GPUs) until they exit.
            if j.state in FINAL_JOB_STATES and j.finished_at is not None and j.finished_at < before
        ]
        dropped_workdirs: set[str] = set()
        for jid in gone:
            job = self.jobs[jid]
            if job.spec.get("workdir"):
                dropped_workdirs.add(job.spec["workdir"])
            self.job_counts.pop(jid, None)
            self.spec_sizes.pop(jid, None)
            for tid in self.jobs.pop(jid).tasks:
                if self.tasks[tid].state == "pending":  # never: a final job has none
                    self.note_pending_tasks(job.user, -1)
                t = self.tasks.pop(tid)
                self.stopping.pop(tid, None)  # never there: a final job's tasks carry no stop
                if t.node_id is not None:
                    discard_from(self.node_tasks, t.node_id, tid)
                    self.unset_aside(t.node_id, tid)
        # A workdir manifest goes with the last job that used it (never one that
        # no job has used yet: it may be about to be submitted).
        if dropped_workdirs:
            still_used = {j.spec.get("workdir") for j in self.jobs.values()}
            for mid in dropped_workdirs - still_used:
                self.manifests.pop(mid, None)
                self.manifest_owners.pop(mid, None)
        # Join tokens long expired go the same way; usage records only after
        # their own, longer, retention (`usage_before`, when given).
        joins = nc.gc_join_tokens(self, before)
        usage_before = a.get("usage_before")
        days = 0
        if isinstance(usage_before, int | float) and not isinstance(usage_before, bool):
            days = acct.forget_usage_before(self, float(usage_before))
        return {
            "removed": len(gone),
            **({"join_tokens_removed": joins} if joins else {}),
            **({"usage_days_removed": days} if days else {}),
        }

    # -- scheduling -------------------------------------------------------------
    def apply_plan(self, a: dict[str, Any], index: int) -> Result:
        return tl.apply_plan(self, a)

    def apply_task_events(
        self, a: dict[str, Any], index: int, version: int = COMMAND_VERSION
    ) -> Result:
        return tl.apply_task_events(self, a, version)

    def apply_gpu_health(self, a: dict[str, Any], index: int) -> Result:
        return gpuhealth.apply_gpu_health(self, self._node(a), a)

    # -- tokens, members, manifests ----------------------------------------------
    def apply_token_create(self, a: dict[str, Any], index: int) -> Result:
        tid = _str(a, "id")
        if nc.key_in_use(self, tid):
            raise ArgError("conflict", f"token id {tid} exists")
        role = a["role"]
        if role not in ROLES:
            raise ArgError("bad_request", f"role must be one of {', '.join(ROLES)}")
        sealed = a["sealed"]
        if not isinstance(sealed, bytes):
            raise ArgError("bad_request", "sealed token secret must be bytes")
        name = validate_name(a["name"], "token name")
        unix_user = validate_unix_user(a["unix_user"]) if a.get("unix_user") else ""
        self.tokens[tid] = Token(
            id=tid,
            name=name,
            role=role,
            sealed=sealed,
            created_at=float(a["now"]),
            unix_user=unix_user,
        )
        return {"id": tid}

    def apply_token_revoke(self, a: dict[str, Any], index: int) -> Result:
        tok = self.tokens.get(_str(a, "id"))
        if tok is None:
            raise ArgError("not_found", f"no token {a['id']!r}")
        tok = self.tokens.writable(tok.id)
        tok.revoked = True
        return {"id": tok.id, "revoked": True}

    def apply_join_token_create(self, a: dict[str, Any], index: int) -> Result:
        return nc.apply_join_token_create(self, a)

    def apply_join_token_revoke(self, a: dict[str, Any], index: int) -> Result:
        return nc.apply_join_token_revoke(self, a)

    def apply_node_join(self, a: dict[str, Any], index: int) -> Result:
        return nc.apply_node_join(self, a)

    def apply_member_info(self, a: dict[str, Any], index: int) -> Result:
        m = Member(
            raft_addr=_str(a, "raft_addr"),
            rpc_addr=_str(a, "rpc_addr"),
            http_addr=str(a.get("http_addr", "")),
        )
        self.members[m.raft_addr] = m
        return {"ok": True}

    def apply_member_remove(self, a: dict[str, Any], index: int) -> Result:
        self.members.pop(_str(a, "raft_addr"), None)
        return {"ok": True}

    def apply_put_manifest(self, a: dict[str, Any], index: int) -> Result:
        """Commit a workdir manifest for `user` (the same content committed by
        several users is one manifest with several owners)."""
        mid = _str(a, "id")
        if not isinstance(a["manifest"], dict):
            raise ArgError("bad_request", "manifest must be a map")
        user = a.get("user")
        if user is not None:
            user = _str(a, "user")
        self.manifests.setdefault(mid, a["manifest"])
        owners = self.manifest_owners.get(mid, ())
        if user is not None and user not in owners:
            self.manifest_owners[mid] = tuple(sorted({*owners, user}))
        return {"id": mid}

    def apply_restore(self, a: dict[str, Any], index: int) -> Result:
        """Replace the whole state with a snapshot's.

        A snapshot is usually larger than one Raft entry, so it arrives in
        parts ({id, part, parts, sha256, data}) that are staged here, in the
        replicated state (and in snapshots, so a replica that installs one
        mid-restore stages the same bytes), and the state is replaced when
        the last part applies. Journals from before parts hold one entry
        with the whole snapshot ({state}), which still applies as it did.
        """
        if "state" in a:
            data = a["state"]
        else:
            data = self._restore_part(a)
            if data is None:
                return {"id": a["id"], "received": int(a["part"]) + 1, "parts": int(a["parts"])}
        if not isinstance(data, bytes):
            raise ArgError("bad_request", "restore needs snapshot bytes")
        fresh = ClusterState()
        fresh.restore(data)  # raises ValueError on a bad snapshot: an error value, state untouched
        # Every map is replaced by fresh's: views keep the old ones, untouched.
        # Local counters go on from where they were (the scheduler compares
        # epochs, readers compare generations: apply() moves it at the end),
        # and the dedupe table stays.
        fresh_state = dict(fresh.__dict__)
        for local in ("recent", "capacity_epoch", "generation"):
            del fresh_state[local]
        self.__dict__.update(fresh_state)
        self.restoring = None  # a snapshot saved mid-restore brings no parts along
        return {"jobs": len(self.jobs), "nodes": len(self.nodes)}

    def _restore_part(self, a: dict[str, Any]) -> bytes | None:
        """Stage one part of a restore; the whole snapshot once the last is in."""
        rid, part, parts, digest, data = a["id"], a["part"], a["parts"], a["sha256"], a["data"]
        if not (
            isinstance(rid, str)
            and 0 < len(rid) <= 64
            and isinstance(parts, int)
            and isinstance(part, int)
            and 0 <= part < parts <= MAX_RESTORE_PARTS
            and isinstance(digest, str)
            and len(digest) == 64
            and isinstance(data, bytes)
        ):
            raise ArgError("bad_request", "restore part is malformed")
        staged = self.restoring
        if part == 0:
            # A new restore replaces one abandoned halfway.
            staged = {"id": rid, "parts": parts, "sha256": digest, "chunks": []}
        elif (
            staged is None
            or (staged["id"], staged["parts"], staged["sha256"]) != (rid, parts, digest)
            or len(staged["chunks"]) != part
        ):
            raise ArgError(
                "conflict", f"restore {rid}: part {part} out of order; start the restore again"
            )
        # A new dict each time, never an append: views share the old one.
        staged = self.restoring = {**staged, "chunks": [*staged["chunks"], data]}
        if part + 1 < parts:
            return None
        self.restoring = None
        whole = b"".join(staged["chunks"])
        if hashlib.sha256(whole).hexdigest() != digest:
            raise ArgError("bad_request", f"restore {rid}: the parts do not add up to the snapshot")
        return whole

    def apply_noop(self, a: dict[str, Any], index: int) -> Result:
        return {"ok": True}

    # -- views and snapshots -----------------------------------------------------
    def freeze(self, for_snapshot: bool = False) -> StateView:
        """Publish the state as of now as an immutable view (raft/view.py).

        Cheap: a shallow copy of each map written since the last view, none
        when nothing was applied since. Call it where apply cannot run at the
        same time (the apply thread, or holding the apply lock). With
        `for_snapshot` the view also carries the dedupe table, which only
        snapshots need (a copy of its entries).
        """
        v = self._view
        if v is None or v.generation != self.generation or self._maps_changed():
            (
                nodes,
                jobs,
                tasks,
                tokens,
                members,
                join_tokens,
                node_creds,
                manifests,
                counters,
                usage,
                manifest_owners,
                user_pending,
                gpu_owner,
                node_tasks,
                pending,
                stopping,
                node_cred_of,
            ) = frozen_all(self._maps())
            v = self._view = StateView(
                nodes=nodes,
                jobs=jobs,
                tasks=tasks,
                tokens=tokens,
                members=members,
                join_tokens=join_tokens,
                node_creds=node_creds,
                manifests=manifests,
                counters=counters,
                usage=usage,
                manifest_owners=manifest_owners,
                user_pending=user_pending,
                gpu_owner=gpu_owner,
                node_tasks=node_tasks,
                pending=pending,
                stopping=stopping,
                node_cred_of=node_cred_of,
                restoring=self.restoring,
                applied_index=self.applied_index,
                capacity_epoch=self.capacity_epoch,
                generation=self.generation,
                recent=None,
            )
        if not for_snapshot:
            return v
        return StateView(
            **{k: getattr(v, k) for k in StateView.__slots__ if k != "recent"},
            recent=self.recent.frozen(),
        )

    def answered(self, rid: str) -> bool:
        """Whether a command with this request id was applied recently."""
        return rid in self.recent

    def _maps_changed(self) -> bool:
        # Writes outside apply (tests that poke a record map) also count.
        return any(m._changed for m in self._maps())

    def _maps(self) -> tuple[CowMap[Any, Any], ...]:
        maps: tuple[CowMap[Any, Any], ...] = _MAPS(self)
        return maps

    def snapshot(self) -> bytes:
        return self.freeze(for_snapshot=True).encode()

    def restore(self, data: bytes) -> None:
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if not isinstance(obj, dict) or obj.get("v") not in READABLE_SNAPSHOT_VERSIONS:
                raise ValueError("not a leptond state snapshot of a known version")
            nodes = {n["id"]: Node.from_wire(n) for n in obj["nodes"]}
            jobs = {j["id"]: Job.from_wire(j) for j in obj["jobs"]}
            tasks = {t["id"]: Task.from_wire(t) for t in obj["tasks"]}
            tokens = {t["id"]: Token.from_wire(t) for t in obj["tokens"]}
            members = {m["raft_addr"]: Member.from_wire(m) for m in obj["members"]}
            joins = {j["id"]: JoinToken.from_wire(j) for j in obj.get("join_tokens") or []}
            creds = {c["id"]: NodeCredential.from_wire(c) for c in obj.get("node_creds") or []}
            recent = RecentResults.from_wire(obj["recent"])
            manifests = dict(obj.get("manifests") or {})
            # Snapshots from before accounting have neither: both start empty.
            counters = {str(k): v for k, v in (obj.get("counters") or {}).items()}
            if not all(isinstance(v, int | float) for v in counters.values()):
                raise ValueError("counters must be numbers")
            usage = {(u.user, u.day): u for u in map(UsageDay.from_wire, obj.get("usage") or [])}
            if not all(isinstance(u, str) and isinstance(d, int) for u, d in usage):
                raise ValueError("usage records need a user name and a day number")
            owners = {
                str(k): tuple(sorted(str(u) for u in v))
                for k, v in (obj.get("manifest_owners") or {}).items()
                if k in manifests and isinstance(v, list | tuple)
            }
            applied_index = int(obj.get("applied_index", 0))
            restoring = obj.get("restoring")
            if restoring is not None and not (
                isinstance(restoring, dict) and isinstance(restoring.get("chunks"), list)
            ):
                raise ValueError("bad staged restore")
            for n in nodes.values():
                # Snapshots from before drain_reason: a draining node's drain
                # is the one its reason names.
                if n.state == "draining" and n.drain_reason is None:
                    n.drain_reason = n.reason
            for t in tasks.values():
                # Snapshots from before ended tasks dropped their stop.
                if t.state in FINAL_TASK_STATES:
                    t.stop = None
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
            raise ValueError(f"bad state snapshot: {exc}") from None
        # The dicts built here become the maps' first bases (CowMap.adopt).
        self.nodes, self.jobs, self.tasks = _cow(nodes), _cow(jobs), _cow(tasks)
        self.tokens, self.members = _cow(tokens), _cow(members)
        self.join_tokens, self.node_creds = _cow(joins), _cow(creds)
        self.manifests = CowMap.adopt(manifests)
        self.counters = CowMap.adopt(counters)
        self.usage = _cow(usage)
        self.manifest_owners = CowMap.adopt(owners)
        self.recent = recent
        self.restoring = restoring
        self.applied_index = applied_index
        self._reindex()
        self.generation += 1

    def _reindex(self) -> None:
        nc.reindex(self)
        gpu_owner: dict[tuple[str, int], str] = {}
        node_tasks: dict[str, set[str]] = {nid: set() for nid in self.nodes}
        pending: dict[str, None] = {}
        stopping: dict[str, None] = {}
        user_pending: dict[str, tuple[int, int]] = {}
        self.dependents = {}
        self.removed_node_tasks = {}
        self.job_counts = {}
        self.user_pending_tasks = {}
        self.spec_sizes = {}
        for t in self.tasks.values():
            counts = self.job_counts.setdefault(t.job_id, {})
            counts[t.state] = counts.get(t.state, 0) + 1
            if t.state == "pending" and t.job_id in self.jobs:
                self.note_pending_tasks(self.jobs[t.job_id].user, 1)
        for j in self.jobs.values():
            wl.add_dependents(self, j)
            if j.state == "pending":
                n, held = user_pending.get(j.user, (0, 0))
                user_pending[j.user] = (n + 1, held + spec_bytes(j.spec))
        for t in self.tasks.values():
            if t.state == "pending":
                pending[t.id] = None
            if t.stop is not None:
                stopping[t.id] = None
            if t.node_id is not None and t.node_id in node_tasks:
                node_tasks[t.node_id].add(t.id)
            elif t.node_id is not None:
                self.removed_node_tasks.setdefault(t.node_id, set()).add(t.id)
            if t.state in LIVE_TASK_STATES and t.node_id is not None:
                for g in t.gpus:
                    gpu_owner[(t.node_id, g)] = t.id
        self.gpu_owner = CowMap.adopt(gpu_owner)
        self.node_tasks = CowMap.adopt(node_tasks, clone=set.copy)
        self.pending = CowMap.adopt(pending)
        self.stopping = CowMap.adopt(stopping)
        self.user_pending = CowMap.adopt(user_pending)

    def digest(self) -> bytes:
        """A canonical encoding for comparing replicas in tests."""
        return self.snapshot()


# Every map of the state, in the order freeze() takes them (one C call).
_MAPS = attrgetter(
    "nodes",
    "jobs",
    "tasks",
    "tokens",
    "members",
    "join_tokens",
    "node_creds",
    "manifests",
    "counters",
    "usage",
    "manifest_owners",
    "user_pending",
    "gpu_owner",
    "node_tasks",
    "pending",
    "stopping",
    "node_cred_of",
)


def _cow(records: dict[Any, Any]) -> CowMap[Any, Any]:
    # The method itself, not a lambda around it: one call less per copy.
    return CowMap.adopt(records, clone=Record.clone)


def _str(d: dict[str, Any], key: str) -> str:
    v = d[key]
    if not isinstance(v, str) or not v or len(v) > 256:
        raise ArgError("bad_request", f"{key} must be a non-empty string")
    return v


def _int64(v: Any) -> int:
    """int(v) that msgpack can pack again: int(1e300) would make snapshot() raise."""
    out = int(v)
    if not -(2**63) <= out < 2**63:
        raise ValueError(f"number {v!r} out of range")
    return out


def _gpu(g: Any) -> dict[str, Any]:
    return {
        "index": _int64(g["index"]),
        "uuid": str(g.get("uuid", "")),
        "model": str(g.get("model", "")),
        "mem_bytes": _int64(g.get("mem_bytes", 0)),
        "domain": _int64(g.get("domain", -1)),
    }


# Ops whose apply takes the command's format version: those that validate
# with limits a release may change (raft/validate.py).
VERSIONED_OPS = frozenset({"submit_jobs", "register_node", "task_events"})
CAPACITY_OPS = frozenset(
    {
        "register_node",
        "node_state",
        "node_down",
        "remove_node",
        "cancel_job",
        "restore",
        "gpu_health",
    }
)
OPS = frozenset(
    {
        "register_node",
        "node_state",
        "node_labels",
        "drain_expired",
        "node_down",
        "remove_node",
        "submit_jobs",
        "cancel_job",
        "gc_jobs",
        "plan",
        "task_events",
        "token_create",
        "token_revoke",
        "join_token_create",
        "join_token_revoke",
        "node_join",
        "member_info",
        "member_remove",
        "put_manifest",
        "restore",
        "gpu_health",
        "noop",
    }
)
# The method that applies each op, named once rather than per command.
_HANDLERS = {op: f"apply_{op}" for op in OPS}
_ = NODE_STATES
