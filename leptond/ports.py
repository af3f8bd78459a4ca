"""The narrow interfaces the master's services are given (habit 5).

No service is handed the whole master: each gets the few of these it uses,
and master.py (the composition root) wires the real ones together. A
simulation drives the same services with its own: a virtual `Clock`, a
`Proposer` over a model Raft log, a `StateReader` over that log's state, a
`NodeChannel` to simulated agents and a `LeaderStatus` it flips itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from raft.view import StateView

from .clock import Clock
from .wire.errors import RpcError

__all__ = [
    "Clock",
    "LeaderStatus",
    "NodeChannel",
    "Proposer",
    "RaftAdmin",
    "RaftRole",
    "StateReader",
    "StateView",
]


class Proposer(Protocol):
    async def propose(
        self,
        op: str,
        args: dict[str, Any],
        rid: str | None = None,
        timeout_s: float | None = None,
        wake: bool = False,
    ) -> dict[str, Any]:
        """Commit one command (raft/commands.py) and return what apply
        returned; raises RpcError with a one-line message otherwise.

        `rid`: the request id of a client's logical call (api.request_id), so a
        retry is answered, not applied again. wake=True nudges the leader's
        scheduling loop once it committed (it may have freed capacity or
        added work). When this returns, every `StateReader` view taken
        afterwards includes the command."""
        ...


class StateReader(Protocol):
    def view(self) -> StateView:
        """The newest immutable view of the replicated state (raft/view.py).
        Cheap; read it freely, never mutate what it holds."""
        ...

    def snapshot_view(self) -> StateView:
        """A view that can be encoded as a snapshot (StateView.encode)."""
        ...

    def answered(self, rid: str) -> bool:
        """Whether a command with this request id was applied recently."""
        ...


class NodeChannel(Protocol):
    """Pushes to agents. Fire and forget: a push that is lost is repaired by
    the agent's next heartbeat (its reconcile answer)."""

    def push_start(self, node_id: str, specs: list[dict[str, Any]]) -> None: ...

    def push_stop(
        self, node_id: str, task_ids: list[str], warned: dict[str, float] | None = None
    ) -> None:
        """Stop tasks; those in `warned` get their warning signal and that
        grace (seconds) instead of SIGTERM and the kill grace."""
        ...

    def push_input(self, node_id: str, args: dict[str, Any]) -> bool:
        """Keystrokes or a window size for an interactive session there.
        False, and nothing sent: the connection to that agent already has
        more queued than user input may add to (it would be cut off as a
        slow reader, and every session and stream on the host with it)."""
        ...

    def push_warn(self, node_id: str, task_ids: list[str]) -> None:
        """Send tasks their warning signal now (a drain deadline is near)."""
        ...

    def is_connected(self, node_id: str) -> bool: ...

    async def call(self, node_id: str, method: str, args: dict[str, Any], timeout_s: float) -> Any:
        """One request to the node's agent and its answer; RpcError
        `unavailable` when it is not connected."""
        ...

    def stream(self, node_id: str, method: str, args: dict[str, Any]) -> AsyncIterator[Any]:
        """Relay a stream from the node's agent (task output); RpcError
        `unavailable` when it is not connected."""
        ...


class LeaderStatus(Protocol):
    def is_leader(self) -> bool:
        """Whether this master leads and its leader-only work is running."""
        ...

    def ensure_leader(self) -> None:
        """Raise the not-leader error (with the leader's address) unless leading."""
        ...

    def not_leader(self) -> RpcError: ...

    def leader_rpc_addr(self) -> str | None: ...


class RaftRole(Protocol):
    """What this master's Raft member says about leadership (raft.node.RaftNode)."""

    def is_leader(self) -> bool: ...

    def leader(self) -> str | None: ...

    def reachable(self) -> tuple[int, int]: ...

    def status(self) -> dict[str, Any]: ...


class RaftAdmin(RaftRole, Protocol):
    """Membership changes, for admins (raft.node.RaftNode)."""

    async def add_member(self, addr: str, timeout_s: float = 10.0) -> None: ...

    async def remove_member(self, addr: str, timeout_s: float = 10.0) -> None: ...
