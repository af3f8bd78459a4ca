"""Task lifecycle inside apply: placement, exits, retries, gangs, job states.

Invariant (DESIGN §7), enforced here at apply time whatever the plan says:
no GPU is held by two live tasks, and no node goes over its CPUs or memory.

Copy on write (raft/cow.py): every function here that changes a task takes
the writable one from `s.tasks.writable` first, and re-reads a job by id
after calls that may have changed it, so published views never change.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from . import accounting
from . import workloads as wl
from .cow import add_to, discard_from
from .model import FINAL_TASK_STATES, LIVE_TASK_STATES, Job, Task

if TYPE_CHECKING:
    from .state import ClusterState


def set_state(s: ClusterState, t: Task, state: str) -> None:
    """The one way apply changes a task's state: it keeps the count of its
    job's tasks in each state (ClusterState.job_counts) in step, so an
    array's state is known without looking at every task.

    The cumulative counters (raft/accounting.py) are not kept here: they
    need to know why (an attempt's end reason, its times), so the callers
    that know it count each event once, next to their set_state."""
    counts = s.job_counts.get(t.job_id)
    if counts is not None:
        counts[t.state] = counts.get(t.state, 0) - 1
        counts[state] = counts.get(state, 0) + 1
    if (t.state == "pending") != (state == "pending"):
        s.note_pending_tasks(s.jobs[t.job_id].user, 1 if state == "pending" else -1)
    t.state = state


def note_stop(s: ClusterState, t: Task) -> None:
    """Keep ClusterState.stopping in step with `t.stop`: every write of a
    task's stop is followed by this, so the leader finds the stops to push
    without a look at every node's tasks."""
    if t.stop is None:
        s.stopping.pop(t.id, None)
    elif t.id not in s.stopping:
        s.stopping[t.id] = None


def apply_plan(s: ClusterState, a: dict[str, Any]) -> dict[str, Any]:
    now = float(a["now"])
    _check_plan_shape(a)  # a malformed plan applies nothing, not its first half
    placed: list[str] = []
    dropped: list[dict[str, str]] = []
    preempting: list[str] = []
    for p in a.get("preemptions", []):
        t = s.tasks.get(str(p["task_id"]))
        if t is None or t.state not in LIVE_TASK_STATES or t.stop is not None:
            continue
        if s.jobs[t.job_id].spec.get("preemptible") is False:
            continue
        preempting.append(t.id)
        accounting.preempted(s)
        evict(s, t, "preempt", f"{PREEMPTED_FOR}{p.get('for_task', '?')}", now)
    # Group placements by job so a gang is placed whole or not at all; the
    # tasks of an array are placed one by one.
    by_job: dict[str, list[dict[str, Any]]] = {}
    for p in a.get("placements", []):
        t = s.tasks.get(str(p["task_id"]))
        if t is None:
            dropped.append({"task_id": str(p["task_id"]), "reason": "no such task"})
            continue
        by_job.setdefault(t.id if wl.is_array(s.jobs[t.job_id]) else t.job_id, []).append(p)
    live: dict[str, int] = {}  # live tasks of each array with a max_running
    for group in by_job.values():
        job = s.jobs[s.tasks[str(group[0]["task_id"])].job_id]
        reason = _check_group(s, job, group) or _over_max_running(s, job, live)
        if reason:
            dropped.extend({"task_id": str(p["task_id"]), "reason": reason} for p in group)
            continue
        for p in group:
            t = s.tasks.writable(str(p["task_id"]))
            node_id = str(p["node_id"])
            gpus = [int(g) for g in p["gpus"]]
            set_state(s, t, "assigned")
            t.node_id, t.gpus = node_id, gpus
            t.attempt += 1
            t.assigned_at, t.started_at, t.finished_at = now, None, None
            t.exit_code, t.message, t.stop = None, "", None
            note_stop(s, t)
            s.pending.pop(t.id, None)
            add_to(s.node_tasks, node_id, t.id)
            for g in gpus:
                s.gpu_owner[(node_id, g)] = t.id
            placed.append(t.id)
        if job.id in live:
            live[job.id] += 1
        refresh_job(s, job, now)
    return {"placed": placed, "dropped": dropped, "preempting": preempting}


def _over_max_running(s: ClusterState, job: Job, live: dict[str, int]) -> str:
    """Why one more task of this array cannot start ('' when it can): the
    scheduler keeps to --max-running, and apply checks it again."""
    limit = job.spec.get("max_running")
    if limit is None:
        return ""
    if job.id not in live:
        live[job.id] = wl.array_live(s, job)
    if live[job.id] >= limit:
        return f"array limit: {live[job.id]} of its tasks are running (--max-running {limit})"
    return ""


def _check_plan_shape(a: dict[str, Any]) -> None:
    """Raise on a placement or preemption that would fail halfway through apply.

    Values that are merely wrong (an unknown node, a GPU list of the wrong
    length) are not malformed: they drop their placement with a reason.
    """
    preemptions, placements = a.get("preemptions", []), a.get("placements", [])
    if not isinstance(preemptions, list) or not isinstance(placements, list):
        raise ValueError("plan preemptions and placements must be lists")
    for p in preemptions + placements:
        if not isinstance(p, dict) or "task_id" not in p:
            raise ValueError("plan entries must be maps with a task_id")
    for p in placements:
        gpus = p.get("gpus")
        if "node_id" not in p or not isinstance(gpus, list):
            raise ValueError("plan placements need a node_id and a list of gpus")
        if any(isinstance(g, list | dict) for g in gpus):
            raise ValueError("plan placement gpus must be GPU indexes")


def _check_group(s: ClusterState, job: Job, group: list[dict[str, Any]]) -> str:
    """Why this job's placements cannot apply now ('' when they can)."""
    if job.state not in ("pending", "running"):
        return f"job is {job.state}"
    nodes_used: set[str] = set()
    claimed: dict[str, tuple[set[int], float, int]] = {}
    gang = int(job.spec.get("nodes", 1)) > 1
    if len({str(p["task_id"]) for p in group}) != len(group):
        return "a task is placed twice in one plan"
    if gang:
        pending_ranks = {tid for tid in job.tasks if s.tasks[tid].state == "pending"}
        if {str(p["task_id"]) for p in group} != pending_ranks or len(pending_ranks) != len(
            job.tasks
        ):
            return "a gang is placed whole or not at all"
    for p in group:
        t = s.tasks[str(p["task_id"])]
        if t.state != "pending":
            return f"task {t.id} is {t.state}"
        node = s.nodes.get(str(p["node_id"]))
        if node is None or node.state != "ready":
            return "node is not ready"
        if gang and node.id in nodes_used:
            return "gang tasks need distinct nodes"
        nodes_used.add(node.id)
        gpus = p["gpus"]
        if (
            not isinstance(gpus, list)
            or len(set(gpus)) != len(gpus)
            or len(gpus) != int(job.spec.get("gpus", 0))
        ):
            return "wrong GPU list"
        valid = {g["index"] for g in node.gpus}
        broken = {int(f["index"]) for f in node.gpu_faults}
        if node.id not in claimed:
            claimed[node.id] = s.node_usage(node.id)
        held, cpus, mem = claimed[node.id]
        for g in gpus:
            if g not in valid:
                return f"node {node.name} has no GPU {g}"
            if g in broken:
                return f"GPU {g} on {node.name} is unhealthy"
            if g in held:
                return f"GPU {g} on {node.name} is taken"
        if cpus + t.cpus > node.cpus + 1e-9 or mem + t.mem_bytes > node.mem_bytes:
            return f"node {node.name} lacks CPUs or memory"
        claimed[node.id] = (held | set(gpus), cpus + t.cpus, mem + t.mem_bytes)
    return ""


# A task that exits with this code asks to run again from its checkpoint: it
# goes back to pending without spending a retry (command format 4 on), as
# does one that exits 0 after a warning signal (an event's `warned`).
REQUEUE_EXIT = 85
REQUEUE_SINCE_VERSION = 4
# From this command version on, an exit event with `lost: true` (its shim
# killed it when the node's lease ran out on the host, agent/lease.py) ends
# the attempt `lost`, as a node declared down does: the node failed it, not
# the task. Earlier commands applied such an event as a plain failure.
LOST_SINCE_VERSION = 5
# Requeues a task may ask for; past it, exit 85 is a failure like any other,
# so a task that always asks cannot hold its resources forever.
MAX_RESTARTS = 1000


def apply_task_events(s: ClusterState, a: dict[str, Any], version: int) -> dict[str, Any]:
    applied = 0
    stale = 0
    ended = False
    # The proposer's clock (the leader's): the job's times follow it, not the
    # host's, which may be far off. A job finished by a host clock an hour
    # slow would otherwise be collected an hour early (gc_jobs goes by the
    # leader's clock). Commands from before `now` carry none.
    now = None if a.get("now") is None else float(a["now"])
    # Convert every event before applying any: a malformed one applies none.
    events = [(ev, *_event_fields(ev)) for ev in a["events"]]
    for ev, task_id, attempt, at, code in events:
        when = at if now is None else now
        t = s.tasks.get(task_id)
        # Events from an earlier attempt or another node are stale: ignore.
        if t is None or t.attempt != attempt or t.node_id != ev.get("node_id", t.node_id):
            stale += 1
            continue
        kind = ev["state"]
        if kind == "running":
            if t.state == "assigned":
                t = s.tasks.writable(task_id)
                set_state(s, t, "running")
                t.started_at = at
                accounting.task_started(s, t, s.jobs[t.job_id], at)
                refresh_job(s, s.jobs[t.job_id], when)
                applied += 1
        elif kind == "exited":
            if t.state in LIVE_TASK_STATES:
                outcome = "succeeded" if code == 0 else "failed"
                if code != 0 and version >= LOST_SINCE_VERSION and ev.get("lost") is True:
                    outcome = "lost"
                asked = version >= REQUEUE_SINCE_VERSION and (
                    code == REQUEUE_EXIT or (code == 0 and ev.get("warned") is True)
                )
                msg = str(ev.get("message", ""))[:1024]
                task_exited(s, t, outcome, code, msg, when, at=at, requeue=asked)
                applied += 1
                ended = True
        else:
            stale += 1
    if ended:
        # Only an end frees room (ClusterState.capacity_epoch): a start, the
        # bulk of these commands, leaves what did not fit before unplaceable.
        s.capacity_epoch += 1
    return {"applied": applied, "stale": stale}


def _event_fields(ev: dict[str, Any]) -> tuple[str, int, float, int | None]:
    """task_id, attempt, at and exit_code of one event; raises when malformed."""
    code = None if ev.get("exit_code") is None else int(ev["exit_code"])
    if code is not None and not -(2**63) <= code < 2**63:  # int(1e300) breaks snapshot()
        raise ValueError("exit_code out of range")
    if "state" not in ev:
        raise KeyError("state")
    at = float(ev["at"])
    if not math.isfinite(at):
        raise ValueError("event time must be finite")
    return str(ev["task_id"]), int(ev["attempt"]), at, code


def _release(s: ClusterState, t: Task) -> None:
    if t.node_id is not None:
        for g in t.gpus:
            if s.gpu_owner.get((t.node_id, g)) == t.id:
                del s.gpu_owner[(t.node_id, g)]


def _requeue(s: ClusterState, t: Task, message: str) -> None:
    t = s.tasks.writable(t.id)
    _release(s, t)
    if t.node_id is not None:
        discard_from(s.node_tasks, t.node_id, t.id)
        # An ended task of a removed node can run again (a gang restarting
        # its ranks that had succeeded): it is that node's no more.
        s.unset_aside(t.node_id, t.id)
    accounting.rescheduled(s)
    set_state(s, t, "pending")
    t.node_id, t.gpus, t.stop = None, [], None
    note_stop(s, t)
    t.message = message
    s.pending[t.id] = None


# The message of a task a preemption stops, before the preemptor's id.
PREEMPTED_FOR = "preempted for "


def preempted_for(t: Task) -> str | None:
    """The task a live task stops for, while a preemption stops it: what a
    new leader learns of the preemptions an earlier one left under way."""
    if t.stop != "preempt" or not t.message.startswith(PREEMPTED_FOR):
        return None
    return t.message[len(PREEMPTED_FOR) :]


# Stops that are no fault of the task: it goes back to pending without spending
# a retry, and the rest of its gang restarts with it. "gpu": one of its GPUs
# was found faulty (raft/gpuhealth.py).
REQUEUE_STOPS = frozenset({"preempt", "drain", "shrink", "gpu"})


def evict(s: ClusterState, t: Task, how: str, message: str, now: float) -> None:
    """Ask for a live task to stop for `how` (one of REQUEUE_STOPS)."""
    t = s.tasks.writable(t.id)
    t.message = message
    request_stop(s, t, how, now)


def request_stop(s: ClusterState, t: Task, how: str, now: float, message: str = "") -> None:
    """Ask for a live task to stop for `how` (cancel, gang or one of REQUEUE_STOPS).

    A running task is stopped by its agent: the dispatcher pushes the stop
    (SIGTERM, then SIGKILL after the kill grace) and its exit comes back
    through task_exited. An assigned task has not started as far as the state
    knows, and may never: its agent may not have got it, may get it only after
    the stop (the dispatcher never starts a task with a stop), or may be down.
    No exit would come back for it, so it ends here, as if it had exited
    before it started. Should its agent be starting it at this very moment,
    that run is no live task of the node any more: the agent's next heartbeat
    reconcile stops it, and its events are stale (another attempt or node) or
    land on a finished task, which ignores them.
    """
    t = s.tasks.writable(t.id)
    t.stop = how
    note_stop(s, t)
    if t.state == "assigned":
        task_exited(s, t, "failed", None, message, now, started=False)


def task_exited(
    s: ClusterState,
    t: Task,
    outcome: str,
    code: int | None,
    message: str,
    now: float,
    started: bool = True,
    at: float | None = None,
    requeue: bool = False,
) -> None:
    """A live task stopped (or was lost). Decide its next state and its job's.

    started=False: a stop ended it before it started (see request_stop).
    `at`: when it ended by its host's clock (an exit the agent reported);
    everything else, the job's times included, goes by `now`.
    requeue: it asked to run again from its checkpoint (REQUEUE_EXIT, or
    exit 0 after a warning signal); it does, unless a stop says otherwise.
    """
    t = s.tasks.writable(t.id)
    job = s.jobs[t.job_id]
    stop = t.stop
    how = f"(exit {code})" if started else "before it started"
    t.exit_code, t.finished_at = code, now if at is None else at
    going_on = job.state not in ("cancelled", "failed")
    asked = requeue and stop is None and going_on and t.restarts < MAX_RESTARTS
    # Each attempt that ends is counted once, by the reason it ended, and
    # its run charged, before the branches below decide what comes next.
    if asked:
        reason = "requeued"
    elif stop in REQUEUE_STOPS and going_on:
        reason = "preempted" if stop == "preempt" else "evicted"
    elif stop == "gang" and going_on:
        reason = "evicted"
    elif stop == "cancel" or job.state == "cancelled":
        reason = "cancelled"
    else:
        reason = accounting.end_reason(stop, outcome, message)
    # The run is charged from its start to its end by its host's clock.
    accounting.attempt_ended(s, t, job, reason, t.finished_at)
    job = s.jobs[t.job_id]  # charging the run may have copied it
    if asked:
        t.restarts += 1
        why = f"exit {code}" if code != 0 else "exit 0 after the warning signal"
        _requeue(s, t, f"asked to run again ({why}); waiting to run again")
        _stop_gang(s, job, t, "gang", now)
    elif stop in REQUEUE_STOPS and job.state not in ("cancelled", "failed"):
        t.restarts += 1
        if stop == "preempt":
            t.preemptions += 1
            note = f"preempted {how}"
        elif stop == "drain":
            node = s.nodes.get(t.node_id or "")
            where = node.name if node is not None else t.node_id
            note = f"stopped at the drain deadline of node {where} {how}"
        elif stop == "gpu":
            note = f"stopped {how}: {t.message or 'a GPU of its node became unhealthy'}"
        else:
            note = message
        _requeue(s, t, f"{note}; waiting to run again")
        _stop_gang(s, job, t, "gang", now)
    elif stop == "gang" and job.state not in ("cancelled", "failed"):
        _requeue(s, t, "restarting with its gang")
    elif stop == "cancel" or job.state == "cancelled":
        _release(s, t)
        set_state(s, t, "cancelled")
        t.message = message or ("cancelled" if started else "cancelled before it started")
    elif outcome == "succeeded":
        _release(s, t)
        set_state(s, t, "succeeded")
        t.message = message
    elif wl.is_array(job) and t.retries_used < int(job.spec.get("retries", 0)):
        # An array's retries are per task: one bad index spends its own.
        t.retries_used += 1
        left = int(job.spec.get("retries", 0)) - t.retries_used
        _requeue(s, t, f"{outcome}: {message or f'exit {code}'}; retrying ({left} retries left)")
    elif not wl.is_array(job) and job.retries_left > 0 and job.state not in ("cancelled", "failed"):
        job = s.jobs.writable(job.id)
        job.retries_left -= 1
        _requeue(
            s,
            t,
            f"{outcome}: {message or f'exit {code}'}; retrying ({job.retries_left} retries left)",
        )
        _stop_gang(s, job, t, "gang", now)
    else:
        _release(s, t)
        set_state(s, t, outcome)
        t.message = message
        _stop_gang(s, job, t, "cancel", now)
    if t.state in FINAL_TASK_STATES:
        # An ended task has nothing left to stop: a stop is a request to a live
        # task, and one left behind would read "stopping" forever (DESIGN §6).
        # Nothing reads the stop of an ended task, so no decision changes.
        t.stop = None
        note_stop(s, t)
    refresh_job(s, job, now)


def _stop_gang(s: ClusterState, job: Job, failed: Task, how: str, now: float) -> None:
    """When one rank of a gang fails, the other ranks stop (and restart with it).

    A gang is placed only when every rank is pending, so on a restart ("gang")
    ranks that already succeeded run again too; otherwise the job never runs.
    The tasks of an array are no gang: each goes its own way.
    """
    if int(job.spec.get("nodes", 1)) <= 1:
        return
    for tid in job.tasks:
        if tid == failed.id:
            continue
        other = s.tasks[tid]
        if other.state in LIVE_TASK_STATES and other.stop is None:
            # An assigned rank ends at once (requeued or cancelled): no
            # further _stop_gang, as only gang and cancel stops reach here.
            request_stop(s, other, how, now, f"gang member {failed.rank} failed")
        elif other.state == "pending" and how == "cancel":
            s.pending.pop(tid, None)
            other = s.tasks.writable(tid)
            set_state(s, other, "cancelled")
            other.message = f"gang member {failed.rank} failed"
        elif other.state == "succeeded" and how == "gang":
            _requeue(s, other, f"restarting with its gang (rank {failed.rank} stopped)")


_FAILED = frozenset({"failed", "lost"})
_SUCCEEDED = frozenset({"succeeded"})
_PENDING = frozenset({"pending"})


def refresh_job(s: ClusterState, job: Job, now: float) -> None:
    """Bring the job's state in line with its tasks' states.

    Reads the job afresh by id (the one passed may be a copy that a nested
    call has since replaced) and writes it only when something changes."""
    job = s.jobs[job.id]
    state, message, finished_at = job.state, job.message, job.finished_at
    array = wl.is_array(job)
    # The set of states its tasks are in: which states, not how many, decide.
    if array:
        # A count per state, not a look at each of (maybe) 100,000 tasks.
        states = {st for st, n in s.job_counts.get(job.id, {}).items() if n > 0}
    else:
        tasks = s.tasks
        states = {tasks[tid].state for tid in job.tasks}
    if state == "cancelled":
        if states <= FINAL_TASK_STATES and finished_at is None:
            finished_at = now
    elif array:
        state, message = wl.array_outcome(s, job)
        if state in ("succeeded", "failed", "cancelled"):
            finished_at = finished_at or now
    else:
        if not states.isdisjoint(_FAILED):
            state = "failed"
            failed = [s.tasks[tid] for tid in job.tasks if s.tasks[tid].state in _FAILED]
            message = f"task {failed[0].rank} {failed[0].state}: {failed[0].message}"[:1024]
        elif states <= _SUCCEEDED:
            state = "succeeded"
        elif not states.isdisjoint(LIVE_TASK_STATES):
            state = "running"
        elif states <= _PENDING:
            state = "pending"
        if state in ("succeeded", "failed") and states <= FINAL_TASK_STATES:
            finished_at = finished_at or now
    if (state, message, finished_at) != (job.state, job.message, job.finished_at):
        was_pending = job.state == "pending"
        job = s.jobs.writable(job.id)
        ended = job.finished_at is None and finished_at is not None
        job.state, job.message, job.finished_at = state, message, finished_at
        if ended:
            accounting.job_ended(s, job, now)
        s._pending_changed(job, was_pending)
        if ended:
            wl.release_dependents(s, job.id, now)
