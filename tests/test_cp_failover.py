"""Raft control plane under faults: real `leptond run` masters on loopback.

Four clients submit continuously, each retrying the SAME request id after an
error until it is acknowledged. Whatever happens to the masters (kill -9 of the
leader, of all of them, SIGSTOP), afterwards every master holds every
acknowledged job exactly once and nothing else.

The scenarios share one 3-master cluster and run in file order.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.cp_support import (
    Submitters,
    local_job_ids,
    module_cluster,
    rpc,
    snapshot_files,
    wait_replicas_hold,
    write_until_snapshotted,
)
from tests.harness import Cluster, Master, wait_for

pytestmark = pytest.mark.timeout(300)


def metric(m: Master, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{m.http}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # Frequent snapshots, so restarts here load a snapshot and a short journal
    # (the path a long-running cluster takes), not only a journal from entry 1.
    yield from module_cluster(tmp_path_factory, "cp-failover", ["--snapshot-every", "300"])


@pytest.fixture(scope="module")
def acked() -> set[str]:
    """Job ids acknowledged so far in this module; each test adds its own."""
    return set()


def _answers(c: Cluster, m: Master) -> bool:
    st = rpc(m.rpc_addr, c.admin_token, "cluster_status", timeout_s=2.0)
    return bool(st.get("leader"))


def _term(c: Cluster) -> int:
    return int(rpc(c.wait_leader(60).rpc_addr, c.admin_token, "cluster_status")["term"])


def _wait_new_term(c: Cluster, term: int) -> Master:
    def elected() -> Master | None:
        m = c.leader()
        if m is None:
            return None
        return m if int(rpc(m.rpc_addr, c.admin_token, "cluster_status")["term"]) > term else None

    return wait_for(elected, 60, f"a leader elected after term {term}")


def test_ten_leader_kills_lose_and_duplicate_nothing(cluster: Cluster, acked: set[str]) -> None:
    # Every master compacts its log first, so the restarts below load a
    # snapshot and a short journal, however few entries the kills write.
    acked |= write_until_snapshotted(cluster, "admin")
    # The leader compacted its own log (a follower may instead have installed
    # the leader's snapshot, which it does not count as written): written in
    # the background, and counted once durable (raft/snapwriter.py).
    lead = cluster.wait_leader(60)
    wait_for(lambda: metric(lead, "lepton_raft_snapshots_total") >= 1, 60, "the count")
    assert metric(lead, "lepton_raft_snapshot_seconds") > 0
    term0 = _term(cluster)
    with Submitters(cluster.addrs, cluster.admin_token, "admin", n=4, tag="kill") as load:
        load.wait_more(20)
        for _ in range(10):
            old = cluster.wait_leader(60)
            term = int(rpc(old.rpc_addr, cluster.admin_token, "cluster_status")["term"])
            old.proc.kill9()
            old.proc.start()  # restart at once so the next kill leaves a quorum
            # Any master may win the next election, the restarted one too
            # (its log can be the most up to date); what counts is that one did.
            _wait_new_term(cluster, term)
            load.wait_more(10)  # a new leader acknowledges writes
            wait_for(lambda old=old: _answers(cluster, old), 60, f"master-{old.index} back")
        load.stop()
    ids = load.check_ids()
    assert _term(cluster) >= term0 + 10, "fewer elections than leader kills"
    acked |= ids
    wait_replicas_hold(cluster, acked)
    for m in cluster.masters:
        # Restarts went through a snapshot, and none left a master counting
        # itself among its peers (which would make a quorum of 3 unreachable).
        assert snapshot_files(cluster)[m.index].exists()
        st = rpc(m.rpc_addr, cluster.admin_token, "cluster_status")
        peers = sorted(p["addr"] for p in st["members"])
        assert peers == sorted(o.raft_addr for o in cluster.masters if o is not m), peers


def test_kill_all_masters_under_load_keeps_every_acknowledged_job(
    cluster: Cluster, acked: set[str]
) -> None:
    with Submitters(cluster.addrs, cluster.admin_token, "admin", n=4, tag="all") as load:
        load.wait_more(20)
        for m in cluster.masters:
            m.proc.kill9()
        for m in cluster.masters:
            m.proc.start()
        cluster.wait_leader(60)
        load.wait_more(20)
        load.stop()
    acked |= load.check_ids()
    wait_replicas_hold(cluster, acked)


def test_stopped_leader_steps_down_and_a_new_one_serves(cluster: Cluster, acked: set[str]) -> None:
    with Submitters(cluster.addrs, cluster.admin_token, "admin", n=4, tag="stop") as load:
        load.wait_more(20)
        old = cluster.wait_leader(60)
        old.proc.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            others = ",".join(m.rpc_addr for m in cluster.masters if m is not old)
            # Served while the old leader is frozen: a one-shot leptonctl submit.
            job = cluster.submit("--", "true", addr=others, timeout_s=60)
            assert job.startswith("j-")
            assert old.proc.alive()
            load.wait_more(10)
            new = cluster.wait_leader(60, not_=old)
            wait_for(lambda: time.monotonic() - stopped_at >= 5, 10, "5 s of SIGSTOP")
        finally:
            old.proc.signal(signal.SIGCONT)
        wait_for(
            lambda: (
                (st := rpc(old.rpc_addr, cluster.admin_token, "cluster_status"))["is_leader"]
                is False
                and st["leader"] == new.raft_addr
            ),
            30,
            "the resumed old leader to follow the new one",
        )
        load.wait_more(10)
        load.stop()
    acked |= load.check_ids() | {job}
    wait_replicas_hold(cluster, acked)


def test_two_of_three_stopped_fails_fast_with_one_line(cluster: Cluster, acked: set[str]) -> None:
    lead = cluster.wait_leader(60)
    frozen = [m for m in cluster.masters if m is not lead]
    for m in frozen:
        m.proc.signal(signal.SIGSTOP)
    try:
        # It gives up by itself (--timeout 10); the harness's own deadline
        # (60 s) only catches a client that hangs.
        out = cluster.ctl(
            "--timeout", "10", "submit", "--", "true", addr=lead.rpc_addr, check=False
        )
        assert out.returncode != 0, out.stdout
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert "quorum" in lines[0] or "no leader" in lines[0], lines[0]
    finally:
        for m in frozen:
            m.proc.signal(signal.SIGCONT)
    cluster.wait_leader(60)
    job = cluster.submit("--", "true", timeout_s=60)
    for m in cluster.masters:
        wait_for(
            lambda m=m: job in local_job_ids(m.rpc_addr, cluster.admin_token),
            30,
            f"the next job on master-{m.index}",
        )
