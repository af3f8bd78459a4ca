"""GPU hosts end to end: 3 real masters, 2 agents with simulated GPUs, driven
through leptonctl. One cluster serves the whole module (starting one costs
seconds); each test leaves it idle for the next.

Also home of the helpers the other tests_hosts_* modules share: the
GPU-exclusivity check and the cleanup of task processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from leptond.wire.client import ClusterClient, parse_addrs
from leptond.wire.errors import RpcError
from leptond.wire.tokens import parse_token
from tests.harness import Cluster, env, wait_for

LIVE = ("assigned", "running")


# -- shared helpers -------------------------------------------------------------------
def rpc(c: Cluster, method: str, args: dict[str, Any] | None = None) -> Any:
    """One call with the admin token, in-process (cheaper than a leptonctl run)."""

    async def go() -> Any:
        tok = parse_token(c.admin_token)
        client = ClusterClient(parse_addrs(c.addrs), key_id=tok.id, psk=tok.psk)
        try:
            return await client.call(method, args or {}, timeout_s=30)
        finally:
            await client.close()

    return asyncio.run(go())


def assert_no_gpu_shared(c: Cluster) -> int:
    """DESIGN §7: no (node, GPU) is held by two live tasks. Reads every job's
    status; returns how many GPUs live tasks hold."""

    async def go() -> list[dict[str, Any]]:
        tok = parse_token(c.admin_token)
        client = ClusterClient(parse_addrs(c.addrs), key_id=tok.id, psk=tok.psk)
        try:
            jobs = await client.call("jobs", {"all": True}, timeout_s=30)
            return [await client.call("status", {"job_id": j["id"]}, timeout_s=30) for j in jobs]
        finally:
            await client.close()

    holders: dict[tuple[str, int], str] = {}
    for st in asyncio.run(go()):
        for t in st["tasks"]:
            if t["state"] not in LIVE:
                continue
            assert t["node_id"], f"live task {t['id']} without a node"
            for g in t["gpus"]:
                key = (t["node_id"], g)
                assert key not in holders, f"GPU {key} held by {holders[key]} and {t['id']}"
                holders[key] = t["id"]
    return len(holders)


def kill_task_leftovers(c: Cluster) -> None:
    """Task processes whose shim was orphaned (agent killed and never back) may
    have children that left the shim's group; they still run in a task dir."""
    root = str(c.root.resolve())
    for p in psutil.process_iter(["pid", "cwd"]):
        with contextlib.suppress(psutil.Error, OSError):
            if (p.info.get("cwd") or "").startswith(root) and p.pid != os.getpid():
                p.kill()


def node_by_name(c: Cluster, name: str) -> dict[str, Any] | None:
    return next((n for n in c.nodes() if n["name"] == name), None)


def task0(c: Cluster, job: str) -> dict[str, Any]:
    return dict(c.status(job)["tasks"][0])


def wait_task(c: Cluster, job: str, states: set[str], timeout_s: float = 60) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        t = task0(c, job)
        return t if t["state"] in states else None

    t = wait_for(reached, timeout_s, f"task 0 of {job} to reach {states}")
    assert t is not None
    return t


@contextlib.contextmanager
def module_cluster(
    tmp: Path,
    request: pytest.FixtureRequest,
    ttl_s: float = 3.0,
    master_args: list[str] | None = None,
) -> Iterator[Cluster]:
    c = Cluster(tmp / "cluster", n_masters=3, ttl_s=ttl_s, master_args=master_args or [])
    failed_before = request.session.testsfailed
    try:
        c.start_masters()
        yield c
    finally:
        if request.session.testsfailed > failed_before:
            print(c.logs())
        c.close()
        kill_task_leftovers(c)


# -- this module's cluster ---------------------------------------------------------------
@pytest.fixture(scope="module")
def hosts(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    with module_cluster(tmp_path_factory.mktemp("hosts-e2e"), request) as c:
        # A small log cap so the flood test shows the cap without writing much.
        for name in ("h1", "h2"):
            c.start_agent(name, gpus="4", extra=["--log-cap", str(1 << 20)])
        c.wait_nodes_ready(2, timeout_s=60)
        yield c


ENV_CHECK = r"""
import os, sys
e = os.environ
keys = ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LEPTON_JOB_ID",
        "LEPTON_TASK_RANK", "LEPTON_NNODES", "LEPTON_NODE_RANK", "CUDA_VISIBLE_DEVICES"]
print(" ".join(f"{k}={e.get(k, '<unset>')}" for k in keys))
ok = (
    all(k in e for k in keys)
    and e["WORLD_SIZE"] == "2" and e["LEPTON_NNODES"] == "2"
    and e["RANK"] in ("0", "1")
    and e["RANK"] == e["NODE_RANK"] == e["LEPTON_NODE_RANK"] == e["LEPTON_TASK_RANK"]
    and e["MASTER_PORT"].isdigit() and 0 < int(e["MASTER_PORT"]) < 65536
    and e["MASTER_ADDR"] != ""
    and len(e["CUDA_VISIBLE_DEVICES"].split(",")) == 1
)
sys.exit(0 if ok else 3)
"""


def test_gang_tasks_get_rank_and_rendezvous_env(hosts: Cluster) -> None:
    job = hosts.submit("--nodes", "2", "--gpus", "1", "--", sys.executable, "-c", ENV_CHECK)
    st = hosts.wait_job(job, {"succeeded", "failed"})
    assert st["state"] == "succeeded", st
    assert len({t["node_id"] for t in st["tasks"]}) == 2, "gang ranks share a node"
    seen = []
    for rank in (0, 1):
        line = hosts.ctl("logs", job, "--rank", str(rank)).stdout.strip()
        kv = dict(item.split("=", 1) for item in line.split())
        assert kv["RANK"] == str(rank)
        assert kv["LEPTON_JOB_ID"] == job
        seen.append((kv["MASTER_ADDR"], kv["MASTER_PORT"]))
    assert seen[0] == seen[1], "ranks disagree on the rendezvous address"
    assert_no_gpu_shared(hosts)


GLOO = r"""
import datetime, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank {dist.get_rank()} of {dist.get_world_size()}: sum {t.item():g}")
dist.destroy_process_group()
raise SystemExit(0 if t.item() == 3.0 else 4)
"""


def test_gang_gloo_all_reduce(hosts: Cluster) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", "import torch.distributed"], capture_output=True, env=env()
    )
    if probe.returncode != 0:
        pytest.skip("torch is not installed")
    job = hosts.submit(
        "--nodes", "2", "--gpus", "1", "--env", "GLOO_SOCKET_IFNAME=lo",
        "--", sys.executable, "-c", GLOO,
    )  # fmt: skip
    st = hosts.wait_job(job, {"succeeded", "failed"}, timeout_s=180)
    logs = [hosts.ctl("logs", job, "--rank", str(r)).stdout for r in (0, 1)]
    assert st["state"] == "succeeded", (st, logs)
    assert "rank 0 of 2: sum 3" in logs[0]
    assert "rank 1 of 2: sum 3" in logs[1]


def test_nodes_and_the_overview_are_bounded_in_bytes_and_nodes_pages_through_all(
    hosts: Cluster,
) -> None:
    # One node's summary is over 1 KiB: the smallest page holds one.
    whole = rpc(hosts, "nodes")
    assert len(whole) == 2
    page = rpc(hosts, "nodes", {"paged": True, "page_bytes": 1024})
    seen = list(page["nodes"])
    while page["next"]:
        page = rpc(hosts, "nodes", {"paged": True, "page_bytes": 1024, "after": page["next"]})
        assert len(page["nodes"]) == 1
        seen += page["nodes"]
    assert [n["id"] for n in seen] == [n["id"] for n in whole]
    # Without pages: the first that fit.
    assert [n["id"] for n in rpc(hosts, "nodes", {"page_bytes": 1024})] == [whole[0]["id"]]
    for bad in ("nonsense", "x|y"):
        with pytest.raises(RpcError, match="after must be a cursor from a previous page"):
            rpc(hosts, "nodes", {"paged": True, "after": bad})
    # The overview lists what fits and counts all.
    ov = rpc(hosts, "overview", {"node_bytes": 1024})
    assert [n["id"] for n in ov["nodes"]] == [whole[0]["id"]]
    assert ov["node_counts"] == {"ready": 2}
    assert len(rpc(hosts, "overview")["nodes"]) == 2


def test_nodes_json_healthz_and_metrics(hosts: Cluster) -> None:
    nodes = hosts.ctl_json("nodes")
    assert {n["name"] for n in nodes} >= {"h1", "h2"}
    for n in nodes:
        for key in ("id", "name", "state", "gpus_total", "gpus_free"):
            assert key in n, (key, n)
        assert n["gpus_total"] == 4
        assert 0 <= n["gpus_free"] <= 4

    # Per-GPU stats from the simulated probe arrive with the heartbeats.
    def with_stats() -> list[dict[str, Any]]:
        ns = hosts.ctl_json("nodes")
        return list(ns) if all(len(n["gpus"]) == 4 for n in ns) else []

    nodes = wait_for(with_stats, 20, "GPU stats from every node")
    for n in nodes:
        for g in n["gpus"]:
            assert g["name"].startswith("Simulated")
            assert g["mem_total_bytes"] > 0
            assert 0 <= g["util_pct"] <= 100
            assert "temperature_c" in g and "power_w" in g
        assert n["host"].get("cpu_count", 0) >= 1
    leader = hosts.wait_leader()
    for m in hosts.masters:
        with urllib.request.urlopen(f"http://127.0.0.1:{m.http}/healthz", timeout=10) as r:
            body = json.loads(r.read())
            assert r.status == 200
        assert body["role"] == ("leader" if m is leader else "follower")
    with urllib.request.urlopen(f"http://127.0.0.1:{leader.http}/metrics", timeout=10) as r:
        text = r.read().decode()
    for name in (
        "lepton_nodes",
        "lepton_gpus",
        "lepton_gpus_allocated",
        "lepton_jobs",
        "lepton_gpu_utilization_ratio",
        "lepton_submit_to_start_seconds_bucket",
        "lepton_raft_term",
    ):
        assert re.search(rf"^{name}[{{ ]", text, re.M), f"{name} missing from /metrics"
    assert re.search(r"^lepton_gpus 8(\.0)?$", text, re.M), "8 GPUs in total"
    assert re.search(r'^lepton_nodes\{state="ready"\} 2(\.0)?$', text, re.M)


def test_missing_command_fails_with_127_and_says_why(hosts: Cluster) -> None:
    job = hosts.submit("--gpus", "1", "--", "no-such-command-xyz", "--flag")
    st = hosts.wait_job(job, {"failed"})
    assert st["tasks"][0]["exit_code"] == 127
    assert "no-such-command-xyz" in hosts.ctl("logs", job).stdout


def _dir_bytes(p: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def test_output_flood_is_capped_and_agent_carries_on(hosts: Cluster) -> None:
    job = hosts.submit("--gpus", "1", "--", "sh", "-c", "yes flood | head -c 200000000; echo END")
    st = hosts.wait_job(job, {"succeeded", "failed"}, timeout_s=120)
    assert st["state"] == "succeeded", st
    node = st["tasks"][0]["node"]
    # The agents run with --log-cap 1 MiB: the newest output is kept, the rest dropped.
    assert _dir_bytes(hosts.root / f"agent-{node}") < 8 << 20
    tail = hosts.ctl("logs", job).stdout
    assert tail.rstrip().endswith("END")
    assert len(tail) <= 1 << 20
    assert "dropped by the log cap" in hosts.status(job)["tasks"][0]["message"]
    # The agent is unharmed: still heartbeating and running work.
    agent = next(a for a in hosts.agents if a.name == node)
    assert agent.alive()
    # Four GPUs: only an idle node fits, and the other node may be the one chosen,
    # so run two such jobs at once to need both nodes.
    nxt = [hosts.submit("--gpus", "4", "--", "sh", "-c", "sleep 1") for _ in range(2)]
    sts = [hosts.wait_job(j, {"succeeded", "failed"}) for j in nxt]
    assert all(s["state"] == "succeeded" for s in sts), sts
    n = node_by_name(hosts, node)
    assert n is not None and n["state"] == "ready"
    assert n["last_heartbeat_s"] is not None and n["last_heartbeat_s"] < 5


def test_cancel_of_a_finished_job_is_one_line(hosts: Cluster) -> None:
    job = hosts.submit("--", "true")
    hosts.wait_job(job, {"succeeded"})
    out = hosts.ctl("cancel", job, check=False)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "already succeeded" in out.stderr
    assert "Traceback" not in out.stderr


def test_more_gpus_than_any_node_stays_pending_with_a_reason(hosts: Cluster) -> None:
    # --queue-anyway: without it, it is refused at submit (test_cli_e2e).
    job = hosts.submit("--gpus", "5", "--queue-anyway", "--", "true")

    def with_reason() -> dict[str, Any]:
        s = hosts.status(job)
        return s if s.get("reason") else {}

    st = wait_for(with_reason, 30, "a pending reason")
    assert st["state"] == "pending"
    text = hosts.ctl("status", job).stdout
    assert "pending" in text and st["reason"] in text
    # The scheduler keeps the job pending quietly: no loop of errors in the logs.
    leader = hosts.wait_leader()
    before = leader.proc.log.read_text(errors="replace").count("\n")
    hosts.ctl("jobs")  # some time passes with the job pending (several loop turns)
    wait_for(lambda: hosts.status(job)["state"] == "pending", 10, "still pending")
    log_text = leader.proc.log.read_text(errors="replace")
    assert "Traceback" not in log_text
    assert "loop failed" not in log_text
    assert log_text.count("\n") - before < 5, log_text[-2000:]
    hosts.ctl("cancel", job)
    assert hosts.wait_job(job, {"cancelled"})["state"] == "cancelled"


def test_logs_follow_streams_until_the_job_ends(hosts: Cluster) -> None:
    job = hosts.submit(
        "--gpus", "1", "--", "sh", "-c", "for i in 1 2 3 4 5; do echo line $i; sleep 0.5; done"
    )
    e = env()
    e["LEPTON_ADDR"] = hosts.addrs
    e["LEPTON_TOKEN"] = hosts.admin_token
    e["LEPTON_CONFIG"] = str(hosts.root / "no-config.toml")
    p = subprocess.Popen(
        [sys.executable, "-m", "leptonctl.cli", "--timeout", "60", "logs", "-f", job],
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert out.splitlines() == [f"line {i}" for i in range(1, 6)]
    # It returned because the job ended, not because of a timeout.
    assert hosts.status(job)["state"] == "succeeded"


def test_submit_wait_exits_with_the_job_exit_code(hosts: Cluster) -> None:
    out = hosts.ctl("submit", "--wait", "--gpus", "1", "--", "sh", "-c", "exit 9", check=False)
    assert out.returncode == 9, out.stderr
    assert hosts.ctl("submit", "--wait", "--", "true", check=False).returncode == 0


def test_job_file_with_an_unknown_key_is_refused(hosts: Cluster, tmp_path: Path) -> None:
    f = tmp_path / "job.toml"
    f.write_text('command = "true"\ngpus = 1\ngpu_count = 2\n')
    before = rpc(hosts, "jobs", {"all": True})
    out = hosts.ctl("submit", "-f", str(f), check=False)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "gpu_count" in out.stderr
    assert rpc(hosts, "jobs", {"all": True}) == before


def test_gpus_stay_exclusive_under_a_burst(hosts: Cluster) -> None:
    jobs = [hosts.submit("--gpus", "3", "--", "sleep", "1") for _ in range(4)]
    held: list[int] = []

    def all_done() -> bool:
        held.append(assert_no_gpu_shared(hosts))
        return all(hosts.status(j)["state"] == "succeeded" for j in jobs)

    wait_for(all_done, 120, "the burst to finish")
    # Four 3-GPU jobs on two 4-GPU nodes: at most two run at once.
    assert max(held) <= 6
