"""Operating the control plane through leptonctl on real masters: tokens and roles,
the audit log, snapshots, membership changes, exit codes.

The scenarios share one 3-master cluster and run in file order; the membership
test is last because it changes who the masters are.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cp_support import (
    Submitters,
    local_job_ids,
    module_cluster,
    wait_replicas_hold,
)
from tests.harness import Cluster, free_ports, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from module_cluster(tmp_path_factory, "cp-admin")


def one_line_failure(out: subprocess.CompletedProcess[str], code: int | None = None) -> str:
    """The command failed with exactly one line on stderr and no traceback."""
    assert out.returncode != 0, out.stdout
    if code is not None:
        assert out.returncode == code, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


def job_states(c: Cluster) -> dict[str, str]:
    return {r["id"]: r["state"] for r in c.ctl_json("jobs", "--all")}


def audit(c: Cluster, index: int) -> list[dict[str, Any]]:
    path = c.root / f"master-{index}" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_exit_codes_usage_and_unreachable_cluster(cluster: Cluster) -> None:
    for argv in (
        ["bogus"],
        ["cluster"],
        ["submit", "--gpus", "two", "--", "true"],
        ["submit"],  # no command
        ["token", "create", "--role", "root"],
    ):
        out = cluster.ctl(*argv, check=False)
        assert out.returncode == 2, (argv, out.returncode, out.stderr)
        assert "Traceback" not in out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("leptonctl"), out.stderr
    (nobody,) = free_ports(1)
    out = cluster.ctl("--timeout", "3", "jobs", addr=f"127.0.0.1:{nobody}", check=False)
    line = one_line_failure(out, code=1)
    assert "cannot reach" in line, line


def test_tokens_roles_and_audit(cluster: Cluster) -> None:
    wrong = "ltk_admin_" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    before = job_states(cluster)
    line = one_line_failure(cluster.ctl("submit", "--", "true", token=wrong, check=False))
    assert "refused the token" in line, line

    reader = cluster.ctl("token", "create", "--role", "read", "--name", "reader").stdout.strip()
    alice = cluster.ctl("token", "create", "--role", "submit", "--name", "alice").stdout.strip()
    bob = cluster.ctl("token", "create", "--role", "submit", "--name", "bob").stdout.strip()
    listed = {t["name"]: t for t in cluster.ctl_json("token", "ls")}
    assert {n: listed[n]["role"] for n in ("reader", "alice", "bob")} == {
        "reader": "read",
        "alice": "submit",
        "bob": "submit",
    }
    assert not any(listed[n]["revoked"] for n in ("reader", "alice", "bob"))

    line = one_line_failure(cluster.ctl("submit", "--", "true", token=reader, check=False))
    assert "role submit" in line, line
    assert cluster.ctl("jobs", token=reader).returncode == 0  # reading is allowed
    assert job_states(cluster) == before

    job_a = cluster.submit("--", "true", token=alice)
    job_b = cluster.submit("--", "true", token=bob)
    line = one_line_failure(cluster.ctl("cancel", job_b, token=alice, check=False))
    assert "only its owner or an admin" in line, line
    assert cluster.status(job_b)["state"] == "pending"
    assert cluster.ctl("cancel", job_a, token=alice).stdout.split() == [job_a, "cancelled"]
    assert cluster.ctl("cancel", job_b).stdout.split() == [job_b, "cancelled"]  # admin

    bob_id = listed["bob"]["id"]
    assert cluster.ctl("token", "revoke", bob_id).stdout.strip() == f"revoked {bob_id}"
    assert {t["name"]: t["revoked"] for t in cluster.ctl_json("token", "ls")}["bob"] is True
    before = job_states(cluster)
    line = one_line_failure(cluster.ctl("submit", "--", "true", token=bob, check=False))
    assert "refused the token" in line, line
    assert job_states(cluster) == before

    # Each call is audited by the master that served it: the leader, unless
    # leadership moved meanwhile (a busy machine), so read every master's.
    entries = [e for m in cluster.masters for e in audit(cluster, m.index)]

    def has(**want: Any) -> bool:
        return any(
            all((e.get(k) == v if not callable(v) else v(e.get(k))) for k, v in want.items())
            for e in entries
        )

    assert has(who="alice", action="submit", target=job_a, result="ok"), entries
    assert has(
        who="alice",
        action="cancel",
        target=job_b,
        result=lambda r: str(r).startswith("error: forbidden"),
    ), entries
    assert has(who="admin", action="cancel", target=job_b, result="ok"), entries
    assert has(who="admin", action="token_revoke", target=bob_id, result="ok"), entries
    # The read token's refused submit is audited by whichever master it reached.
    assert any(
        e["who"] == "reader" and e["action"] == "submit" and e["result"].startswith("error")
        for m in cluster.masters
        for e in audit(cluster, m.index)
    )


def test_snapshot_save_restore_and_corrupt_file(cluster: Cluster, tmp_path: Path) -> None:
    early = [cluster.submit("--name", f"early{i}", "--", "true") for i in range(3)]
    saved = set(job_states(cluster))
    assert set(early) <= saved
    path = tmp_path / "state.snap"
    out = cluster.ctl("snapshot", "save", str(path))
    assert out.stdout.startswith("saved state at index"), out.stdout
    late = [cluster.submit("--name", f"late{i}", "--", "true") for i in range(2)]
    assert set(late) <= set(job_states(cluster))

    out = cluster.ctl("snapshot", "restore", str(path), "--yes")
    assert out.stdout.startswith(f"restored {len(saved)} job(s)"), out.stdout
    assert set(job_states(cluster)) == saved
    for m in cluster.masters:  # every replica applied the restore
        wait_for(
            lambda m=m: set(local_job_ids(m.rpc_addr, cluster.admin_token)) == saved,
            30,
            f"master-{m.index} to hold the restored jobs",
        )

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.snap"
    bad.write_bytes(bytes(data))
    truncated = tmp_path / "short.snap"
    truncated.write_bytes(bytes(data[: len(data) // 3]))
    for f in (bad, truncated):
        line = one_line_failure(cluster.ctl("snapshot", "restore", str(f), check=False))
        assert "not a valid leptond snapshot" in line, line
    assert set(job_states(cluster)) == saved


def test_grow_to_five_masters_and_back_while_serving(cluster: Cluster) -> None:
    original = list(cluster.masters)
    with Submitters(cluster.addrs, cluster.admin_token, "admin", n=2, tag="grow") as load:
        load.wait_more(10)
        added = []
        for _ in range(2):
            m = cluster.add_master_proc()
            out = cluster.ctl("cluster", "add-master", m.raft_addr)
            assert out.stdout.strip() == m.raft_addr
            added.append(m)
            load.wait_more(10)

        def members_are(want: set[str]) -> dict[str, Any] | None:
            lead = cluster.wait_leader(60)
            st = cluster.ctl_json("cluster", "status", addr=lead.rpc_addr)
            assert {"leader", "term", "members"} <= set(st)
            assert st["leader"] == st["self"] == lead.raft_addr
            others = {x["addr"]: x for x in st["members"]}
            ok = set(others) | {st["self"]} == want and all(
                x["connected"] and (x["match_index"] or 0) > 0 for x in others.values()
            )
            return st if ok else None

        five = {m.raft_addr for m in original + added}
        wait_for(lambda: members_are(five), 60, "five connected, caught-up masters")
        load.wait_more(10)
        for m in added:  # the newcomers hold the jobs too
            wait_for(
                lambda m=m: (
                    set(load.acked.values()) & set(local_job_ids(m.rpc_addr, cluster.admin_token))
                ),
                30,
                f"jobs on master-{m.index}",
            )

        for m in reversed(added):
            lead = cluster.wait_leader(60)
            if lead is m:  # a leader cannot remove itself; hand over first
                m.proc.stop()
                lead = cluster.wait_leader(60, not_=m)
            out = cluster.ctl("cluster", "remove-master", m.raft_addr, addr=lead.rpc_addr)
            assert out.stdout.strip() == m.raft_addr
            m.proc.stop()
            cluster.masters.remove(m)
            load.wait_more(10)
        wait_for(
            lambda: members_are({m.raft_addr for m in original}), 60, "the three original masters"
        )
        load.wait_more(10)
        load.stop()
    want = load.check_ids()
    wait_replicas_hold(cluster, want, exact=False)
