"""What readers make of a state view: scheduler inputs and what people see.

They read an immutable StateView (raft/view.py), with no lock held; the
results are plain values.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import scheduler as sch
from raft import arrays
from raft.commands import encoded_size
from raft.model import LIVE_TASK_STATES, Job, Node, Task
from raft.tasks import REQUEUE_EXIT
from raft.view import StateView


def node_view(
    n: Node, cached: frozenset[str] = frozenset(), with_faulty: bool = False
) -> sch.NodeView:
    """The node as the scheduler sees it: without its unhealthy GPUs, which
    take no work (`with_faulty`: with them, for "could this ever fit")."""
    faulty = set() if with_faulty or not n.gpu_faults else {int(f["index"]) for f in n.gpu_faults}
    return sch.NodeView(
        node_id=n.id,
        name=n.name,
        cpus=n.cpus,
        mem_bytes=n.mem_bytes,
        gpus=tuple([_gpu(g) for g in n.gpus if g["index"] not in faulty]),
        labels=dict(n.effective_labels()),
        schedulable=n.state == "ready",
        cached_blocks=cached,
    )


# GPUs as the scheduler sees them, by what they are made of: a view is made
# of a node's record again at each change of the record (a heartbeat's time,
# a state) and at each submit that checks it could ever fit, and a frozen
# dataclass costs far more to make than a look-up. Immutable, so shared.
# Bounded: cleared whole when full (several GPUs for each of 10,000 nodes fit).
_GPUS: dict[tuple[int, str, str, int, int], sch.Gpu] = {}
_MAX_GPUS = 1 << 18


def _gpu(g: dict[str, Any]) -> sch.Gpu:
    # raft/validate.py makes index, memory and domain ints and the rest
    # strings, so equal keys make equal Gpus.
    key = (g["index"], g["uuid"], g["model"], g["mem_bytes"], g.get("domain", -1))
    hit = _GPUS.get(key)
    if hit is None:
        if len(_GPUS) >= _MAX_GPUS:
            _GPUS.clear()
        hit = _GPUS[key] = sch.Gpu(*key)
    return hit


class InputCache:
    """Scheduler inputs kept from one pass to the next while the records they
    were made from are the same objects.

    A record a published view holds is never changed again (raft/cow.py:
    apply changes a copy), so a task, job or node that is still the very
    object it was is unchanged, and so is what was made from it. Only what
    the last pass saw is kept."""

    def __init__(self) -> None:
        self.nodes: dict[str, tuple[Node, frozenset[str], sch.NodeView]] = {}
        self.allocs: dict[str, tuple[Task, Job, sch.Allocation]] = {}
        self.requests: dict[str, tuple[Task, Job, frozenset[str], sch.TaskRequest]] = {}
        # Ids in `requests` whose job has no --max-running.
        self.plain: set[str] = set()


def scheduler_inputs(
    s: StateView,
    cached: dict[str, frozenset[str]] | None = None,
    block_sets: dict[str, frozenset[str]] | None = None,
    skip: set[str] | frozenset[str] = frozenset(),
    cache: InputCache | None = None,
    held: dict[str, str] | None = None,
) -> tuple[list[sch.NodeView], list[sch.Allocation], list[sch.TaskRequest]]:
    """What the scheduler decides on. Pending tasks it may not place yet are
    left out: those of a job waiting for others (raft/workloads.py), and
    those of an array over its --max-running; `held` gets their reasons."""
    cached = cached or {}
    block_sets = block_sets or {}
    c = cache or InputCache()
    no_blocks: frozenset[str] = frozenset()
    nodes: list[sch.NodeView] = []
    node_seen: dict[str, tuple[Node, frozenset[str], sch.NodeView]] = {}
    for n in s.nodes.values():
        blocks = cached.get(n.id, no_blocks)
        hit = c.nodes.get(n.id)
        if hit is None or hit[0] is not n or hit[1] != blocks:
            view = node_view(n, blocks)
            if hit is not None and hit[2] == view:
                # A new record (a heartbeat's time, a reason) the scheduler
                # sees as before: the same view object, which the scheduler
                # keeps what it took from nodes by (scheduler/cluster.py).
                view = hit[2]
            hit = (n, blocks, view)
        node_seen[n.id] = hit
        nodes.append(hit[2])
    live_of: dict[str, int] = {}  # live tasks per job
    allocs: list[sch.Allocation] = []
    alloc_seen: dict[str, tuple[Task, Job, sch.Allocation]] = {}
    # Per task of every node (ended ones too, until they are forgotten):
    # the maps and look-ups read once, outside the loop.
    tasks, jobs, kept_alloc, live = s.tasks, s.jobs, c.allocs.get, LIVE_TASK_STATES
    for tids in s.node_tasks.values():
        for tid in tids:
            t = tasks[tid]
            if t.state in live and t.node_id is not None:
                job = jobs[t.job_id]
                live_of[t.job_id] = live_of.get(t.job_id, 0) + 1
                a = kept_alloc(tid)
                if a is None or a[0] is not t or a[1] is not job:
                    a = (t, job, _allocation(t, job))
                alloc_seen[tid] = a
                allocs.append(a[2])
    pending: list[sch.TaskRequest] = []
    request_seen: dict[str, tuple[Task, Job, frozenset[str], sch.TaskRequest]] = {}
    room: dict[str, int] = {}  # tasks each limited array may still start
    # An incremental pass skips what did not fit last time. With tens of
    # thousands pending and a pass per submit batch, even a cheap look at each
    # skipped task was most of the leader's CPU, so those that need no look
    # are dropped by set operations first: a skipped task was offered before,
    # so it waits on no job (waiting_on is set at submit and only shrinks),
    # and unless its job is an array with --max-running (counted below, in
    # its place in the order) nothing about it is needed here.
    fast = skip & c.plain if skip else set()
    order: Iterable[str] = [t for t in s.pending if t not in fast] if fast else s.pending
    plain_seen: set[str] = set()
    kept_request = c.requests.get
    for tid in order:
        t = tasks[tid]
        job = jobs[t.job_id]
        if job.state not in ("pending", "running"):
            continue
        if job.waiting_on:
            if held is not None:
                held[tid] = waiting_reason(job)
            continue
        limit = job.spec.get("max_running")
        if limit is not None:
            left = room.setdefault(job.id, limit - live_of.get(job.id, 0))
            if left <= 0:
                if held is not None:
                    held[tid] = (
                        f"array limit: {live_of.get(job.id, 0)} of its tasks are running "
                        f"(--max-running {limit})"
                    )
                continue
            room[job.id] = left - 1
        if tid in skip:
            continue
        blocks = (
            block_sets.get(str(job.spec.get("workdir")), no_blocks) if block_sets else no_blocks
        )
        r = kept_request(tid)
        if r is None or r[0] is not t or r[1] is not job or r[2] != blocks:
            r = (t, job, blocks, _request(t, job, blocks))
        request_seen[tid] = r
        if limit is None:
            plain_seen.add(tid)
        pending.append(r[3])
    if cache is not None:
        cache.nodes, cache.allocs = node_seen, alloc_seen
        # Skipped tasks stay: the next full pass wants them again. (Updated in
        # place: a copy per incremental pass would be O(pending) again.)
        if skip:
            cache.requests.update(request_seen)
            cache.plain |= plain_seen
        else:
            cache.requests, cache.plain = request_seen, plain_seen
    return nodes, allocs, pending


def waiting_reason(job: Job) -> str:
    """The pending reason of a job waiting for others: the first one named."""
    dep = job.waiting_on[0]
    how = "succeed" if dep in (job.spec.get("after_ok") or ()) else "end"
    more = f" (and {len(job.waiting_on) - 1} more)" if len(job.waiting_on) > 1 else ""
    return f"waiting for job {dep} to {how}{more}"


def _allocation(t: Task, job: Job) -> sch.Allocation:
    assert t.node_id is not None
    return sch.Allocation(
        task_id=t.id,
        job_id=t.job_id,
        user=job.user,
        node_id=t.node_id,
        gpus=tuple(t.gpus),
        cpus=t.cpus,
        mem_bytes=t.mem_bytes,
        priority=t.priority,
        started_at=t.started_at or t.assigned_at or 0.0,
        preemptible=bool(job.spec.get("preemptible", True)) and t.stop is None,
    )


def _request(t: Task, job: Job, blocks: frozenset[str]) -> sch.TaskRequest:
    sp = job.spec
    return sch.TaskRequest(
        task_id=t.id,
        job_id=job.id,
        user=job.user,
        priority=t.priority,
        submitted_at=job.submitted_at,
        gpus=int(sp.get("gpus", 0)),
        cpus=t.cpus,
        mem_bytes=t.mem_bytes,
        gpu_type=sp.get("gpu_type"),
        gpu_mem_min=int(sp.get("gpu_mem_min", 0)),
        constraints=dict(sp.get("constraints") or {}),
        gang_size=int(sp.get("nodes", 1)),
        rank=t.rank,
        spread=bool(sp.get("spread", False)),
        preemptible=bool(sp.get("preemptible", True)),
        blocks=blocks,
        time_limit_s=sp.get("time_limit_s"),
    )


# Below Linux's default ephemeral range (32768-60999): a port picked from
# inside it collides with whatever outgoing connection the kernel handed that
# number to, and torch's store then fails with EADDRINUSE.
GANG_PORT_LO, GANG_PORT_HI = 20000, 32768


def gang_port(job_id: str, attempt: int = 0) -> int:
    """A rendezvous port for a gang's rank 0, stable for one attempt of the
    job. A retry gets another port, so a port taken on rank 0's host costs
    one attempt, not all of them."""
    digest = hashlib.sha256(f"{job_id}/{attempt}".encode()).digest()
    return GANG_PORT_LO + int.from_bytes(digest[:4], "big") % (GANG_PORT_HI - GANG_PORT_LO)


def torch_env(s: StateView, job: Job, t: Task, nnodes: int) -> dict[str, str]:
    """What torch.distributed and torchrun read, so neither needs glue (DESIGN §6).

    One task per node: a plain script is local rank 0 of 1. For gangs the
    usual MASTER_ADDR/PORT, WORLD_SIZE, RANK and NODE_RANK, and torchrun's own
    settings (it reads its flags or PET_* and ignores the others), so a bare
    `torchrun --nproc-per-node=N script.py` forms one job across the gang.
    PET_NPROC_PER_NODE is the task's GPU count: one worker per GPU; a task
    without GPUs gets none, and torchrun's default (1) applies.
    """
    env = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    if t.gpus:
        env["PET_NPROC_PER_NODE"] = str(len(t.gpus))
    if nnodes > 1:
        rank0 = s.tasks[job.tasks[0]]
        node = s.nodes.get(rank0.node_id) if rank0.node_id else None
        host = node.addr if node is not None else "127.0.0.1"
        addr, port = host or "127.0.0.1", str(gang_port(job.id, rank0.attempt))
        env.update(
            {
                "MASTER_ADDR": addr,
                "MASTER_PORT": port,
                "WORLD_SIZE": str(nnodes),
                "RANK": str(t.rank),
                "NODE_RANK": str(t.rank),
                "PET_NNODES": str(nnodes),
                "PET_NODE_RANK": str(t.rank),
                "PET_MASTER_ADDR": addr,
                "PET_MASTER_PORT": port,
            }
        )
    return env


def launch_spec(s: StateView, t: Task, allow_root: bool = False) -> dict[str, Any]:
    """What an agent needs to start one task attempt. `allow_root`: whether
    the masters let tasks run as uid 0 (the agent resolves the account)."""
    job = s.jobs[t.job_id]
    sp = job.spec
    nnodes = int(sp.get("nodes", 1))
    env = dict(sp.get("env") or {})
    # An array's task is a job of one task whose rank is 0; its index is
    # LEPTON_ARRAY_INDEX (the task's rank in the state).
    rank = 0 if sp.get("array") is not None else t.rank
    env.update(
        {
            "LEPTON_JOB_ID": job.id,
            "LEPTON_USER": job.user,
            "LEPTON_TASK_ID": t.id,
            "LEPTON_TASK_RANK": str(rank),
            "LEPTON_NNODES": str(nnodes),
            "LEPTON_NODE_RANK": str(rank),
            "LEPTON_ATTEMPT": str(t.attempt),
            # Resuming from a checkpoint: how many times it was requeued
            # through no fault of its own, and the exit code that asks for one.
            "LEPTON_RESTART_COUNT": str(t.restarts),
            "LEPTON_REQUEUE_EXIT": str(REQUEUE_EXIT),
        }
    )
    if sp.get("array") is not None:
        env["LEPTON_ARRAY_INDEX"] = str(t.rank)
        env["LEPTON_ARRAY_TASK_COUNT"] = str(len(job.tasks))
    env.update(torch_env(s, job, t, nnodes))
    manifest = s.manifests.get(sp["workdir"]) if sp.get("workdir") else None
    return {
        "task_id": t.id,
        "job_id": job.id,
        "attempt": t.attempt,
        "rank": t.rank,
        "argv": sp["argv"],
        "env": env,
        "gpus": list(t.gpus),
        "time_limit_s": sp.get("time_limit_s"),
        # The warning before its time limit (the agent sends it).
        "signal": sp.get("signal"),
        "signal_before_s": sp.get("signal_before_s"),
        "tty": sp.get("tty", False),
        "tty_size": sp.get("tty_size"),
        "cwd": sp.get("cwd"),
        "workdir": sp.get("workdir"),
        "manifest": manifest,
        "stop": t.stop,
        "unix_user": job.unix_user or job.user,
        "allow_root": allow_root,
        "cpus": t.cpus,
        "mem_bytes": t.mem_bytes,
    }


def job_summary(j: Job, s: StateView | None = None, whole_command: bool = False) -> dict[str, Any]:
    """A job as `jobs`, `status` and -o json show it: one source for all three.

    With the state: `started_at`, when its current run started (the first
    rank to start; None before), and `stopping`, how many of its tasks are
    live with a stop asked for (a cancelled job whose tasks still exit).
    Its command is cut short (`command_cut`: True) unless `whole_command`: a
    listing of many jobs must not carry a quarter MiB of command line each."""
    sp = j.spec
    started: float | None = None
    stopping = 0
    if s is not None:
        for tid in j.tasks:
            t = s.tasks[tid]
            if t.started_at is not None and (started is None or t.started_at < started):
                started = t.started_at
            if t.state in LIVE_TASK_STATES and t.stop is not None:
                stopping += 1
    gpus, nodes = sp.get("gpus", 0), sp.get("nodes", 1)
    array = sp.get("array")
    counts: dict[str, int] = {}
    if array is not None and s is not None:
        for tid in j.tasks:
            st = s.tasks[tid].state
            counts[st] = counts.get(st, 0) + 1
    argv = sp.get("argv", [])
    cut = False
    if not whole_command:
        argv, cut = short_command(argv)
    return {
        "id": j.id,
        "name": j.name,
        "user": j.user,
        "state": j.state,
        "stopping": stopping,
        "submitted_at": j.submitted_at,
        "started_at": started,
        "finished_at": j.finished_at,
        # Per node (one task per node), as --gpus means; gpus_total is per job.
        "gpus": gpus,
        "gpus_total": gpus * nodes,
        "nodes": nodes,
        "priority": sp.get("priority", 0),
        "command": argv,
        "command_cut": cut,
        "message": j.message,
        "retries": sp.get("retries", 0),
        "retries_left": j.retries_left,
        # Job arrays: the indexes (as --array takes them), how many tasks,
        # and how many are in each state.
        "array": arrays.describe(array) if array is not None else None,
        "array_tasks": len(j.tasks) if array is not None else None,
        "task_states": counts,
        "max_running": sp.get("max_running"),
        # Dependencies: what it waits for, and which of those have not ended.
        "after_ok": list(sp.get("after_ok") or []),
        "after_any": list(sp.get("after_any") or []),
        "waiting_on": list(j.waiting_on),
    }


# What a listing shows of each job's command, in characters.
LISTED_COMMAND_CHARS = 256


def short_command(argv: list[str]) -> tuple[list[str], bool]:
    """The first arguments of a command, up to LISTED_COMMAND_CHARS in all
    (the last one cut with "..."); and whether anything was left out."""
    out: list[str] = []
    left = LISTED_COMMAND_CHARS
    for arg in argv:
        if len(arg) > left:
            out.append(arg[:left] + "...")
            return out, True
        out.append(arg)
        left -= len(arg) + 1
        if left <= 0 and len(out) < len(argv):
            out.append("...")
            return out, True
    return out, False


REDACTED = "<redacted>"


def redacted_spec(j: Job) -> dict[str, Any]:
    """A job's spec as people other than its owner see it: env names, no
    values, and not its workdir's manifest id (that id would let a submit use
    those files, were it not checked; nobody else needs it)."""
    spec = dict(j.spec)
    spec["env"] = dict.fromkeys(spec.get("env") or {}, REDACTED)
    if spec.get("workdir"):
        spec["workdir"] = REDACTED
    return spec


def task_detail(s: StateView, t: Task) -> dict[str, Any]:
    node = s.nodes.get(t.node_id) if t.node_id else None
    return {
        "id": t.id,
        "rank": t.rank,
        "state": t.state,
        "node": node.name if node else t.node_id,
        "node_id": t.node_id,
        "gpus": list(t.gpus),
        "exit_code": t.exit_code,
        "attempt": t.attempt,
        "message": t.message,
        "assigned_at": t.assigned_at,
        "started_at": t.started_at,
        "finished_at": t.finished_at,
        # Only a live task can be stopping (an ended one never shows it).
        "stopping": t.stop if t.state in LIVE_TASK_STATES else None,
        "preemptions": t.preemptions,
        "restarts": t.restarts,
    }


def failed_tasks(s: StateView, job: Job, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """The failed and lost tasks of a job (up to `limit`), and whether more were left out."""
    out: list[dict[str, Any]] = []
    for tid in job.tasks:
        t = s.tasks[tid]
        if t.state in ("failed", "lost"):
            if len(out) == limit:
                return out, True
            out.append(task_detail(s, t))
    return out, False


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def node_summary(s: StateView, n: Node, live: dict[str, Any] | None) -> dict[str, Any]:
    """A node as `nodes` shows it. What its agent last reported is checked at
    arrival (leptond/nodestats.py); this still takes only what has the right
    shape, so one host's bad report never breaks the listing for everyone."""
    held, cpus_used, mem_used = s.node_usage(n.id)
    if n.state == "down" or not isinstance(live, dict):
        live = None  # its last heartbeat is stale: show no utilisation at all
    stats = (live or {}).get("stats")
    stats = stats if isinstance(stats, dict) else {}
    gpu_stats = (live or {}).get("gpus")
    gpu_stats = [g for g in gpu_stats if isinstance(g, dict)] if isinstance(gpu_stats, list) else []
    # -1: the GPU could not tell (off the bus, an old driver).
    utils = [g["util_pct"] for g in gpu_stats if _number(g.get("util_pct")) and g["util_pct"] >= 0]
    cache = (live or {}).get("cache")
    age = (live or {}).get("age_s")
    faulty = {int(f["index"]) for f in n.gpu_faults}
    return {
        "id": n.id,
        "name": n.name,
        "state": n.state,
        "drain_deadline": n.drain_deadline,
        "drain_reason": n.drain_reason,
        "addr": n.addr,
        "labels": dict(n.effective_labels()),
        "admin_labels": dict(n.admin_labels),
        "gpus_total": len(n.gpus),
        "gpus_used": len(held),
        # Free: neither held nor unhealthy (an unhealthy GPU may still be held
        # by a task that is stopping).
        "gpus_free": len({g["index"] for g in n.gpus} - held - faulty),
        "gpus_unhealthy": len(faulty),
        "gpu_faults": [dict(f) for f in n.gpu_faults],
        "gpu_models": sorted({g["model"] for g in n.gpus}),
        # None: nothing known (no GPUs, no heartbeat yet, or the node is down).
        "gpu_util_pct": round(sum(utils) / len(utils), 1) if utils else None,
        "cpus": n.cpus,
        "cpus_used": cpus_used,
        "mem_bytes": n.mem_bytes,
        "mem_used_bytes": mem_used,
        "reason": n.reason,
        "gpus": gpu_stats,
        "host": stats,
        "cache": cache if isinstance(cache, dict) else {},
        "last_heartbeat_s": age if _number(age) else None,
        # Why the node takes no new task while it is up: its data disk is
        # under its reserve (agent/diskguard.py); None when it is not.
        "disk_low": low if isinstance(low := (live or {}).get("disk_low"), str) else None,
    }


# Live tasks the overview lists one by one for a job (an array may have
# thousands; its counts by state say the rest).
MAX_PLACED = 64


def job_row(s: StateView, j: Job, reasons: dict[str, str] | None = None) -> dict[str, Any]:
    """A job for the overview (`leptonctl top`, the web UI): its summary, the
    nodes its live tasks run on (each once), the GPUs they hold, and why it
    waits when it does."""
    out = job_summary(j, s)
    nodes: dict[str, None] = {}  # in the order of its tasks, each node once
    placed: list[dict[str, Any]] = []
    held = 0
    for tid in j.tasks:
        t = s.tasks[tid]
        if t.state in LIVE_TASK_STATES and t.node_id:
            node = s.nodes.get(t.node_id)
            name = node.name if node else t.node_id
            nodes[name] = None
            held += len(t.gpus)
            if len(placed) < MAX_PLACED:
                placed.append({"rank": t.rank, "node": name, "gpus": list(t.gpus)})
    out["on"] = list(nodes)
    out["placed"] = placed
    out["gpus_held"] = held
    if reasons is not None and j.state == "pending":
        out["reason"] = next((reasons[tid] for tid in j.tasks if tid in reasons), "")
    return out


def fill(rows: Iterable[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """The rows, in order, while they fit in `budget` bytes once encoded (at
    least one). `rows` may be lazy: those past the budget are never made."""
    out: list[dict[str, Any]] = []
    used = 0
    for row in rows:
        used += encoded_size(row)
        if out and used > budget:
            break
        out.append(row)
    return out


def overview(
    s: StateView,
    stats: Callable[[str], dict[str, Any] | None],
    reasons: dict[str, str],
    limit: int,
    node_bytes: int,
) -> dict[str, Any]:
    """The cluster at a glance: the nodes (with their GPUs' figures) that fit
    in `node_bytes`, how many there are in each state, GPU totals, and the
    running and pending jobs (the oldest `limit` of each)."""
    # Past the budget the nodes are only counted (at 10,000 nodes the whole
    # list is over the RPC frame cap).
    nodes = fill((node_summary(s, n, stats(n.id)) for n in s.nodes.values()), node_bytes)
    by_state: dict[str, int] = {}
    for n in s.nodes.values():
        by_state[n.state] = by_state.get(n.state, 0) + 1
    up = [n for n in s.nodes.values() if n.state != "down"]
    running: list[Job] = []
    pending: list[Job] = []
    for j in s.jobs.values():
        if j.state == "running":
            running.append(j)
        elif j.state == "pending":
            pending.append(j)
    return {
        "nodes": nodes,
        "node_counts": by_state,
        "gpus": {
            "total": sum(len(n.gpus) - len(n.gpu_faults) for n in up),
            "allocated": len(s.gpu_owner),
            "unhealthy": sum(len(n.gpu_faults) for n in s.nodes.values()),
        },
        "running": [job_row(s, j) for j in running[:limit]],
        "pending": [job_row(s, j, reasons) for j in pending[:limit]],
        "counts": {"running": len(running), "pending": len(pending)},
    }
