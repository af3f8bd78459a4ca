"""Entry size and determinism in the state machine and its proposers.

Limits count bytes of the encoded command and belong to the command's format
version; every command a master proposes fits in one Raft entry (a restore
arrives in parts, a plan is split by job, batches by bytes); apply's sums do
not depend on a process's hash seed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from typing import Any

import msgpack
import pytest

import scheduler as sch
from leptond.batcher import Batcher
from leptond.blocks.manifest import MAX_MANIFEST_BYTES, WorkdirError, check_manifest_size
from leptond.controllers import plan_commands
from raft.commands import (
    BATCH_BUDGET_BYTES,
    COMMAND_VERSION,
    MAX_ENTRY_BYTES,
    encode,
    encoded_size,
)
from raft.state import ClusterState
from raft.validate import MAX_COMMAND_ENV_BYTES, SpecError, validate_spec
from tests.harness import ROOT
from tests.test_state_support import Harness, is_error, records

# The issue's submit: 8 arguments of 30,000 four-byte characters (960 kB).
ISSUE_ARGV = ["echo", *(["\U0001f600" * 30000] * 8)]


def job(job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"id": job_id, "user": "alice", "spec": spec, "submitted_at": 1.0}


def test_a_submit_over_the_limit_is_one_line_in_bytes() -> None:
    with pytest.raises(SpecError) as err:
        validate_spec({"argv": ISSUE_ARGV})
    assert str(err.value) == "command and env are 960.0 kB; the limit is 256 KiB"
    # The env counts with the command; characters are not what counts.
    env = {"DATA": "é" * (MAX_COMMAND_ENV_BYTES // 2)}
    with pytest.raises(SpecError, match=r"^command and env are 262\.2 kB; the limit is 256 KiB$"):
        validate_spec({"argv": ["true"], "env": env})
    just_under = "é" * ((MAX_COMMAND_ENV_BYTES - 64) // 2)
    assert validate_spec({"argv": ["true", just_under]}).argv[1] == just_under


def test_limits_belong_to_the_command_version_so_old_journals_replay_the_same() -> None:
    # Version 1 counted characters: 240,000 of them passed, though they are
    # 960 kB. A journal written then must replay to the same state now.
    old = Harness()
    v1 = msgpack.packb(
        {
            "op": "submit_jobs",
            "v": 1,
            "rid": "old",
            "args": {"jobs": [job("j1", {"argv": ISSUE_ARGV})]},
        },
        use_bin_type=True,
    )
    assert old.raw(v1) == {"results": [{"id": "j1"}]}
    assert old.state.jobs["j1"].spec["argv"] == ISSUE_ARGV
    # The same job in today's format is refused by apply too, not only by the API.
    new = Harness()
    res = new.raw(encode("submit_jobs", {"jobs": [job("j1", {"argv": ISSUE_ARGV})]}))
    assert COMMAND_VERSION >= 2
    assert res["results"][0]["error"]["message"].startswith("command and env are 960.0 kB")
    assert "j1" not in new.state.jobs
    # And version 1 refused what it refused then.
    too_many = {"argv": ["x" * (256 * 1024 + 1)]}
    with pytest.raises(SpecError, match="command line too long"):
        validate_spec(too_many, version=1)


NODE_USAGE = """
import sys
sys.path.insert(0, {root!r})
from tests.test_state_support import Harness
h = Harness()
h.register("n1", gpus=0, cpus=100.0)
cpus = [0.1, 0.2, 0.3, 0.7, 1.1, 2.3, 0.01, 3.7, 0.13]
for i, c in enumerate(cpus):
    h.submit(f"j{{i}}", cpus=c)
h.plan([(f"j{{i}}.0", "n1", []) for i in range(len(cpus))])
print(repr(h.state.node_usage("n1")[1]))
"""


def test_node_usage_sums_in_a_defined_order_whatever_the_hash_seed() -> None:
    script = NODE_USAGE.format(root=str(ROOT))
    seen = set()
    for seed in range(12):
        env = dict(os.environ, PYTHONHASHSEED=str(seed))
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        seen.add(out.stdout.strip())
    cpus = [0.1, 0.2, 0.3, 0.7, 1.1, 2.3, 0.01, 3.7, 0.13]
    in_id_order = 0.0
    for i in sorted(range(len(cpus)), key=lambda i: f"j{i}.0"):
        in_id_order += cpus[i]
    assert seen == {repr(in_id_order)}


def restore_parts(snapshot: bytes, step: int, rid: str = "r1") -> list[dict[str, Any]]:
    chunks = [snapshot[i : i + step] for i in range(0, len(snapshot), step)]
    digest = hashlib.sha256(snapshot).hexdigest()
    return [
        {"id": rid, "part": i, "parts": len(chunks), "sha256": digest, "data": c}
        for i, c in enumerate(chunks)
    ]


def filled(n_jobs: int) -> Harness:
    h = Harness()
    h.register("n1")
    for i in range(n_jobs):
        h.submit(f"src{i}", argv=["python", "-c", "x" * 2000])
    return h


def test_a_restore_in_parts_replaces_the_state_once_the_last_part_applies() -> None:
    source = filled(40)
    snap = source.state.snapshot()
    target = Harness()
    target.register("other")
    target.submit("mine")
    parts = restore_parts(snap, 10_000)
    assert len(parts) > 5
    for p in parts[:-1]:
        res = target.ok("restore", p)
        assert res["received"] == p["part"] + 1
        assert "mine" in target.state.jobs  # nothing replaced yet

    # A replica that installs a snapshot taken mid-restore finishes the same way.
    replica = ClusterState()
    replica.restore(target.state.snapshot())
    res = target.ok("restore", parts[-1])
    assert res == {"jobs": 40, "nodes": 1}
    assert replica.apply(encode("restore", parts[-1]), 10_000) == res
    assert records(replica) == records(target.state) == records(source.state)
    assert target.state.restoring is None


def test_restore_parts_out_of_order_or_not_adding_up_change_nothing() -> None:
    snap = filled(10).state.snapshot()
    h = Harness()
    h.submit("mine")
    parts = restore_parts(snap, 4_000)
    res = h.cmd("restore", parts[1])
    assert is_error(res, "conflict") and "out of order" in res["error"]["message"]
    h.ok("restore", parts[0])
    res = h.cmd("restore", parts[2])
    assert is_error(res, "conflict")
    # A part of another restore does not mix in.
    other = restore_parts(filled(3).state.snapshot(), 4_000, rid="r2")
    assert is_error(h.cmd("restore", dict(other[1], id="r1")), "conflict")
    # Parts that do not add up to the announced checksum restore nothing.
    bad = restore_parts(snap, 4_000)
    bad[-1] = dict(bad[-1], data=bad[-1]["data"][:-1] + b"?")
    for p in bad[:-1]:
        h.ok("restore", p)
    res = h.cmd("restore", bad[-1])
    assert is_error(res, "bad_request") and "do not add up" in res["error"]["message"]
    assert set(h.state.jobs) == {"mine"} and h.state.restoring is None


def test_a_plan_of_100000_placements_commits_in_parts_each_within_one_entry() -> None:
    h = Harness()
    nodes = 12_500  # 8 GPUs each: 100,000 one-GPU tasks
    batch: list[dict[str, Any]] = []
    for n in range(nodes):
        h.register(f"node-{n:05d}", gpus=8, cpus=64.0)
    for i in range(100_000):
        batch.append(job(f"j{i:06d}", {"argv": ["train"], "gpus": 1, "cpus": 1}))
        if len(batch) == 5000:
            h.ok("submit_jobs", {"jobs": batch})
            batch = []
    # Gangs of 4 ranks on 4 distinct nodes must stay whole in one part.
    gang_nodes = [f"gang-{g}" for g in range(4)]
    for n in gang_nodes:
        h.register(n, gpus=8, cpus=64.0)
    h.submit("gang", nodes=4, gpus=8)
    placements = [
        sch.Placement(f"j{i:06d}.0", f"node-{i // 8:05d}", (i % 8,)) for i in range(100_000)
    ]
    placements[50_000:50_000] = [
        sch.Placement(f"gang.{r}", gang_nodes[r], tuple(range(8))) for r in range(4)
    ]
    plan = sch.Plan(tuple(placements), (), {})
    parts = plan_commands(plan, h.now)
    whole = sum(len(p["placements"]) for p in parts)
    assert whole == 100_004 and len(parts) > 1
    assert encoded_size([p for args in parts for p in args["placements"]]) > MAX_ENTRY_BYTES
    placed: list[str] = []
    for args in parts:
        data = encode("plan", args)
        assert len(data) <= MAX_ENTRY_BYTES
        ranks = {p["task_id"] for p in args["placements"] if p["task_id"].startswith("gang.")}
        assert ranks in (set(), {f"gang.{r}" for r in range(4)})
        res = h.raw(data)
        assert res["dropped"] == []
        placed += res["placed"]
    assert len(placed) == 100_004 and not h.state.pending


def test_batches_are_split_by_encoded_bytes() -> None:
    async def go() -> list[list[int]]:
        flushed: list[list[int]] = []

        async def flush(items: list[bytes]) -> list[int]:
            flushed.append([len(x) for x in items])
            return [len(x) for x in items]

        b: Batcher[bytes, int] = Batcher(
            flush, max_batch=1000, size_of=encoded_size, max_bytes=BATCH_BUDGET_BYTES
        )
        b.start()
        items = [os.urandom(300 * 1024) for _ in range(7)] + [b"small"] * 3
        try:
            results = await asyncio.gather(*(b.submit(x) for x in items))
        finally:
            await b.close()
        assert results == [len(x) for x in items]
        return flushed

    flushed = asyncio.run(go())
    assert sum(len(f) for f in flushed) == 10
    for sizes in flushed:
        assert sum(s + 5 for s in sizes) <= BATCH_BUDGET_BYTES
    assert len(flushed) >= 3


def test_a_largest_manifest_fits_in_one_entry() -> None:
    def manifest(n: int) -> dict[str, Any]:
        return {"v": 1, "block_size": 1, "files": [], "links": [], "dirs": ["d" * n]}

    n = MAX_MANIFEST_BYTES - encoded_size(manifest(0))
    n -= encoded_size(manifest(n)) - MAX_MANIFEST_BYTES  # the str header grew
    largest = manifest(n)
    assert encoded_size(largest) == MAX_MANIFEST_BYTES
    check_manifest_size(largest)  # type: ignore[arg-type]
    with pytest.raises(WorkdirError, match="the limit is 1000 KiB"):
        check_manifest_size(manifest(n + 1))  # type: ignore[arg-type]
    data = encode("put_manifest", {"id": "f" * 64, "manifest": largest})
    assert len(data) <= MAX_ENTRY_BYTES
