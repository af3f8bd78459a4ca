"""Membership changes are checked before they are proposed (real masters).

`cluster add-master` used to accept any address: 127.0.0.1:1, 999.1.1.1:7442
and an RPC port all became members, three of six were then unreachable, and
without a quorum not even remove-master could undo it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from raft.node import RaftNode
from tests.cp_support import local_job_ids, module_cluster
from tests.harness import Cluster, free_ports, listening_on, wait_for
from tests.raft_kv_proc import KVStateMachine

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from module_cluster(tmp_path_factory, "cp-membership")


def refused(c: Cluster, *args: str) -> str:
    out: subprocess.CompletedProcess[str] = c.ctl(*args, check=False)
    assert out.returncode != 0, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def members(c: Cluster) -> dict[str, bool]:
    lead = c.wait_leader(60)
    st = c.ctl_json("cluster", "status", addr=lead.rpc_addr)
    out = {m["addr"]: bool(m["connected"]) for m in st["members"]}
    out[st["self"]] = True
    return out


def all_connected(c: Cluster) -> dict[str, bool] | None:
    m = members(c)
    return m if all(m.values()) else None


def test_addresses_that_are_not_running_masters_of_this_cluster_are_refused(
    cluster: Cluster, tmp_path: Path
) -> None:
    lead = cluster.wait_leader(60)
    # Compared at the end: start from every member connected, not from a
    # moment when the leader was still dialing one of them.
    before = wait_for(lambda: all_connected(cluster), 30, "every member connected")
    (stranger_port,) = free_ports(1)
    stranger = f"127.0.0.1:{stranger_port}"
    # A Raft node with another secret: a real pysyncobj port, the wrong cluster.
    other = RaftNode(KVStateMachine(), stranger, [stranger], tmp_path / "other", b"other-secret")
    try:
        cases = {
            "127.0.0.1:1": "nothing answers at 127.0.0.1:1 (connection refused)",
            "999.1.1.1:7442": "'999.1.1.1' is not a valid IP address",
            "127.0.0.1:http": "expected HOST:RAFTPORT, got '127.0.0.1:http'",
            lead.rpc_addr: f"{lead.rpc_addr} does not answer this cluster's Raft handshake",
            stranger: f"{stranger} does not answer this cluster's Raft handshake",
            cluster.masters[1].raft_addr: f"{cluster.masters[1].raft_addr} is already a member",
        }
        for addr, why in cases.items():
            line = refused(cluster, "cluster", "add-master", addr)
            assert why in line, (addr, line)
    finally:
        other.close()
    assert members(cluster) == before
    line = refused(cluster, "cluster", "remove-master", "127.0.0.1:1")
    assert "127.0.0.1:1 is not a member" in line, line
    job = cluster.submit("--", "true")
    for m in cluster.masters:
        wait_for(
            lambda m=m: job in local_job_ids(m.rpc_addr, cluster.admin_token),
            30,
            f"the job on master-{m.index}",
        )


def test_no_change_may_leave_fewer_reachable_masters_than_a_quorum(cluster: Cluster) -> None:
    lead = cluster.wait_leader(60)
    down, up = [m for m in cluster.masters if m is not lead]
    down.proc.stop()
    try:
        # cluster status tells the truth: one member unreachable, quorum kept.
        wait_for(lambda: members(cluster)[down.raft_addr] is False, 30, "the member unreachable")
        line = refused(cluster, "cluster", "remove-master", up.raft_addr)
        assert f"removing {up.raft_addr} would leave 1 of 2 masters reachable, no quorum" in line
        assert set(members(cluster)) == {m.raft_addr for m in cluster.masters}
    finally:
        down.proc.start()
    wait_for(lambda: all(members(cluster).values()), 60, "every member connected again")


def test_each_master_listens_only_on_the_address_it_was_given(cluster: Cluster) -> None:
    # pysyncobj listens on every interface unless told otherwise; masters
    # bound to 127.0.0.1 must not expose their Raft ports (where pysyncobj's
    # code reads what strangers send) on any other address.
    for m in cluster.masters:
        for port in (m.raft, m.rpc, m.http):
            assert listening_on(port) == {"127.0.0.1"}, (m.index, port, listening_on(port))
