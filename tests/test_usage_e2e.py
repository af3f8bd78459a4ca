"""`leptonctl usage` and the decayed fair share on a real cluster: one master
with --fair-share-half-life 1d and one agent with 2 simulated GPUs."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

import pytest

from tests.harness import Cluster


@pytest.fixture(scope="module")
def uc(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path_factory.mktemp("usage") / "cluster",
        n_masters=1,
        master_args=["--fair-share-half-life", "1d"],
    )
    failed = request.session.testsfailed
    try:
        c.start_masters()
        c.start_agent("h1", gpus="2")
        c.wait_nodes_ready(1)
        yield c
    finally:
        if request.session.testsfailed > failed:
            print(c.logs())
        c.close()


def token(c: Cluster, name: str) -> str:
    # Their jobs run as root here: the test host has no accounts alice and bob.
    return c.ctl(
        "token", "create", "--role", "submit", "--name", name, "--unix-user", "root"
    ).stdout.strip()


def test_usage_per_user_and_per_job_in_every_format(uc: Cluster) -> None:
    alice = token(uc, "alice")
    job = uc.submit("--gpus", "2", "--cpus", "1", "--", "sleep", "1", token=alice)
    st = uc.wait_job(job, {"succeeded"})
    # Its run by its host's clock: what is charged (the job's own times go by
    # the leader's, which learns of the start and the end a little later).
    t = st["tasks"][0]
    ran_s = t["finished_at"] - t["started_at"]
    rows = {r["user"]: r for r in uc.ctl_json("usage")}
    a = rows["alice"]
    assert a["jobs"]["succeeded"] == 1
    # 2 GPUs for about the second it ran, rounded to 4 places of an hour.
    assert 2 * ran_s / 3600 - 0.00005 <= a["gpu_hours"] < 2 * (ran_s + 5) / 3600
    table = uc.ctl("usage").stdout.splitlines()
    assert table[0].split() == [
        "USER", "GPU", "HOURS", "CPU", "HOURS", "SUCCEEDED", "FAILED", "CANCELLED", "RUNNING", "TASKS",
    ]  # fmt: skip
    assert any(line.split()[0] == "alice" for line in table[1:])
    got = list(csv.DictReader(io.StringIO(uc.ctl("usage", "-o", "csv").stdout)))
    row = next(r for r in got if r["user"] == "alice")
    assert row["succeeded"] == "1" and float(row["gpu_hours"]) == a["gpu_hours"]
    jobs = json.loads(uc.ctl("usage", "--by", "job", "--since", "1d", "-o", "json").stdout)
    assert {"job": job, "user": "alice", "state": "succeeded"}.items() <= next(
        r for r in jobs if r["job"] == job
    ).items()
    # A job named with a terminal escape (its program's name) prints escaped,
    # in the table and in CSV alike.
    odd = uc.submit("--", "\x1b[2Jgone", token=alice)
    uc.wait_job(odd, {"failed"})
    for fmt in ("table", "csv"):
        out = uc.ctl("usage", "--by", "job", "-o", fmt).stdout
        assert "\x1b" not in out and "\\x1b[2Jgone" in out, (fmt, out)
    # Anyone may read usage; mistakes are one line.
    reader = uc.ctl("token", "create", "--role", "read", "--name", "auditor").stdout.strip()
    assert "alice" in uc.ctl("usage", token=reader).stdout
    for bad in (["--since", "yesterday"], ["--since", "0d"], ["--by", "team"]):
        out = uc.ctl("usage", *bad, check=False)
        assert out.returncode == 2, (bad, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_a_user_who_used_the_gpus_lately_yields_to_one_who_did_not(uc: Cluster) -> None:
    alice, bob = token(uc, "alice2"), token(uc, "bob")
    used = uc.submit("--gpus", "2", "--", "sleep", "2", token=alice)
    uc.wait_job(used, {"succeeded"})
    blocker = uc.submit("--gpus", "2", "--", "sleep", "600")
    uc.wait_job(blocker, {"running"})
    # alice2 asks first, bob after: first come, first served would pick alice2.
    first = uc.submit("--gpus", "2", "--", "sleep", "1", token=alice)
    second = uc.submit("--gpus", "2", "--", "sleep", "1", token=bob)
    queue = {r["user"]: r for r in uc.ctl_json("queue")}
    assert queue["alice2"]["past_share"] > queue["bob"]["past_share"]
    assert "PAST USAGE" in uc.ctl("queue").stdout
    uc.ctl("cancel", blocker)
    a = uc.wait_job(first, {"succeeded"}, timeout_s=120)
    b = uc.wait_job(second, {"succeeded"}, timeout_s=120)
    assert b["started_at"] < a["started_at"], (a, b)
