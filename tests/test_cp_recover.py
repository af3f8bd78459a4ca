"""`leptond recover` on real masters: two of three lost for good, the survivor
serves writes again with every acknowledged job, and the cluster grows back.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.cp_support import Submitters, local_job_ids, module_cluster
from tests.harness import ROOT, Cluster, env, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # Frequent snapshots: recovery rewrites the snapshot's membership too.
    yield from module_cluster(tmp_path_factory, "cp-recover", ["--snapshot-every", "10"])


def leptond(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "leptond.cli", *args],
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_two_of_three_lost_for_good_recover_the_survivor(cluster: Cluster) -> None:
    with Submitters(cluster.addrs, cluster.admin_token, "admin", n=2, tag="rec") as load:
        load.wait_more(30)
        load.stop()
    acked = load.check_ids()
    lead = cluster.wait_leader(60)
    survivor = next(m for m in cluster.masters if m is not lead)
    wait_for(
        lambda: acked <= set(local_job_ids(survivor.rpc_addr, cluster.admin_token)),
        60,
        "the survivor to hold every acknowledged job",
    )
    lost = [m for m in cluster.masters if m is not survivor]
    for m in lost:
        m.proc.kill9()
        cluster.masters.remove(m)

    # cluster status tells the truth: no quorum, both others unreachable.
    def no_quorum() -> bool:
        st = cluster.rpc("cluster_status", addr=survivor.rpc_addr, timeout_s=5)
        return not st["has_quorum"] and not any(m["connected"] for m in st["members"])

    wait_for(no_quorum, 30, "the survivor to report no quorum")
    out = cluster.ctl("--timeout", "3", "submit", "--", "true", addr=survivor.rpc_addr, check=False)
    assert out.returncode != 0 and "no quorum, 1 of 3 masters reachable" in out.stderr, out.stderr

    data_dir = str(cluster.root / f"master-{survivor.index}")
    assert (cluster.root / f"master-{survivor.index}" / "raft" / "raft.snapshot").exists()
    members = survivor.raft_addr
    busy = leptond("recover", "--data-dir", data_dir, "--members", members)
    assert busy.returncode == 1, busy.stdout
    assert busy.stderr.strip() == (
        f"leptond recover: {data_dir}/raft is in use by a running master; stop it first"
    )
    survivor.proc.stop()
    bad = leptond("recover", "--data-dir", data_dir, "--members", "999.1.1.1:7442")
    assert bad.returncode == 1 and "not a valid IP address" in bad.stderr, bad.stderr
    ok = leptond("recover", "--data-dir", data_dir, "--members", members)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"recovered {data_dir}/raft: members {members};"), ok.stdout

    # Same command line as before, --peers still naming the lost masters.
    survivor.proc.start()
    assert cluster.wait_leader(60) is survivor
    st = cluster.rpc("cluster_status", addr=survivor.rpc_addr)
    assert st["has_quorum"] and st["members"] == []
    again = cluster.submit("--", "true")
    held = set(local_job_ids(survivor.rpc_addr, cluster.admin_token))
    assert acked | {again} <= held

    # Grow back: a fresh master joins the recovered one.
    fresh = cluster.add_master_proc()
    cluster.ctl("cluster", "add-master", fresh.raft_addr)
    wait_for(
        lambda: acked | {again} <= set(local_job_ids(fresh.rpc_addr, cluster.admin_token)),
        90,
        "the new master to catch up",
    )
    more = cluster.submit("--", "true")
    wait_for(
        lambda: more in local_job_ids(fresh.rpc_addr, cluster.admin_token),
        30,
        "a new write on both masters",
    )
