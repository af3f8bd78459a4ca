"""The master daemon's composition root.

It builds each service and hands it the narrow interfaces it uses
(leptond/ports.py): no service is given this object, and none reaches
another through it. Who does what:

- raft.node.RaftNode: the Raft member; raft.view.Publisher: the StateReader;
- proposer.RaftProposer: the Proposer;
- leadership.Leadership: every leader-only activity, on and off;
- controllers.Controllers: the leader's reconcile loops;
- agents.AgentRegistry: the agents' RPCs and the NodeChannel to them;
- blockservice, members, api (with joins), http: the rest of the RPC and
  HTTP surface.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

from raft.node import GIL_SWITCH_INTERVAL_S, RaftNode
from raft.state import ClusterState
from raft.view import Publisher

from . import api, faults, joins, operate
from . import interactive as _interactive  # registers its RPC methods
from .agents import AgentRegistry
from .apictx import ApiContext, submit_batcher
from .auth import AuditLog, KeyStore
from .batcher import Batcher
from .blockservice import BlockService
from .clock import REAL, Clock
from .config import MasterConfig
from .controllers import Controllers
from .disk import DiskGuard
from .fdlimit import fit_connections
from .gcpolicy import GcStats
from .http import HttpDeps, HttpServer
from .leadership import LeaderGate, Leadership
from .liveness import NodeLiveness
from .members import Members
from .proposer import RaftProposer
from .rpcstats import RpcStats
from .wire.connection import Connection
from .wire.server import RpcServer
from .wire.tokens import read_secret_file, read_token_file

log = logging.getLogger("lepton.master")
# Importing these registers their RPCs in api's table: node credentials, and
# the overview, usage and GPU reset.
_ = joins, operate


class Master:
    def __init__(
        self, cfg: MasterConfig, clock: Clock = REAL, gc_stats: GcStats | None = None
    ) -> None:
        self.cfg = cfg
        self.gc_stats = gc_stats  # the process's collector (leptond/gcpolicy.py), for /metrics
        self.clock = clock
        self.secret = read_secret_file(cfg.secret_file)
        self.admin = read_token_file(cfg.admin_token_file)
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state = ClusterState()
        self.audit = AuditLog(cfg.data_dir / "audit.log", clock, max_bytes=cfg.audit_log_bytes)
        self.faults = faults.from_env()  # test builds only; inert otherwise
        self.started_at = clock.now()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # What close() stops, set by start().
        self.raft: RaftNode | None = None
        self._leadership: Leadership | None = None
        self._rpc: RpcServer | None = None
        self._http: HttpServer | None = None
        self._blocks: BlockService | None = None
        self._submits: Batcher[dict[str, Any], dict[str, Any]] | None = None

    async def start(self) -> None:
        cfg, clock = self.cfg, self.clock
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # see raft/node.py
        loop = asyncio.get_running_loop()
        leader_events: asyncio.Queue[bool] = asyncio.Queue()
        peers = [p for p in cfg.peers if p and p != cfg.raft_addr]
        raft = self.raft = RaftNode(
            self.state,
            cfg.raft_addr,
            peers,
            cfg.data_dir / "raft",
            self.secret,
            on_leadership=leader_events.put_nowait,
            loop=loop,
            raft_min_timeout_s=cfg.raft_min_timeout_s,
            raft_max_timeout_s=cfg.raft_max_timeout_s,
            connection_retry_s=cfg.raft_connection_retry_s,
            log_compaction_min_entries=cfg.snapshot_every,
            bind_addr=cfg.raft_bind_addr,
        )
        reader = Publisher(self.state, raft.lock)
        disk = DiskGuard(
            cfg.data_dir,
            cfg.min_free_disk_bytes,
            lambda: raft.journal.write_error,
            clock.monotonic,
            audit_bytes=self.audit.files_bytes,
        )
        # Under the reserve, refused calls are no longer written to the audit
        # log (only counted): what is left is for the journal.
        self.audit.disk_low = lambda: disk.state().low
        gate = LeaderGate(cfg, raft, reader)
        wakeup = asyncio.Event()
        proposer = RaftProposer(raft, clock, gate.not_leader, wakeup.set, cfg.commit_timeout_s)
        keys = KeyStore(self.secret, self.admin, reader, clock)
        liveness = NodeLiveness(clock)
        members = Members(cfg, self.secret, raft, reader, proposer, gate, disk, clock)
        blocks = BlockService(cfg, self.secret, proposer, reader, gate, disk, members, clock)
        agents = AgentRegistry(
            cfg, proposer, reader, gate, liveness, raft.heard_from_majority_within, clock
        )
        controllers = Controllers(cfg, proposer, reader, agents, liveness, blocks, wakeup, clock)
        liveness.on_disk_change = controllers.wake
        leadership = Leadership(gate, reader, agents, controllers, clock)

        submits = submit_batcher(proposer)
        sessions = _Sessions()
        ctx = ApiContext(
            cfg=cfg,
            secret=self.secret,
            proposer=proposer,
            reader=reader,
            leader=gate,
            raft=raft,
            keys=keys,
            audit=self.audit,
            faults=self.faults,
            disk=disk,
            submits=submits,
            scheduling=controllers,
            channel=agents,
            liveness=liveness,
            close_connections=sessions.close_key,
            health=members.health,
            block_stats=blocks.stats,
            clock=clock,
        )

        def on_connect(conn: Connection) -> None:
            conn.context["user"], conn.context["role"] = keys.identity(conn.key_id)

        rpc_stats = RpcStats()
        table = {**api.handlers(ctx), **agents.handlers(), **blocks.handlers()}
        rpc = sessions.server = RpcServer(
            rpc_stats.wrap({**table, **members.handlers()}),
            keys.psk,
            on_connect=on_connect,
            on_disconnect=agents.on_disconnect,
            max_buffered_bytes=cfg.max_buffered_bytes,
            max_connections=fit_connections(cfg.max_connections),
            max_connections_per_key=cfg.max_connections_per_key,
            notifications=_interactive.NOTIFIED,
        )
        http = HttpServer(
            HttpDeps(
                cfg, reader, raft, gate, disk, liveness, keys, members.health, rpc, rpc_stats,
                lambda: leadership.errors, self.started_at, clock, self.gc_stats,
            )
        )  # fmt: skip
        self._leadership, self._rpc, self._http = leadership, rpc, http
        self._blocks, self._submits = blocks, submits
        await rpc.start(cfg.bind, cfg.rpc_port)
        await http.start(cfg.bind, cfg.http_port)
        submits.start()
        self._tasks = [
            loop.create_task(leadership.follow(leader_events)),
            loop.create_task(members.announce_forever()),
            loop.create_task(blocks.collect_garbage_forever()),
        ]
        log.info(
            "master %s: rpc %s, http %s, raft %s, peers %s",
            cfg.host,
            cfg.rpc_addr,
            cfg.http_addr,
            cfg.raft_addr,
            ",".join(peers) or "-",
        )

    async def run_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()
        await self.close()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._blocks is not None:
            await self._blocks.close()
        if self._submits is not None:
            await self._submits.close()
        if self._leadership is not None:
            await self._leadership.revoke()
        if self._rpc is not None:
            await self._rpc.close()
        if self._http is not None:
            await self._http.close()
        if self.raft is not None:
            await asyncio.to_thread(self.raft.close)  # joins the Raft thread
        self.audit.close()


class _Sessions:
    """Closes the RPC connections made with a key that was revoked or replaced."""

    server: RpcServer | None = None

    def close_key(self, key_id: str) -> None:
        if self.server is None:
            return
        for c in list(self.server.connections):
            if c.key_id == key_id:
                c.close()
