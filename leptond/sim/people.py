"""People using the cluster: submits, cancels, drains, through the real RPC methods.

Each person has a token (alice, bob and carol may submit; admin drains) and
a ClusterClient that finds the leader through the simulated network, as
leptonctl does. A submit carries a request id made from the seed, so its
job id is known before the answer comes (api.submit derives it from the
id); an answered submit is an acknowledged job, which must then stay in
the state exactly once until its retention has passed.

Jobs run `sim-task KIND SECONDS TERM_S` (host.py says what that does);
some ask for more than a node has, some are gangs, some come at a higher
priority and preempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raft.commands import encode

from ..wire.client import ClusterClient, parse_addrs
from ..wire.errors import RpcError
from .net import Network
from .trace import Trace
from .vtime import SimClock

USERS = ("alice", "bob", "carol")
GiB = 1 << 30


def token_commands() -> list[bytes]:
    """The people's tokens, as the state holds them (the sealed secrets are
    never opened in the simulation: no handshake is simulated)."""
    return [
        encode(
            "token_create",
            {"id": u, "name": u, "role": "submit", "sealed": b"\0" * 28, "now": 0.0},
        )
        for u in USERS
    ]


@dataclass
class Ledger:
    """What people were told. Entries are only added, one name at a time,
    and never changed (names are unique): the checker reads their sizes."""

    acked: dict[str, str] = field(default_factory=dict)  # job name -> id, answered
    sent: dict[str, str] = field(default_factory=dict)  # job name -> id, outcome unknown
    cancelled: set[str] = field(default_factory=set)  # job ids whose cancel was answered


class People:
    def __init__(
        self,
        seed: int,
        rng: random.Random,
        net: Network,
        clock: SimClock,
        masters: str,
        trace: Trace,
        busy: Callable[[], bool],
        violation: Callable[[str], None],
    ) -> None:
        self.seed = seed
        self.rng = rng
        self.clock = clock
        self.trace = trace
        self.busy = busy  # enough work queued: no submits for now
        self.violation = violation
        self.ledger = Ledger()
        self._seq = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.clients = {
            who: ClusterClient(
                parse_addrs(masters),
                key_id=who,
                psk=b"",
                clock=clock,
                dial=net.dialer(f"c-{who}", clock),
            )
            for who in (*USERS, "admin")
        }

    def _spawn(self, coro: Any) -> None:
        t = self.clock.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _rid(self) -> str:
        self._seq += 1
        return f"sim{self.seed:x}-{self._seq:06d}"

    async def _call(self, who: str, what: str, method: str, args: dict[str, Any]) -> Any:
        try:
            res = await self.clients[who].call(method, args, timeout_s=30.0)
        except RpcError as exc:
            self.trace(f"{who} {what}: {exc.code}: {exc.message}")
            return None
        return res

    # -- what people do ------------------------------------------------------------
    def submit(self) -> None:
        if self.busy():
            return
        rng = self.rng
        who = rng.choice(USERS)
        kind = rng.choices(("ok", "fail", "flaky", "oom", "hang"), (55, 8, 12, 5, 20))[0]
        seconds = round(rng.uniform(1.0, 40.0), 2)
        term = "ignore" if rng.random() < 0.15 else str(round(rng.uniform(0.0, 2.0), 2))
        spec: dict[str, Any] = {
            "argv": ["sim-task", kind, str(seconds), term],
            "gpus": rng.choices((0, 1, 2, 4, 8), (15, 35, 25, 20, 5))[0],
            "cpus": float(rng.choice((1, 2, 4))),
            "mem_bytes": rng.choice((0, 4 * GiB, 16 * GiB)),
            "nodes": rng.choices((1, 2, 3), (85, 10, 5))[0],
            "priority": rng.choices((0, 10), (80, 20))[0],
            "retries": rng.choice((0, 0, 1, 2, 3)),
            "preemptible": rng.random() < 0.9,
        }
        if kind == "hang" and rng.random() < 0.5:
            spec["time_limit_s"] = round(rng.uniform(5.0, 60.0), 1)
        self.submit_spec(who, spec, f"{kind} {seconds}s")

    def submit_spec(self, who: str, spec: dict[str, Any], what: str = "") -> str:
        """Submit `spec` as `who`, in the background; the job's id."""
        rid = self._rid()
        name = f"w{self._seq}"
        job_id = "j-" + hashlib.sha256(f"{who}\0{rid}".encode()).hexdigest()[:12]
        self.ledger.sent[name] = job_id
        what = (
            f"submit {name} {job_id} {spec.get('nodes', 1)}x{spec.get('gpus', 0)} gpus "
            f"p{spec.get('priority', 0)} {what}"
        ).rstrip()
        self._spawn(self._submit(who, what, name, job_id, spec, rid))
        return job_id

    async def _submit(
        self, who: str, what: str, name: str, job_id: str, spec: dict[str, Any], rid: str
    ) -> None:
        self.trace(f"{who} {what}")
        res = await self._call(who, what, "submit", {"spec": spec, "name": name, "rid": rid})
        if res is None:
            return
        if res.get("id") != job_id:
            self.violation(f"submit {name} answered {res!r}, not job {job_id}")
            return
        self.ledger.acked[name] = job_id
        self.trace(f"{who} submitted {name} as {job_id}")

    def cancel(self, jobs: list[tuple[str, str]]) -> None:
        """Cancel one of `jobs` ((id, owner), not finished), as its owner or an admin."""
        if not jobs:
            return
        job_id, owner = self.rng.choice(jobs)
        who = owner if self.rng.random() < 0.8 else "admin"
        self._spawn(self._cancel(who, job_id))

    async def _cancel(self, who: str, job_id: str) -> None:
        what = f"cancel {job_id}"
        self.trace(f"{who} {what}")
        res = await self._call(who, what, "cancel", {"job_id": job_id, "rid": self._rid()})
        if res is not None:
            self.ledger.cancelled.add(job_id)
            self.trace(f"{who} cancelled {job_id}: {res.get('state')}")

    def drain(self, node: str, deadline_s: float | None) -> None:
        args: dict[str, Any] = {"node": node, "reason": "maintenance", "rid": self._rid()}
        if deadline_s is not None:
            args["deadline_s"] = deadline_s
        self._spawn(self._admin(f"drain {node} deadline {deadline_s}", "node_drain", args))

    def undrain(self, node: str) -> None:
        args = {"node": node, "rid": self._rid()}
        self._spawn(self._admin(f"undrain {node}", "node_undrain", args))

    async def _admin(self, what: str, method: str, args: dict[str, Any]) -> None:
        self.trace(f"admin {what}")
        res = await self._call("admin", what, method, args)
        if res is not None:
            self.trace(f"admin {what}: {res.get('state')}")

    def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
