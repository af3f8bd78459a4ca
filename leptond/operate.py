"""RPC methods behind `leptonctl top`, `leptonctl usage`, the web UI and GPU
health: the cluster at a glance (`overview`), who used what (`usage`), and
putting an unhealthy GPU back in service (`node_gpu_reset`).

Registered in api.py's table on import, as joins.py's are; the same role
checks and audit apply.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import param, usage, views
from .api import find_node, method, prefer_leader, request_id
from .apictx import ApiContext
from .wire.connection import Connection
from .wire.errors import BAD_REQUEST, CONFLICT, RpcError

MAX_USAGE_SINCE_S = 3650 * 86400.0
MAX_OVERVIEW_JOBS = 10_000
# The nodes `overview` lists whole, in bytes (about 1,800 of 8 GPUs); past
# that it counts them by state (`node_counts`) and `nodes` pages them all.
OVERVIEW_NODE_BYTES = 4 << 20
MAX_OVERVIEW_NODE_BYTES = 8 << 20


@method("overview", "read")
async def overview(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """Nodes, GPUs, running and pending jobs (with why they wait) and the
    masters, in one answer: what `leptonctl top` and the web UI show."""
    prefer_leader(m)
    limit = param.integer(a, "limit", 1, MAX_OVERVIEW_JOBS, 200)
    node_bytes = param.integer(a, "node_bytes", 1024, MAX_OVERVIEW_NODE_BYTES, OVERVIEW_NODE_BYTES)
    out = views.overview(m.view(), m.liveness.stats, m.scheduling.reasons, limit, node_bytes)
    st = m.raft.status()
    members = {k: v.to_wire() for k, v in m.view().members.items()}
    masters = [
        {
            "raft_addr": m.cfg.raft_addr,
            "rpc_addr": m.cfg.rpc_addr,
            "http_addr": m.cfg.http_addr,
            "role": "leader" if m.is_leader() else "follower",
            "connected": True,
        }
    ]
    for mb in st.get("members", []):
        info = members.get(mb["addr"], {})
        masters.append(
            {
                "raft_addr": mb["addr"],
                "rpc_addr": info.get("rpc_addr", ""),
                "http_addr": info.get("http_addr", ""),
                "role": "leader" if mb["addr"] == st.get("leader") else "follower",
                "connected": bool(mb.get("connected")),
                "lag": mb.get("lag"),
            }
        )
    out["cluster"] = {
        "leader": m.leader_rpc_addr(),
        "term": st.get("term"),
        "commit_index": st.get("commit_index"),
        "masters": masters,
    }
    out["now"] = m.clock.now()
    return out


@method("usage", "read")
async def usage_report(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """GPU-hours, CPU-hours and jobs by final state, per user (`by`: user) or
    per job the cluster still holds (`by`: job), over the last `since_s`
    seconds (whole UTC days; default 7 days)."""
    prefer_leader(m)
    since_s = param.number(a, "since_s", 0, MAX_USAGE_SINCE_S)
    by = param.choice(a, "by", ("user", "job"), "user")
    s, now = m.view(), m.clock.now()
    since = 7 * 86400.0 if since_s is None else since_s
    rows = usage.by_user(s, now, since) if by == "user" else usage.by_job(s, now, since)
    return {"by": by, "since_s": since, "now": now, "rows": rows}


BURN_IN_WAIT_S = 330.0  # the agent's burn-in timeout, and some


@method("node_gpu_reset", "admin", mutating=True)
async def node_gpu_reset(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """Put an unhealthy GPU back in service: its agent runs a burn-in on it
    (agent/burnin.py) and, when it passes, the fault is cleared."""
    m.ensure_leader()
    nid = find_node(m, param.string(a, "node"))
    gpu = param.integer(a, "gpu", 0, 1 << 20, -1)
    if gpu < 0:
        raise RpcError(BAD_REQUEST, "which GPU? give its index")
    node = m.view().nodes[nid]
    rid = request_id(conn, a, "node_gpu_reset")
    if rid is not None and m.answered(rid):
        # A retry of a reset that went through (its answer was lost).
        return {"node": node.name, "gpu": gpu, "state": "healthy", "burn_in": "reset already"}
    if gpu not in {g["index"] for g in node.gpus}:
        have = ", ".join(str(g["index"]) for g in node.gpus) or "none"
        raise RpcError(BAD_REQUEST, f"node {node.name} has no GPU {gpu} (its GPUs: {have})")
    if gpu not in {int(f["index"]) for f in node.gpu_faults}:
        raise RpcError(CONFLICT, f"GPU {gpu} of {node.name} is healthy; there is nothing to reset")
    # Not "unavailable" or "timeout": clients retry those, and each retry
    # would start another burn-in.
    if not m.channel.is_connected(nid):
        raise RpcError(
            CONFLICT,
            f"node {node.name} is not connected; the burn-in runs on the host, so a reset "
            "needs its agent",
        )
    key = (nid, gpu)
    running = m.gpu_resets.get(key)
    if running is None:
        # Its own task, shielded from the caller: a caller that goes away
        # does not stop a burn-in half way, and its result is still recorded.
        running = asyncio.ensure_future(_reset(m, nid, node.name, gpu, rid))
        m.gpu_resets[key] = running
        running.add_done_callback(lambda f: _reset_done(m, key, f))
    return await asyncio.shield(running)


def _reset_done(m: ApiContext, key: tuple[str, int], f: asyncio.Future[Any]) -> None:
    if m.gpu_resets.get(key) is f:
        del m.gpu_resets[key]
    if not f.cancelled():
        f.exception()  # retrieved: its callers (if any are left) got it


async def _reset(
    m: ApiContext, nid: str, node_name: str, gpu: int, rid: str | None
) -> dict[str, Any]:
    """The burn-in on the host, then the GPU recorded healthy."""
    try:
        res = await m.channel.call(nid, "gpu_reset", {"gpu": gpu}, timeout_s=BURN_IN_WAIT_S)
    except RpcError as exc:
        if exc.code in ("unavailable", "timeout"):
            raise RpcError(
                CONFLICT, f"node {node_name}: the burn-in got no answer ({exc.message})"
            ) from None
        raise
    note = str(res.get("note", "")) if isinstance(res, dict) else ""
    await m.propose(
        "gpu_health",
        {"node_id": nid, "healthy": [gpu], "now": m.clock.now()},
        rid=rid,
        wake=True,
    )
    return {"node": node_name, "gpu": gpu, "state": "healthy", "burn_in": note}
