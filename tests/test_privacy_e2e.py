"""Privacy and policy between users, through leptonctl on real processes: who
sees whose env values and output, per-user priority caps, reserved env names.
One master (with priority caps) and one agent serve the module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leptond.views import REDACTED
from tests.harness import Cluster
from tests.test_hosts_e2e import kill_task_leftovers

SECRET = "hunter2-s3cr3t"


@pytest.fixture(scope="module")
def users(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path_factory.mktemp("privacy") / "cluster",
        n_masters=1,
        master_args=["--max-priority", "alice=10", "--default-max-priority", "50"],
    )
    failed_before = request.session.testsfailed
    try:
        c.start_masters()
        c.start_agent("h1", gpus="2")
        c.wait_nodes_ready(1, timeout_s=60)
        # Their jobs run as root on this test cluster (which allows it): what
        # is checked here is who sees what, not which account a task runs as.
        c.tokens = {  # type: ignore[attr-defined]
            name: c.ctl(
                "token", "create", "--role", role, "--name", name, "--unix-user", "root"
            ).stdout.strip()
            for name, role in (("alice", "submit"), ("bob", "submit"), ("rita", "read"))
        }
        yield c
    finally:
        if request.session.testsfailed > failed_before:
            print(c.logs())
        c.close()
        kill_task_leftovers(c)


def as_(c: Cluster, user: str, *args: str, check: bool = True) -> Any:
    return c.ctl(*args, token=c.tokens[user], check=check)  # type: ignore[attr-defined]


def one_line(out: Any) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return str(lines[0])


def job_ids(c: Cluster) -> set[str]:
    return {j["id"] for j in c.ctl_json("jobs", "--all")}


def audit(c: Cluster) -> list[dict[str, Any]]:
    path = c.root / "master-0" / "audit.log"
    return [json.loads(ln) for ln in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def alices_job(users: Cluster) -> str:
    job = as_(
        users, "alice", "submit", "--env", f"API_KEY={SECRET}", "--env", "MODE=fast",
        "--", "sh", "-c", 'echo "alice says $API_KEY"',
    ).stdout.strip()  # fmt: skip
    assert users.wait_job(job, {"succeeded", "failed"})["state"] == "succeeded"
    return str(job)


def test_a_read_token_sees_metadata_but_not_env_values_or_output(
    users: Cluster, alices_job: str
) -> None:
    listed = json.loads(as_(users, "rita", "jobs", "-o", "json").stdout)
    assert any(j["id"] == alices_job and j["user"] == "alice" for j in listed)
    out = as_(users, "rita", "status", alices_job, "-o", "json")
    st = json.loads(out.stdout)
    assert st["user"] == "alice" and st["state"] == "succeeded"
    assert st["spec"]["env"] == {"API_KEY": REDACTED, "MODE": REDACTED}
    assert SECRET not in out.stdout
    logs = as_(users, "rita", "logs", alices_job, check=False)
    assert logs.returncode != 0 and SECRET not in logs.stdout
    assert "belongs to alice" in one_line(logs)


def test_another_submit_user_is_refused_too_and_the_owner_sees_everything(
    users: Cluster, alices_job: str
) -> None:
    out = as_(users, "bob", "status", alices_job, "-o", "json")
    assert SECRET not in out.stdout
    assert json.loads(out.stdout)["spec"]["env"]["API_KEY"] == REDACTED
    logs = as_(users, "bob", "logs", alices_job, check=False)
    assert logs.returncode != 0 and "belongs to alice" in one_line(logs)
    # bob's own job: in full.
    mine = as_(users, "bob", "submit", "--env", "BOBS=own", "--", "echo", "bob here").stdout.strip()
    users.wait_job(mine, {"succeeded"})
    st = json.loads(as_(users, "bob", "status", mine, "-o", "json").stdout)
    assert st["spec"]["env"] == {"BOBS": "own"}
    assert as_(users, "bob", "logs", mine).stdout.strip() == "bob here"
    # alice's: in full, for alice.
    st = json.loads(as_(users, "alice", "status", alices_job, "-o", "json").stdout)
    assert st["spec"]["env"]["API_KEY"] == SECRET
    assert as_(users, "alice", "logs", alices_job).stdout.strip() == f"alice says {SECRET}"


def test_an_admin_sees_everything_and_each_such_read_is_audited(
    users: Cluster, alices_job: str
) -> None:
    before = len(audit(users))
    st = users.ctl_json("status", alices_job)
    assert st["spec"]["env"]["API_KEY"] == SECRET
    assert users.ctl("logs", alices_job).stdout.strip() == f"alice says {SECRET}"
    reads = [r for r in audit(users)[before:] if r["target"] == alices_job]
    assert [(r["who"], r["action"]) for r in reads] == [("admin", "status"), ("admin", "logs")]
    assert all("alice" in r["result"] for r in reads), reads
    # The owner's own reads are not audited as reads of someone else's job.
    as_(users, "alice", "logs", alices_job)
    assert not [
        r for r in audit(users)[before + 2 :] if r["target"] == alices_job and r["who"] == "alice"
    ]


def test_priorities_over_a_users_cap_are_refused_and_change_nothing(users: Cluster) -> None:
    before = job_ids(users)
    for user, prio, cap in (("alice", "11", 10), ("bob", "51", 50), ("bob", "1000", 50)):
        out = as_(users, user, "submit", "--priority", prio, "--", "true", check=False)
        assert out.returncode != 0
        line = one_line(out)
        assert f"priority {prio}" in line and f"({cap})" in line, line
    assert job_ids(users) == before
    # At the cap is fine; an admin is not capped.
    for user, prio in (("alice", "10"), ("bob", "50")):
        job = as_(users, user, "submit", "--priority", prio, "--", "true").stdout.strip()
        assert users.status(job)["priority"] == int(prio)
    assert users.status(users.submit("--priority", "1000", "--", "true"))["priority"] == 1000


@pytest.mark.parametrize("name", ["CUDA_VISIBLE_DEVICES", "LEPTON_JOB_ID", "RANK", "PET_NNODES"])
def test_reserved_env_names_are_refused_with_one_line_and_change_nothing(
    users: Cluster, tmp_path: Path, name: str
) -> None:
    before = job_ids(users)
    out = as_(users, "alice", "submit", "--env", f"{name}=0", "--", "true", check=False)
    assert out.returncode == 2
    assert name in one_line(out)
    job_file = tmp_path / "job.toml"
    job_file.write_text(f'command = ["true"]\n[env]\n{name} = "0"\n')
    out = as_(users, "alice", "submit", "-f", str(job_file), check=False)
    assert out.returncode == 2 and name in one_line(out)
    assert job_ids(users) == before
