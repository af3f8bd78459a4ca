"""One master's health, as /healthz and `cluster status` tell it.

Healthy means this master can take part in writes: it knows a leader, it
reaches a quorum, its journal can be written and its data disk is above the
reserve. An unreachable member is reported, but a master that still has a
quorum stays healthy.
"""

from __future__ import annotations

from typing import Any

from .disk import DiskState


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
