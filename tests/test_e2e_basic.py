"""The main path on real processes: 3 masters, 2 agents with simulated GPUs."""

from __future__ import annotations

from tests.harness import Cluster, wait_for


def test_submit_runs_with_exactly_the_requested_gpus(cluster: Cluster) -> None:
    cluster.start_agent("h1", gpus="4")
    cluster.start_agent("h2", gpus="4")
    cluster.wait_nodes_ready(2)
    job = cluster.submit(
        "--gpus", "2", "--", "sh", "-c", 'echo "gpus=$CUDA_VISIBLE_DEVICES"; exit 7'
    )
    st = cluster.wait_job(job, {"failed"})
    task = st["tasks"][0]
    assert task["exit_code"] == 7
    assert len(task["gpus"]) == 2
    out = cluster.ctl("logs", job).stdout
    assert out.strip() == "gpus=" + ",".join(map(str, task["gpus"]))
    ok = cluster.submit("--gpus", "1", "--", "true")
    assert cluster.wait_job(ok, {"succeeded"})["tasks"][0]["exit_code"] == 0


def test_submit_through_a_follower_follows_the_leader(cluster: Cluster) -> None:
    leader = cluster.wait_leader()
    follower = next(m for m in cluster.masters if m is not leader)
    job = cluster.submit("--", "true", addr=follower.rpc_addr)
    assert job.startswith("j-")
    # Every master has the job once it is replicated.
    for m in cluster.masters:
        wait_for(
            lambda m=m: any(j["id"] == job for j in cluster.ctl_json("jobs", addr=m.rpc_addr)),
            20,
            f"job on {m.rpc_addr}",
        )


def test_bad_job_spec_is_one_line_and_changes_nothing(cluster: Cluster) -> None:
    before = cluster.ctl_json("jobs", "--all")
    for args in (
        ["--gpus", "-1"],
        ["--cpus", "0"],
        ["--mem", "lots"],
        ["--nodes", "0"],
        ["--gpus", "100000"],
    ):
        out = cluster.ctl("submit", *args, "--", "true", check=False)
        assert out.returncode == 2, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr
    assert cluster.ctl_json("jobs", "--all") == before


def test_http_api_needs_a_token_but_health_and_metrics_do_not(cluster: Cluster) -> None:
    import json
    import urllib.error
    import urllib.request

    leader = cluster.wait_leader()
    base = f"http://127.0.0.1:{leader.http}"
    cluster.submit("--name", "secret-job", "--env", "API_KEY=hunter2", "--", "true")
    try:
        urllib.request.urlopen(base + "/api/jobs", timeout=10)
        raise AssertionError("/api/jobs answered without a token")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401
        assert b"hunter2" not in exc.read()
    req = urllib.request.Request(
        base + "/api/jobs", headers={"Authorization": f"Bearer {cluster.admin_token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert any(j["name"] == "secret-job" for j in json.load(resp))
    with urllib.request.urlopen(base + "/healthz", timeout=10) as resp:
        assert json.load(resp)["role"] == "leader"
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        assert b"lepton_jobs" in resp.read()
