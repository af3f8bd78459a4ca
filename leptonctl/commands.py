"""What each leptonctl command does, on top of the calls in api.py."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Any

from leptond.client import calls as api
from leptond.wire.client import ClusterClient

from . import interactive, jobfile, jobs
from .jobs import UsageError
from .logs import Follower, Options
from .output import ago, clean, emit_json, say, size, table, until

__all__ = ["UsageError", "dispatch", "node_state"]


async def dispatch(c: ClusterClient, a: argparse.Namespace) -> int:
    cmd = a.cmd
    if cmd == "submit":
        return await jobs.submit(c, a)
    if cmd == "run":
        return await interactive.run(c, a)
    if cmd == "exec":
        return await interactive.exec_in(c, a)
    if cmd == "jobs":
        return await jobs.jobs(c, a)
    if cmd == "status":
        return await jobs.status(c, a)
    if cmd == "cancel":
        return await jobs.cancel(c, a)
    if cmd == "logs":
        return await logs(c, a)
    if cmd == "queue":
        return await queue(c, a)
    if cmd == "usage":
        return await usage(c, a)
    if cmd == "top":
        if not sys.stdout.isatty():
            raise UsageError("top draws on a terminal; for scripts use nodes, jobs or queue")
        from . import top

        return await top.run(c, a.timeout)
    if cmd == "nodes":
        return await nodes(c, a)
    if cmd in ("node", "drain"):
        return await node(c, a)
    if cmd == "cluster":
        return await cluster(c, a)
    if cmd == "snapshot":
        return await snapshot(c, a)
    if cmd == "token":
        return await token(c, a)
    raise UsageError(f"unknown command {cmd}")


async def logs(c: ClusterClient, a: argparse.Namespace) -> int:
    if a.all and a.rank is not None:
        raise UsageError("--rank and --all: choose one")
    if a.index is not None and (a.all or a.rank is not None):
        raise UsageError("--index names one task of an array: no --rank or --all with it")
    if a.tail is not None and a.tail < 0:
        raise UsageError(f"--tail takes a number of lines, 0 or more, got {a.tail}")
    opts = Options(
        ranks=None if a.all else [a.rank or 0],
        follow=a.follow,
        stream="stderr" if a.stderr else "output",
        tail=a.tail,
        timestamps=a.timestamps,
        hint_ranks=a.rank is None,
        index=a.index,
    )
    return await Follower(c, a.job, opts, a.timeout).run()


async def queue(c: ClusterClient, a: argparse.Namespace) -> int:
    rows = await api.queue(c, timeout_s=a.timeout)
    if a.output == "json":
        emit_json(rows)
        return 0
    # With --fair-share-half-life on the masters, the decayed usage the
    # scheduler adds to each share shows too.
    past = any(r.get("past_share") for r in rows)
    table(
        ["USER", "GPUS", "CPUS", "MEM", "SHARE", "PENDING", "PENDING GPUS", "QUOTA"]
        + (["PAST USAGE"] if past else []),
        [
            [
                r["user"],
                r["gpus"],
                r["cpus"],
                size(r["mem_bytes"]),
                f"{r['dominant_share']:.3f}",
                r["pending_tasks"],
                r["pending_gpus"],
                r.get("quota_gpus") or "-",
            ]
            + ([f"{r.get('past_share', 0.0):.3f}"] if past else [])
            for r in rows
        ],
    )
    return 0


USAGE_COLUMNS = {
    "user": ["user", "gpu_hours", "cpu_hours", "succeeded", "failed", "cancelled", "running_tasks"],
    "job": ["job", "name", "user", "state", "gpu_hours", "cpu_hours"],
}


async def usage(c: ClusterClient, a: argparse.Namespace) -> int:
    try:
        since_s = jobfile.parse_duration(a.since)
    except jobfile.JobFileError:
        raise UsageError(f"--since: not a duration: {a.since!r} (try 1d, 7d or 30d)") from None
    if not 0 < since_s <= 3650 * 86400:
        raise UsageError(f"--since must be more than 0s and at most 3650d, got {a.since!r}")
    res = await api.usage(c, since_s, a.by, timeout_s=a.timeout)
    rows = res["rows"]
    if a.output == "json":
        emit_json(rows)
        return 0
    cols = USAGE_COLUMNS[a.by]
    flat = [{**r, **(r.get("jobs") or {})} for r in rows]
    if a.output == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        # Cleaned as the table is: a name may hold terminal escapes.
        w.writerows([[clean(r.get(k, "")) for k in cols] for r in flat])
        return 0
    table(
        [k.replace("_", " ").upper() for k in cols],
        [[f"{r[k]:.2f}" if k.endswith("_hours") else r.get(k, "") for k in cols] for r in flat],
    )
    return 0


# -- nodes and cluster ---------------------------------------------------------
async def nodes(c: ClusterClient, a: argparse.Namespace) -> int:
    rows = await api.nodes(c, timeout_s=a.timeout)
    if a.output == "json":
        emit_json(rows)
        return 0
    # Every resource as used/total; utilisation only for what is up (a down
    # node's last figures are stale).
    faults = [
        f"{r['name']}: GPU {f['index']} unhealthy: {f['reason']} "
        f"(leptonctl node gpu reset {r['name']} {f['index']})"
        for r in rows
        for f in r.get("gpu_faults") or []
    ]
    full = [f"{r['name']}: takes no new tasks: {r['disk_low']}" for r in rows if r.get("disk_low")]
    table(
        ["NAME", "ID", "STATE", "GPUS", "GPU UTIL", "MODEL", "CPUS", "MEM", "LABELS"],
        [
            [
                r["name"],
                r["id"],
                node_state(r["state"], r.get("drain_deadline"), r.get("drain_reason") is not None)
                + disk_tag(r.get("disk_low")),
                f"{r['gpus_used']}/{r['gpus_total']}"
                + (f" ({r['gpus_unhealthy']} unhealthy)" if r.get("gpus_unhealthy") else ""),
                "-" if r.get("gpu_util_pct") is None else f"{r['gpu_util_pct']:.0f}%",
                ",".join(r["gpu_models"]) or "-",
                f"{r['cpus_used']:g}/{r['cpus']:g}",
                f"{size(r['mem_used_bytes'])}/{size(r['mem_bytes'])}",
                ",".join(f"{k}={v}" for k, v in r["labels"].items()) or "-",
            ]
            for r in rows
        ],
    )
    for line in faults + full:
        say(line)
    return 0


MAX_DRAIN_DEADLINE_S = 366 * 86400  # the masters refuse longer ones too


def drain_deadline_s(text: str) -> float:
    """--deadline DURATION -> seconds, or a UsageError that says what was wrong."""
    try:
        seconds = jobfile.parse_duration(text)
    except jobfile.JobFileError:
        raise UsageError(f"--deadline: not a duration: {text!r} (try 30s, 10m or 1h)") from None
    if not 0 < seconds <= MAX_DRAIN_DEADLINE_S:
        raise UsageError(f"--deadline must be more than 0s and at most 366d, got {text!r}")
    return seconds


async def node(c: ClusterClient, a: argparse.Namespace) -> int:
    sub = "drain" if a.cmd == "drain" else a.node_cmd
    if sub == "join-token":
        return await join_token(c, a)
    if sub == "gpu":
        res = await api.gpu_reset(c, a.node, a.gpu)
        say(f"{res['node']}: GPU {res['gpu']} {res['state']} ({res['burn_in']})")
        return 0
    deadline_s = None
    if getattr(a, "deadline", None) is not None:
        deadline_s = drain_deadline_s(a.deadline)  # before anything is sent
    force = bool(getattr(a, "force", False))
    res = await api.node_change(
        c, sub, a.node, force=force, deadline_s=deadline_s, timeout_s=a.timeout
    )
    if res.get("removed") is False and res.get("revoked"):
        say(f"{a.node}: credential revoked")  # a node id only a credential still named
        return 0
    state = node_state(
        res.get("state", "removed"), res.get("drain_deadline"), bool(res.get("drained"))
    )
    say(f"{a.node}: {state}")
    return 0


async def join_token(c: ClusterClient, a: argparse.Namespace) -> int:
    if a.join_cmd == "create":
        try:
            ttl_s = jobfile.parse_duration(a.ttl)
        except jobfile.JobFileError:
            raise UsageError(f"--ttl: not a duration: {a.ttl!r} (try 30m, 1h or 7d)") from None
        if not 0 < ttl_s <= MAX_DRAIN_DEADLINE_S:
            raise UsageError(f"--ttl must be more than 0s and at most 366d, got {a.ttl!r}")
        if a.uses < 1:
            raise UsageError(f"--uses must be at least 1, got {a.uses}")
        res = await api.join_token_create(c, ttl_s, a.uses, timeout_s=a.timeout)
        say(res["token"])
        return 0
    if a.join_cmd == "ls":
        rows = await api.join_token_ls(c, timeout_s=a.timeout)
        if a.output == "json":
            emit_json(rows)
            return 0
        table(
            ["ID", "CREATED BY", "EXPIRES", "USED", "REVOKED"],
            [
                [
                    r["id"],
                    r["created_by"] or "-",
                    "never"
                    if r["expires_at"] is None
                    else (f"in {left}" if (left := until(r["expires_at"])) else "expired"),
                    f"{r['used']}/{r['max_uses'] or 'any'}",
                    "yes" if r["revoked"] else "no",
                ]
                for r in rows
            ],
        )
        return 0
    res = await api.join_token_revoke(c, a.id, timeout_s=a.timeout)
    say(f"revoked {res['id']}")
    return 0


def disk_tag(low: Any) -> str:
    """The STATE column's note for a node under its disk reserve: which one
    ran short, bytes or inodes (the agent's reason says it first)."""
    if not low:
        return ""
    return " (inodes full)" if str(low).startswith("inodes full") else " (disk full)"


def node_state(state: str, drain_deadline: float | None, drained: bool = False) -> str:
    """draining, draining (deadline in 5m); a down node that comes back
    draining: down (drained), down (drained, deadline passed)."""
    deadline = None
    if drain_deadline is not None:
        left = until(drain_deadline)
        deadline = f"deadline {'passed' if left is None else 'in ' + left}"
    if state == "down" and drained:
        return f"down (drained, {deadline})" if deadline else "down (drained)"
    if state != "draining" or deadline is None:
        return state
    return f"draining ({deadline})"


async def cluster(c: ClusterClient, a: argparse.Namespace) -> int:
    if a.cluster_cmd == "status":
        return await cluster_status(c, a)
    how = "add" if a.cluster_cmd == "add-master" else "remove"
    res = await api.cluster_membership(c, how, a.member, timeout_s=a.timeout)
    say(next(iter(res.values())))
    return 0


async def cluster_status(c: ClusterClient, a: argparse.Namespace) -> int:
    """The same table from any master: asked through a follower, the leader
    answers (only it knows each member's lag); without a leader, the master
    reached answers for itself and says so."""
    st = await api.cluster_status(c, timeout_s=a.timeout)
    if a.output == "json":
        emit_json(st)
        return 0
    leader = st.get("leader")
    if leader:
        say(f"leader  {leader} (rpc {st.get('leader_rpc') or '-'})")
    else:
        say(f"leader  none: this is master {st.get('self')}'s own view")
    quorum = "yes" if st.get("has_quorum") else "no"
    say(f"term    {st.get('term')}   commit index {st.get('commit_index')}   quorum {quorum}")
    me = {
        "addr": st.get("self"),
        "rpc_addr": st.get("self_rpc"),
        "connected": True,
        "health": st.get("health"),
        "match_index": st.get("commit_index") if st.get("is_leader") else None,
        "lag": 0 if st.get("is_leader") else None,
    }
    rows = sorted([me, *st.get("members", [])], key=lambda m: str(m.get("addr")))
    table(
        ["MEMBER", "RPC", "ROLE", "MATCH INDEX", "LAG", "HEALTH"],
        [
            [
                m.get("addr"),
                m.get("rpc_addr") or "-",
                "leader" if m.get("addr") == leader else ("follower" if leader else "-"),
                "-" if m.get("match_index") is None else m["match_index"],
                "-" if m.get("lag") is None else m["lag"],
                member_health(m),
            ]
            for m in rows
        ],
    )
    for p in st.get("problems", []):
        say(f"problem: {p}")
    return 0


def member_health(m: dict[str, Any]) -> str:
    """ok, unreachable, or what is wrong with it: disk low, journal not writable, no leader."""
    if not m.get("connected"):
        return "unreachable"
    h = m.get("health")
    if not isinstance(h, dict):
        return "ok" if "health" not in m else "no answer"
    disk = h.get("disk") or {}
    bad = []
    if disk.get("low"):
        bad.append("disk low")
    if disk.get("journal_writable") is False:
        bad.append("journal not writable")
    if h.get("leader") is None:
        bad.append("no leader")
    return ", ".join(bad) or "ok"


async def snapshot(c: ClusterClient, a: argparse.Namespace) -> int:
    path = Path(a.file)
    if a.snap_cmd == "save":
        return await snapshot_save(c, a, path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    # What it replaces, asked before anything changes.
    check = await api.snapshot_check(c, data, timeout_s=a.timeout)
    now, theirs = check["current"], check["snapshot"]
    what = (
        f"restoring {path} replaces the whole cluster state, {now['jobs']} job(s) and "
        f"{now['nodes']} node(s) now, with the snapshot's {theirs['jobs']} job(s) and "
        f"{theirs['nodes']} node(s)"
    )
    if not a.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"{what}; run it again with --yes to go ahead")
        say(what, file=sys.stderr)
        try:
            typed = input("type 'restore' to go ahead: ")
        except EOFError:
            typed = ""
        if typed.strip() != "restore":
            say("leptonctl: not restored; nothing changed", file=sys.stderr)
            return 1
    res = await api.snapshot_restore(c, data, timeout_s=a.timeout)
    say(f"restored {res['jobs']} job(s) and {res['nodes']} node(s) from {path}")
    return 0


async def snapshot_save(c: ClusterClient, a: argparse.Namespace, path: Path) -> int:
    # Where it goes is checked first: no point fetching a snapshot to nowhere.
    where = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a directory")
    if not where.is_dir():
        raise UsageError(f"cannot write {path}: no directory {where}")
    if not os.access(where, os.W_OK):
        raise UsageError(f"cannot write {path}: {where} is not writable")
    res = await api.snapshot_save(c, timeout_s=a.timeout)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(res["data"])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    say(f"saved state at index {res['index']} to {path} ({size(len(res['data']))})")
    return 0


async def token(c: ClusterClient, a: argparse.Namespace) -> int:
    if a.token_cmd == "create":
        res = await api.token_create(c, a.role, a.name, a.unix_user, timeout_s=a.timeout)
        say(res["token"])
        return 0
    if a.token_cmd == "ls":
        rows = await api.token_ls(c, timeout_s=a.timeout)
        if a.output == "json":
            emit_json(rows)
            return 0
        table(
            ["ID", "NAME", "ROLE", "UNIX USER", "CREATED", "REVOKED"],
            [
                [
                    r["id"],
                    r["name"],
                    r["role"],
                    r.get("unix_user", ""),
                    ago(r["created_at"]),
                    "yes" if r["revoked"] else "no",
                ]
                for r in rows
            ],
        )
        return 0
    res = await api.token_revoke(c, a.id, timeout_s=a.timeout)
    say(f"revoked {res['id']}")
    return 0
