"""/metrics on real masters and agents, as Prometheus sees them.

One cluster for the module: 3 masters and 3 agents (h3 is killed by the last
tests). Checks: `promtool check metrics` is clean on every endpoint; the
cluster's series come from the leader only, so sums are right; a down node
keeps no utilisation and counts as no capacity; counters and the
submit-to-start histogram go on across a change of leader; agents serve
per-GPU and per-task series; and a real Prometheus (the Debian package)
scraping the cluster sums GPUs right and evaluates every query of
deploy/grafana/leptond.json and deploy/prometheus/alerts.yml.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leptond.wire.errors import RpcError
from leptond.wire.tokens import Token, parse_token
from tests.harness import ROOT, Cluster, Master, Proc, free_ports, wait_for
from tests.test_hosts_e2e import module_cluster

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
DASHBOARD = ROOT / "deploy" / "grafana" / "leptond.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
# Words of PromQL that look like metric names.
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "by", "without", "rate",
    "increase", "irate", "histogram_quantile", "absent", "or", "and", "unless", "on",
    "ignoring", "group_left", "group_right", "bool", "le", "offset", "vector", "delta",
}  # fmt: skip


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(r.read().decode())


def samples(text: str) -> dict[str, float]:
    """'name{labels}' -> value, for every sample of an exposition."""
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample of `name` whose labels include `labels`."""
    hits = []
    for key, v in samples(text).items():
        n, _, rest = key.partition("{")
        if n != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(have.get(k) == want for k, want in labels.items()):
            hits.append(v)
    assert len(hits) <= 1, (name, labels, hits)
    return hits[0] if hits else None


def names(text: str) -> set[str]:
    """Sample names, and the names of families declared without samples yet
    (Xid counters before the first Xid): `# TYPE name kind`."""
    out = {key.partition("{")[0] for key in samples(text)}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        out.add(name)
        if kind == "histogram":
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return out


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool is missing: apt-get install prometheus (.ci/run does)"
    return subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def obs(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    with module_cluster(tmp_path_factory.mktemp("metrics-e2e"), request) as c:
        for name in ("h1", "h2", "h3"):
            c.start_agent(name, gpus="2")
        c.wait_nodes_ready(3, timeout_s=60)
        yield c


def followers(c: Cluster, leader: Master) -> list[Master]:
    return [m for m in c.masters if m is not leader and m.proc.alive()]


def running_job(c: Cluster, *args: str) -> str:
    job = c.submit(*args, "--", "sleep", "600")
    c.wait_job(job, {"running"})
    return job


def test_promtool_finds_nothing_wrong_on_any_endpoint(obs: Cluster) -> None:
    done = obs.submit("--gpus", "1", "--", "true")
    obs.wait_job(done, {"succeeded"})
    job = running_job(obs, "--gpus", "1")
    leader = obs.wait_leader()
    try:
        endpoints = {f"master-{m.index}": m.http for m in obs.masters}
        endpoints.update({f"agent {n}": p for n, p in obs.agent_http_ports.items()})
        for what, port in endpoints.items():
            text = scrape(port)
            out = promtool_check(text)
            assert out.returncode == 0 and not out.stdout.strip(), (what, out.stdout, out.stderr)
            # Process and platform collectors are on everywhere.
            assert {"process_resident_memory_bytes", "python_info"} <= names(text), what
        text = scrape(leader.http)
        # The task that runs is a series on its host, with its job and user.
        host = obs.status(job)["tasks"][0]["node"]
        agent = scrape(obs.agent_http_ports[host])
        assert value(agent, "lepton_agent_task_memory_bytes", job=job, user="admin") is not None
        assert value(agent, "lepton_agent_task_cpu_seconds_total", job=job) is not None
        gpu = str(obs.status(job)["tasks"][0]["gpus"][0])
        assert value(agent, "lepton_agent_task_gpu_memory_bytes", job=job) == value(
            agent, "lepton_agent_gpu_memory_used_bytes", gpu=gpu
        )
        assert value(agent, "lepton_agent_gpu_healthy", gpu=gpu, model="Simulated A100") == 1
        assert value(agent, "lepton_agent_gpu_utilization_ratio", gpu=gpu) == 0.95
        assert value(text, "lepton_user_gpus", user="admin") == 1
    finally:
        obs.ctl("cancel", job)


def test_each_master_times_its_garbage_collections_and_freezes_its_state(obs: Cluster) -> None:
    for m in obs.masters:
        if not m.proc.alive():
            continue
        text = scrape(m.http)
        # The master has run for a while: young collections have run and
        # been timed, and (--gc-policy tuned, the default) what survived
        # them, start-up's objects and the state, is frozen.
        count = value(text, "lepton_gc_pause_seconds_count", generation="0")
        assert count is not None and count > 0, m.index
        assert value(text, "lepton_gc_pause_seconds_count", generation="2") is not None
        assert value(text, "lepton_gc_pause_max_seconds", generation="0") is not None
        frozen = value(text, "lepton_gc_frozen_objects")
        assert frozen is not None and frozen > 10_000, (m.index, frozen)
        assert value(text, "lepton_gc_unfreezes_total") is not None


def test_an_agent_counts_its_block_cache_hits_misses_and_bytes(
    obs: Cluster, tmp_path: Path
) -> None:
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "data.bin").write_bytes(b"leptond" * 40_000)
    port = obs.agent_http_ports["h1"]
    before = scrape(port)
    obs.rpc("node_label", {"node": "h1", "set": {"pin": "h1"}})
    try:
        for _ in range(2):
            job = obs.submit("--constraint", "pin=h1", "--workdir", str(wd), "--", "true")
            obs.wait_job(job, {"succeeded"})
    finally:
        obs.rpc("node_label", {"node": "h1", "unset": ["pin"]})
    after = scrape(port)

    def grew(name: str) -> float:
        return (value(after, name) or 0) - (value(before, name) or 0)

    # The first run fetched the file's blocks; the second found them all here.
    misses = grew("lepton_agent_block_cache_misses_total")
    assert misses >= 1
    assert grew("lepton_agent_block_cache_hits_total") >= misses
    assert grew("lepton_agent_block_cache_fetched_bytes_total") > 0
    assert (value(after, "lepton_agent_block_cache_bytes") or 0) > 0
    assert (value(after, "lepton_agent_block_cache_blocks") or 0) >= misses


def test_the_cluster_series_come_from_the_leader_only(obs: Cluster) -> None:
    leader = obs.wait_leader()
    lead = scrape(leader.http)
    assert value(lead, "lepton_raft_leader") == 1
    assert value(lead, "lepton_gpus") == 6
    assert value(lead, "lepton_node_state", node="h1", state="ready") == 1
    assert value(lead, "lepton_node_state", node="h1", state="down") == 0
    assert value(lead, "lepton_node_gpus", node="h2") == 2
    assert value(lead, "lepton_node_heartbeat_age_seconds", node="h3") is not None
    for m in followers(obs, leader):
        text = scrape(m.http)
        assert value(text, "lepton_raft_leader") == 0
        # Every master has its own Raft series; none but the leader the cluster's.
        assert value(text, "lepton_raft_term") == value(lead, "lepton_raft_term")
        assert names(text) >= {"lepton_raft_applied_index", "lepton_raft_elections_total"}
        assert not {n for n in names(text) if re.match(r"lepton_(node|gpus|jobs|user)", n)}
        # The leader knows how far behind each follower is.
        member = f"127.0.0.1:{m.raft}"
        wait_for(
            lambda member=member: (
                value(  # type: ignore[misc]
                    scrape(leader.http), "lepton_raft_follower_lag_entries", member=member
                )
                == 0
            ),
            30,
            f"follower {member} caught up",
        )


def test_rpc_and_auth_failures_are_counted(obs: Cluster) -> None:
    leader = obs.wait_leader()
    before = scrape(leader.http)
    fails = value(before, "lepton_auth_failures_total", via="rpc") or 0
    http_fails = value(before, "lepton_auth_failures_total", via="http") or 0
    nodes_calls = value(before, "lepton_rpc_requests_total", method="nodes") or 0
    # The admin token's id with a secret nobody issued: a wrong key.
    forged = Token(parse_token(obs.admin_token).id, b"\0" * 32)
    with pytest.raises(RpcError):
        obs.rpc("nodes", addr=leader.rpc_addr, token=forged, timeout_s=5)
    req = urllib.request.Request(
        f"http://127.0.0.1:{leader.http}/api/nodes", headers={"Authorization": "Bearer ltk_nope"}
    )
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(req, timeout=10)
    obs.rpc("nodes", addr=leader.rpc_addr)
    after = scrape(leader.http)
    assert (value(after, "lepton_auth_failures_total", via="rpc") or 0) > fails
    assert (value(after, "lepton_auth_failures_total", via="http") or 0) == http_fails + 1
    assert (value(after, "lepton_rpc_requests_total", method="nodes") or 0) > nodes_calls
    with pytest.raises(RpcError, match="no job"):
        obs.rpc("status", {"job_id": "j-nope"}, addr=leader.rpc_addr)
    text = scrape(leader.http)
    assert (value(text, "lepton_rpc_errors_total", method="status", code="not_found") or 0) >= 1


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels") or [])
            for t in p.get("targets") or []:
                exprs.append(t["expr"])

    walk(dash["panels"])
    return exprs


def alert_queries() -> list[str]:
    text = ALERTS.read_text()
    return [m.strip().strip('"') for m in re.findall(r"^\s+expr: (.+)$", text, re.M)]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (label values and names dropped)."""
    bare = re.sub(r'"[^"]*"', '""', expr)  # label values
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\[[^]]*\]", "", bare)  # ranges
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)  # grouping labels
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare))
    return {w for w in words if w not in PROMQL_WORDS and not w.isdigit()}


def test_every_query_of_the_dashboard_and_alerts_names_a_metric_that_exists(obs: Cluster) -> None:
    leader = obs.wait_leader()
    job = running_job(obs, "--gpus", "1")  # per-task series exist while one runs
    try:
        exported = names(scrape(leader.http))
        for m in followers(obs, leader):
            exported |= names(scrape(m.http))
        for port in obs.agent_http_ports.values():
            exported |= names(scrape(port))
    finally:
        obs.ctl("cancel", job)
    exported.add("up")  # Prometheus's own
    queries = dashboard_queries()
    assert len(queries) > 30
    for expr in queries + alert_queries():
        missing = metric_names(expr) - exported
        assert not missing, f"{expr!r} names {sorted(missing)}, which no endpoint exports"
    # The check itself catches a misspelt name.
    assert metric_names('sum(rate(lepton_tasks_endd_total{reason="oom"}[5m]))') - exported


def test_a_real_prometheus_sums_right_and_evaluates_every_query(
    obs: Cluster, tmp_path: Path
) -> None:
    obs.wait_leader()
    port = free_ports(1)[0]
    masters = [f"127.0.0.1:{m.http}" for m in obs.masters]
    agents = [f"127.0.0.1:{p}" for p in obs.agent_http_ports.values()]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {"job_name": "leptond", "static_configs": [{"targets": masters}]},
                    {"job_name": "lepton-agent", "static_configs": [{"targets": agents}]},
                ],
            }
        )
    )
    assert PROMETHEUS is not None, "prometheus is missing: apt-get install prometheus"
    prom = Proc(
        "prometheus",
        [
            PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        tmp_path / "prometheus.log",
    )  # fmt: skip
    obs.extra.append(prom)
    prom.start()
    try:

        def query(q: str) -> list[dict[str, Any]]:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
            assert body["status"] == "success", (q, body)
            return list(body["data"]["result"])

        def scalar(q: str) -> float | None:
            res = query(q)
            return float(res[0]["value"][1]) if res else None

        n_targets = len(masters) + len(agents)
        wait_for(lambda: scalar("sum(up)") == n_targets, 60, "Prometheus scraping every target")
        # The complaint: every master exported the totals, so sums tripled.
        wait_for(lambda: scalar("sum(lepton_gpus)") == 6, 30, "sum(lepton_gpus) == 6")
        assert scalar("count(lepton_raft_term)") == 3

        def leaders_nodes() -> float | None:
            # The leader as Prometheus saw it in its last scrapes: on a loaded
            # machine leadership may move while the test runs, and the
            # cluster-wide series move with it.
            leaders = query("lepton_raft_leader == 1")
            if len(leaders) != 1 or scalar("sum(lepton_raft_leader)") != 1:
                return None
            instance = leaders[0]["metric"]["instance"]
            return scalar(f'sum(lepton_nodes{{instance="{instance}"}})')

        wait_for(lambda: leaders_nodes() == 3, 30, "the leader's lepton_nodes summing to 3")
        for expr in dashboard_queries() + alert_queries():
            query(expr)  # parses and evaluates
        url = f"http://127.0.0.1:{port}/api/v1/rules"
        with urllib.request.urlopen(url, timeout=10) as r:
            groups = json.loads(r.read())["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == len(alert_queries())
        assert all(r["health"] == "ok" for r in rules), rules
    finally:
        prom.signal(signal.SIGTERM)
        prom.stop()


def test_a_down_node_has_no_utilisation_and_no_capacity(obs: Cluster) -> None:
    leader = obs.wait_leader()
    h3 = next(a for a in obs.agents if a.name == "h3")
    text = scrape(leader.http)
    assert value(text, "lepton_gpu_utilization_ratio", node="h3", gpu="0") is not None
    h3.kill9()
    wait_for(
        lambda: value(scrape(leader.http), "lepton_node_state", node="h3", state="down") == 1,
        60,
        "h3 down in the metrics",
    )
    text = scrape(leader.http)
    assert value(text, "lepton_node_state", node="h3", state="ready") == 0
    assert value(text, "lepton_nodes", state="down") == 1
    assert value(text, "lepton_gpus") == 4  # h1 and h2 only
    assert not [k for k in samples(text) if k.startswith("lepton_gpu_") and 'node="h3"' in k]
    # `nodes` lists only the states asked for (10,000 nodes whole are over
    # the frame cap); a state that does not exist is one clear line.
    assert [n["name"] for n in obs.rpc("nodes", {"state": ["down"]})] == ["h3"]
    assert "h3" not in {n["name"] for n in obs.rpc("nodes", {"state": "ready"})}
    assert len(obs.rpc("nodes", {})) == len(obs.agents)
    with pytest.raises(RpcError, match="'gone' is not one of ready, draining, down"):
        obs.rpc("nodes", {"state": ["gone"]})


def test_counters_and_the_histogram_go_on_across_a_change_of_leader(obs: Cluster) -> None:
    old = obs.wait_leader()
    job = obs.submit("--gpus", "1", "--", "true")
    obs.wait_job(job, {"succeeded"})
    failed = obs.submit("--", "false")
    obs.wait_job(failed, {"failed"})
    before = scrape(old.http)
    count = value(before, "lepton_submit_to_start_seconds_count")
    ok = value(before, "lepton_tasks_ended_total", reason="succeeded")
    assert count is not None and count >= 2 and ok is not None and ok >= 1
    assert (value(before, "lepton_tasks_ended_total", reason="failed") or 0) >= 1
    assert (value(before, "lepton_jobs_ended_total", state="failed") or 0) >= 1
    bucket = value(before, "lepton_submit_to_start_seconds_bucket", le="+Inf")
    assert bucket == count
    # Each task is observed once: one more job, one more observation.
    again = obs.submit("--", "true")
    obs.wait_job(again, {"succeeded"})
    text = scrape(old.http)
    assert value(text, "lepton_submit_to_start_seconds_count") == count + 1
    # A new leader exports the same totals (they live in the replicated state).
    old.proc.signal(signal.SIGKILL)
    old.proc.stop()
    new = obs.wait_leader(not_=old)
    after = wait_for(
        lambda: (t := scrape(new.http)) and value(t, "lepton_raft_leader") == 1 and t,
        30,
        "the new leader's metrics",
    )
    assert value(after, "lepton_submit_to_start_seconds_count") == count + 1
    assert value(after, "lepton_tasks_ended_total", reason="succeeded") == ok + 1
    assert (value(after, "lepton_raft_leader_changes_total") or 0) >= 2
