"""GPU health end to end: a fault written to a simulated GPU's fault file marks
it unhealthy; its task is stopped and runs again elsewhere without spending a
retry; operators see it in `nodes` and in both /metrics; `leptonctl node gpu
reset` puts it back only after a burn-in passes.

One master and one agent with 4 simulated GPUs for the module.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from leptond.operate import BURN_IN_WAIT_S
from tests.harness import Cluster, wait_for
from tests.test_metrics_e2e import scrape, value


@pytest.fixture(scope="module")
def gh(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("gpu-health") / "cluster", n_masters=1, ttl_s=3.0)
    failed = request.session.testsfailed
    try:
        c.start_masters()
        c.start_agent("h1", gpus="4")
        c.wait_nodes_ready(1)
        yield c
    finally:
        if request.session.testsfailed > failed:
            print(c.logs())
        c.close()


def inject(c: Cluster, text: str) -> None:
    (c.root / "agent-h1" / "simulate" / "faults").write_text(text)


def node(c: Cluster) -> dict[str, Any]:
    return next(n for n in c.nodes() if n["name"] == "h1")


def faults(c: Cluster) -> dict[int, str]:
    return {f["index"]: f["reason"] for f in node(c)["gpu_faults"]}


def agent_metrics(c: Cluster) -> str:
    return scrape(c.agent_http_ports["h1"])


def test_an_xid_stops_the_task_on_that_gpu_which_runs_again_without_spending_a_retry(
    gh: Cluster,
) -> None:
    job = gh.submit("--gpus", "2", "--retries", "0", "--", "sleep", "600")
    st = gh.wait_job(job, {"running"})
    bad = st["tasks"][0]["gpus"][1]
    inject(gh, f"xid 79 gpu={bad}\n")
    wait_for(lambda: bad in faults(gh), 30, f"GPU {bad} marked unhealthy")
    assert faults(gh)[bad] == "Xid 79: GPU has fallen off the bus"
    # Stopped, requeued, running again on other GPUs: the job did not fail.
    moved = wait_for(
        lambda: (t := gh.status(job)["tasks"][0])["state"] == "running" and t["attempt"] == 2 and t,
        60,
        "the task to run again",
    )
    assert bad not in moved["gpus"], moved
    st = gh.status(job)
    assert st["state"] == "running" and st["retries_left"] == 0
    # Operators see it: nodes, the leader's /metrics, the agent's /metrics.
    out = gh.ctl("nodes").stdout
    assert f"h1: GPU {bad} unhealthy: Xid 79" in out and "(1 unhealthy)" in out, out
    assert f"leptonctl node gpu reset h1 {bad}" in out
    master = scrape(gh.masters[0].http)
    assert value(master, "lepton_node_gpus_unhealthy", node="h1") == 1
    assert value(master, "lepton_gpus") == 3
    agent = agent_metrics(gh)
    assert value(agent, "lepton_agent_gpu_healthy", gpu=str(bad)) == 0
    assert value(agent, "lepton_agent_gpu_xid_errors_total", gpu=str(bad), xid="79") == 1
    gh.ctl("cancel", job)
    gh.wait_job(job, {"cancelled"})


def test_an_applications_xid_and_a_bad_line_change_nothing(gh: Cluster) -> None:
    before = faults(gh)
    healthy = next(i for i in range(4) if i not in before)
    inject(gh, f"xid 13 gpu={healthy}\nnot a fault\nxid 79 gpu=9\n")
    log = gh.root / "agent-h1.log"
    wait_for(lambda: "no simulated GPU 9" in log.read_text(), 30, "the agent to read the file")
    assert "no gpu=I in 'not a fault'" in log.read_text()
    wait_for(
        lambda: value(agent_metrics(gh), "lepton_agent_gpu_xid_errors_total", xid="13") == 1,
        30,
        "Xid 13 counted",
    )
    assert faults(gh) == before


def test_reset_runs_a_burn_in_and_puts_the_gpu_back(gh: Cluster) -> None:
    inject(gh, "ecc dbe gpu=3\n")
    wait_for(lambda: 3 in faults(gh), 30, "GPU 3 marked unhealthy")
    assert faults(gh)[3] == "double-bit ECC error"
    wait_for(
        lambda: (
            value(
                agent_metrics(gh), "lepton_agent_gpu_ecc_errors_total", gpu="3", type="uncorrected"
            )
            == 1
        ),
        30,
        "the ECC error counted",
    )
    # Only admins reset; a healthy GPU has nothing to reset; a GPU it lacks is named.
    reader = gh.ctl("token", "create", "--role", "read", "--name", "watcher").stdout.strip()
    out = gh.ctl("node", "gpu", "reset", "h1", "3", token=reader, check=False)
    assert out.returncode == 1 and "needs a token with role admin" in out.stderr, out.stderr
    healthy = next(i for i in range(4) if i not in faults(gh))
    out = gh.ctl("node", "gpu", "reset", "h1", str(healthy), check=False)
    assert out.returncode == 1 and "healthy; there is nothing to reset" in out.stderr
    out = gh.ctl("node", "gpu", "reset", "h1", "7", check=False)
    assert out.returncode == 2 and "node h1 has no GPU 7" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    # A burn-in that fails leaves it out of service.
    inject(gh, "burnin-fail gpu=3\n")
    wait_for(lambda: (gh.root / "agent-h1" / "simulate" / "faults").stat().st_size == 0, 30, "read")
    out = gh.ctl("node", "gpu", "reset", "h1", "3", check=False)
    assert out.returncode == 1 and "failed its burn-in" in out.stderr, out.stderr
    assert 3 in faults(gh)
    # One that passes (torch on the CPU for a simulated GPU) brings it back.
    # This one takes longer than a client's usual attempt (6 s), as loading
    # torch alone can on a busy host: leptonctl waits for it, and the host
    # runs it once (each retry used to start another, and none was ever
    # recorded). The master waits for it up to its own limit, and so does this.
    inject(gh, "burnin-slow gpu=3\n")
    wait_for(lambda: (gh.root / "agent-h1" / "simulate" / "faults").stat().st_size == 0, 30, "read")
    out = gh.ctl("node", "gpu", "reset", "h1", "3", timeout_s=BURN_IN_WAIT_S + 30)
    assert "h1: GPU 3 healthy (burn-in passed on the CPU" in out.stdout, out.stdout
    assert 3 not in faults(gh)
    passed = (gh.root / "agent-h1.log").read_text().count("GPU 3 is back in service")
    assert passed == 1, f"{passed} burn-ins passed for one reset"
    # Two resets of the same GPU at once (two admins, say): one burn-in.
    inject(gh, "ecc dbe gpu=3\n")
    wait_for(lambda: 3 in faults(gh), 30, "GPU 3 marked unhealthy again")
    inject(gh, "burnin-slow gpu=3\n")
    wait_for(lambda: (gh.root / "agent-h1" / "simulate" / "faults").stat().st_size == 0, 30, "read")
    with ThreadPoolExecutor(2) as pool:
        both = list(
            pool.map(
                lambda _: gh.ctl(
                    "node", "gpu", "reset", "h1", "3", timeout_s=BURN_IN_WAIT_S + 30, check=False
                ),
                range(2),
            )
        )
    for out in both:
        # The one that came second either waited for the first one's burn-in
        # or, on a machine slow to start it, found the GPU healthy already.
        assert (out.returncode == 0 and "GPU 3 healthy" in out.stdout) or (
            out.returncode == 1 and "healthy; there is nothing to reset" in out.stderr
        ), (out.stdout, out.stderr)
    assert any(out.returncode == 0 for out in both)
    passed = (gh.root / "agent-h1.log").read_text().count("GPU 3 is back in service")
    assert passed == 2, f"{passed - 1} burn-ins passed for two resets at once"
    wait_for(
        lambda: value(agent_metrics(gh), "lepton_agent_gpu_healthy", gpu="3") == 1,
        30,
        "the agent's metric back to healthy",
    )


def test_a_fault_outlives_an_agent_restart_and_its_gpu_takes_no_work(gh: Cluster) -> None:
    inject(gh, "retired-pages gpu=0\n")
    wait_for(lambda: 0 in faults(gh), 30, "GPU 0 marked unhealthy")
    agent = next(a for a in gh.agents if a.name == "h1")
    agent.stop()
    gh.start_agent("h1", gpus="4")

    def healthz() -> bytes:
        url = f"http://127.0.0.1:{gh.agent_http_ports['h1']}/healthz"
        with urllib.request.urlopen(url, timeout=10) as r:
            return bytes(r.read())

    # The agent kept its own record too (its data dir), as the leader did.
    assert b"retired pages pending" in wait_for(healthz, 60, "the restarted agent's /healthz")
    assert faults(gh)[0].startswith("retired pages pending")
    # Four GPUs, one out: a job that wants every healthy one runs on the others.
    healthy = 4 - len(faults(gh))
    job = gh.submit("--gpus", str(healthy), "--", "sleep", "600")
    st = gh.wait_job(job, {"running"})
    assert 0 not in st["tasks"][0]["gpus"]
    gh.ctl("cancel", job)
    gh.wait_job(job, {"cancelled"})
