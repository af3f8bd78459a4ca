"""Interactive sessions through the leader: `attach` (leptonctl run -it),
`exec` (leptonctl exec) and their keystrokes (`tty_input`).

The leader checks who may (the job's owner, or an admin), audits each
session once when it opens (keystrokes are not audited), and relays the
agent's stream (agent/sessions.py) under one of the user's relay slots; input
goes to the agent as notifications. An `attach` that ends because its client
went away (not because the task ended) cancels the job: an interactive task
lives as long as its session.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections.abc import AsyncIterator
from typing import Any

from raft.model import FINAL_JOB_STATES

from . import param
from .api import method
from .apictx import ApiContext
from .wire.connection import Connection
from .wire.errors import BAD_REQUEST, FORBIDDEN, NOT_FOUND, RpcError

log = logging.getLogger("lepton.master")

MAX_INPUT_BYTES = 64 * 1024
MAX_EXEC_ARGV_BYTES = 64 * 1024
MAX_TTY_SIDE = 10_000
_background: set[asyncio.Task[Any]] = set()
# The methods the leader serves when a client sends them as notifications
# (no reply): keystrokes only. Everything else must be a call (connection.py).
NOTIFIED = ("tty_input",)


def _job_task(m: ApiContext, conn: Connection, a: dict[str, Any]) -> tuple[Any, Any]:
    """The job and the task a session names, if the caller may use them."""
    jid = param.string(a, "job_id")
    rank = param.integer(a, "rank", 0, 1 << 20, 0)
    s = m.view()
    job = s.jobs.get(jid)
    if job is None:
        raise RpcError(NOT_FOUND, f"no job {jid!r}")
    if job.user != conn.context["user"] and conn.context["role"] != "admin":
        raise RpcError(
            FORBIDDEN, f"job {jid} belongs to {job.user}; only its owner or an admin can enter it"
        )
    if not 0 <= rank < len(job.tasks):
        raise RpcError(BAD_REQUEST, f"job {jid} has ranks 0-{len(job.tasks) - 1}")
    return job, s.tasks[job.tasks[rank]]


def _session(a: dict[str, Any]) -> str:
    s = param.string(a, "session", max_chars=64)
    if len(s) < 8:
        raise RpcError(BAD_REQUEST, "a session id is 8-64 characters")
    return s


def _running(m: ApiContext, job: Any, t: Any) -> str:
    """The node of a running task, or a one-line error."""
    if t.state != "running" or t.node_id is None:
        raise RpcError(
            "not_started", f"task {t.rank} of job {job.id} is {t.state}", job_state=job.state
        )
    if not m.channel.is_connected(t.node_id):
        raise RpcError("unavailable", "the task's host is not connected; try again shortly")
    return str(t.node_id)


def _size(a: dict[str, Any]) -> dict[str, int]:
    return {
        "rows": param.integer(a, "rows", 1, MAX_TTY_SIDE, 24),
        "cols": param.integer(a, "cols", 1, MAX_TTY_SIDE, 80),
    }


@method("attach", "submit", mutating=True, stream=True)
async def attach(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """The terminal of an interactive job's task: its output as it comes."""
    m.ensure_leader()
    job, t = _job_task(m, conn, a)
    if not job.spec.get("tty"):
        raise RpcError(BAD_REQUEST, f"job {job.id} has no terminal: start it with leptonctl run -t")
    node = _running(m, job, t)
    args = {"task_id": t.id, "attempt": t.attempt, "session": _session(a), **_size(a)}
    return _relay(m, conn, node, "attach", args, end_job=job.id)


@method("exec", "submit", mutating=True, stream=True)
async def exec_in(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """Run a command inside a running task: its output, then {"exit": code}."""
    m.ensure_leader()
    job, t = _job_task(m, conn, a)
    argv = a.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(x, str) for x in argv):
        raise RpcError(BAD_REQUEST, "exec needs a command after --")
    if sum(len(x.encode("utf-8", "replace")) for x in argv) > MAX_EXEC_ARGV_BYTES or any(
        "\x00" in x for x in argv
    ):
        raise RpcError(BAD_REQUEST, "the command is over 64 KiB or holds a NUL byte")
    node = _running(m, job, t)
    # The session is audited once (the decorator); the command with it.
    user, role = conn.context["user"], conn.context["role"]
    m.audit.record(user, role, "exec", job.id, f"ok: rank {t.rank}: {shlex.join(argv)[:512]}")
    args = {
        "task_id": t.id,
        "attempt": t.attempt,
        "session": _session(a),
        "argv": argv,
        "tty": param.flag(a, "tty"),
        **_size(a),
    }
    return _relay(m, conn, node, "exec", args, end_job=None)


@method("tty_input", "submit")
async def tty_input(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """Keystrokes (`data`) and a window size (`rows`, `cols`) for a session."""
    m.ensure_leader()
    job, t = _job_task(m, conn, a)
    data = a.get("data") or b""
    if not isinstance(data, bytes) or len(data) > MAX_INPUT_BYTES:
        raise RpcError(BAD_REQUEST, f"input is bytes, at most {MAX_INPUT_BYTES} at a time")
    if t.node_id is None:
        raise RpcError("not_started", f"task {t.rank} of job {job.id} is {t.state}")
    session = _session(a)
    if (t.id, session) not in m.sessions:
        # Nothing would read it: refused here rather than sent to the host.
        raise RpcError(NOT_FOUND, f"no session {session!r} open on job {job.id} rank {t.rank}")
    args: dict[str, Any] = {"task_id": t.id, "session": session, "data": data}
    if a.get("rows") is not None or a.get("cols") is not None:
        args.update(_size(a))
    if not m.channel.push_input(t.node_id, args):
        raise RpcError("busy", "the host is behind on input; send it again shortly")
    return {"ok": True}


async def _relay(
    m: ApiContext,
    conn: Connection,
    node_id: str,
    method_name: str,
    args: dict[str, Any],
    end_job: str | None,
) -> AsyncIterator[Any]:
    user = conn.context["user"]
    m.relays.take(user)
    key = (str(args["task_id"]), str(args["session"]))
    m.sessions[key] += 1
    ended = False
    try:
        async for item in m.channel.stream(node_id, method_name, args):
            yield item
        ended = True
    finally:
        m.relays.give(user)
        m.sessions[key] -= 1
        if m.sessions[key] <= 0:
            del m.sessions[key]
        if end_job is not None and not ended:
            _cancel_later(m, end_job, user)


def _cancel_later(m: ApiContext, job_id: str, user: str) -> None:
    """The client of an interactive job went away: end the job, off this
    (closing) stream's task."""
    job = m.view().jobs.get(job_id)
    if job is None or job.state in FINAL_JOB_STATES:
        return

    async def cancel() -> None:
        try:
            await m.propose(
                "cancel_job",
                {"job_id": job_id, "user": user, "admin": True, "now": m.clock.now()},
                wake=True,
            )
            log.info("job %s cancelled: its interactive session ended", job_id)
        except Exception as exc:  # a reconcile loop's rule: log and go on
            log.warning("could not cancel job %s after its session ended: %s", job_id, exc)

    task = asyncio.ensure_future(cancel())
    _background.add(task)
    task.add_done_callback(_background.discard)
