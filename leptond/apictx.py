"""What the RPC methods for people (api.py, joins.py) are given.

Each field is a narrow interface, not the master: the methods read immutable
views (never the live state or its lock), commit through the Proposer, and
reach agents only through the NodeChannel. master.py builds one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import scheduler as sch
from raft import commands
from raft.view import StateView

from .auth import AuditLog, KeyStore
from .batcher import Batcher
from .clock import Clock
from .config import MasterConfig
from .disk import DiskGuard
from .faults import Faults
from .liveness import NodeLiveness
from .ports import LeaderStatus, NodeChannel, Proposer, RaftAdmin, StateReader
from .wire.errors import RpcError


class RelaySlots:
    """Log streams relayed through this master at once, per user and in all.

    Each holds up to a window of an agent's output items in the leader's
    memory (agents.RELAY_WINDOW), so their number is what bounds that memory.
    """

    def __init__(self, per_user: int = 16, total: int = 256) -> None:
        self.per_user = per_user
        self.total = total
        self.open: dict[str, int] = {}

    def take(self, user: str) -> None:
        mine = self.open.get(user, 0)
        if mine >= self.per_user:
            raise RpcError(
                "busy", f"{user} already follows {mine} log streams; close one and try again"
            )
        if sum(self.open.values()) >= self.total:
            raise RpcError("busy", "this master relays too many log streams; try again later")
        self.open[user] = mine + 1

    def give(self, user: str) -> None:
        left = self.open.get(user, 0) - 1
        if left > 0:
            self.open[user] = left
        else:
            self.open.pop(user, None)


class SchedulingInfo(Protocol):
    """What the scheduling loop last concluded (controllers.Controllers)."""

    reasons: dict[str, str]  # pending task id -> why it waits
    policy: sch.Policy


@dataclass(frozen=True)
class ApiContext:
    cfg: MasterConfig
    secret: bytes
    proposer: Proposer
    reader: StateReader
    leader: LeaderStatus
    raft: RaftAdmin
    keys: KeyStore
    audit: AuditLog
    faults: Faults
    disk: DiskGuard
    submits: Batcher[dict[str, Any], dict[str, Any]]
    scheduling: SchedulingInfo
    channel: NodeChannel
    liveness: NodeLiveness
    # Close every RPC connection made with this key id (a revoked token).
    close_connections: Callable[[str], None]
    health: Callable[[dict[str, Any]], dict[str, Any]]
    block_stats: Callable[[], dict[str, Any]]
    clock: Clock
    relays: RelaySlots = field(default_factory=lambda: RelaySlots())
    # Interactive sessions this leader relays now, by (task id, session id),
    # with how many relays of each: input for any other is refused here.
    sessions: Counter[tuple[str, str]] = field(default_factory=Counter)
    # GPU resets under way, by (node id, GPU): a second reset of the same GPU
    # waits for the first one's burn-in instead of starting another.
    gpu_resets: dict[tuple[str, int], asyncio.Future[dict[str, Any]]] = field(default_factory=dict)

    # -- shorthands the methods use --------------------------------------------
    def view(self) -> StateView:
        return self.reader.view()

    async def propose(
        self,
        op: str,
        args: dict[str, Any],
        rid: str | None = None,
        timeout_s: float | None = None,
        wake: bool = False,
    ) -> dict[str, Any]:
        return await self.proposer.propose(op, args, rid=rid, timeout_s=timeout_s, wake=wake)

    def answered(self, rid: str) -> bool:
        return self.reader.answered(rid)

    def ensure_leader(self) -> None:
        self.leader.ensure_leader()

    def is_leader(self) -> bool:
        return self.leader.is_leader()

    def not_leader(self) -> RpcError:
        return self.leader.not_leader()

    def leader_rpc_addr(self) -> str | None:
        return self.leader.leader_rpc_addr()


def submit_batcher(proposer: Proposer) -> Batcher[dict[str, Any], dict[str, Any]]:
    """Submits arriving together are proposed as one `submit_jobs` entry (up
    to 5,000 jobs, or the entry's byte budget): one Raft round trip and one
    fsync for all of them. A master and the simulator's masters both use it."""

    async def flush_submits(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        res = await proposer.propose("submit_jobs", {"jobs": jobs}, wake=True)
        return list(res["results"])

    return Batcher(
        flush_submits,
        max_batch=5000,
        size_of=commands.encoded_size,
        max_bytes=commands.BATCH_BUDGET_BYTES,
    )
