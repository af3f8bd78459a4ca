"""Leadership in one place (Nomad's leader.go establishLeadership/revokeLeadership).

`Leadership` turns every leader-only activity on when this master gains
leadership (after its log is applied: raft.node announces it then) and off
when it loses it. The list of those activities is here and nowhere else:

- the agents' side: every node gets a full TTL (plus the time a deposed
  leader may still have renewed leases in) before it is judged, and task
  events are batched into commands;
- the reconcile loops of controllers.py: liveness, drain deadlines,
  scheduling (with the dispatcher), membership upkeep.

`LeaderGate` answers "do I lead?" for the RPC handlers: only while Raft says
so *and* the leader-only work is running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from .clock import Clock
from .config import MasterConfig
from .ports import RaftRole, StateReader
from .wire.errors import NOT_LEADER, RpcError

log = logging.getLogger("lepton.master")
# How long a loop that failed waits before its next pass.
RETRY_AFTER_S = 0.5


class LeaderGate:
    """The LeaderStatus port of a master (leptond/ports.py)."""

    def __init__(self, cfg: MasterConfig, raft: RaftRole, reader: StateReader) -> None:
        self._cfg = cfg
        self._raft = raft
        self._reader = reader
        self.active = False  # the leader-only work runs (set by Leadership)

    def is_leader(self) -> bool:
        return self.active and self._raft.is_leader()

    def leader_rpc_addr(self) -> str | None:
        leader = self._raft.leader()
        if leader is None:
            return None
        if leader == self._cfg.raft_addr:
            return self._cfg.rpc_addr
        m = self._reader.view().members.get(leader)
        return m.rpc_addr if m else None

    def not_leader(self) -> RpcError:
        reachable, members = self._raft.reachable()
        addr = self.leader_rpc_addr()
        if addr and addr != self._cfg.rpc_addr and reachable * 2 > members:
            return RpcError(NOT_LEADER, f"not the leader; the leader is {addr}", leader=addr)
        if reachable * 2 <= members:
            return RpcError(
                NOT_LEADER,
                f"no leader: no quorum, {reachable} of {members} masters reachable; "
                "start or reconnect the others",
                leader="",
            )
        return RpcError(NOT_LEADER, "no leader elected yet; try again in a moment", leader="")

    def ensure_leader(self) -> None:
        if not self.is_leader():
            raise self.not_leader()


class AgentDuties(Protocol):
    """The agents' side of leading (agents.AgentRegistry)."""

    def lead(self, node_ids: list[str]) -> None: ...

    async def step_down(self) -> None: ...


class Loops(Protocol):
    """The leader's reconcile loops, one pass per call (controllers.Controllers)."""

    def reset(self) -> None: ...

    def wake(self) -> None: ...

    async def liveness_pass(self) -> None: ...

    async def drain_pass(self) -> None: ...

    async def scheduling_pass(self) -> None: ...

    async def members_pass(self) -> None: ...


class Leadership:
    def __init__(
        self,
        gate: LeaderGate,
        reader: StateReader,
        agents: AgentDuties,
        loops: Loops,
        clock: Clock,
    ) -> None:
        self.gate = gate
        self._reader = reader
        self._agents = agents
        self._loops = loops
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []
        self.errors = 0

    async def follow(self, events: asyncio.Queue[bool]) -> None:
        """Apply leadership changes as raft.node announces them, in order.

        A change that fails (a bug in taking up or handing over a duty) is
        logged, counted and tried again until it takes or a newer change
        arrives: this task must outlive it, or a master Raft elected would
        never lead (and one deposed never stop leading)."""
        while True:
            leading = await events.get()
            log.info("became leader" if leading else "no longer leader")
            while True:
                try:
                    if leading:
                        self.establish()
                    else:
                        await self.revoke()
                    break
                except Exception:
                    self.errors += 1
                    what = "taking up leadership" if leading else "stepping down"
                    log.exception("%s failed; trying again", what)
                    await self._clock.sleep(RETRY_AFTER_S)
                    if not events.empty():
                        break  # a newer change decides

    def establish(self) -> None:
        if self.gate.active:
            return
        try:
            self._agents.lead(list(self._reader.view().nodes))
            self._loops.reset()
            self.gate.active = True
            loops = self._loops
            passes: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                ("liveness", loops.liveness_pass),
                ("drains", loops.drain_pass),
                ("scheduler", loops.scheduling_pass),
                ("members", loops.members_pass),
            ]
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._forever(name, fn)) for name, fn in passes]
            loops.wake()
        except BaseException:
            # Half taken up is not leading: the next try starts from nothing.
            self.gate.active = False
            for t in self._tasks:
                t.cancel()
            self._tasks = []
            raise

    async def revoke(self) -> None:
        self.gate.active = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._agents.step_down()

    async def _forever(self, name: str, one_pass: Callable[[], Awaitable[None]]) -> None:
        # A reconcile loop logs, counts and keeps going after its own errors.
        while self.gate.active:
            try:
                await one_pass()
            except asyncio.CancelledError:
                raise
            except RpcError as exc:
                self.errors += 1
                log.warning("%s: %s", name, exc)
                await self._clock.sleep(RETRY_AFTER_S)
            except Exception:
                self.errors += 1
                log.exception("%s loop failed; restarting it", name)
                await self._clock.sleep(RETRY_AFTER_S)
