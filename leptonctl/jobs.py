"""Jobs from the shell: submit (and wait), list, inspect, cancel."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from leptond.client import calls as api
from leptond.clock import REAL as clock
from leptond.wire.client import ClusterClient
from leptond.wire.errors import UNSCHEDULABLE, RpcError

from . import jobfile
from .logs import FINAL_JOB_STATES, Follower, Options
from .output import ago, emit_json, job_state, ran_for, say, size, table


class UsageError(Exception):
    pass


# -- submit ----------------------------------------------------------------------
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
        "signal": a.signal,
        "preempt_grace": a.preempt_grace,
        "array": a.array,
        "max_running": a.max_running,
        "after": a.after,
        "after_any": a.after_any,
        "after_ok": a.after_ok,
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
            say(f"workdir: {upload_words(upload)}", file=sys.stderr)
    try:
        res = await api.submit(c, spec, name, queue_anyway=a.queue_anyway, timeout_s=a.timeout)
    except RpcError as exc:
        if exc.code == UNSCHEDULABLE:
            raise RpcError(
                exc.code, f"{exc.message}; --queue-anyway keeps it waiting for such a node"
            ) from None
        raise
    job_id = res["id"]
    streaming = a.wait and not a.quiet and a.output != "json"
    if a.output == "json" and not a.wait:
        emit_json({"id": job_id, **({"upload": upload} if upload else {})})
    elif streaming:
        # stdout is the job's output; the id goes to stderr.
        say(f"leptonctl: submitted {job_id}; its output follows", file=sys.stderr, flush=True)
    else:
        say(job_id, flush=True)
    if not a.wait:
        return 0
    if streaming and spec.get("array") is not None:
        say(
            f"leptonctl: an array's tasks are many: `leptonctl logs {job_id} --index I` "
            "shows one; waiting for all of them",
            file=sys.stderr,
        )
    elif streaming:
        ranks = None if a.all else [0]
        opts = Options(ranks=ranks, follow=True, hint_ranks=False)
        await Follower(c, job_id, opts, a.timeout).run()
    return await wait_job(c, job_id, a)


def upload_words(u: dict[str, Any]) -> str:
    """What the workdir upload did, in words: reused blocks are no failure."""
    total, sent = u["total_blocks"], u["blocks"]
    whole = f"{total} block(s), {size(u.get('bytes_total', 0))}"
    if sent == 0:
        return f"{whole}, all already on the cluster (nothing to upload)"
    if sent == total:
        return f"{whole}, uploaded"
    return f"{whole}: uploaded {sent} that changed ({size(u['bytes'])}), reused the rest"


async def wait_job(c: ClusterClient, job_id: str, a: argparse.Namespace) -> int:
    """Wait for the job to end; exit with its exit code (130 when cancelled)."""
    delay = 0.1
    while True:
        st = await api.status(c, job_id, timeout_s=a.timeout, brief=True)
        if st["state"] in FINAL_JOB_STATES:
            if a.output == "json":
                emit_json(await api.status(c, job_id, timeout_s=a.timeout))
            codes = [t["exit_code"] for t in st["tasks"] if t.get("exit_code")]
            if st["state"] == "succeeded":
                return 0
            if st["state"] == "cancelled":
                say(f"leptonctl: job {job_id} was cancelled", file=sys.stderr)
                return 130 if not codes else int(codes[0])
            say(f"leptonctl: job {job_id} failed: {st.get('message', '')}", file=sys.stderr)
            return int(codes[0]) if codes else 1
        await clock.sleep(delay)
        delay = min(delay * 1.5, 1.0)


# -- jobs and status ---------------------------------------------------------------
def job_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["id"],
            r["name"],
            r["user"],
            job_state(r) + (f" [{task_counts(r)}]" if r.get("array") is not None else ""),
            r.get("gpus_total", r["gpus"]),
            r["nodes"],
            ago(r["submitted_at"]),
            ago(r.get("started_at")),
            ago(r.get("finished_at")),
            ran_for(r.get("started_at"), r.get("finished_at")),
        ]
        for r in rows
    ]


JOB_HEADERS = ["ID", "NAME", "USER", "STATE", "GPUS", "NODES", "SUBMITTED", "STARTED", "ENDED"]


async def jobs(c: ClusterClient, a: argparse.Namespace) -> int:
    async def fetch() -> list[dict[str, Any]]:
        return await api.jobs(
            c,
            all=a.all,
            states=a.state or (),
            user=a.user,
            limit=a.limit,
            timeout_s=a.timeout,
        )

    if not a.watch:
        rows = await fetch()
        if a.output == "json":
            emit_json(rows)
        else:
            table([*JOB_HEADERS, "DURATION"], job_rows(rows))
        return 0
    tty = sys.stdout.isatty()
    while True:  # until Ctrl-C
        rows = await fetch()
        if tty:
            sys.stdout.write("\x1b[H\x1b[2J")  # redraw in place
        now = clock.now()
        at = datetime.fromtimestamp(now).strftime("%H:%M:%S")
        say(f"every {a.interval:g}s, {at} (Ctrl-C stops)")
        table([*JOB_HEADERS, "DURATION"], job_rows(rows))
        if not tty:
            print()
        sys.stdout.flush()
        await clock.sleep(a.interval)


async def status(c: ClusterClient, a: argparse.Namespace) -> int:
    st = await api.status(c, a.job, timeout_s=a.timeout, index=a.index)
    if a.output == "json":
        emit_json(st)
        return 0
    say(f"job       {st['id']}  ({st['name']}, by {st['user']})")
    say(f"state     {job_state(st)}" + (f"  - {st['message']}" if st.get("message") else ""))
    say(f"command   {' '.join(st['command'])}")
    gpus, nodes = st["gpus"], st["nodes"]
    per = f"{gpus} per node x {nodes} nodes ({gpus * nodes} in all)" if nodes > 1 else str(gpus)
    say(f"gpus      {per}; priority {st['priority']}")
    when = [f"submitted {ago(st['submitted_at'])}"]
    if st.get("started_at"):
        when.append(f"started {ago(st['started_at'])}")
    if st.get("finished_at"):
        when.append(f"ended {ago(st['finished_at'])}")
    if st.get("started_at"):
        when.append(f"ran {ran_for(st['started_at'], st.get('finished_at'))}")
    say(f"time      {'; '.join(when)}")
    if st.get("waiting_on"):
        say(f"waits for {', '.join(st['waiting_on'])}")
    if st.get("reason"):
        say(f"pending   {st['reason']}")
    if st.get("array") is not None:
        limit = f"; at most {st['max_running']} at once" if st.get("max_running") else ""
        say(f"array     {st['array_tasks']} tasks ({st['array']}){limit}")
        say(f"tasks     {task_counts(st)}")
        if a.index is None:
            if not st["tasks"]:
                return 0
            more = " (the first of them)" if st.get("tasks_cut") else ""
            say(f"failed tasks{more}:")
    table(
        [
            "INDEX" if st.get("array") is not None else "RANK",
            "STATE",
            "NODE",
            "GPUS",
            "EXIT",
            "ATTEMPT",
            "STARTED",
            "ENDED",
            "MESSAGE",
        ],
        [
            [
                t["rank"],
                t["state"] + (" (stopping)" if t.get("stopping") else ""),
                t["node"] or "-",
                ",".join(map(str, t["gpus"])) or "-",
                "-" if t["exit_code"] is None else t["exit_code"],
                t["attempt"],
                ago(t.get("started_at")),
                ago(t.get("finished_at")),
                task_message(t),
            ]
            for t in st["tasks"]
        ],
    )
    return 0


def task_counts(r: dict[str, Any]) -> str:
    """An array's tasks by state: `3 running, 90 pending, 7 succeeded`."""
    order = ["running", "assigned", "pending", "succeeded", "failed", "lost", "cancelled"]
    counts = r.get("task_states") or {}
    return ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k))


def task_message(t: dict[str, Any]) -> str:
    """What happened to a task and, while it is pending, why it still waits."""
    said, reason = t["message"] or "", t.get("reason") or ""
    if said and reason and reason not in said:
        return f"{said} - {reason}"
    return reason or said


# -- cancel ------------------------------------------------------------------------
async def cancel(c: ClusterClient, a: argparse.Namespace) -> int:
    """Cancel the jobs named, or every job of a user in the states given."""
    filtered = a.user is not None or bool(a.state)
    if a.jobs and filtered:
        raise UsageError("give job ids, or --user/--state to choose jobs, not both")
    if not a.jobs and not filtered:
        raise UsageError("cancel what? give job ids, or --user U and/or --state pending")
    ids = list(dict.fromkeys(a.jobs))
    if a.index is not None:
        if filtered or len(ids) != 1:
            raise UsageError("--index names a task of one job array: give exactly one JOB")
        res = await api.cancel(c, ids[0], timeout_s=a.timeout, index=a.index)
        say(f"{res['id']} --index {res['index']} {res['state']}")
        return 0
    if filtered:
        me = await api.whoami(c, timeout_s=a.timeout)
        user = a.user or me["user"]
        if user != me["user"] and me["role"] != "admin":
            raise RpcError(
                "forbidden",
                f"you ({me['user']}) may cancel only your own jobs; an admin can cancel {user}'s",
            )
        states = a.state or ["pending", "running"]
        rows = await api.jobs(c, states=states, user=user, limit=100_000, timeout_s=a.timeout)
        ids = [r["id"] for r in rows]
        if not ids:
            say(f"leptonctl: {user} has no {' or '.join(states)} jobs", file=sys.stderr)
            return 0
    failed = 0
    for job_id in ids:
        try:
            res = await api.cancel(c, job_id, timeout_s=a.timeout)
        except RpcError as exc:
            if exc.code in ("unavailable", "timeout", "no_quorum", "unauthenticated"):
                raise  # the cluster, not this job: the rest would fail the same way
            say(f"leptonctl: {job_id}: {exc.message}", file=sys.stderr)
            failed += 1
            continue
        say(f"{res['id']} {res['state']}")
    return 1 if failed else 0
