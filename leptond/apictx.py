"""What the RPC methods for people (api.py, joins.py) are given.

Each field is a narrow interface, not the master: the methods read immutable
views (never the live state or its lock), commit through the Proposer, and
reach agents only through the NodeChannel. master.py builds one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import scheduler as sch
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
