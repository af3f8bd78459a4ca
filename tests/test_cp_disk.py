"""The masters' data disk, which the Raft journal shares with workdir blocks.

Three masters, each on its own small disk (a tmpfs). A user cannot fill it
with uploads: each user's quota and the block store's limit refuse with one
line. When the disk fills anyway (here: another process's file), the masters
refuse new jobs with one line, keep serving reads and running work, and say
so in /healthz (503) and `cluster status`; even a completely full disk loses
nothing acknowledged, and once space is freed everything works again.

The same cluster also shows that /healthz and `cluster status` tell of a
member that is down, and of a master left without quorum or leader.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leptond.wire.errors import RpcError
from tests.cp_support import local_job_ids
from tests.harness import Cluster, Master, wait_for
from tests.tmpfs import MiB, fill, tmpfs

DISK = 64 * MiB
STORE = 12 * MiB
QUOTA = 6 * MiB
RESERVE = 16 * MiB
BLOCK = 2 * MiB  # one file of this size is one block


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cp-disk") / "cluster"
    c = Cluster(
        root,
        n_masters=3,
        master_args=[
            "--block-store-bytes", str(STORE),
            "--upload-quota-bytes", str(QUOTA),
            "--min-free-disk", str(RESERVE),
        ],
    )  # fmt: skip
    with contextlib.ExitStack() as mounts:
        for m in c.masters:
            mounts.enter_context(tmpfs(data_dir(c, m), DISK))
        try:
            c.start_masters(timeout_s=60)
            yield c
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.close()


def data_dir(c: Cluster, m: Master) -> Path:
    return c.root / f"master-{m.index}"


def healthz(m: Master) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{m.http}/healthz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metric(m: Master, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{m.http}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


def workdir(base: Path, name: str, blocks: int) -> Path:
    d = base / name
    d.mkdir()
    for k in range(blocks):
        (d / f"part{k}").write_bytes(os.urandom(BLOCK))
    return d


def user_token(c: Cluster, name: str) -> str:
    return c.ctl("token", "create", "--role", "submit", "--name", name).stdout.strip()


def one_line_error(out: Any) -> str:
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return str(lines[0])


def test_uploads_stop_at_the_quota_and_the_store_limit(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    mallory, eve, trent = (user_token(c, u) for u in ("mallory", "eve", "trent"))
    ok = c.ctl("submit", "--workdir", str(workdir(tmp_path, "a", 3)), "--", "true", token=mallory)
    assert ok.stdout.strip().startswith("j-")
    more = c.ctl(
        "submit", "--workdir", str(workdir(tmp_path, "b", 1)), "--", "true",
        token=mallory, check=False,
    )  # fmt: skip
    assert "upload quota used up: mallory's workdir blocks hold 6 MiB of 6 MiB" in (
        one_line_error(more)
    )
    c.ctl("submit", "--workdir", str(workdir(tmp_path, "c", 3)), "--", "true", token=eve)
    full = c.ctl(
        "submit", "--workdir", str(workdir(tmp_path, "d", 1)), "--", "true",
        token=trent, check=False,
    )  # fmt: skip
    assert "the block store is full" in one_line_error(full)
    # Each master holds at most its limit, and its disk keeps the reserve.
    for m in c.masters:
        blocks = c.rpc("cluster_status", addr=m.rpc_addr)["blocks"]
        assert blocks["bytes_on_disk"] <= STORE, (m.index, blocks)
        status, body = healthz(m)
        assert status == 200 and not body["disk_low"], body
    # Someone without uploads still gets work in.
    assert c.submit("--", "true").startswith("j-")


def test_a_full_disk_refuses_new_jobs_and_loses_nothing(cluster: Cluster) -> None:
    c = cluster
    acked = {str(c.rpc("submit", {"spec": {"argv": ["true"]}})["id"]) for _ in range(40)}
    jobs = sorted(acked)
    fillers = [fill(data_dir(c, m), leave_bytes=RESERVE // 2) for m in c.masters]
    cancelled: dict[str, str] = {}  # job -> request id of an acknowledged cancel
    failed: dict[str, str] = {}  # job -> request id of a cancel that got an error
    try:
        for m in c.masters:
            _, body = wait_for(
                lambda m=m: (h := healthz(m))[0] == 503 and h,
                30,
                f"master-{m.index} to report its disk low",
            )
            assert body["disk_low"] and body["journal_writable"], body
            assert any(p.startswith("disk low") for p in body["problems"]), body
        assert metric(c.masters[0], "lepton_data_disk_low") == 1
        refused = c.ctl("submit", "--", "true", check=False)
        assert "too full for new work" in one_line_error(refused)
        # Reads are served, running work goes on: a cancel still commits.
        assert {j["id"] for j in c.ctl_json("jobs", "--all")} >= acked
        assert c.ctl("cancel", jobs[0]).returncode == 0
        cancelled[jobs[0]] = ""

        # Each master's own answer (the others announce their RPC address a
        # little after they start).
        def all_low() -> dict[str, Any] | None:
            st = c.ctl_json("cluster", "status")
            low = [(m.get("health") or {}).get("disk", {}).get("low") for m in st["members"]]
            return st if all(low) else None

        st = wait_for(all_low, 30, "cluster status to show every master's disk low")
        assert st["health"]["disk"]["low"] and len(st["problems"]) >= 3, st
        out = c.ctl("cluster", "status").stdout
        rows = [ln for ln in out.splitlines() if ln.startswith("127.0.0.1:")]
        assert len(rows) == 3 and all(ln.endswith("disk low") for ln in rows), out
        assert out.count("problem: disk low") == 1, out
        assert out.count("problem: master 127.0.0.1:") == 2, out

        # Now completely full. Records still fit in the journal's last page for
        # a while; then a write can no longer be made durable, and fails in
        # bounded time instead of being acknowledged.
        for m in c.masters:
            fill(data_dir(c, m), name="more")
        for m in c.masters:
            wait_for(
                lambda m=m: not healthz(m)[1]["journal_writable"],
                30,
                f"master-{m.index} to report its journal not writable",
            )
        for job in jobs[1:]:
            rid = f"cancel-on-full-{job}"
            try:
                c.rpc("cancel", {"job_id": job, "rid": rid}, timeout_s=8)
                cancelled[job] = rid
            except RpcError:
                failed[job] = rid
                break
        assert failed, "every cancel was acknowledged on a full disk"
    finally:
        for f in fillers:
            f.unlink()
            (f.parent / "more").unlink(missing_ok=True)
    for m in c.masters:
        wait_for(lambda m=m: healthz(m)[0] == 200, 90, f"master-{m.index} healthy again")
    # The write that failed is retried with its request id: done once.
    for job, rid in failed.items():
        again = c.rpc("cancel", {"job_id": job, "rid": rid}, timeout_s=30)
        assert again == {"id": job, "state": "cancelled"}
        cancelled[job] = rid
    acked.add(c.submit("--", "true"))
    for m in c.masters:
        wait_for(
            lambda m=m: (
                acked <= set(ids := local_job_ids(m.rpc_addr, c.admin_token))
                and len(ids) == len(set(ids))
            ),
            60,
            f"master-{m.index} to hold every acknowledged job once",
        )
    states = {j["id"]: j["state"] for j in c.rpc("jobs", {"all": True, "limit": 10**6})}
    for job in cancelled:
        assert states[job] == "cancelled", (job, states[job])


def test_health_tells_of_an_unreachable_member_and_of_no_quorum(cluster: Cluster) -> None:
    c = cluster
    leader = c.wait_leader()
    first, second = [m for m in c.masters if m is not leader]
    first.proc.kill9()
    try:
        # One member down: the others still have a quorum, and say who is missing.
        def one_down() -> dict[str, Any] | None:
            st = c.ctl_json("cluster", "status", addr=leader.rpc_addr)
            gone = [m for m in st["members"] if m["addr"] == first.raft_addr]
            return st if gone and not gone[0]["connected"] else None

        st = wait_for(one_down, 30, "cluster status to show the member unreachable")
        assert f"master {first.raft_addr} unreachable" in st["problems"], st
        out = c.ctl("cluster", "status", addr=leader.rpc_addr).stdout
        assert f"problem: master {first.raft_addr} unreachable" in out, out
        row = next(ln for ln in out.splitlines() if ln.startswith(first.raft_addr))
        assert row.endswith("unreachable"), out
        status, body = healthz(leader)
        assert status == 200 and body["unreachable"] == [first.raft_addr], body

        # Two down: the last one has no quorum and no leader, and says so.
        second.proc.kill9()
        status, body = wait_for(
            lambda: (h := healthz(leader))[0] == 503 and h[1]["leader"] is None and h,
            30,
            "the last master to lose its leader",
        )
        assert not body["quorum"], body
        assert "no quorum: 1 of 3 masters reachable" in body["problems"], body
        assert any(p.startswith("no leader") for p in body["problems"]), body
        out = c.ctl("cluster", "status", addr=leader.rpc_addr).stdout
        assert "problem: no quorum: 1 of 3 masters reachable" in out, out
        assert "problem: no leader" in out, out
    finally:
        for m in (first, second):
            if not m.proc.alive():
                m.proc.start()
    for m in c.masters:
        wait_for(lambda m=m: healthz(m)[0] == 200, 60, f"master-{m.index} healthy again")
