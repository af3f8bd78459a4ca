"""Client retries are idempotent: a write whose reply is lost after it
committed, retried with the same request id, is applied once and answered as
the first attempt would have been, on the same leader or after a leader change.

The masters run with the test-only fault hook `LEPTOND_TEST_FAULTS=drop-reply`
(leptond/faults.py): a call whose request id starts with `drop-` is carried
out, then its connection is cut instead of answered, once per master, and the
reply it did not send is logged for comparison.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from leptond.wire.client import ClusterClient, parse_addrs
from leptond.wire.errors import RpcError
from leptond.wire.tokens import parse_token
from tests.cp_support import call_one
from tests.harness import Cluster, Master, wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path_factory.mktemp("cp-retries") / "cluster",
        n_masters=3,
        master_env={"LEPTOND_TEST_FAULTS": "drop-reply"},
    )
    try:
        c.start_masters(timeout_s=60)
        c.start_agent("h1", gpus="1")
        c.wait_nodes_ready(1, timeout_s=60)
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def dropped(c: Cluster, rid: str, masters: list[Master] | None = None) -> Any:
    """The reply a master logged instead of sending, for the call with this rid."""
    pat = re.compile(r"test fault: dropped the reply to \S+ \(rid " + re.escape(rid) + r"\): (.*)$")
    for m in masters or c.masters:
        for line in m.proc.log.read_text(errors="replace").splitlines():
            hit = pat.search(line)
            if hit:
                return json.loads(hit.group(1))
    raise AssertionError(f"no master dropped the reply to {rid}")


def call(c: Cluster, method: str, args: dict[str, Any], token: str | None = None) -> Any:
    """One logical call through the client library, which retries on a lost reply."""
    tok = parse_token(token or c.admin_token)

    async def go() -> Any:
        cl = ClusterClient(parse_addrs(c.addrs), key_id=tok.id, psk=tok.psk)
        try:
            return await cl.call(method, args, timeout_s=30)
        finally:
            await cl.close()

    return asyncio.run(go())


def test_a_write_whose_reply_was_lost_is_applied_once_and_answered_the_same(
    cluster: Cluster,
) -> None:
    c = cluster
    spec = {"argv": ["sleep", "300"]}
    sub = call(c, "submit", {"spec": spec, "rid": "drop-submit-0001"})
    assert sub == dropped(c, "drop-submit-0001")
    job = sub["id"]
    assert [j["id"] for j in c.rpc("jobs", {"all": True})].count(job) == 1

    # A cancel applied twice would answer "already cancelled" the second time.
    res = call(c, "cancel", {"job_id": job, "rid": "drop-cancel-0001"})
    assert res == dropped(c, "drop-cancel-0001") == {"id": job, "state": "cancelled"}

    # A token made twice would leave one that nobody holds.
    before = {t["id"] for t in c.rpc("token_ls")}
    tok = call(c, "token_create", {"role": "read", "name": "retried", "rid": "drop-token-0001"})
    assert tok == dropped(c, "drop-token-0001")
    made = [t for t in c.rpc("token_ls") if t["id"] not in before]
    assert [(t["id"], t["name"]) for t in made] == [(tok["id"], "retried")]
    assert call(c, "whoami", {}, token=tok["token"]) == {"user": "retried", "role": "read"}

    drain = call(c, "node_drain", {"node": "h1", "reason": "retry", "rid": "drop-drain-0001"})
    assert drain == dropped(c, "drop-drain-0001")
    assert drain["state"] == "draining"
    call(c, "node_undrain", {"node": "h1"})


def test_a_retry_after_a_leader_change_is_answered_the_same(cluster: Cluster) -> None:
    c = cluster
    job = call(c, "submit", {"spec": {"argv": ["sleep", "300"]}, "rid": "leader-change-job"})["id"]
    old = c.wait_leader()
    rid = "drop-cancel-after-failover"
    # The first attempt commits on the old leader, whose reply never comes...
    with pytest.raises(RpcError):
        asyncio.run(call_one(old.rpc_addr, c.admin_token, "cancel", {"job_id": job, "rid": rid}))
    first = dropped(c, rid, [old])
    assert first == {"id": job, "state": "cancelled"}
    # ...and the old leader dies before the client tries again.
    old.proc.kill9()
    try:
        c.wait_leader(timeout_s=60, not_=old)
        assert call(c, "cancel", {"job_id": job, "rid": rid}) == first
        # A cancel that is not a retry still says what it finds.
        with pytest.raises(RpcError, match="already cancelled"):
            call(c, "cancel", {"job_id": job})
    finally:
        old.proc.start()
    wait_for(
        lambda: all(m["connected"] for m in c.rpc("cluster_status")["members"]),
        60,
        "the old leader back as a member",
    )
