"""Per-node credentials on real processes: agents join with a join token, hold
no cluster-wide secret, and their credential opens node RPCs for their own
node only. One master and two agents serve the module; tests run in file order.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leptond.blocks import unpack_block
from leptond.wire.client import ClusterClient, parse_addrs
from leptond.wire.connection import open_connection
from leptond.wire.errors import RpcError
from leptond.wire.tokens import Token, parse_token
from tests.harness import Cluster, Proc, wait_for
from tests.test_hosts_e2e import kill_task_leftovers, node_by_name, wait_task

TOKEN = re.compile(r"^ltk_[a-z0-9]+_[A-Za-z0-9_-]{43}$")


@pytest.fixture(scope="module")
def creds(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("nodecreds") / "cluster", n_masters=1, ttl_s=4.0)
    failed_before = request.session.testsfailed
    try:
        c.start_masters()
        for name in ("h1", "h2"):
            c.start_agent(name, gpus="2", extra=["--labels", f"host={name}"])
        c.wait_nodes_ready(2, timeout_s=60)
        yield c
    finally:
        if request.session.testsfailed > failed_before:
            print(c.logs())
        c.close()
        kill_task_leftovers(c)


def cred_of(c: Cluster, name: str) -> Token:
    return parse_token((c.root / f"agent-{name}" / "node.credential").read_text())


def call_as(c: Cluster, tok: Token, method: str, args: dict[str, Any] | None = None) -> Any:
    async def go() -> Any:
        client = ClusterClient(parse_addrs(c.addrs), key_id=tok.id, psk=tok.psk)
        try:
            return await client.call(method, args or {}, timeout_s=20)
        finally:
            await client.close()

    return asyncio.run(go())


def refusal(c: Cluster, tok: Token, method: str, args: dict[str, Any] | None = None) -> RpcError:
    try:
        res = call_as(c, tok, method, args)
    except RpcError as exc:
        assert "\n" not in exc.message, exc.message
        return exc
    raise AssertionError(f"{method} answered a node credential: {res!r}")


def test_agents_hold_a_node_credential_and_no_cluster_key(creds: Cluster) -> None:
    for name in ("h1", "h2"):
        agent = next(a for a in creds.agents if a.name == name)
        assert "--secret-file" not in agent.argv and str(creds.secret) not in agent.argv
        node = node_by_name(creds, name)
        assert node is not None
        data_dir = creds.root / f"agent-{name}"
        cred_file = data_dir / "node.credential"
        assert stat.S_IMODE(cred_file.stat().st_mode) == 0o600
        # Others may pass through (tasks reach their own dirs below), never
        # list or read it.
        assert stat.S_IMODE(data_dir.stat().st_mode) & 0o066 == 0
        assert cred_file.stat().st_uid == os.getuid()
        assert TOKEN.match(cred_file.read_text().strip())
        assert node["id"] == (data_dir / "node_id").read_text().strip()
        # Its join token file went once the credential was saved: nothing on
        # the host can admit another one.
        assert not (creds.root / f"join-{name}.token").exists()
        assert "deleted the join token file" in agent.log.read_text()


def test_a_join_token_cannot_buy_the_credential_of_a_node_that_registered(creds: Cluster) -> None:
    # The fleet token both agents joined with admits any number of hosts and
    # has not expired: what a compromised host would use to become h2.
    fleet = parse_token(creds.join_token_file().read_text())
    h2 = node_by_name(creds, "h2")
    assert h2 is not None
    mine = cred_of(creds, "h2")
    exc = refusal(creds, fleet, "node_join", {"node_id": h2["id"]})
    assert exc.code == "conflict" and "registered already" in exc.message, exc.message
    # h2 keeps its credential: its connection was not taken away from it.
    assert cred_of(creds, "h2") == mine
    n = node_by_name(creds, "h2")
    assert n is not None and n["state"] == "ready"
    h2_log = next(a for a in creds.agents if a.name == "h2").log.read_text()
    assert "refused this node's credential" not in h2_log


def test_a_node_credential_can_call_nothing_but_its_own_node_rpcs(creds: Cluster) -> None:
    tok = cred_of(creds, "h1")
    job = creds.submit("--", "true")
    # Settled first: a job that ends meanwhile would change the listing too.
    creds.wait_job(job, {"succeeded"})
    before = creds.ctl_json("jobs", "--all")
    for method, args in (
        ("submit", {"spec": {"argv": ["id"]}, "rid": "x" * 16}),
        ("cancel", {"job_id": job}),
        ("token_create", {"role": "admin", "name": "evil"}),
        ("join_token_create", {"ttl_s": 60}),
        ("jobs", {}),
        ("status", {"job_id": job}),
        ("nodes", {}),
        ("whoami", {}),
        ("snapshot_save", {}),
        ("node_rm", {"node": "h2"}),
        ("peer_block_get", {"id": "0" * 64}),
        ("peer_block_put", {"id": "0" * 64, "data": b"x"}),
        ("member_hello", {"raft_addr": "x:1", "rpc_addr": "x:2"}),
    ):
        exc = refusal(creds, tok, method, args)
        assert exc.code == "forbidden", (method, exc.code, exc.message)
    assert creds.ctl_json("jobs", "--all") == before
    assert {n["name"] for n in creds.nodes()} == {"h1", "h2"}
    # It cannot register, so cannot speak for, another node.
    h2 = node_by_name(creds, "h2")
    assert h2 is not None
    exc = refusal(
        creds, tok, "agent_register", {"node": {**h2, "id": h2["id"], "gpus": []}, "running": []}
    )
    assert exc.code == "forbidden" and "another node" in exc.message
    # Nor can a person's token act as a node.
    admin = parse_token(creds.admin_token)
    assert refusal(creds, admin, "heartbeat", {}).code == "forbidden"


def test_a_node_credential_reads_only_its_own_tasks_blocks_and_events(
    creds: Cluster, tmp_path: Path
) -> None:
    wd = tmp_path / "wd"
    wd.mkdir()
    payload = os.urandom(100_000)
    (wd / "data.bin").write_bytes(payload)
    res = json.loads(
        creds.ctl(
            "submit", "--constraint", "host=h2", "--workdir", str(wd), "-o", "json",
            "--", "sh", "-c", "sleep 300",
        ).stdout
    )  # fmt: skip
    job = res["id"]
    wait_task(creds, job, {"running"})
    import hashlib

    bid = hashlib.sha256(payload).hexdigest()
    # h2 runs the task: its credential may read the block ...
    got = call_as(creds, cred_of(creds, "h2"), "block_get", {"id": bid})
    assert unpack_block(got["data"], bool(got["z"]), 1 << 26) == payload
    # ... h1's may not.
    exc = refusal(creds, cred_of(creds, "h1"), "block_get", {"id": bid})
    assert exc.code == "forbidden" and "no workdir of a task on this node" in exc.message

    # h1's credential, registered as h1, reports h2's task as exited: ignored.
    async def forge() -> Any:
        tok = cred_of(creds, "h1")
        leader = creds.wait_leader()
        conn = await open_connection("127.0.0.1", leader.rpc, key_id=tok.id, psk=tok.psk)
        try:
            desc = node_by_name(creds, "h1")
            assert desc is not None
            node = {k: desc[k] for k in ("id", "name", "addr", "labels", "cpus", "mem_bytes")}
            node["gpus"] = []
            reg = await conn.call("agent_register", {"node": node, "running": []})
            ev = {"task_id": f"{job}.0", "attempt": 1, "state": "exited", "exit_code": 0,
                  "message": "forged", "at": 0.0}  # fmt: skip
            await conn.call("task_events", {"events": [ev]})
            return reg
        finally:
            conn.close()

    reg = asyncio.run(forge())
    assert all(t["task_id"] != f"{job}.0" for t in reg["tasks"]), reg["tasks"]
    st = creds.status(job)
    assert st["tasks"][0]["state"] == "running", st
    creds.ctl("cancel", job)
    creds.wait_job(job, {"cancelled"})
    # The real h1 agent registers again (its connection was taken over above).
    wait_for(
        lambda: (n := node_by_name(creds, "h1")) is not None and n["state"] == "ready",
        60,
        "h1 ready again",
    )


@pytest.fixture(scope="module")
def unprivileged() -> Iterator[str]:
    """A Unix user of its own, as a task's user would be; removed afterwards."""
    name = f"ltest{os.getpid() % 100000}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)


def test_a_task_cannot_read_the_node_credential(creds: Cluster, unprivileged: str) -> None:
    cred_file = creds.root / "agent-h1" / "node.credential"
    # What a task running as its user (not root) gets: no way in.
    for target in (cred_file, cred_file.parent):
        out = subprocess.run(
            ["setpriv", f"--reuid={unprivileged}", f"--regid={unprivileged}", "--clear-groups",
             "cat" if target.is_file() else "ls", str(target)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode != 0 and "Permission denied" in out.stderr, out
        assert "ltk_" not in out.stdout
    # And nothing of it reaches a task's environment.
    job = creds.submit("--constraint", "host=h1", "--", "env")
    assert creds.wait_job(job, {"succeeded", "failed"})["state"] == "succeeded"
    output = creds.ctl("logs", job).stdout
    assert "LEPTON_JOB_ID" in output
    assert "ltk_" not in output and cred_of(creds, "h1").id not in output


def test_node_rm_revokes_the_credential_and_closes_its_connection(creds: Cluster) -> None:
    p = creds.start_agent("h3", gpus="1", extra=["--labels", "host=h3"])
    creds.wait_nodes_ready(3, timeout_s=60)
    tok = cred_of(creds, "h3")

    async def held_open() -> bool:
        leader = creds.wait_leader()
        conn = await open_connection("127.0.0.1", leader.rpc, key_id=tok.id, psk=tok.psk)
        # A live connection of the node's credential (it makes no call that matters).
        with pytest.raises(RpcError):
            await conn.call("jobs", {})
        out = await asyncio.to_thread(creds.ctl, "node", "rm", "h3", "--force")
        assert out.stdout.strip() == "h3: removed"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not conn.is_closing() and loop.time() < deadline:
            await asyncio.sleep(0.1)
        return conn.is_closing()

    assert asyncio.run(held_open()), "node rm left the node credential's connection open"
    assert node_by_name(creds, "h3") is None
    # The agent cannot come back with it: it says why, once, and stays out.
    wait_for(lambda: "refused this node's credential" in p.log.read_text(), 60, "the refusal")
    with pytest.raises(RpcError) as exc:
        call_as(creds, tok, "heartbeat", {})
    assert exc.value.code == "unauthenticated"
    assert node_by_name(creds, "h3") is None
    p.stop()


def test_join_tokens_expire_and_admit_only_as_many_hosts_as_their_uses(creds: Cluster) -> None:
    out = creds.ctl("node", "join-token", "create", "--uses", "1", "--ttl", "1h")
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and TOKEN.match(lines[0]), out.stdout
    one = parse_token(lines[0])
    first = call_as(creds, one, "node_join", {"node_id": "n-test-a"})
    assert first["node_id"] == "n-test-a" and TOKEN.match(first["credential"])
    exc = refusal(creds, one, "node_join", {"node_id": "n-test-b"})
    assert exc.code == "forbidden" and "used up" in exc.message
    # Trading again for the same node (a crash before the agent saved it)
    # spends no use and replaces the credential.
    again = call_as(creds, one, "node_join", {"node_id": "n-test-a"})
    assert again["credential"] != first["credential"]
    with pytest.raises(RpcError):
        call_as(creds, parse_token(first["credential"]), "heartbeat", {})
    listed = {r["id"]: r for r in creds.ctl_json("node", "join-token", "ls")}
    assert (listed[one.id]["used"], listed[one.id]["max_uses"]) == (1, 1)
    # A join token is good for nothing but the trade.
    assert refusal(creds, one, "jobs").code == "forbidden"
    # TTL: a token that lives one second admits nobody after it; it does not
    # even open a connection any more (an authenticated peer costs the master work).
    short = parse_token(creds.ctl("node", "join-token", "create", "--ttl", "1s").stdout)
    wait_for(
        lambda: (
            refusal(creds, short, "node_join", {"node_id": "n-test-c"}).code == "unauthenticated"
        ),
        30,
        "the one-second join token to expire",
    )
    assert "expired" in refusal(creds, short, "whoami").message
    # Without --uses a join token admits one host.
    dflt = parse_token(creds.ctl("node", "join-token", "create").stdout)
    assert call_as(creds, dflt, "node_join", {"node_id": "n-test-e"})["node_id"] == "n-test-e"
    assert "used up" in refusal(creds, dflt, "node_join", {"node_id": "n-test-f"}).message
    # Revoked: its handshake fails.
    rev = parse_token(creds.ctl("node", "join-token", "create").stdout)
    creds.ctl("node", "join-token", "revoke", rev.id)
    assert refusal(creds, rev, "node_join", {"node_id": "n-test-d"}).code == "unauthenticated"
    # Bad flags are one line and exit 2 before anything is sent.
    for bad in (["--ttl", "soon"], ["--ttl", "0s"], ["--uses", "0"]):
        res = creds.ctl("node", "join-token", "create", *bad, check=False)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_an_agent_that_died_before_saving_its_credential_joins_as_itself(
    creds: Cluster,
) -> None:
    token = creds.ctl("node", "join-token", "create", "--uses", "1").stdout
    token_file = creds.root / "one-use.token"
    token_file.write_text(token)
    data = creds.root / "agent-h4"
    data.mkdir(mode=0o700)
    # A directory where the credential's temporary file goes: the masters
    # issue the credential, and the agent cannot save it (as if it died then).
    blocker = data / "node.credential.tmp"
    blocker.mkdir()

    def start() -> Proc:
        # The harness's own --join-token-file comes first; this one wins.
        return creds.start_agent(
            "h4", gpus="1", extra=["--labels", "host=h4", "--join-token-file", str(token_file)]
        )

    p = start()
    wait_for(lambda: "cannot keep the node credential" in p.log.read_text(), 60, "the failed save")
    listed = {r["id"]: r for r in creds.ctl_json("node", "join-token", "ls")}
    assert listed[parse_token(token).id]["used"] == 1  # the masters did issue it
    p.kill9()
    assert not (data / "node.credential").exists() and token_file.exists()
    node_id = (data / "node_id").read_text().strip()
    blocker.rmdir()
    p = start()
    wait_for(lambda: "registered as" in p.log.read_text(), 60, "h4 to register")
    n = node_by_name(creds, "h4")
    assert n is not None and n["id"] == node_id and n["state"] == "ready", n
    listed = {r["id"]: r for r in creds.ctl_json("node", "join-token", "ls")}
    assert listed[parse_token(token).id]["used"] == 1  # still its one use, spent once
    assert not token_file.exists()  # deleted once the credential was saved
    # The token cannot be traded for h4 again, now that it registered ...
    exc = refusal(creds, parse_token(token), "node_join", {"node_id": node_id})
    assert exc.code == "conflict", exc.message
    # ... nor admit a second host: its one use went to h4.
    other = creds.root / "h5.token"
    other.write_text(token)
    p5 = creds.start_agent("h5", gpus="1", extra=["--join-token-file", str(other)])
    wait_for(lambda: "used up" in p5.log.read_text(), 60, "h5 to be refused")
    assert node_by_name(creds, "h5") is None
    p5.stop()
    p.stop()


def test_http_api_takes_peoples_tokens_only(creds: Cluster) -> None:
    leader = creds.wait_leader()
    tok = cred_of(creds, "h1")
    req = urllib.request.Request(
        f"http://127.0.0.1:{leader.http}/api/jobs", headers={"Authorization": f"Bearer {tok}"}
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 401


def test_the_agent_refuses_to_start_without_a_credential_or_a_join_token(
    creds: Cluster, tmp_path: Path
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--masters", creds.addrs,
         "--data-dir", str(tmp_path / "fresh"), "--simulate-gpus", "1"],
        capture_output=True, text=True, timeout=60, cwd=str(Path(__file__).parent.parent),
    )  # fmt: skip
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--join-token-file" in lines[0], out.stderr
