"""A simulated master: the real services, wired as master.py wires them.

Each master has its own ClusterState (applied from the model Raft log), a
Publisher of views over it, the real LeaderGate, RaftProposer, NodeLiveness,
AgentRegistry, Controllers and Leadership, and the real RPC methods for
people (api.py). What differs from master.py is only the world around
them: the Raft member is a raftmodel.Member, connections come from the
simulated network, the clock is virtual, and the few parts that touch the
machine (the audit file, the disk check, workdir blocks) are left out.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from raft.state import ClusterState
from raft.view import Publisher, StateView

from .. import api, joins
from ..agents import AgentRegistry
from ..apictx import ApiContext, submit_batcher
from ..auth import AuditLog, KeyStore
from ..config import MasterConfig
from ..controllers import Controllers
from ..disk import DiskGuard, DiskState
from ..faults import Faults
from ..leadership import LeaderGate, Leadership
from ..liveness import NodeLiveness
from ..proposer import RaftProposer
from ..wire.connection import Handler
from ..wire.tokens import Token
from .net import ServerEnd
from .raftmodel import Member, SimRaft
from .vtime import SimClock

_ = joins  # its RPC methods register with api's table, as in master.py
SECRET = b"simulated cluster secret, 32 b.."
ADMIN = Token("admin", b"\x01" * 32)
NODE_KEY_PREFIX = "node-"  # a node credential's key id, in the simulation


class _Reader:
    """The master's StateReader: its Publisher, over the entries this member
    knows are committed (followers apply lazily, which no reader can tell)."""

    def __init__(self, publisher: Publisher, member: Member) -> None:
        self._publisher = publisher
        self._member = member

    def view(self) -> StateView:
        m = self._member
        if m.applied < m.known:
            m.catch_up()
        return self._publisher.view()

    def snapshot_view(self) -> StateView:
        self.view()
        return self._publisher.snapshot_view()

    def answered(self, rid: str) -> bool:
        return self._publisher.answered(rid)


class _NoBlocks:
    def cached_sets(self) -> dict[str, frozenset[str]]:
        return {}

    def block_sets(self, view: StateView) -> dict[str, frozenset[str]]:
        return {}


class _NoAudit:
    def record(self, who: str, role: str, action: str, target: Any, result: str) -> None:
        pass


class _RoomyDisk(DiskGuard):
    """The data disk never fills up here (its statvfs is the machine's)."""

    def _measure(self) -> DiskState:
        return DiskState(str(self.path), 1 << 40, self.reserve_bytes, False, None)


def _no_health(raft_status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {}


class WatchedLoops:
    """controllers.Controllers as leadership.Leadership runs it, watched.

    After each completed scheduling pass: every task that was pending before
    the pass and still is, with the same attempt (so it was never placed
    meanwhile), must have a reason."""

    def __init__(
        self, c: Controllers, reader: _Reader, violation: Callable[[str], None], name: str
    ) -> None:
        self.c = c
        self._reader = reader
        self._violation = violation
        self._name = name
        self.passes = 0

    def _pending(self) -> dict[str, int]:
        s = self._reader.view()
        return {tid: s.tasks[tid].attempt for tid in s.pending}

    def reset(self) -> None:
        self.c.reset()

    def wake(self) -> None:
        self.c.wake()

    async def liveness_pass(self) -> None:
        await self.c.liveness_pass()

    async def drain_pass(self) -> None:
        await self.c.drain_pass()

    async def members_pass(self) -> None:
        await self.c.members_pass()

    async def scheduling_pass(self) -> None:
        before = self._pending()
        await self.c.scheduling_pass()
        self.passes += 1
        now = self._pending()
        reasons = self.c.reasons
        for tid, attempt in sorted(before.items()):
            if now.get(tid) == attempt and tid not in reasons:
                self._violation(f"{self._name}: pending task {tid} has no reason after a pass")
                break


class SimMaster:
    def __init__(
        self,
        name: str,
        peers: tuple[str, ...],
        raft: SimRaft,
        clock: SimClock,
        settings: dict[str, Any],
        violation: Callable[[str], None],
    ) -> None:
        self.name = name
        self.violation = violation
        cfg = self.cfg = MasterConfig(
            data_dir=Path("/sim") / name,
            secret_file=Path("/sim/secret"),
            admin_token_file=Path("/sim/admin"),
            bind=name,
            peers=peers,
            **settings,
        )
        self.clock = clock
        self.state = ClusterState()
        self.member = member = raft.add(cfg.raft_addr, self.state)
        self.reader = reader = _Reader(Publisher(self.state, threading.RLock()), member)
        self.gate = gate = LeaderGate(cfg, member, reader)
        wakeup = asyncio.Event()
        self.proposer = proposer = RaftProposer(
            member, clock, gate.not_leader, wakeup.set, cfg.commit_timeout_s
        )
        self.liveness = liveness = NodeLiveness(clock)
        self.agents = agents = AgentRegistry(
            cfg, proposer, reader, gate, liveness, member.heard_from_majority_within, clock
        )
        self.controllers = controllers = Controllers(
            cfg, proposer, reader, agents, liveness, _NoBlocks(), wakeup, clock
        )
        self.loops = WatchedLoops(controllers, reader, violation, name)
        self.leadership = Leadership(gate, reader, agents, self.loops, clock)
        self.keys = KeyStore(SECRET, ADMIN, reader, clock)

        self.submits = submit_batcher(proposer)
        ctx = ApiContext(
            cfg=cfg,
            secret=SECRET,
            proposer=proposer,
            reader=reader,
            leader=gate,
            raft=member,
            keys=self.keys,
            audit=cast(AuditLog, _NoAudit()),
            faults=Faults(),
            disk=_RoomyDisk(cfg.data_dir, 0, lambda: None, clock.monotonic),
            submits=self.submits,
            scheduling=controllers,
            channel=agents,
            liveness=liveness,
            close_connections=lambda key_id: None,
            health=_no_health,
            block_stats=dict,
            clock=clock,
        )
        self.api_handlers = api.handlers(ctx)
        self.node_handlers = agents.handlers()
        self.events: asyncio.Queue[bool] = asyncio.Queue()
        member.on_leadership = self.events.put_nowait
        self.task: asyncio.Task[None] | None = None

    @property
    def rpc_addr(self) -> str:
        return self.cfg.rpc_addr

    def start(self) -> None:
        self.submits.start()
        self.task = asyncio.get_running_loop().create_task(self.leadership.follow(self.events))

    def leads(self) -> bool:
        return self.gate.is_leader()

    # -- net.Server ---------------------------------------------------------------
    def accept(self, conn: ServerEnd) -> dict[str, Handler]:
        if conn.key_id.startswith(NODE_KEY_PREFIX):
            # A node credential: it speaks for its own node only (auth.KeyStore).
            conn.context["user"] = conn.key_id[len(NODE_KEY_PREFIX) :]
            conn.context["role"] = "node"
            return self.node_handlers
        conn.context["user"], conn.context["role"] = self.keys.identity(conn.key_id)
        return self.api_handlers

    def closed(self, conn: ServerEnd) -> None:
        self.agents.on_disconnect(cast(Any, conn))

    def on_error(self, what: str) -> None:
        self.violation(f"{self.name}: {what}")
