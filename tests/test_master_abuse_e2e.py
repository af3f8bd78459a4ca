"""A hostile token holder, or a compromised host, against a real master.

One master and one agent (simulated GPUs) on loopback, shared by the module.
Each test is one finding of a security review, replayed as the attacker ran
it; before the fixes each of these froze the leader, took gigabytes, filled
its disk, broke a listing for everyone, or gave one user another's files:

- a 66 KB lz4 frame of msgpack empty arrays, from a read token;
- a connection that asks for thousands of replies and never reads them;
- `logs -f` streams nobody reads, relayed from the agent through the leader;
- block uploads that decompress to 64 MiB each;
- refused calls with megabyte arguments, for the audit log;
- a thousand jobs with quarter-MiB command lines, and the `jobs` listing;
- a submit naming another user's workdir manifest;
- a node credential's heartbeats and registrations full of bad values.

Memory is measured on the master process (its peak, sampled) and bounded
generously; a stall shows as a node marked down or a call that never
answers, not as a time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import struct
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import lz4.block
import msgpack
import pytest

from leptond.audit import REFUSAL_BURST, REFUSALS_PER_S
from leptond.blocks.manifest import manifest_id
from leptond.wire.codec import FLAG_LZ4, MAX_FRAME
from leptond.wire.connection import open_connection
from leptond.wire.errors import RpcError
from leptond.wire.tokens import Token, parse_token
from tests.harness import Cluster, wait_for
from tests.rss_support import PeakRss
from tests.wire_raw import RawPeer

MiB = 1024 * 1024
MAX_PENDING_JOBS = 6
MAX_PENDING_SPEC = 800 * 1024  # three quarter-MiB specs, not four


class Users:
    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.tokens: dict[str, str] = {}

    def token(self, name: str, role: str = "submit") -> Token:
        if name not in self.tokens:
            self.tokens[name] = self.c.ctl(
                "token", "create", "--role", role, "--name", name, "--unix-user", "nobody"
            ).stdout.strip()
        return parse_token(self.tokens[name])

    def raw(self, name: str) -> str:
        self.token(name)
        return self.tokens[name]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Users]]:
    c = Cluster(
        tmp_path_factory.mktemp("abuse") / "cluster",
        n_masters=1,
        ttl_s=6.0,
        master_args=[
            "--max-pending-jobs",
            str(MAX_PENDING_JOBS),
            "--max-pending-spec-bytes",
            str(MAX_PENDING_SPEC),
            "--audit-log-size",
            "1M",
        ],
    )
    try:
        c.start_masters(timeout_s=60)
        c.start_agent("h1", gpus="2")
        c.wait_nodes_ready(1, timeout_s=60)
        yield c, Users(c)
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def master_log(c: Cluster) -> str:
    return c.masters[0].proc.log.read_text(errors="replace")


def call(c: Cluster, tok: Token, method: str, args: Any = None, timeout_s: float = 30) -> Any:
    return c.rpc(method, args or {}, token=tok, timeout_s=timeout_s)


def refusal(c: Cluster, tok: Token, method: str, args: Any = None) -> RpcError:
    try:
        res = call(c, tok, method, args)
    except RpcError as exc:
        assert "\n" not in exc.message and len(exc.message) <= 1024, exc.message[:300]
        return exc
    raise AssertionError(f"{method} was accepted: {str(res)[:300]}")


def bomb(i: int) -> bytes:
    """{"t": "q", "i": i, "m": "whoami", "a": [[]] * 16M} as a 66 KB lz4 body."""
    n = MAX_FRAME - 256
    head = msgpack.packb({"t": "q", "i": i, "m": "whoami"})
    body = bytes([head[0] + 1]) + head[1:] + msgpack.packb("a")
    body += b"\xdd" + struct.pack(">I", n) + b"\x90" * n
    return bytes([FLAG_LZ4]) + lz4.block.compress(body)


def big_argv() -> list[str]:
    return ["true", base64.b64encode(os.urandom(180_000)).decode()]


def test_a_msgpack_bomb_from_a_read_token_neither_stalls_the_leader_nor_loses_a_node(
    env: tuple[Cluster, Users],
) -> None:
    c, users = env
    job = c.submit("--", "sleep", "300")
    c.wait_job(job, {"running"}, timeout_s=60)
    reader = users.token("reader", "read")
    m = c.masters[0]
    peer = RawPeer.connect(m.rpc, psk=reader.psk, key_id=reader.id)
    answered: list[Any] = []
    try:
        frames = peer.seal_plain(bomb(10)) + peer.seal_plain(bomb(11))
        assert len(frames) < 200_000
        with PeakRss(m.proc.pid) as rss:
            peer.sock.sendall(frames)
            # Another client, meanwhile: answered while the bombs are dealt with.
            answered.append(call(c, reader, "whoami", timeout_s=20))
            assert peer.closed_by_server(60)
        assert answered == [{"user": "reader", "role": "read"}]
        # Unpacked, each is 1.2 GiB of lists and seconds of the event loop.
        assert rss.growth_mib < 250, f"the master grew by {rss.growth_mib} MiB"
        # Nothing was judged down meanwhile: the job runs on, in its first attempt.
        deadline = time.monotonic() + 2 * c.ttl_s
        while time.monotonic() < deadline:
            st = c.status(job)
            assert st["state"] == "running" and st["tasks"][0]["attempt"] == 1, st
            time.sleep(0.5)
        assert "marking it down" not in master_log(c)
    finally:
        peer.close()
        c.ctl("cancel", job)


def test_an_expired_join_token_opens_no_connection(env: tuple[Cluster, Users]) -> None:
    c, _ = env
    short = parse_token(c.ctl("node", "join-token", "create", "--ttl", "1s").stdout.strip())

    def refused() -> bool:
        try:
            call(c, short, "node_join", {"node_id": "n-late"}, timeout_s=5)
        except RpcError as exc:
            return exc.code == "unauthenticated"
        return False

    wait_for(refused, 30, "the join token's handshake to be refused once it expired")


def test_a_reader_that_never_reads_its_replies_is_cut_off(env: tuple[Cluster, Users]) -> None:
    c, users = env
    bob = users.token("bob")
    job = call(
        c, bob, "submit", {"spec": {"argv": big_argv(), "gpus": 64}, "rid": uuid.uuid4().hex,
                           "queue_anyway": True},
    )["id"]  # fmt: skip
    reader = users.token("reader", "read")
    m = c.masters[0]
    peer = RawPeer.connect(m.rpc, psk=reader.psk, key_id=reader.id)
    try:
        # 2,000 requests for a quarter-MiB reply each (bob's job), never read.
        asks = b"".join(
            peer.seal({"t": "q", "i": 100 + k, "m": "status", "a": {"job_id": job}})
            for k in range(2000)
        )
        with PeakRss(m.proc.pid) as rss:
            peer.sock.sendall(asks)
            wait_for(
                lambda: metric(c, "lepton_rpc_slow_readers_closed") >= 1,
                60,
                "the master to close the connection that does not read",
            )
        # All of it is half a GiB; the cap is 64 MiB a connection.
        assert rss.growth_mib < 250, f"the master grew by {rss.growth_mib} MiB"
        assert call(c, reader, "whoami")["role"] == "read"
    finally:
        peer.close()
        call(c, bob, "cancel", {"job_id": job})


def metric(c: Cluster, name: str) -> float:
    url = f"http://127.0.0.1:{c.masters[0].http}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "_total "):
                return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


def test_unread_log_streams_hold_only_a_window_each_on_the_leader(
    env: tuple[Cluster, Users],
) -> None:
    c, _ = env
    job = c.submit("--", "sh", "-c", "head -c 30000000 /dev/zero | base64 -w 1000; sleep 300")
    c.wait_job(job, {"running"}, timeout_s=60)
    out = c.root / "agent-h1"
    wait_for(
        lambda: sum(p.stat().st_size for p in out.rglob("output.log*")) > 40_000_000,
        120,
        "the task to write its output",
    )
    admin = parse_token(c.admin_token)
    m = c.masters[0]
    peer = RawPeer.connect(m.rpc, psk=admin.psk, key_id=admin.id)
    try:
        asks = b"".join(
            peer.seal({"t": "q", "i": 100 + k, "m": "logs", "a": {"job_id": job, "follow": True}})
            for k in range(12)
        )
        with PeakRss(m.proc.pid) as rss:
            peer.sock.sendall(asks)
            # Each stream relays what fits its window, then waits for the reader.
            time.sleep(8)
        # Unbounded, each stream queued the whole 40 MB output on the leader.
        assert rss.growth_mib < 150, f"the master grew by {rss.growth_mib} MiB"
    finally:
        peer.close()
        c.ctl("cancel", job)
    # And a reader that reads gets all of it.
    got = c.ctl("logs", job, timeout_s=120).stdout
    assert len(got) > 40_000_000


def test_block_uploads_are_checked_and_decompressed_one_at_a_time(
    env: tuple[Cluster, Users],
) -> None:
    c, users = env
    bob = users.token("bob")
    payload = lz4.block.compress(b"\0" * (64 * MiB), store_size=True)  # 257 KiB
    m = c.masters[0]

    async def uploads() -> set[str]:
        from tests.cp_support import client

        cl = client(c.addrs, users.raw("bob"))
        try:

            async def one(i: int) -> str:
                bid = hashlib.sha256(b"%d" % i).hexdigest()
                try:
                    await cl.call(
                        "block_put", {"id": bid, "data": payload, "z": True}, timeout_s=120
                    )
                except RpcError as exc:
                    return exc.code
                return "accepted"

            return set(await asyncio.gather(*(one(i) for i in range(30))))
        finally:
            await cl.close()

    with PeakRss(m.proc.pid) as rss:
        answers = asyncio.run(uploads())
    assert answers == {"bad_request"}, answers  # none matches its id
    # 30 x 64 MiB decompressed at once took 2 GiB; one at a time, one block.
    assert rss.growth_mib < 300, f"the master grew by {rss.growth_mib} MiB"
    # A block that declares more than a block may hold is refused unopened.
    huge = (1 << 30).to_bytes(4, "little") + b"\x00" * 16
    exc = refusal(c, bob, "block_put", {"id": "0" * 64, "data": huge, "z": True})
    assert exc.code == "bad_request" and "declares" in exc.message


def audit_lines(c: Cluster) -> list[dict[str, Any]]:
    path = c.root / "master-0" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_refused_calls_leave_a_short_audit_trail(env: tuple[Cluster, Users]) -> None:
    c, users = env
    dave = users.token("dave")
    path = c.root / "master-0" / "audit.log"

    def daves() -> list[dict[str, Any]]:
        return [e for e in audit_lines(c) if e["who"] == "dave"]

    before = path.stat().st_size
    big = "A" * (4 * MiB)
    started = time.monotonic()
    for k in range(30):
        exc = refusal(
            c, dave, "submit", {"spec": {"argv": ["true"]}, "name": big, "rid": f"rid-{k:06d}x"}
        )
        assert exc.code == "bad_request"
    elapsed = time.monotonic() - started
    # 30 x 4 MiB went to the audit log before; now each refusal is cut short,
    # and a burst of them is rate-limited: at most the burst, and the rate
    # over the time the burst took (however slow the machine was).
    grown = path.stat().st_size - before
    assert grown < 64 * 1024, f"the audit log grew by {grown} bytes"
    mine = daves()
    assert 0 < len(mine) <= REFUSAL_BURST + int(elapsed * REFUSALS_PER_S) + 1
    assert all(len(json.dumps(e)) < 2048 for e in mine)
    # Small refusals, until one is held back: its record does not appear.
    # (How many that takes depends on how fast they come, not whether.)
    for k in range(1000):
        n = len(daves())
        refusal(c, dave, "cancel", {"job_id": f"held-{k}"})
        if len(daves()) == n:
            break
    else:
        raise AssertionError("no refusal was held back in 1,000 tries")
    # What was held back is said in the next record written for dave.
    time.sleep(1.5)
    refusal(c, dave, "cancel", {"job_id": "x" * 300})
    last = daves()[-1]
    assert last["action"] == "cancel" and last.get("refusals_held_back", 0) > 0, last


def test_each_user_has_a_cap_on_waiting_jobs_and_their_spec_bytes(
    env: tuple[Cluster, Users],
) -> None:
    c, users = env
    erin = users.token("erin")
    spec = {"argv": ["sleep", "1"], "gpus": 64}

    async def burst(n: int) -> list[str]:
        from tests.cp_support import client

        cl = client(c.addrs, users.raw("erin"))
        try:

            async def one() -> str:
                args = {"spec": spec, "rid": uuid.uuid4().hex, "queue_anyway": True}
                try:
                    return str((await cl.call("submit", args, timeout_s=60))["id"])
                except RpcError as exc:
                    assert "\n" not in exc.message
                    return exc.code

            return list(await asyncio.gather(*(one() for _ in range(n))))
        finally:
            await cl.close()

    # 40 at once: all past the API's check together, the cap holds at apply.
    results = asyncio.run(burst(40))
    accepted = [r for r in results if r.startswith("j-")]
    assert len(accepted) == MAX_PENDING_JOBS, results
    assert set(results) - set(accepted) == {"pending_limit"}
    exc = refusal(c, erin, "submit", {"spec": spec, "rid": uuid.uuid4().hex, "queue_anyway": True})
    assert exc.code == "pending_limit" and "waiting to start" in exc.message
    # A cancel makes room again.
    call(c, erin, "cancel", {"job_id": accepted[0]})
    again = call(c, erin, "submit", {"spec": spec, "rid": uuid.uuid4().hex, "queue_anyway": True})
    assert again["id"].startswith("j-")
    # Bytes: quarter-MiB commands fill the spec budget before the job count.
    frank = users.token("frank")
    codes = []
    for _ in range(5):
        try:
            args = {"spec": {"argv": big_argv(), "gpus": 64}, "rid": uuid.uuid4().hex}
            call(c, frank, "submit", {**args, "queue_anyway": True})
            codes.append("ok")
        except RpcError as exc:
            codes.append(exc.code)
            assert "bytes of specs" in exc.message
    assert codes == ["ok", "ok", "ok", "pending_limit", "pending_limit"], codes
    for row in c.rpc("jobs", {"user": "erin"}) + c.rpc("jobs", {"user": "frank"}):
        if row["state"] == "pending":
            c.rpc("cancel", {"job_id": row["id"]})


def test_jobs_listings_cut_commands_and_page_by_bytes(env: tuple[Cluster, Users]) -> None:
    c, users = env

    async def submit_many(n: int) -> None:
        from tests.cp_support import client

        cl = client(c.addrs, c.admin_token)  # admins have no pending caps
        sem = asyncio.Semaphore(8)
        try:

            async def one() -> None:
                async with sem:
                    args = {"spec": {"argv": big_argv(), "gpus": 64}, "rid": uuid.uuid4().hex}
                    await cl.call("submit", {**args, "queue_anyway": True}, timeout_s=60)

            await asyncio.gather(*(one() for _ in range(n)))
        finally:
            await cl.close()

    # 90 jobs x 240 KB: a listing of their whole commands is over the 16 MiB frame cap.
    asyncio.run(submit_many(90))
    out = c.ctl("jobs", token=users.raw("reader"), timeout_s=120)
    assert out.returncode == 0 and out.stdout.count("true") >= 90
    rows = c.ctl_json("jobs", timeout_s=120)
    big = [r for r in rows if r["command_cut"]]
    assert len(big) >= 90
    assert all(len(" ".join(r["command"])) < 300 for r in big)
    # Pages of at most page_bytes, each job once, in order.
    seen: list[str] = []
    args: dict[str, Any] = {"paged": True, "page_bytes": 4096, "state": ["pending"]}
    pages = 0
    while True:
        page = c.rpc("jobs", args)
        assert len(msgpack.packb(page["jobs"])) < 4096 + 1024
        seen += [r["id"] for r in page["jobs"]]
        pages += 1
        if not page["next"]:
            break
        args["after"] = page["next"]
    assert pages > 5 and len(seen) == len(set(seen)) >= 90
    # The whole command is still there for its owner.
    st = c.status(big[0]["id"])
    assert len(st["command"][1]) == len(big_argv()[1])
    for jid in {r["id"] for r in rows if r["state"] == "pending"}:
        c.rpc("cancel", {"job_id": jid})


def upload(c: Cluster, tok: Token, data: bytes) -> tuple[str, str]:
    """Upload one file's block and its manifest as `tok`; (block id, manifest id)."""
    bid = hashlib.sha256(data).hexdigest()
    missing = call(c, tok, "blocks_missing", {"ids": [bid]})["missing"]
    if missing:
        call(c, tok, "block_put", {"id": bid, "data": data, "z": False})
    man = manifest_of(bid, len(data))
    return bid, call(c, tok, "manifest_put", {"manifest": man})["id"]


def manifest_of(bid: str, size: int) -> dict[str, Any]:
    return {
        "v": 1,
        "block_size": 4 << 20,
        "files": [{"path": "secret.txt", "mode": 0o600, "size": size, "blocks": [bid]}],
        "links": [],
        "dirs": [],
    }


def test_a_workdir_manifest_and_its_blocks_are_their_uploaders_alone(
    env: tuple[Cluster, Users],
) -> None:
    c, users = env
    alice, bob = users.token("alice"), users.token("bob")
    secret = b"ALICE-PRIVATE-KEY-" + os.urandom(16).hex().encode()
    bid, mid = upload(c, alice, secret)
    assert mid == manifest_id(manifest_of(bid, len(secret)))
    spec = {"argv": ["cat", "secret.txt"], "workdir": mid, "gpus": 64}
    job = call(c, alice, "submit", {"spec": spec, "rid": uuid.uuid4().hex, "queue_anyway": True})
    # Bob sees alice's job, not her workdir's id.
    assert call(c, bob, "status", {"job_id": job["id"]})["spec"]["workdir"] == "<redacted>"
    assert call(c, alice, "status", {"job_id": job["id"]})["spec"]["workdir"] == mid
    # He cannot use her manifest, in the API...
    spec_b = {"argv": ["cat", "secret.txt"], "workdir": mid}
    exc = refusal(c, bob, "submit", {"spec": spec_b, "rid": uuid.uuid4().hex})
    assert exc.code == "bad_request" and "not uploaded by bob" in exc.message
    # ...nor name her blocks in a manifest of his own (knowing the id from a
    # block cache), and asking about the block tells him nothing.
    other = hashlib.sha256(b"nobody uploaded this").hexdigest()
    assert call(c, bob, "blocks_missing", {"ids": [bid, other]})["missing"] == [bid, other]
    exc = refusal(c, bob, "manifest_put", {"manifest": manifest_of(bid, len(secret))})
    assert "were not uploaded" in exc.message
    # With the bytes themselves he proves he has the content: then it is his too.
    bid_b, mid_b = upload(c, bob, secret)
    assert (bid_b, mid_b) == (bid, mid)
    job_b = call(c, bob, "submit", {"spec": {**spec_b, "gpus": 64}, "rid": uuid.uuid4().hex,
                                    "queue_anyway": True})  # fmt: skip
    # An admin may use anyone's.
    job_a = c.rpc("submit", {"spec": {**spec_b, "gpus": 64}, "rid": uuid.uuid4().hex,
                             "queue_anyway": True})  # fmt: skip
    for tok, jid in ((alice, job["id"]), (bob, job_b["id"])):
        call(c, tok, "cancel", {"job_id": jid})
    c.rpc("cancel", {"job_id": job_a["id"]})


class Host:
    """One connection made with a node credential, as its agent keeps one
    (heartbeats count only on the connection that registered)."""

    def __init__(self, c: Cluster, cred: Token) -> None:
        self.loop = asyncio.new_event_loop()
        host, port = c.masters[0].rpc_addr.split(":")
        self.conn = self.loop.run_until_complete(
            open_connection(host, int(port), key_id=cred.id, psk=cred.psk, timeout_s=10)
        )

    def call(self, method: str, args: Any) -> Any:
        return self.loop.run_until_complete(self.conn.call(method, args, timeout_s=30))

    def refusal(self, method: str, args: Any) -> RpcError:
        try:
            res = self.call(method, args)
        except RpcError as exc:
            assert "\n" not in exc.message and len(exc.message) <= 1024, exc.message[:300]
            return exc
        raise AssertionError(f"{method} was accepted: {str(res)[:300]}")

    def close(self) -> None:
        self.conn.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


def test_a_compromised_host_cannot_break_node_views_or_claim_admin_labels(
    env: tuple[Cluster, Users],
) -> None:
    c, users = env
    reader = users.token("reader", "read")
    join = parse_token(c.ctl("node", "join-token", "create", "--uses", "1").stdout.strip())
    cred = parse_token(call(c, join, "node_join", {"node_id": "n-evil"})["credential"])
    host = Host(c, cred)

    def node(**kw: Any) -> dict[str, Any]:
        return {"id": "n-evil", "name": "evil", "addr": "127.0.0.1", "cpus": 1.0,
                "mem_bytes": 1 << 30, "gpus": [], "labels": {}, **kw}  # fmt: skip

    gpu = {"index": 0, "uuid": "GPU-0", "model": "sim", "mem_bytes": 1 << 30}
    bad = {
        "gpus": [dict(gpu, index=i) for i in range(10_000)],
        "cpus": 1e6,
        "mem_bytes": 1 << 62,
        "labels": {f"k{i}": "v" for i in range(1000)},
    }
    try:
        for field, value in bad.items():
            exc = host.refusal("agent_register", {"node": node(**{field: value}), "running": []})
            assert exc.code == "bad_request", (field, exc.message)
        assert all(n["id"] != "n-evil" for n in c.nodes())
        # A sane registration that claims an admin label: registered, without it.
        claim = {"admin/secure": "yes", "zone": "a"}
        host.call("agent_register", {"node": node(labels=claim), "running": []})
        evil = next(n for n in c.nodes() if n["id"] == "n-evil")
        assert evil["labels"] == {"zone": "a"}
        constrained = {"argv": ["true"], "constraints": {"admin/secure": "yes"}}
        gina = users.token("gina")
        exc = refusal(c, gina, "submit", {"spec": constrained, "rid": uuid.uuid4().hex})
        assert exc.code == "unschedulable"
        # Heartbeats full of bad values: dropped and counted, never shown.
        for stats in (
            {"host": {"load_1": "x", "n": float("inf")}, "gpus": [{"index": 0, "util_pct": "x"}]},
            {"host": [], "gpus": 5, "cache": {"bytes": [1]}, "running": 7, "exited": [[1]]},
        ):
            host.call("heartbeat", stats)
            rows = {n["id"]: n for n in call(c, reader, "nodes")}
            assert rows["n-evil"]["gpu_util_pct"] is None
            assert json.dumps(rows["n-evil"])  # plain values only
            with urllib.request.urlopen(
                f"http://127.0.0.1:{c.masters[0].http}/metrics", timeout=10
            ) as r:
                assert r.status == 200
        assert metric(c, "lepton_heartbeat_values_dropped") >= 5
        assert c.ctl("nodes", token=users.raw("reader")).returncode == 0
        # A GPU fault's words are cut to one short printable line; a fault
        # for a GPU the node does not have, or of the wrong shape, is ignored.
        host.call("agent_register", {"node": node(gpus=[gpu]), "running": []})
        faults = [{"index": 0, "reason": "Xid 79\n\x1b[2Jforged" + "x" * 100_000}]
        faults += [{"index": 7, "reason": "no such GPU"}, "junk", {"index": True}]
        host.call("heartbeat", {"gpu_faults": faults})
        marked = wait_for(
            lambda: next(n for n in c.nodes() if n["id"] == "n-evil")["gpu_faults"],
            30,
            "the fault committed",
        )
        assert [f["index"] for f in marked] == [0]
        reason = marked[0]["reason"]
        assert reason.startswith("Xid 79  [2Jforged") and len(reason) <= 256
        assert reason.isprintable()
        # The admin's word counts: set, the label is the node's, and wins.
        c.rpc("node_label", {"node": "n-evil", "set": {"admin/secure": "no", "zone": "b"}})
        evil = next(n for n in c.nodes() if n["id"] == "n-evil")
        assert evil["labels"] == {"zone": "b", "admin/secure": "no"}
        # Registering again changes the host's own labels, not the admin's.
        host.call("agent_register", {"node": node(labels=claim), "running": []})
        evil = next(n for n in c.nodes() if n["id"] == "n-evil")
        assert evil["labels"]["admin/secure"] == "no"
    finally:
        host.close()
        c.rpc("node_rm", {"node": "n-evil", "force": True})


def test_malformed_http_requests_get_one_short_log_line_now_and_then(
    env: tuple[Cluster, Users],
) -> None:
    # No token needed: anyone may send the HTTP port a header over 8 KiB.
    c, _ = env
    m = c.masters[0]
    before = m.proc.log.read_text(errors="replace")
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", m.http), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 100_000 + b"\r\n\r\n")
            assert b" 400 " in s.recv(64), "refused"
    # The port still serves; the log says so in single lines, without the
    # client's bytes or a traceback (how few lines: tests/test_httplog.py).
    with socket.create_connection(("127.0.0.1", m.http), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b" 200 " in s.recv(64)
    new = m.proc.log.read_text(errors="replace")[len(before) :]
    lines = [ln for ln in new.splitlines() if "malformed HTTP request" in ln]
    assert 1 <= len(lines) <= 5 and "aaaa" not in new and "Traceback" not in new, new[-3000:]
