"""Every call a client makes to the cluster, in one place: the method names,
the shape of their arguments and the time each may take. The SDK's clients
(aio.py, sync.py) and every leptonctl command call only these.

Each function takes a `ClusterClient` (leptond.wire.client), which follows
the leader and retries; writes carry one request id for all their retries.
Errors come out typed (errors.py): each is still an RpcError.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from leptond.wire.client import ClusterClient
from leptond.wire.errors import RpcError

from .errors import typed

DEFAULT_TIMEOUT_S = 20.0
SLOW_TIMEOUT_S = 60.0


async def _call(c: ClusterClient, method: str, args: Any, **kw: Any) -> Any:
    try:
        return await c.call(method, args, **kw)
    except RpcError as exc:
        raise typed(exc) from None


async def _stream(c: ClusterClient, method: str, args: Any) -> AsyncIterator[Any]:
    try:
        async for item in c.stream(method, args):
            yield item
    except RpcError as exc:
        raise typed(exc) from None


# -- jobs ------------------------------------------------------------------------
async def submit(
    c: ClusterClient,
    spec: dict[str, Any],
    name: str | None,
    *,
    queue_anyway: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    # One request id for every retry of this submit: the cluster makes one job.
    args: dict[str, Any] = {"spec": spec, "name": name, "rid": uuid.uuid4().hex}
    if queue_anyway:
        args["queue_anyway"] = True
    return dict(await _call(c, "submit", args, timeout_s=timeout_s))


async def jobs(
    c: ClusterClient,
    *,
    all: bool = False,
    states: Sequence[str] = (),
    user: str | None = None,
    limit: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    args: dict[str, Any] = {"all": all}
    if states:
        args["state"] = list(states)
    if user:
        args["user"] = user
    if limit is not None:
        args["limit"] = limit
    return await _pages(c, "jobs", args, timeout_s)


async def _pages(
    c: ClusterClient, method: str, args: dict[str, Any], timeout_s: float
) -> list[dict[str, Any]]:
    """Every row of a paged listing (`jobs`, `nodes`), page by page: each
    reply is bounded in bytes, however many rows there are."""
    args = {**args, "paged": True}
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    while True:
        res = await _call(c, method, args, timeout_s=timeout_s)
        if isinstance(res, list):  # a master from before pages
            return out + res
        # A row removed between two pages can bring one back twice (nodes).
        out += [r for r in res[method] if r["id"] not in seen]
        seen.update(r["id"] for r in res[method])
        if not res.get("next"):
            return out
        args["after"] = res["next"]


async def status(
    c: ClusterClient,
    job_id: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    brief: bool = False,
    index: int | None = None,
) -> dict[str, Any]:
    """brief: states, tasks and times without the spec (no audited read).
    index: one task of a job array (its only entry in `tasks`)."""
    args: dict[str, Any] = {"job_id": job_id, "brief": True} if brief else {"job_id": job_id}
    if index is not None:
        args["index"] = index
    return dict(await _call(c, "status", args, timeout_s=timeout_s))


async def cancel(
    c: ClusterClient, job_id: str, timeout_s: float = DEFAULT_TIMEOUT_S, index: int | None = None
) -> dict[str, Any]:
    """Cancel a job, or with `index` one task of a job array."""
    args: dict[str, Any] = {"job_id": job_id}
    if index is not None:
        args["index"] = index
    return dict(await _call(c, "cancel", args, timeout_s=timeout_s))


def logs(
    c: ClusterClient,
    job_id: str,
    rank: int,
    *,
    index: int | None = None,
    follow: bool = False,
    offset: int = 0,
    stream: str = "output",
    tail_lines: int | None = None,
    timestamps: bool = False,
) -> AsyncIterator[dict[str, Any]]:
    """Items {data, offset[, times]}; `not_started` (with `job_state`) when the
    task has not started."""
    args: dict[str, Any] = {
        "job_id": job_id,
        "rank": rank,
        "follow": follow,
        "offset": offset,
        "stream": stream,
        "timestamps": timestamps,
    }
    if tail_lines is not None:
        args["tail_lines"] = tail_lines
    if index is not None:
        args["index"] = index
    return _stream(c, "logs", args)


# -- interactive sessions -------------------------------------------------------------
def attach(
    c: ClusterClient, job_id: str, session: str, rows: int, cols: int
) -> AsyncIterator[dict[str, Any]]:
    """An interactive job's terminal: items {data} until its task ends."""
    args = {"job_id": job_id, "session": session, "rows": rows, "cols": cols}
    return _stream(c, "attach", args)


def exec_in(
    c: ClusterClient,
    job_id: str,
    argv: list[str],
    session: str,
    *,
    rank: int = 0,
    tty: bool = False,
    rows: int = 24,
    cols: int = 80,
) -> AsyncIterator[dict[str, Any]]:
    """A command inside a running task: items {data}, then {exit}."""
    args = {"job_id": job_id, "rank": rank, "argv": argv, "session": session, "tty": tty}
    args.update(rows=rows, cols=cols)
    return _stream(c, "exec", args)


async def tty_input(
    c: ClusterClient,
    job_id: str,
    session: str,
    data: bytes = b"",
    *,
    rank: int = 0,
    size: tuple[int, int] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Keystrokes, or a new window size, for a session."""
    args: dict[str, Any] = {"job_id": job_id, "session": session, "data": data, "rank": rank}
    if size is not None:
        args["rows"], args["cols"] = size
    await _call(c, "tty_input", args, timeout_s=timeout_s)


async def queue(c: ClusterClient, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[dict[str, Any]]:
    return list(await _call(c, "queue", {}, timeout_s=timeout_s))


async def usage(
    c: ClusterClient, since_s: float, by: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    return dict(await _call(c, "usage", {"since_s": since_s, "by": by}, timeout_s=timeout_s))


async def overview(c: ClusterClient, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Nodes, running and pending jobs in one answer (what `leptonctl top` draws)."""
    return dict(await _call(c, "overview", {}, timeout_s=timeout_s))


async def whoami(c: ClusterClient, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    return dict(await _call(c, "whoami", {}, timeout_s=timeout_s))


# -- nodes ------------------------------------------------------------------------
async def nodes(
    c: ClusterClient, timeout_s: float = DEFAULT_TIMEOUT_S, states: Sequence[str] = ()
) -> list[dict[str, Any]]:
    args: dict[str, Any] = {"state": list(states)} if states else {}
    return await _pages(c, "nodes", args, timeout_s)


async def gpu_reset(
    c: ClusterClient, node: str, gpu: int, timeout_s: float = 360.0
) -> dict[str, Any]:
    """The burn-in runs on the host first: this may take minutes."""
    # One attempt for the whole wait: a retry after the usual 6 s would give up
    # on a burn-in still running and start another on the host (under load,
    # loading torch alone can take longer: each retry started one more).
    args = {"node": node, "gpu": gpu}
    return dict(
        await _call(c, "node_gpu_reset", args, timeout_s=timeout_s, attempt_timeout_s=timeout_s)
    )


async def node_change(
    c: ClusterClient,
    how: str,
    node: str,
    *,
    force: bool = False,
    deadline_s: float | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """how: drain, undrain or rm."""
    method = {"drain": "node_drain", "undrain": "node_undrain", "rm": "node_rm"}[how]
    args: dict[str, Any] = {"node": node, "force": force}
    if deadline_s is not None:
        args["deadline_s"] = deadline_s
    return dict(await _call(c, method, args, timeout_s=timeout_s))


async def join_token_create(
    c: ClusterClient, ttl_s: float, uses: int, timeout_s: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    args = {"ttl_s": ttl_s, "uses": uses}
    return dict(await _call(c, "join_token_create", args, timeout_s=timeout_s))


async def join_token_ls(
    c: ClusterClient, timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[dict[str, Any]]:
    return list(await _call(c, "join_token_ls", {}, timeout_s=timeout_s))


async def join_token_revoke(
    c: ClusterClient, token_id: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    return dict(await _call(c, "join_token_revoke", {"id": token_id}, timeout_s=timeout_s))


# -- cluster ----------------------------------------------------------------------
async def cluster_status(c: ClusterClient, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """The leader's view when there is a leader (the same from any master),
    else the answering master's own; with every member's health."""
    args = {"health": True, "from_leader": True}
    return dict(await _call(c, "cluster_status", args, timeout_s=timeout_s))


async def cluster_membership(
    c: ClusterClient, how: str, member: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    """how: add or remove a master by its Raft address."""
    method = "cluster_add" if how == "add" else "cluster_remove"
    # One attempt may take a while: the leader waits for a just-started
    # master to answer the Raft handshake, then for the change to commit.
    wait_s = max(timeout_s, 30)
    res = await _call(c, method, {"addr": member}, timeout_s=wait_s, attempt_timeout_s=wait_s)
    return dict(res)


async def snapshot_save(c: ClusterClient, timeout_s: float = SLOW_TIMEOUT_S) -> dict[str, Any]:
    # A large state takes longer than one usual attempt (6 s) to write or
    # read: one attempt for the whole wait, not a new one every 6 s.
    slow = max(timeout_s, SLOW_TIMEOUT_S)
    return dict(await _call(c, "snapshot_save", {}, timeout_s=slow, attempt_timeout_s=slow))


async def snapshot_check(
    c: ClusterClient, data: bytes, timeout_s: float = SLOW_TIMEOUT_S
) -> dict[str, Any]:
    """What a restore of `data` would replace, without changing anything."""
    args = {"data": data}
    slow = max(timeout_s, SLOW_TIMEOUT_S)  # one attempt (snapshot_save says why)
    return dict(await _call(c, "snapshot_check", args, timeout_s=slow, attempt_timeout_s=slow))


async def snapshot_restore(
    c: ClusterClient, data: bytes, timeout_s: float = SLOW_TIMEOUT_S
) -> dict[str, Any]:
    args = {"data": data}
    slow = max(timeout_s, SLOW_TIMEOUT_S)  # one attempt (snapshot_save says why)
    return dict(await _call(c, "snapshot_restore", args, timeout_s=slow, attempt_timeout_s=slow))


# -- tokens -----------------------------------------------------------------------
async def token_create(
    c: ClusterClient,
    role: str,
    name: str | None,
    unix_user: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    args = {"role": role, "name": name, "unix_user": unix_user}
    return dict(await _call(c, "token_create", args, timeout_s=timeout_s))


async def token_ls(c: ClusterClient, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[dict[str, Any]]:
    return list(await _call(c, "token_ls", {}, timeout_s=timeout_s))


async def token_revoke(
    c: ClusterClient, token_id: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    return dict(await _call(c, "token_revoke", {"id": token_id}, timeout_s=timeout_s))


# -- workdir blocks ---------------------------------------------------------------
async def blocks_missing(c: ClusterClient, ids: list[str], timeout_s: float) -> list[str]:
    res = await _call(c, "blocks_missing", {"ids": ids}, timeout_s=timeout_s)
    return list(res["missing"])


async def block_put(
    c: ClusterClient, block_id: str, payload: bytes, compressed: bool, timeout_s: float
) -> None:
    args = {"id": block_id, "data": payload, "z": compressed}
    await _call(c, "block_put", args, timeout_s=timeout_s)


async def manifest_put(c: ClusterClient, manifest: dict[str, Any], timeout_s: float) -> str:
    res = await _call(c, "manifest_put", {"manifest": manifest}, timeout_s=timeout_s)
    return str(res["id"])
