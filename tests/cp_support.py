"""Control-plane test and bench helpers: one-master RPC, leader lookup, a submit load.

`Submitters` is the exactly-once client contract in code: every submit has its
own request id, and after an error the client retries the SAME id until the
cluster acknowledges it.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leptond.wire.client import ClusterClient, parse_addr, parse_addrs
from leptond.wire.connection import open_connection
from leptond.wire.errors import RpcError
from leptond.wire.tokens import parse_token
from tests.harness import Cluster, Master, wait_for

if TYPE_CHECKING:  # benchmarks import this module without pytest installed
    import pytest

SPEC = {"argv": ["true"]}


def snapshot_files(c: Cluster) -> list[Path]:
    return [c.root / f"master-{m.index}" / "raft" / "raft.snapshot" for m in c.masters]


def write_until_snapshotted(c: Cluster, user: str, timeout_s: float = 120.0) -> set[str]:
    """Submit one job at a time (one Raft entry each) until every master has
    written a snapshot; returns the acknowledged job ids.

    Makes the log long enough for compaction whatever the machine's speed:
    concurrent submits are batched into few entries on a fast machine."""
    with Submitters(c.addrs, c.admin_token, user, n=1, tag="fill", pause_s=0) as load:
        wait_for(
            lambda: load.failure is None and all(p.exists() for p in snapshot_files(c)),
            timeout_s,
            "a snapshot on every master",
            interval_s=0.1,
        )
        load.stop()
    return load.check_ids()


def job_id(user: str, rid: str) -> str:
    """The job id the leader derives from the submitter and its request id (api.submit)."""
    return "j-" + hashlib.sha256(f"{user}\0{rid}".encode()).hexdigest()[:12]


async def call_one(
    addr: str, token: str, method: str, args: Any = None, timeout_s: float = 5.0
) -> Any:
    """One call on exactly this master: no redirect, no retry."""
    tok = parse_token(token)
    host, port = parse_addr(addr)
    conn = await open_connection(host, port, key_id=tok.id, psk=tok.psk, timeout_s=timeout_s)
    try:
        return await conn.call(method, args if args is not None else {}, timeout_s=timeout_s)
    finally:
        conn.close()


def rpc(addr: str, token: str, method: str, args: Any = None, timeout_s: float = 5.0) -> Any:
    return asyncio.run(call_one(addr, token, method, args, timeout_s))


def client(addrs: str | Sequence[str], token: str) -> ClusterClient:
    tok = parse_token(token)
    return ClusterClient(parse_addrs(addrs), key_id=tok.id, psk=tok.psk)


def module_cluster(
    tmp_path_factory: pytest.TempPathFactory, name: str, master_args: list[str] | None = None
) -> Iterator[Cluster]:
    """A 3-master cluster shared by one test module; logs printed if it fails."""
    c = Cluster(
        tmp_path_factory.mktemp(name) / "cluster", n_masters=3, master_args=master_args or []
    )
    try:
        c.start_masters(timeout_s=60)
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def local_job_ids(addr: str, token: str) -> list[str]:
    """Job ids in this master's own replica, duplicates kept (they would be a bug)."""
    args: dict[str, Any] = {"all": True, "local": True, "limit": 10**9, "paged": True}
    ids: list[str] = []
    while True:  # page by page: one reply holds a few MiB of summaries
        page = rpc(addr, token, "jobs", args, timeout_s=20)
        ids += [r["id"] for r in page["jobs"]]
        if not page["next"]:
            return ids
        args["after"] = page["next"]


def wait_replicas_hold(
    c: Cluster, want: set[str], timeout_s: float = 60.0, exact: bool = True
) -> None:
    """Every master converges to exactly `want` (or a superset), each id once."""
    for m in c.masters:
        if not m.proc.alive():
            continue

        def holds(m: Master = m) -> bool:
            ids = local_job_ids(m.rpc_addr, c.admin_token)
            have = set(ids)
            return len(ids) == len(have) and (have == want if exact else want <= have)

        try:
            wait_for(holds, timeout_s, f"master-{m.index} to hold exactly the acknowledged jobs")
        except AssertionError:
            ids = local_job_ids(m.rpc_addr, c.admin_token)
            dups = len(ids) - len(set(ids))
            raise AssertionError(
                f"master-{m.index}: {len(set(ids) - want) if exact else 0} unexpected, "
                f"{len(want - set(ids))} missing, {dups} duplicated job ids"
            ) from None


class Submitters:
    """N clients in one background thread, each submitting 1-task jobs in a loop."""

    def __init__(
        self, addrs: str, token: str, user: str, n: int = 4, tag: str = "", pause_s: float = 0.01
    ) -> None:
        self.addrs, self.token, self.user, self.n = addrs, token, user, n
        self.tag = tag or hex(int(time.time() * 1000) % 0xFFFFFF)[2:]
        self.pause_s = pause_s
        self.acked: dict[str, str] = {}  # rid -> job id
        self.attempted: set[str] = set()
        self.errors = 0
        self.retries_same_rid = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.failure: BaseException | None = None

    def __enter__(self) -> Submitters:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # surfaced by stop()
            self.failure = exc

    async def _run(self) -> None:
        await asyncio.gather(*(self._one(k) for k in range(self.n)))

    async def _one(self, k: int) -> None:
        cl = client(self.addrs, self.token)
        i = 0
        try:
            while not self._stop.is_set():
                rid = f"{self.tag}-c{k}-{i:07d}"
                self.attempted.add(rid)
                while True:  # same rid until acknowledged: the exactly-once contract
                    try:
                        res = await cl.call("submit", {"spec": SPEC, "rid": rid}, timeout_s=10.0)
                    except RpcError:
                        self.errors += 1
                        self.retries_same_rid += 1
                        await asyncio.sleep(0.05)
                        continue
                    self.acked[rid] = res["id"]
                    break
                i += 1
                if self.pause_s:
                    await asyncio.sleep(self.pause_s)
        finally:
            await cl.close()

    def wait_more(self, n: int, timeout_s: float = 60.0) -> None:
        base = len(self.acked)
        wait_for(
            lambda: self.failure is None and len(self.acked) >= base + n,
            timeout_s,
            f"{n} more acknowledged submits (have {base}, errors {self.errors})",
            interval_s=0.05,
        )
        if self.failure is not None:
            raise self.failure

    def stop(self, timeout_s: float = 90.0) -> None:
        """Stop starting new submits; each client's last one is retried until acknowledged."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError("submitters did not finish their last submits in time")
        if self.failure is not None:
            raise self.failure

    def check_ids(self) -> set[str]:
        """Acked ids are the ones derived from user+rid, and every attempt was acknowledged."""
        assert set(self.acked) == self.attempted, "a submit was given up before its ack"
        for rid, jid in self.acked.items():
            assert jid == job_id(self.user, rid), (rid, jid)
        return set(self.acked.values())
