"""`leptonctl exec` into a task that runs as another Unix account: the command
runs as that account, in the task's cgroup, namespaces and environment, and
only the job's owner (or an admin) may enter it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness import Cluster, wait_for
from tests.isolation_support import passable_dir, unix_users

PROBE = "id -u; id -g; cat /proc/self/cgroup; readlink /proc/self/ns/mnt; echo gpus=$CUDA_VISIBLE_DEVICES"
# Opens each simulated GPU's device file: the task's own gives ENXIO (no
# driver behind it), another's EPERM (the device rules of the task's cgroup).
DEVICES = (
    'for i in 0 1; do if [ "$i" = "$CUDA_VISIBLE_DEVICES" ]; then w=own; else w=other; fi; '
    'echo "$w: $(head -c0 "$LEPTON_GPU_DEVICE_DIR/nvidia$i" 2>&1 && echo opened)"; done'
)


@dataclass
class Users:
    cluster: Cluster
    uid: int
    alice: str  # her submit token, mapped to her account
    bob: str  # another user's


@pytest.fixture(scope="module")
def u() -> Iterator[Users]:
    with passable_dir("lepton-exec-") as top, unix_users("ea", "eb") as (alice, bob):
        c = Cluster(top / "cluster", n_masters=1, ttl_s=5.0)
        try:
            c.start_masters()
            c.start_agent("h1", gpus="2")
            c.wait_nodes_ready(1, timeout_s=60)
            toks = [
                c.ctl(
                    "token", "create", "--role", "submit", "--name", who.pw_name,
                    "--unix-user", who.pw_name,
                ).stdout.strip()
                for who in (alice, bob)
            ]  # fmt: skip
            yield Users(c, alice.pw_uid, toks[0], toks[1])
        finally:
            c.close()


def test_exec_runs_as_the_tasks_user_in_its_cgroup_and_namespaces(u: Users) -> None:
    c = u.cluster
    job = c.submit(
        "--gpus", "1", "--cpus", "0.1", "--mem", "64M", "--", "sh", "-c", f"{PROBE}; sleep 600",
        token=u.alice,
    )  # fmt: skip
    c.wait_job(job, {"running"})
    own = wait_for(
        lambda: "gpus=" in (o := c.ctl("logs", job, token=u.alice).stdout) and o, 30, "its probe"
    )
    assert own.splitlines()[0] == str(u.uid)
    out = c.ctl("exec", job, "--", "sh", "-c", PROBE, token=u.alice)
    assert out.stdout == own
    # Its GPU devices are the task's: its own GPU only.
    devs = c.ctl("exec", job, "--", "sh", "-c", DEVICES, token=u.alice).stdout.splitlines()
    assert len(devs) == 2, devs
    mine = next(d for d in devs if d.startswith("own: "))
    theirs = next(d for d in devs if d.startswith("other: "))
    assert "No such device or address" in mine, devs
    assert "Operation not permitted" in theirs, devs
    # Someone else's token may not enter it; an admin may (and is audited).
    other = c.ctl("exec", job, "--", "true", token=u.bob, check=False)
    assert other.returncode == 1
    assert other.stderr.strip() == (
        f"leptonctl: job {job} belongs to {c.status(job)['user']}; "
        "only its owner or an admin can enter it"
    )
    assert c.ctl("exec", job, "--", "id", "-u").stdout.strip() == str(u.uid)
    c.ctl("cancel", job)
    c.wait_job(job, {"cancelled"})
