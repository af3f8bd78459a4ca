"""The Python SDK against a real master and agent: typed results and typed
errors, sync and asyncio, and the runnable example from docs/sdk.md."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import pytest

from leptond.client import (
    AsyncClient,
    BadRequest,
    Client,
    JobInfo,
    LeptonError,
    NodeInfo,
    NotFound,
    Unschedulable,
)
from tests.harness import ROOT, Cluster, env


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cl = Cluster(tmp_path_factory.mktemp("sdk") / "cluster", n_masters=1, ttl_s=3.0)
    try:
        cl.start_masters()
        cl.start_agent("h1", gpus="2")
        cl.wait_nodes_ready(1)
        yield cl
    finally:
        cl.close()


@pytest.fixture
def client(c: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    # The same configuration as leptonctl: from the environment here.
    monkeypatch.setenv("LEPTON_ADDR", c.addrs)
    monkeypatch.setenv("LEPTON_TOKEN", c.admin_token)
    monkeypatch.setenv("LEPTON_CONFIG", str(c.root / "no-config.toml"))
    with Client() as cl:
        yield cl


def test_submit_wait_logs_and_listings_are_typed(client: Client) -> None:
    job = client.submit(["sh", "-c", "echo one; echo two"], cpus=0.1, mem_bytes=64 << 20)
    info = job.wait(timeout_s=60)
    assert isinstance(info, JobInfo) and (info.id, info.state) == (job.id, "succeeded")
    assert info.tasks[0].exit_code == 0
    assert "".join(job.logs()) == "one\ntwo\n"
    assert "".join(job.logs(follow=True)) == "one\ntwo\n"
    assert job.id in [j.id for j in client.jobs(all=True)]
    nodes = client.nodes()
    assert [type(n) for n in nodes] == [NodeInfo] and nodes[0].gpus_total == 2


def test_follow_streams_a_running_job_and_cancel(client: Client) -> None:
    job = client.submit(["sh", "-c", "echo started; sleep 600"], cpus=0.1, mem_bytes=64 << 20)
    lines = job.logs(follow=True)
    assert next(lines) == "started\n"
    assert job.cancel() == "cancelled"
    assert list(lines) == []  # the follower ends with the job
    assert job.wait(timeout_s=60).state == "cancelled"


def test_arrays_and_dependencies(client: Client) -> None:
    sweep = client.submit(
        ["sh", "-c", 'echo "i=$LEPTON_ARRAY_INDEX"'], array="0-3", max_running=2, cpus=0.1
    )
    after = client.submit(["true"], after_ok=[sweep.id], cpus=0.1)
    assert after.status().waiting_on in ((sweep.id,), ())
    info = sweep.wait(timeout_s=120)
    assert (info.array, info.array_tasks, info.task_states) == ("0-3", 4, {"succeeded": 4})
    assert "".join(sweep.logs(index=2)) == "i=2\n"
    assert after.wait(timeout_s=60).state == "succeeded"


def test_errors_are_typed_and_one_line(client: Client) -> None:
    with pytest.raises(NotFound) as nf:
        client.status("j-000000000000")
    assert nf.value.code == "not_found" and "\n" not in nf.value.message
    with pytest.raises(Unschedulable):
        client.submit(["true"], gpus=64)
    with pytest.raises(BadRequest, match="--array"):
        client.submit(["true"], array="9-1x")
    with pytest.raises(BadRequest):
        client.submit("true")  # type: ignore[arg-type]
    with pytest.raises(LeptonError):
        client.submit(["true"], after_ok=["j-000000000000"])


def test_the_asyncio_client(c: Cluster) -> None:
    async def go() -> tuple[str, str]:
        async with AsyncClient(c.addrs, c.admin_token) as ac:
            job = await ac.submit(["echo", "hi"], cpus=0.1, mem_bytes=64 << 20)
            text = "".join([t async for t in job.logs(follow=True)])
            return text, (await job.wait(60)).state

    assert asyncio.run(go()) == ("hi\n", "succeeded")


def test_the_documented_example_runs(c: Cluster) -> None:
    e = env()
    e["LEPTON_ADDR"], e["LEPTON_TOKEN"] = c.addrs, c.admin_token
    e["LEPTON_CONFIG"] = str(c.root / "no-config.toml")
    out = subprocess.run(
        [sys.executable, "examples/sdk.py"],
        env=e,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "trial 2 said: trial 2" in out.stdout
    assert "all trials done" in out.stdout
    assert "NotFound: no job 'j-000000000000'" in out.stdout
    assert out.stdout.endswith("hello from asyncio\nsucceeded\n")
