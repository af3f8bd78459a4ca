"""RPC methods for people (leptonctl): jobs, nodes, cluster, tokens, backups.

Each method checks the caller's role, validates its input into one clear
error line, and writes every mutating call to the audit log.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from typing import Any

import scheduler as sch
from raft import arrays, snapcheck
from raft import snapshot as snapfile
from raft.commands import BATCH_BUDGET_BYTES
from raft.errors import MembershipError, NoQuorum, NotLeader, ProposeTimeout, RaftError
from raft.model import FINAL_JOB_STATES, JOB_STATES, NODE_STATES, JobSpec, Node
from raft.validate import (
    SpecError,
    spec_bytes,
    stored_spec,
    validate_labels,
    validate_name,
    validate_spec,
    validate_unix_user,
)

from . import health, param, views
from .apictx import ApiContext
from .auth import require
from .wire.connection import Connection, Handler
from .wire.errors import (
    BAD_REQUEST,
    CONFLICT,
    FORBIDDEN,
    NO_QUORUM,
    NOT_FOUND,
    TIMEOUT,
    UNSCHEDULABLE,
    RpcError,
)
from .wire.tokens import cluster_psk, new_token

log = logging.getLogger("lepton.master")
MAX_DRAIN_DEADLINE_S = 366 * 86400
MAX_JOBS_LISTED = 2**63 - 1  # no cap of its own: a limit only trims the list
MAX_RANK = 1 << 20
# The most tasks `status` lists for a job array (its failed ones).
MAX_LISTED_TASKS = 1000
MAX_TAIL_LINES = 1_000_000
LOG_STREAMS = ("output", "stderr")
RESTORE_PART_BYTES = BATCH_BUDGET_BYTES
# A page of `jobs` holds summaries up to about this many bytes (`page_bytes`
# may ask for less, or up to the most), so that no reply nears the frame cap.
JOBS_PAGE_BYTES = 4 << 20
MAX_JOBS_PAGE_BYTES = 8 << 20
Method = Callable[[ApiContext, Connection, dict[str, Any]], Awaitable[Any]]
_REGISTRY: dict[str, tuple[Method, str, bool, bool]] = {}


def method(
    name: str, role: str, mutating: bool = False, stream: bool = False
) -> Callable[[Method], Method]:
    def deco(fn: Method) -> Method:
        _REGISTRY[name] = (fn, role, mutating, stream)
        return fn

    return deco


def handlers(m: ApiContext) -> dict[str, Handler]:
    out: dict[str, Handler] = {}
    for name, (fn, role, mutating, stream) in _REGISTRY.items():
        call = _stream if stream else _call
        out[name] = functools.partial(call, m, name, fn, role, mutating)
    return out


async def _stream(
    m: ApiContext, name: str, fn: Method, role: str, mutating: bool, conn: Connection, args: Any
) -> Any:
    gen = await _call(m, name, fn, role, mutating, conn, args)
    async for item in gen:
        yield item


async def _call(
    m: ApiContext, name: str, fn: Method, role: str, mutating: bool, conn: Connection, args: Any
) -> Any:
    user, have = m.keys.identity(conn.key_id)
    if not have:
        raise RpcError("unauthenticated", "this token has been revoked")
    conn.context["user"], conn.context["role"] = user, have
    try:
        require(conn.context, role)
    except RpcError as exc:  # a refused attempt to change something is audited too
        if mutating:
            target = _target(args) if isinstance(args, dict) else None
            m.audit.record(user, have, name, target, f"error: {exc.code}: {exc.message}")
        raise
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RpcError(BAD_REQUEST, f"{name}: arguments must be a map")
    if not mutating:
        return await fn(m, conn, args)
    try:
        out = await fn(m, conn, args)
    except RpcError as exc:
        if exc.code != "not_leader":
            m.audit.record(user, have, name, _target(args), f"error: {exc.code}: {exc.message}")
        raise
    target = _target(args)
    if target is None and isinstance(out, dict):
        target = out.get("id")  # e.g. the job a submit made
    m.audit.record(user, have, name, target, "ok")
    if m.faults.drop_reply(args.get("rid")):  # test builds only (leptond/faults.py)
        log.warning(
            "test fault: dropped the reply to %s (rid %s): %s",
            name,
            args["rid"],
            json.dumps(out, default=str),
        )
        conn.abort()
    return out


def request_id(conn: Connection, a: dict[str, Any], method: str) -> str | None:
    """The request id under which a mutating call's result is remembered.

    The client makes one id per logical call and sends it with every retry
    (`rid` in the arguments); the command that commits first is applied and
    later ones get its result (raft/dedupe.py). The id is hashed with the
    caller's key and the method, so one caller cannot collide with, or read
    the result of, another's call. No id (an older client): a fresh one.
    """
    rid = a.get("rid")
    if rid is None:
        return None
    if not isinstance(rid, str) or not 8 <= len(rid) <= 64:
        raise RpcError(BAD_REQUEST, "the request id (rid) must be 8-64 characters")
    return hashlib.sha256(f"{conn.key_id}\0{method}\0{rid}".encode()).hexdigest()[:32]


def _target(args: dict[str, Any]) -> Any:
    for key in ("job_id", "node", "id", "name", "addr", "node_id"):
        v = args.get(key)
        if v is not None:
            # What the caller sent, whatever it is, but never a megabyte of it.
            return v if isinstance(v, str) and len(v) <= 256 else repr(v)[:256]
    return None


# -- jobs -----------------------------------------------------------------------
@method("submit", "submit", mutating=True)
async def submit(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    m.ensure_leader()
    m.disk.check_new_work()
    try:
        spec = validate_spec(a.get("spec"))
        name = validate_name(a["name"], "job name") if a.get("name") else None
    except SpecError as exc:
        raise RpcError(BAD_REQUEST, str(exc)) from None
    user = conn.context["user"]
    admin = conn.context["role"] == "admin"
    most = m.cfg.max_preempt_grace_s
    if spec.preempt_grace_s is not None and spec.preempt_grace_s > most:
        raise RpcError(
            BAD_REQUEST,
            f"--preempt-grace {spec.preempt_grace_s:g}s is over this cluster's maximum "
            f"of {most:g}s (masters: --max-preempt-grace)",
        )
    cap = None if admin else m.cfg.max_priority_of(user)
    if cap is not None and spec.priority > cap:
        raise RpcError(
            FORBIDDEN, f"priority {spec.priority} is above the cap for {user} ({cap}); ask an admin"
        )
    view = m.view()
    if spec.workdir is not None and (
        spec.workdir not in view.manifests
        or (not admin and user not in view.manifest_owners.get(spec.workdir, ()))
    ):
        # Only its own user's manifest (admins: any); the same words whether
        # it does not exist or is someone else's.
        raise RpcError(BAD_REQUEST, f"workdir {spec.workdir} was not uploaded by {user}")
    caps = (
        None
        if admin
        else [m.cfg.max_pending_jobs, m.cfg.max_pending_spec_bytes, m.cfg.max_pending_tasks]
    )
    if caps is not None:
        _refuse_over_pending_caps(view.user_pending.get(user, (0, 0)), user, spec, caps)
    if spec.mem_bytes == 0:
        # Decided here, so the committed job (and every replica) has it; before
        # the fit check, so a default no node can hold is said at once.
        spec.mem_bytes = m.cfg.default_mem_bytes(spec.gpus, spec.cpus)
    if not param.flag(a, "queue_anyway"):
        _refuse_if_it_never_fits(m, spec)
    rid = a.get("rid")
    if not isinstance(rid, str) or not 8 <= len(rid) <= 64:
        raise RpcError(BAD_REQUEST, "submit needs a request id (8-64 characters)")
    unix_user = m.keys.unix_user(conn.key_id)
    if unix_user == "root" and not m.cfg.allow_root_tasks:
        # Agents refuse uid 0 too (whatever its name); this says it at once.
        raise RpcError(
            FORBIDDEN,
            "this token's jobs would run as root, and this cluster does not run tasks as "
            "root (masters: --allow-root-tasks); use a token mapped to another Unix user",
        )
    # The id comes from the client's request id, so a retry after a lost answer
    # or a leader change finds the same job instead of making a second one.
    job_id = "j-" + hashlib.sha256(f"{user}\0{rid}".encode()).hexdigest()[:12]
    item: dict[str, Any] = {
        "id": job_id,
        "name": name,
        "user": user,
        "spec": spec.to_wire(),
        "submitted_at": m.clock.now(),
        "unix_user": unix_user,
    }
    if admin:
        item["admin"] = True  # apply lets an admin use any user's workdir
    if caps is not None:
        # Checked again at apply, against every submit committed before this
        # one: concurrent submits cannot all slip under the cap.
        item["caps"] = caps
    res = await m.submits.submit(item)
    if "error" in res:
        raise RpcError(res["error"]["code"], res["error"]["message"])
    return {"id": job_id}


def _refuse_over_pending_caps(
    pending: tuple[int, int], user: str, spec: JobSpec, caps: list[int]
) -> None:
    """The refusal apply would give (ClusterState._check_pending_caps), said
    before proposing: each user's waiting jobs live on every master."""
    (n, held), (max_jobs, max_bytes) = pending, caps[:2]
    if max_jobs and n + 1 > max_jobs:
        raise RpcError(
            "pending_limit",
            f"{user} has {n} jobs waiting to start, the most one user may ({max_jobs}); "
            "cancel some or wait for them to start",
        )
    size = spec_bytes(stored_spec(spec))
    if max_bytes and held + size > max_bytes:
        raise RpcError(
            "pending_limit",
            f"{user}'s waiting jobs hold {held} bytes of specs; this one ({size} bytes) "
            f"would pass the limit of {max_bytes}; cancel some or wait for them to start",
        )


class _FitNodes:
    """The nodes as `never_fits` reads them, kept from one submit to the next.

    A published map of nodes, and every record in it, is never changed again
    (raft/cow.py: apply changes copies), and a view's map is the same object
    while no node changed: the list made from the same map, or a node's view
    made from the same record, is what node_view would make again. Every
    submit read every node afresh before; nodes change far less often."""

    def __init__(self) -> None:
        self._nodes: Mapping[str, Node] | None = None
        self._list: list[sch.NodeView] = []
        self._made: dict[str, tuple[Node, sch.NodeView]] = {}

    def of(self, nodes: Mapping[str, Node]) -> list[sch.NodeView]:
        if nodes is self._nodes:
            return self._list
        made = self._made
        fresh: dict[str, tuple[Node, sch.NodeView]] = {}
        out: list[sch.NodeView] = []
        for nid, n in nodes.items():
            had = made.get(nid)
            # Unhealthy GPUs count: they come back after a reset.
            nv = had[1] if had is not None and had[0] is n else views.node_view(n, with_faulty=True)
            fresh[nid] = (n, nv)
            out.append(nv)
        self._nodes, self._list, self._made = nodes, out, fresh
        return out


# One per process: masters of one process (a simulation) only miss it.
_FIT_NODES = _FitNodes()


def _refuse_if_it_never_fits(m: ApiContext, spec: JobSpec) -> None:
    """A job no known node could ever host would wait forever: refuse it with
    the reason (the client may insist with `queue_anyway`)."""
    req = sch.TaskRequest(
        task_id="-",
        job_id="-",
        user="-",
        priority=spec.priority,
        submitted_at=0.0,
        gpus=spec.gpus,
        cpus=spec.cpus,
        mem_bytes=spec.mem_bytes,
        gpu_type=spec.gpu_type,
        gpu_mem_min=spec.gpu_mem_min,
        constraints=dict(spec.constraints),
        gang_size=spec.nodes,
    )
    why = sch.never_fits(_FIT_NODES.of(m.view().nodes), req)
    if why is not None:
        raise RpcError(UNSCHEDULABLE, f"no node can ever run this job: {why}")


@method("jobs", "read")
async def jobs(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """Jobs, oldest first: the last `limit` of those in `state` (a list) and of
    `user`; finished jobs older than an hour only with `all`. Commands are
    cut short (`status` shows a job's whole command).

    A reply holds summaries up to `page_bytes`. With `paged`, it is
    {"jobs": [...], "next": cursor or None}: ask again with `after` set to
    the cursor for the next page. Without, it is the list alone: the newest
    of the selection that fit in one page."""
    # `local`: this master's own replica, e.g. to check that a follower has caught up.
    if not param.flag(a, "local"):
        prefer_leader(m)
    limit = param.integer(a, "limit", 1, MAX_JOBS_LISTED, 1000)
    want_all = param.flag(a, "all")
    states = set(param.choices(a, "state", JOB_STATES))
    user = param.string(a, "user")
    paged = param.flag(a, "paged")
    after = param.string(a, "after", max_chars=512)
    budget = param.integer(a, "page_bytes", 1024, MAX_JOBS_PAGE_BYTES, JOBS_PAGE_BYTES)
    recent = m.clock.now() - 3600
    s = m.view()
    js = [
        j
        for j in s.jobs.values()
        if (want_all or j.state not in FINAL_JOB_STATES or (j.finished_at or 0) > recent)
        and (not states or j.state in states)
        and (not user or j.user == user)
    ]
    js = js[-limit:]
    if not paged:
        # The newest that fit: as a smaller `limit` would give.
        rows = _fill(s, reversed(js), budget)
        rows.reverse()
        return rows
    start = _after(js, after) if after else 0
    rows = _fill(s, js[start:], budget)
    more = start + len(rows) < len(js)
    last = js[start + len(rows) - 1] if rows else None
    nxt = f"{last.submitted_at!r}|{last.id}" if more and last is not None else None
    return {"jobs": rows, "next": nxt}


def _fill(s: Any, js: Any, budget: int) -> list[dict[str, Any]]:
    """Summaries of `js` in order, while they fit in `budget` bytes (at least one)."""
    return views.fill((views.job_summary(j, s) for j in js), budget)


def _after(js: list[Any], cursor: str) -> int:
    """Where the page after `cursor` ("submitted_at|job id") starts in `js`."""
    at_s, _, jid = cursor.partition("|")
    for i, j in enumerate(js):
        if j.id == jid:
            return i + 1
    # That job is gone (collected): go on from the first one submitted after it.
    try:
        at = float(at_s)
    except ValueError:
        raise RpcError(BAD_REQUEST, "after must be a cursor from a previous page") from None
    for i, j in enumerate(js):
        if (j.submitted_at, j.id) > (at, jid):
            return i
    return len(js)


@method("status", "read")
async def status(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """One job in detail. `brief`: without its spec (env values), so not a
    read of another user's private parts (no audit record): what `logs -f`
    polls while it follows a job."""
    prefer_leader(m)
    jid = param.string(a, "job_id")
    brief = param.flag(a, "brief")
    index = _index(a)
    reasons = m.scheduling.reasons
    s = m.view()
    job = s.jobs.get(jid)
    if job is None:
        raise RpcError(NOT_FOUND, f"no job {jid!r}")
    out = views.job_summary(job, s, whole_command=True)
    full = _may_read(conn, job.user) and not brief
    if not brief:
        out["spec"] = job.spec if full else views.redacted_spec(job)
    if index is not None:
        out["tasks"] = [views.task_detail(s, _array_task(s, job, index))]
    elif job.spec.get("array") is not None:
        # An array lists its failed tasks; the counts say the rest.
        out["tasks"], out["tasks_cut"] = views.failed_tasks(s, job, MAX_LISTED_TASKS)
    else:
        out["tasks"] = [views.task_detail(s, s.tasks[t]) for t in job.tasks]
    if full:
        _audit_read(m, conn, job.id, job.user, "status")
    for t in out["tasks"]:
        if t["state"] == "pending" and t["id"] in reasons:
            t["reason"] = reasons[t["id"]]
    pend = [t for t in out["tasks"] if t.get("reason")]
    if pend and job.state == "pending":
        out["reason"] = pend[0]["reason"]
    elif job.state in ("pending", "running") and index is None:
        # An array's waiting tasks are not listed: the first one's reason.
        first = next((t for t in job.tasks if t in reasons and t in s.pending), None)
        if first is not None:
            out["reason"] = reasons[first]
    return out


def _index(a: dict[str, Any]) -> int | None:
    """The `index` argument: one task of a job array, or None."""
    if a.get("index") is None:
        return None
    return param.integer(a, "index", 0, arrays.MAX_ARRAY_INDEX, 0)


def _array_task(s: Any, job: Any, index: int) -> Any:
    """The task of `job` with this array index, or a one-line error."""
    if job.spec.get("array") is None:
        raise RpcError(BAD_REQUEST, f"job {job.id} is not an array; it has no --index")
    t = s.tasks.get(f"{job.id}.{index}")
    if t is None or t.job_id != job.id:
        indexes = arrays.describe(job.spec["array"])
        raise RpcError(NOT_FOUND, f"job {job.id} has no index {index} (it has {indexes[:80]})")
    return t


@method("cancel", "submit", mutating=True)
async def cancel(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """Cancel a job, or with `index` one task of a job array."""
    m.ensure_leader()
    index = _index(a)
    return await m.propose(
        "cancel_job",
        {
            "job_id": param.string(a, "job_id"),
            "user": conn.context["user"],
            "admin": conn.context["role"] == "admin",
            "now": m.clock.now(),
            **({"index": index} if index is not None else {}),
        },
        rid=request_id(conn, a, "cancel"),
        wake=True,
    )


@method("logs", "read", stream=True)
async def logs(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """Stream a task's output from its agent, through the leader.

    `stream`: "output" (stdout and stderr as they came) or "stderr" alone;
    `tail_lines`: start that many lines before the end; `timestamps`: each
    item also carries when its lines were written. A task that has not
    started answers `not_started` with the job's state, so a follower knows
    whether to wait."""
    m.ensure_leader()
    jid = param.string(a, "job_id")
    rank = param.integer(a, "rank", 0, MAX_RANK, 0)
    index = _index(a)
    relayed = {
        "offset": param.integer(a, "offset", -(2**62), 2**62, 0),
        "follow": param.flag(a, "follow"),
        "stream": param.choice(a, "stream", LOG_STREAMS, "output"),
        "times": param.flag(a, "timestamps"),
    }
    tail = param.integer(a, "tail_lines", 0, MAX_TAIL_LINES, -1)
    if tail >= 0:
        relayed["tail_lines"] = tail
    s = m.view()
    job = s.jobs.get(jid)
    if job is None:
        raise RpcError(NOT_FOUND, f"no job {jid!r}")
    if index is not None:
        t = _array_task(s, job, index)
        rank, what = index, f"index {index}"
    elif not 0 <= rank < len(job.tasks):
        raise RpcError(BAD_REQUEST, f"job {jid} has ranks 0-{len(job.tasks) - 1}")
    else:
        t = s.tasks[job.tasks[rank]]
        what = f"task {rank}"
    node_id, attempt, state, job_state = t.node_id, t.attempt, t.state, job.state
    if not _may_read(conn, job.user):
        raise RpcError(
            FORBIDDEN,
            f"job {jid} belongs to {job.user}; only its owner or an admin can read its output",
        )
    _audit_read(m, conn, jid, job.user, "logs")
    if node_id is None or attempt == 0:
        raise RpcError(
            "not_started",
            f"{what} of {jid} has not started ({state})",
            job_state=job_state,
        )
    if not m.channel.is_connected(node_id):
        raise RpcError(
            "unavailable", f"the host of {what} is not connected; its output is kept there"
        )
    args = {"task_id": t.id, "attempt": attempt, **relayed}
    # Placed, but its agent may not have started it yet (the start is on its
    # way): the agent then has no output for it, which is "not started yet".
    not_yet = (
        RpcError("not_started", f"{what} of {jid} has not started yet", job_state=job_state)
        if state == "assigned"
        else None
    )
    return _relay(m, conn.context["user"], node_id, args, not_yet)


async def _relay(
    m: ApiContext,
    user: str,
    node_id: str,
    args: dict[str, Any],
    not_yet: RpcError | None = None,
) -> Any:
    """The agent's stream, under one of the user's relay slots (apictx.RelaySlots).
    `not_yet`: what to answer instead when the agent knows no such run."""
    m.relays.take(user)
    try:
        got = False
        try:
            async for item in m.channel.stream(node_id, "logs", args):
                got = True
                yield item
        except RpcError as exc:
            if got or not_yet is None or exc.code != NOT_FOUND:
                raise
            raise not_yet from None
    finally:
        m.relays.give(user)


def _may_read(conn: Connection, owner: str) -> bool:
    """Whether the caller may read a job's private parts (env values, output):
    its owner and admins may; anyone else sees only its metadata."""
    return bool(owner == conn.context["user"] or conn.context["role"] == "admin")


def _audit_read(m: ApiContext, conn: Connection, job_id: str, owner: str, what: str) -> None:
    """Every read of another user's job by an admin goes to the audit log."""
    user, role = conn.context["user"], conn.context["role"]
    if owner != user:
        m.audit.record(user, role, what, job_id, f"ok: read the job of {owner}")


@method("queue", "read")
async def queue(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    prefer_leader(m)
    nodes, allocs, pending = views.scheduler_inputs(m.view())
    policy = m.scheduling.policy
    return [asdict(u) for u in sch.queue_report(nodes, allocs, pending, policy)]


# -- nodes ------------------------------------------------------------------------
@method("nodes", "read")
async def nodes(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """Nodes in the order they joined; only those in `state` (a list) when
    given. A reply holds summaries up to `page_bytes` (10,000 nodes listed
    whole are about 22 MB, over the frame cap). With `paged`, it is
    {"nodes": [...], "next": cursor or None}: ask again with `after` set to
    the cursor for the next page. Without, it is the list alone: the first
    of the selection that fit in one page."""
    prefer_leader(m)
    states = set(param.choices(a, "state", NODE_STATES))
    paged = param.flag(a, "paged")
    after = param.string(a, "after", max_chars=512)
    budget = param.integer(a, "page_bytes", 1024, MAX_JOBS_PAGE_BYTES, JOBS_PAGE_BYTES)
    s = m.view()
    ns = [n for n in s.nodes.values() if not states or n.state in states]
    start = _node_after(ns, after) if paged and after else 0
    rows = views.fill(
        (views.node_summary(s, n, m.liveness.stats(n.id)) for n in ns[start:]), budget
    )
    if not paged:
        return rows
    end = start + len(rows)
    more = end < len(ns)
    return {"nodes": rows, "next": f"{end}|{ns[end - 1].id}" if more and rows else None}


def _node_after(ns: list[Any], cursor: str) -> int:
    """Where the page after `cursor` ("position|node id") starts in `ns`."""
    at_s, _, nid = cursor.partition("|")
    try:
        at = int(at_s)
    except ValueError:
        raise RpcError(BAD_REQUEST, "after must be a cursor from a previous page") from None
    if 0 < at <= len(ns) and ns[at - 1].id == nid:
        return at
    for i, n in enumerate(ns):
        if n.id == nid:
            return i + 1
    # That node is gone (removed since): go on from where it stood, so that
    # nothing after it is skipped (the one that took its place may come twice).
    return max(0, min(at - 1, len(ns)))


def find_node(m: ApiContext, ref: str) -> str:
    s = m.view()
    if ref in s.nodes:
        return ref
    hits = [n.id for n in s.nodes.values() if n.name == ref]
    if len(hits) == 1:
        return hits[0]
    raise RpcError(
        NOT_FOUND,
        f"no node named {ref!r}" if not hits else f"several nodes are named {ref!r}; use the id",
    )


@method("node_drain", "admin", mutating=True)
async def node_drain(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """Stop placing work on a node. With `deadline_s`, tasks still running on it
    that many seconds from now are stopped and requeued (the controllers' drain
    loop does it); without, they run to completion."""
    m.ensure_leader()
    deadline_s = _drain_deadline_s(a.get("deadline_s"))
    reason = param.string(a, "reason", max_chars=1024) or "drained"
    nid = find_node(m, param.string(a, "node"))
    now = m.clock.now()
    cmd: dict[str, Any] = {"node_id": nid, "state": "draining", "now": now, "reason": reason}
    if deadline_s is not None:
        # Decided here, once: apply must not read a clock.
        cmd["deadline"] = now + deadline_s
    return await m.propose("node_state", cmd, rid=request_id(conn, a, "node_drain"))


def _drain_deadline_s(v: Any) -> float | None:
    if v is None:
        return None
    if (
        isinstance(v, bool)
        or not isinstance(v, int | float)
        or not math.isfinite(v)
        or not 0 < v <= MAX_DRAIN_DEADLINE_S
    ):
        raise RpcError(
            BAD_REQUEST, f"drain deadline must be more than 0s and at most 366d, got {v!r}"
        )
    return float(v)


@method("node_label", "admin", mutating=True)
async def node_label(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """Set (`set`: {name: value}) or remove (`unset`: [name]) a node's admin
    labels. They win over the labels its host reports for the same name, and
    only admins set names under `admin/`: a job constrained on such a label
    never goes to a host only because that host claims it."""
    m.ensure_leader()
    ref = param.string(a, "node")
    try:
        add = validate_labels(a.get("set"), "labels")
    except SpecError as exc:
        raise RpcError(BAD_REQUEST, str(exc)) from None
    unset = a.get("unset") or []
    if not isinstance(unset, list) or not all(isinstance(k, str) and len(k) <= 64 for k in unset):
        raise RpcError(BAD_REQUEST, "unset must be a list of label names")
    nid = find_node(m, ref)
    return await m.propose(
        "node_labels",
        {"node_id": nid, "set": add, "unset": unset},
        rid=request_id(conn, a, "node_label"),
        wake=True,
    )


@method("node_undrain", "admin", mutating=True)
async def node_undrain(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    m.ensure_leader()
    nid = find_node(m, param.string(a, "node"))
    return await m.propose(
        "node_state",
        {"node_id": nid, "state": "ready", "now": m.clock.now()},
        rid=request_id(conn, a, "node_undrain"),
        wake=True,
    )


@method("node_rm", "admin", mutating=True)
async def node_rm(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """Forget a node and revoke its credential; its agent's live connection is
    closed, and it cannot connect again (it needs a new join token to rejoin).
    A node id that only a credential still names (its agent deregistered
    itself) has that credential revoked."""
    m.ensure_leader()
    rid = request_id(conn, a, "node_rm")
    if rid is not None and m.answered(rid):
        # A retry of a removal that went through: the node is gone, so it
        # cannot be looked up again; the remembered answer is all there is.
        res = await m.propose("remove_node", {}, rid=rid)
    else:
        ref = param.string(a, "node")
        force = param.flag(a, "force")
        s = m.view()
        orphan = ref not in s.nodes and ref in s.node_cred_of
        nid = ref if orphan else find_node(m, ref)
        res = await m.propose(
            "remove_node",
            {"node_id": nid, "now": m.clock.now(), "force": force, "revoke": True},
            rid=rid,
        )
    cred = res.get("revoked")
    if cred:
        m.close_connections(cred)
    return res


# -- cluster ----------------------------------------------------------------------
@method("cluster_status", "read")
async def cluster_status(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """The cluster as this master sees it. With `health`, each other master is
    also asked for its own health (disk, journal, leader), and `problems`
    lists what is wrong anywhere, in words. With `from_leader`, a follower
    that knows the leader sends the caller there: only the leader knows how
    far behind each member is, so the answer is the same from any master."""
    if param.flag(a, "from_leader"):
        prefer_leader(m)
    want_health = param.flag(a, "health")
    st = m.raft.status()
    mine = m.health(st)
    members = {k: v.to_wire() for k, v in m.view().members.items()}
    for mb in st.get("members", []):
        info = members.get(mb.get("addr"), {})
        mb["rpc_addr"] = info.get("rpc_addr", "")
    problems = list(mine["problems"])
    if want_health:
        asked = [mb["rpc_addr"] for mb in st.get("members", []) if mb["rpc_addr"]]
        answers = await health.ask_members(cluster_psk(m.secret), asked)
        for mb in st.get("members", []):
            h = answers.get(mb["rpc_addr"]) if mb["rpc_addr"] else None
            mb["health"] = h
            if h is None:
                if mb["connected"]:  # not already listed as unreachable over Raft
                    problems.append(f"master {mb['addr']} does not answer over RPC")
                continue
            problems += [f"master {mb['addr']}: {p}" for p in h.get("disk", {}).get("problems", [])]
    leader = st.get("leader")
    return {
        **st,
        "leader": leader,
        "leader_rpc": m.leader_rpc_addr(),
        "self": m.cfg.raft_addr,
        "self_rpc": m.cfg.rpc_addr,
        "pid": os.getpid(),
        "is_leader": m.is_leader(),
        "has_quorum": mine["quorum"],
        "health": mine,
        "problems": problems,
        "blocks": m.block_stats(),
    }


@method("cluster_add", "admin", mutating=True)
async def cluster_add(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """Add a running master. raft.membership lists the checks made before
    anything is proposed (address, one change at a time, the Raft
    handshake, a quorum of reachable members afterwards)."""
    m.ensure_leader()
    addr = param.string(a, "addr")
    await _membership(m, m.raft.add_member(addr, timeout_s=m.cfg.commit_timeout_s * 2))
    return {"added": addr}


@method("cluster_remove", "admin", mutating=True)
async def cluster_remove(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    m.ensure_leader()
    addr = param.string(a, "addr")
    if addr == m.cfg.raft_addr:
        raise RpcError(
            BAD_REQUEST,
            "the leader cannot remove itself; stop it and remove it from another master",
        )
    await _membership(m, m.raft.remove_member(addr, timeout_s=m.cfg.commit_timeout_s * 2))
    await m.propose("member_remove", {"raft_addr": addr})
    return {"removed": addr}


async def _membership(m: ApiContext, change: Awaitable[None]) -> None:
    """Run a membership change; its refusals and failures are one line each."""
    try:
        await change
    except MembershipError as exc:
        raise RpcError(BAD_REQUEST, str(exc)) from None
    except NotLeader:
        raise m.not_leader() from None
    except NoQuorum as exc:
        raise RpcError(NO_QUORUM, str(exc)) from None
    except ProposeTimeout as exc:
        raise RpcError(TIMEOUT, str(exc)) from None
    except RaftError as exc:
        raise RpcError(CONFLICT, str(exc)) from None


# -- backups ---------------------------------------------------------------------
@method("snapshot_save", "admin")
async def snapshot_save(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    prefer_leader(m)
    # The view is encoded off the event loop and with no lock held: a large
    # state takes seconds to encode, and apply goes on meanwhile.
    s = m.reader.snapshot_view()
    index = s.applied_index
    data = await asyncio.to_thread(lambda: snapfile.encode_snapshot(s.encode(), {"index": index}))
    return {
        "data": data,
        "index": index,
    }


@method("snapshot_check", "admin")
async def snapshot_check(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """What restoring this snapshot would replace (nothing is changed): the
    jobs and nodes in it, and those in the cluster now."""
    prefer_leader(m)
    state_bytes, meta = _decode_snapshot(a.get("data"))
    try:
        # Off the event loop: a large snapshot takes a while to decode.
        theirs = await asyncio.to_thread(snapcheck.decode_state, state_bytes)
    except ValueError as exc:
        raise RpcError(BAD_REQUEST, f"not a valid leptond snapshot: {exc}") from None
    s = m.view()
    return {
        "snapshot": {
            "jobs": len(theirs.jobs),
            "nodes": len(theirs.nodes),
            "index": meta.get("index") if isinstance(meta, dict) else None,
        },
        "current": {"jobs": len(s.jobs), "nodes": len(s.nodes)},
    }


def _decode_snapshot(blob: Any) -> tuple[bytes, Any]:
    if not isinstance(blob, bytes):
        raise RpcError(BAD_REQUEST, "restore needs the snapshot file's bytes")
    try:
        return snapfile.decode_snapshot(blob)
    except Exception as exc:
        raise RpcError(BAD_REQUEST, f"not a valid leptond snapshot: {exc}") from None


@method("snapshot_restore", "admin", mutating=True)
async def snapshot_restore(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    m.ensure_leader()
    state_bytes, _meta = _decode_snapshot(a.get("data"))
    # In parts, each well within one Raft entry; the state is replaced, on
    # every replica, when the last part applies (ClusterState.apply_restore).
    # A retry (same client rid) goes on with the same restore: its parts keep
    # their ids, and the parts already applied answer from the dedupe table.
    rid = request_id(conn, a, "snapshot_restore")
    step = RESTORE_PART_BYTES
    parts = [state_bytes[i : i + step] for i in range(0, len(state_bytes), step)] or [b""]
    head = {"id": rid or uuid.uuid4().hex, "parts": len(parts)}
    head["sha256"] = hashlib.sha256(state_bytes).hexdigest()
    res: dict[str, Any] = {}
    for i, data in enumerate(parts):
        last = i + 1 == len(parts)
        res = await m.propose(
            "restore",
            {**head, "part": i, "data": data},
            rid=None if rid is None else f"{rid}.{i}",
            timeout_s=30,
            wake=last,
        )
    return res


# -- tokens ---------------------------------------------------------------------
@method("token_create", "admin", mutating=True)
async def token_create(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    m.ensure_leader()
    role = a.get("role")
    if role not in ("admin", "submit", "read"):
        raise RpcError(BAD_REQUEST, "role must be admin, submit or read")
    try:
        name = validate_name(a.get("name") or f"{role}-user", "token name")
        # By default a token's jobs run as the Unix account of the same name.
        unix_user = validate_unix_user(a.get("unix_user") or name)
    except SpecError as exc:
        raise RpcError(BAD_REQUEST, str(exc)) from None
    tok = new_token()
    res = await m.propose(
        "token_create",
        {
            "id": tok.id,
            "name": name,
            "role": role,
            "sealed": m.keys.seal(tok),
            "now": m.clock.now(),
            "unix_user": unix_user,
        },
        rid=request_id(conn, a, "token_create"),
    )
    if res["id"] != tok.id:
        # A retry of a call that made its token already: answer with that one,
        # so no token is made that nobody holds.
        made = m.keys.token(res["id"])
        rec = m.view().tokens.get(res["id"])
        if made is None or rec is None:
            raise RpcError("internal", f"token {res['id']} was made but cannot be read back")
        tok, name, role, unix_user = made, rec.name, rec.role, rec.unix_user
    return {"id": tok.id, "name": name, "role": role, "unix_user": unix_user, "token": str(tok)}


@method("token_ls", "admin")
async def token_ls(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    return [
        {
            "id": t.id,
            "name": t.name,
            "role": t.role,
            "unix_user": t.unix_user or t.name,
            "created_at": t.created_at,
            "revoked": t.revoked,
        }
        for t in m.view().tokens.values()
    ]


@method("token_revoke", "admin", mutating=True)
async def token_revoke(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    m.ensure_leader()
    res = await m.propose(
        "token_revoke", {"id": param.string(a, "id")}, rid=request_id(conn, a, "token_revoke")
    )
    # Close live connections made with that token.
    m.close_connections(res["id"])
    return res


@method("whoami", "read")
async def whoami(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    return {"user": conn.context.get("user"), "role": conn.context.get("role")}


def prefer_leader(m: ApiContext) -> None:
    """Reads go to the leader when one is known, so a client reads its own writes."""
    if not m.is_leader():
        addr = m.leader_rpc_addr()
        if addr and addr != m.cfg.rpc_addr:
            raise m.not_leader()
