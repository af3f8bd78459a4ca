"""The Proposer port of a master: commands committed through its Raft member."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from raft import commands
from raft.errors import EntryTooLarge, NoQuorum, NotLeader, ProposeTimeout

from .clock import Clock
from .wire.errors import NO_QUORUM, TIMEOUT, RpcError

log = logging.getLogger("lepton.master")
# Error code of a command over the Raft entry limit (never proposed).
TOO_LARGE = "too_large"


class Commits(Protocol):
    """raft.node.RaftNode's write side."""

    async def propose(self, command: bytes, timeout_s: float = 5.0) -> Any: ...


class RaftProposer:
    def __init__(
        self,
        raft: Commits,
        clock: Clock,
        not_leader: Callable[[], RpcError],
        wake: Callable[[], None],
        commit_timeout_s: float,
    ) -> None:
        self._raft = raft
        self._clock = clock
        self._not_leader = not_leader
        self._wake = wake
        self._commit_timeout_s = commit_timeout_s

    async def propose(
        self,
        op: str,
        args: dict[str, Any],
        rid: str | None = None,
        timeout_s: float | None = None,
        wake: bool = False,
    ) -> dict[str, Any]:
        """Commit one command on this (leader) master and return its result
        (the Proposer port, leptond/ports.py)."""
        # The proposer's time ages the table of remembered results (raft/dedupe.py).
        data = commands.encode(op, args, rid, at=self._clock.now())
        try:
            result = await self._raft.propose(data, timeout_s or self._commit_timeout_s)
        except NotLeader:
            raise self._not_leader() from None
        except NoQuorum as exc:
            raise RpcError(NO_QUORUM, str(exc)) from None
        except EntryTooLarge as exc:
            # Callers split their work below the limit, so this is a bug or
            # an input no check caught; either way nothing was proposed.
            log.error("%s: %s", op, exc)
            raise RpcError(TOO_LARGE, f"{op}: {exc}") from None
        except ProposeTimeout as exc:
            raise RpcError(TIMEOUT, str(exc)) from None
        if isinstance(result, dict) and "error" in result:
            err = result["error"]
            raise RpcError(str(err.get("code")), str(err.get("message")))
        if not isinstance(result, dict):
            raise RpcError("internal", f"{op}: unexpected result {result!r}")
        if wake:
            self._wake()
        return result
