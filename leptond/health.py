"""One master's health, as /healthz and `cluster status` tell it.

Healthy means this master can take part in writes: it knows a leader, it
reaches a quorum, its journal can be written and its data disk is above the
reserve. An unreachable member is reported, but a master that still has a
quorum stays healthy.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .disk import DiskState
from .wire.client import parse_addr
from .wire.connection import open_connection
from .wire.errors import RpcError
from .wire.tokens import CLUSTER_KEY_ID

ASK_TIMEOUT_S = 2.0


def assess(raft: dict[str, Any], disk: DiskState) -> dict[str, Any]:
    """From `RaftNode.status()` and the disk: {"ok", "problems", ...}."""
    members = [m for m in raft.get("members", []) if isinstance(m, dict)]
    reachable = 1 + sum(1 for m in members if m.get("connected"))
    total = 1 + len(members)
    has_quorum = bool(raft.get("has_quorum")) and reachable * 2 > total
    problems: list[str] = []
    if raft.get("leader") is None:
        problems.append("no leader: an election is under way or there is no quorum")
    if not has_quorum:
        problems.append(f"no quorum: {reachable} of {total} masters reachable")
    problems += [f"master {m.get('addr')} unreachable" for m in members if not m.get("connected")]
    problems += disk.problems()
    return {
        "ok": raft.get("leader") is not None
        and has_quorum
        and disk.journal_writable
        and not disk.low,
        "leader": raft.get("leader"),
        "quorum": has_quorum,
        "reachable": reachable,
        "members": total,
        "unreachable": [m.get("addr") for m in members if not m.get("connected")],
        "disk": disk.to_wire(),
        "problems": problems,
    }


async def ask_members(cluster_psk: bytes, rpc_addrs: list[str]) -> dict[str, dict[str, Any] | None]:
    """Each other master's own health (its `member_health`); None: no answer in time."""

    async def one(addr: str) -> dict[str, Any] | None:
        try:
            host, port = parse_addr(addr)
            conn = await open_connection(
                host, port, key_id=CLUSTER_KEY_ID, psk=cluster_psk, timeout_s=ASK_TIMEOUT_S
            )
            try:
                return dict(await conn.call("member_health", {}, timeout_s=ASK_TIMEOUT_S))
            finally:
                conn.close()
        except (RpcError, ValueError, TypeError):
            return None

    answers = await asyncio.gather(*(one(a) for a in rpc_addrs))
    return dict(zip(rpc_addrs, answers, strict=True))
