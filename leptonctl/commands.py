"""What each leptonctl command does, on top of the cluster client."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from leptond.wire.client import ClusterClient
from leptond.wire.errors import RpcError

from . import jobfile
from .output import ago, emit_json, size, table, until


class UsageError(Exception):
    pass


async def dispatch(c: ClusterClient, a: argparse.Namespace) -> int:
    cmd = a.cmd
    if cmd == "submit":
        return await submit(c, a)
    if cmd == "jobs":
        return await jobs(c, a)
    if cmd == "status":
        return await status(c, a)
    if cmd == "cancel":
        res = await c.call("cancel", {"job_id": a.job}, timeout_s=a.timeout)
        print(f"{res['id']} {res['state']}")
        return 0
    if cmd == "logs":
        return await logs(c, a)
    if cmd == "queue":
        return await queue(c, a)
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


# -- jobs ------------------------------------------------------------------------
def build_spec(a: argparse.Namespace) -> tuple[str | None, dict[str, Any], str | None]:
    d: dict[str, Any] = jobfile.load_toml(Path(a.file)) if a.file else {}
    flags = {
        "name": a.name,
        "gpus": a.gpus,
        "cpus": a.cpus,
        "mem": a.mem,
        "nodes": a.nodes,
        "priority": a.priority,
        "retries": a.retries,
        "gpu_type": a.gpu_type,
        "gpu_mem": a.gpu_mem,
        "spread": a.spread,
        "no_preempt": a.no_preempt,
        "time_limit": a.time_limit,
        "workdir": a.workdir,
    }
    d.update({k: v for k, v in flags.items() if v is not None})
    if a.env:
        d["env"] = {**(d.get("env") or {}), **jobfile.parse_kv(a.env, "--env")}
    if a.constraint:
        d["constraints"] = {
            **(d.get("constraints") or {}),
            **jobfile.parse_kv(a.constraint, "--constraint"),
        }
    if a.command:
        d["command"] = list(a.command)
    if not d.get("command"):
        raise UsageError(
            "no command: put it after --, e.g. leptonctl submit --gpus 1 -- python train.py"
        )
    name, spec = jobfile.to_spec(d)
    workdir = d.get("workdir")
    return name, spec, str(workdir) if workdir is not None else None


async def submit(c: ClusterClient, a: argparse.Namespace) -> int:
    name, spec, workdir = build_spec(a)
    upload: dict[str, Any] = {}
    if workdir is not None:
        from .workdir import upload_workdir

        base = Path(a.file).parent if a.file and not a.workdir else Path(".")
        spec["workdir"] = await upload_workdir(
            c, base / workdir, timeout_s=max(a.timeout, 600), stats=upload
        )
        if a.output != "json":
            print(
                f"workdir: {upload['blocks']} of {upload['total_blocks']} block(s) uploaded "
                f"({size(upload['bytes'])})",
                file=sys.stderr,
            )
    # One request id for every retry of this submit: the cluster makes one job.
    rid = uuid.uuid4().hex
    res = await c.call("submit", {"spec": spec, "name": name, "rid": rid}, timeout_s=a.timeout)
    job_id = res["id"]
    if a.output == "json" and not a.wait:
        emit_json({"id": job_id, **({"upload": upload} if upload else {})})
    else:
        print(job_id, flush=True)
    if not a.wait:
        return 0
    return await wait_job(c, job_id, a)


async def wait_job(c: ClusterClient, job_id: str, a: argparse.Namespace) -> int:
    delay = 0.1
    while True:
        st = await c.call("status", {"job_id": job_id}, timeout_s=a.timeout)
        if st["state"] in ("succeeded", "failed", "cancelled"):
            if a.output == "json":
                emit_json(st)
            codes = [t["exit_code"] for t in st["tasks"] if t.get("exit_code")]
            if st["state"] == "succeeded":
                return 0
            if st["state"] == "cancelled":
                print(f"leptonctl: job {job_id} was cancelled", file=sys.stderr)
                return 130 if not codes else int(codes[0])
            print(f"leptonctl: job {job_id} failed: {st.get('message', '')}", file=sys.stderr)
            return int(codes[0]) if codes else 1
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 1.0)


async def jobs(c: ClusterClient, a: argparse.Namespace) -> int:
    rows = await c.call("jobs", {"all": a.all}, timeout_s=a.timeout)
    if a.output == "json":
        emit_json(rows)
        return 0
    table(
        ["ID", "NAME", "USER", "STATE", "GPUS", "NODES", "SUBMITTED"],
        [
            [
                r["id"],
                r["name"],
                r["user"],
                r["state"],
                r["gpus"],
                r["nodes"],
                ago(r["submitted_at"]),
            ]
            for r in rows
        ],
    )
    return 0


async def status(c: ClusterClient, a: argparse.Namespace) -> int:
    st = await c.call("status", {"job_id": a.job}, timeout_s=a.timeout)
    if a.output == "json":
        emit_json(st)
        return 0
    print(f"job      {st['id']}  ({st['name']}, by {st['user']})")
    print(f"state    {st['state']}" + (f"  - {st['message']}" if st.get("message") else ""))
    print(f"command  {' '.join(st['command'])}")
    print(
        f"submitted {ago(st['submitted_at'])}; gpus {st['gpus']} x {st['nodes']} node(s); priority {st['priority']}"
    )
    if st.get("reason"):
        print(f"pending  {st['reason']}")
    table(
        ["RANK", "STATE", "NODE", "GPUS", "EXIT", "ATTEMPT", "MESSAGE"],
        [
            [
                t["rank"],
                t["state"] + (" (stopping)" if t.get("stopping") else ""),
                t["node"] or "-",
                ",".join(map(str, t["gpus"])) or "-",
                "-" if t["exit_code"] is None else t["exit_code"],
                t["attempt"],
                task_message(t),
            ]
            for t in st["tasks"]
        ],
    )
    return 0


def task_message(t: dict[str, Any]) -> str:
    """What happened to a task and, while it is pending, why it still waits."""
    said, reason = t["message"] or "", t.get("reason") or ""
    if said and reason and reason not in said:
        return f"{said} - {reason}"
    return reason or said


async def logs(c: ClusterClient, a: argparse.Namespace) -> int:
    args = {"job_id": a.job, "rank": a.rank, "follow": a.follow, "offset": 0}
    out = sys.stdout.buffer
    if a.follow:
        # Wait for the task to start so `submit ... && logs -f` just works.
        deadline = time.monotonic() + a.timeout
        while True:
            try:
                async for item in c.stream("logs", args):
                    out.write(item["data"])
                    out.flush()
                    args["offset"] = item["offset"]
                return 0
            except RpcError as exc:
                if exc.code != "not_started" or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)
    async for item in c.stream("logs", args):
        out.write(item["data"])
    out.flush()
    return 0


async def queue(c: ClusterClient, a: argparse.Namespace) -> int:
    rows = await c.call("queue", {}, timeout_s=a.timeout)
    if a.output == "json":
        emit_json(rows)
        return 0
    table(
        ["USER", "GPUS", "CPUS", "MEM", "SHARE", "PENDING", "PENDING GPUS", "QUOTA"],
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
            for r in rows
        ],
    )
    return 0


# -- nodes and cluster ---------------------------------------------------------
async def nodes(c: ClusterClient, a: argparse.Namespace) -> int:
    rows = await c.call("nodes", {}, timeout_s=a.timeout)
    if a.output == "json":
        emit_json(rows)
        return 0
    table(
        ["NAME", "ID", "STATE", "GPUS FREE", "GPU UTIL", "MODEL", "CPUS", "MEM", "LABELS"],
        [
            [
                r["name"],
                r["id"],
                node_state(r["state"], r.get("drain_deadline"), r.get("drain_reason") is not None),
                f"{r['gpus_free']}/{r['gpus_total']}",
                f"{r['gpu_util_pct']:.0f}%",
                ",".join(r["gpu_models"]) or "-",
                f"{r['cpus_used']:g}/{r['cpus']:g}",
                f"{size(r['mem_used_bytes'])}/{size(r['mem_bytes'])}",
                ",".join(f"{k}={v}" for k, v in r["labels"].items()) or "-",
            ]
            for r in rows
        ],
    )
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
    method = {"drain": "node_drain", "undrain": "node_undrain", "rm": "node_rm"}[sub]
    args: dict[str, Any] = {"node": a.node, "force": bool(getattr(a, "force", False))}
    if getattr(a, "deadline", None) is not None:
        args["deadline_s"] = drain_deadline_s(a.deadline)  # before anything is sent
    res = await c.call(method, args, timeout_s=a.timeout)
    if res.get("removed") is False and res.get("revoked"):
        print(f"{a.node}: credential revoked")  # a node id only a credential still named
        return 0
    state = node_state(
        res.get("state", "removed"), res.get("drain_deadline"), bool(res.get("drained"))
    )
    print(f"{a.node}: {state}")
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
        res = await c.call(
            "join_token_create", {"ttl_s": ttl_s, "uses": a.uses}, timeout_s=a.timeout
        )
        print(res["token"])
        return 0
    if a.join_cmd == "ls":
        rows = await c.call("join_token_ls", {}, timeout_s=a.timeout)
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
    res = await c.call("join_token_revoke", {"id": a.id}, timeout_s=a.timeout)
    print(f"revoked {res['id']}")
    return 0


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
        st = await c.call("cluster_status", {"health": True}, timeout_s=a.timeout)
        if a.output == "json":
            emit_json(st)
            return 0
        print(f"leader  {st.get('leader') or '-'} (rpc {st.get('leader_rpc') or '-'})")
        print(
            f"term    {st.get('term')}   commit index {st.get('commit_index')}   quorum {st.get('has_quorum')}"
        )
        me = {"addr": st.get("self"), "rpc_addr": "(answering)", "connected": True}
        rows = [dict(me, health=st.get("health")), *st.get("members", [])]
        table(
            ["MEMBER", "RPC", "MATCH INDEX", "LAG", "HEALTH"],
            [
                [
                    m.get("addr"),
                    m.get("rpc_addr") or "-",
                    m.get("match_index", "-"),
                    m.get("lag", "-"),
                    member_health(m),
                ]
                for m in rows
            ],
        )
        for p in st.get("problems", []):
            print(f"problem: {p}")
        return 0
    method = "cluster_add" if a.cluster_cmd == "add-master" else "cluster_remove"
    # One attempt may take a while: the leader waits for a just-started
    # master to answer the Raft handshake, then for the change to commit.
    wait_s = max(a.timeout, 30)
    res = await c.call(method, {"addr": a.member}, timeout_s=wait_s, attempt_timeout_s=wait_s)
    print(next(iter(res.values())))
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
        res = await c.call("snapshot_save", {}, timeout_s=max(a.timeout, 60))
        import os

        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(res["data"])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        print(f"saved state at index {res['index']} to {path} ({size(len(res['data']))})")
        return 0
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    res = await c.call("snapshot_restore", {"data": data}, timeout_s=max(a.timeout, 60))
    print(f"restored {res['jobs']} job(s) and {res['nodes']} node(s) from {path}")
    return 0


async def token(c: ClusterClient, a: argparse.Namespace) -> int:
    if a.token_cmd == "create":
        args = {"role": a.role, "name": a.name, "unix_user": a.unix_user}
        res = await c.call("token_create", args, timeout_s=a.timeout)
        print(res["token"])
        return 0
    if a.token_cmd == "ls":
        rows = await c.call("token_ls", {}, timeout_s=a.timeout)
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
    res = await c.call("token_revoke", {"id": a.id}, timeout_s=a.timeout)
    print(f"revoked {res['id']}")
    return 0
