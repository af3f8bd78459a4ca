"""One submit must never stop the cluster's writes (real masters on loopback).

The issue's submit, about 1 MB of 4-byte UTF-8 in 8 arguments, used to pass
validation (which counted characters), take pysyncobj's broken large-entry
path and stall every later write. Now it is refused at once with one line,
writes keep working for everyone, and specs just under the limit, full of
non-ASCII bytes, replicate to every master, several to an entry.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest

from raft.validate import MAX_COMMAND_ENV_BYTES
from tests.cp_support import job_id, local_job_ids, module_cluster, rpc
from tests.harness import Cluster, wait_for

pytestmark = pytest.mark.timeout(300)

ISSUE_ARGV = ["echo", *(["\U0001f600" * 30000] * 8)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from module_cluster(tmp_path_factory, "cp-entry-size")


def one_line_failure(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def wait_everywhere(c: Cluster, ids: set[str], timeout_s: float = 60) -> None:
    for m in c.masters:
        wait_for(
            lambda m=m: ids <= set(local_job_ids(m.rpc_addr, c.admin_token)),
            timeout_s,
            f"master-{m.index} to hold {len(ids)} job(s)",
        )


def wide_argv(n_bytes: int, seed: int) -> list[str]:
    """An argv whose msgpack encoding is exactly n_bytes, nearly all of it
    2-, 3- and 4-byte UTF-8, in arguments a command line can carry."""
    chars = "é中😀ß"
    argv = ["true"]
    size = len(msgpack.packb(argv))
    k = seed
    while size < n_bytes - 64:
        arg = "".join(
            chars[(k + i) % len(chars)] for i in range(min(20_000, (n_bytes - size) // 4))
        )
        k += 1
        argv.append(arg)
        size = len(msgpack.packb(argv))
    argv.append("")
    while len(msgpack.packb(argv)) < n_bytes:
        argv[-1] += "a"
    assert len(msgpack.packb(argv)) == n_bytes
    return argv


def test_the_issues_1_mb_submit_is_refused_at_once_and_writes_keep_working(
    cluster: Cluster,
) -> None:
    out = cluster.ctl("submit", "--", *ISSUE_ARGV, check=False, timeout_s=60)
    line = one_line_failure(out)
    assert line == "leptonctl: command and env are 960.0 kB; the limit is 256 KiB", line

    bob = cluster.ctl("token", "create", "--role", "submit", "--name", "bob").stdout.strip()
    done = {cluster.submit("--", "true", token=bob) for _ in range(3)}
    wait_everywhere(cluster, done)
    lead = cluster.wait_leader(30)
    st = cluster.ctl_json("cluster", "status", addr=lead.rpc_addr)
    assert st["has_quorum"] and all(m["connected"] for m in st["members"])


def test_specs_just_under_the_limit_of_non_ascii_bytes_replicate_to_every_master(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Six of them at once: more than one Raft entry holds, so the submit
    # batcher splits them by bytes.
    argvs = [wide_argv(MAX_COMMAND_ENV_BYTES - 1 - len(msgpack.packb({})), s) for s in range(6)]
    lead = cluster.wait_leader(30)

    def submit(i: int) -> str:
        res = rpc(
            lead.rpc_addr,
            cluster.admin_token,
            "submit",
            {"spec": {"argv": argvs[i]}, "rid": f"wide-{i:04d}"},
            timeout_s=30,
        )
        return str(res["id"])

    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(submit, range(6)))
    assert ids == [job_id("admin", f"wide-{i:04d}") for i in range(6)]
    wait_everywhere(cluster, set(ids))
    for jid, argv in zip(ids, argvs, strict=True):
        assert cluster.status(jid)["spec"]["argv"] == argv

    # The state is now larger than one entry: a restore travels in parts.
    path = tmp_path / "state.snap"
    cluster.ctl("snapshot", "save", str(path))
    saved = {r["id"] for r in cluster.ctl_json("jobs", "--all")}
    assert path.stat().st_size > 1024 * 1024
    later = cluster.submit("--", "true")
    out = cluster.ctl("snapshot", "restore", str(path), "--yes")
    assert out.stdout.startswith(f"restored {len(saved)} job(s)"), out.stdout
    for m in cluster.masters:
        wait_for(
            lambda m=m: set(local_job_ids(m.rpc_addr, cluster.admin_token)) == saved,
            60,
            f"master-{m.index} to hold exactly the restored jobs",
        )
    assert later not in saved
    for jid, argv in zip(ids, argvs, strict=True):
        assert cluster.status(jid)["spec"]["argv"] == argv
