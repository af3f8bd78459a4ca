"""The cheaper ways apply and snapshots encode give the answers of the plain ones.

- A record packs to the same bytes from `wire_fields` (its own lists and
  maps) as from `to_wire` (copies), so snapshots are byte for byte the same.
- `commands.packb` (one Packer per thread) gives msgpack.packb's bytes and
  errors, also right after a pack that failed halfway.
- A small spec skips the per-part size checks: what no encoded size bounds
  (gpu_type's bytes, the count of constraints) is still refused.
- A job's spec is encoded once for the per-user pending caps: a job id that
  comes back after gc with another spec, or a restore, weighs what its own
  spec does.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from raft.commands import packb
from raft.model import Job, JoinToken, Node, NodeCredential, Task, Token, UsageDay
from raft.state import ClusterState
from raft.validate import SpecError, spec_bytes, validate_stored_spec
from tests.test_state_support import Harness, is_error, node_record


def plain_pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


RECORDS = [
    Node(
        id="n1",
        name="n1",
        addr="10.0.0.1:7441",
        cpus=64.0,
        mem_bytes=1 << 40,
        gpus=[{"index": 0, "uuid": "GPU-0", "model": "A100", "mem_bytes": 80 << 30, "domain": 0}],
        labels={"zone": "a"},
        gpu_faults=[{"index": 1, "reason": "xid 79", "at": 5.0}],
        admin_labels={"admin/rack": "r1"},
        drain_reason="maintenance",
        drain_deadline=99.5,
    ),
    Job(
        id="j1",
        name="train",
        user="alice",
        spec={"argv": ["python", "train.py"], "env": {"A": "é"}, "array": [[0, 9, 1]]},
        submitted_at=1.0,
        tasks=["j1.0", "j1.1"],
        waiting_on=["j0"],
        gpu_s=3.5,
    ),
    Task(id="j1.0", job_id="j1", rank=0, state="running", node_id="n1", gpus=[0, 3]),
    Token(id="t1", name="alice", role="submit", sealed=b"\x00\xff", created_at=1.0),
    JoinToken(id="jt", sealed=b"k", created_at=1.0, created_by="root", nodes=["n1", "n2"]),
    NodeCredential(id="k1", node_id="n1", sealed=b"s", issued_at=2.0, join_token="jt"),
    UsageDay(user="alice", day=19000, gpu_s=1.0, jobs={"succeeded": 2}),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_a_record_packs_the_same_from_its_own_fields_as_from_a_copy(record: Any) -> None:
    fields = record.wire_fields()
    assert fields == record.to_wire()
    assert list(fields) == list(record.to_wire())  # the same order: the same bytes
    assert plain_pack(fields) == plain_pack(record.to_wire())


def test_a_snapshot_is_the_same_bytes_as_packing_copies_of_each_record() -> None:
    h = Harness()
    h.register("n1", gpus=2)
    h.submit("j1", gpus=1, env={"K": "v"})
    h.run("j1.0", "n1", [0])
    data = h.state.snapshot()
    snap = msgpack.unpackb(data, raw=False, strict_map_key=False)
    for key, recs in (("nodes", h.state.nodes), ("jobs", h.state.jobs), ("tasks", h.state.tasks)):
        assert snap[key] == [r.to_wire() for r in recs.values()]
    # Restoring and snapshotting again gives the very same bytes.
    again = ClusterState()
    again.restore(data)
    assert again.snapshot() == data


@pytest.mark.parametrize(
    "bad",
    [{"a": ["x", "\ud800"]}, [1, object()], [2**70], {"k": float("nan"), "z": {1: set()}}],
    ids=["surrogate", "object", "too-big-int", "set"],
)
def test_packb_gives_msgpacks_bytes_and_errors_also_after_a_failed_pack(bad: Any) -> None:
    with pytest.raises(Exception) as theirs:
        plain_pack(bad)
    with pytest.raises(type(theirs.value)):
        packb(bad)
    # Nothing of the failed pack is left in the Packer's buffer.
    for value in ({"op": "noop", "v": 5, "args": {}}, [1, 2.5, None, b"\x00"], "é" * 300):
        assert packb(value) == plain_pack(value)


def test_packb_packs_large_values_and_small_ones_after_them() -> None:
    big = ["x" * (3 << 20)]  # more than an entry: its Packer is let go
    assert packb(big) == plain_pack(big)
    assert packb({"a": 1}) == plain_pack({"a": 1})


def test_a_small_spec_still_has_its_gpu_type_bytes_and_constraint_count_checked() -> None:
    # 33 characters of two bytes each: within 64 characters, over 64 bytes.
    with pytest.raises(SpecError, match="gpu_type"):
        validate_stored_spec({"argv": ["x"], "gpu_type": "ü" * 33})
    _, stored = validate_stored_spec({"argv": ["x"], "gpu_type": "ü" * 32})
    assert stored["gpu_type"] == "ü" * 32
    many = {f"k{i}": "" for i in range(257)}
    with pytest.raises(SpecError, match="at most 256 constraints"):
        validate_stored_spec({"argv": ["x"], "constraints": many})


def test_a_spec_near_the_limits_is_checked_part_by_part() -> None:
    # Over the smallest part limit as a whole, every part within its own:
    # stored as the small path stores it.
    argv = ["x" * 2000]
    spec, stored = validate_stored_spec({"argv": argv, "constraints": {"a": "v" * 1000}})
    assert stored["argv"] == argv and spec.constraints == {"a": "v" * 1000}
    with pytest.raises(SpecError, match="constraints: value of a is over 1 KiB"):
        validate_stored_spec({"argv": argv, "constraints": {"a": "v" * 1100}})
    with pytest.raises(SpecError, match="command cannot be encoded"):
        validate_stored_spec({"argv": ["\ud800"]})


def caps_job(jid: str, argv: list[str]) -> dict[str, Any]:
    return {
        "id": jid,
        "user": "alice",
        "spec": {"argv": argv},
        "submitted_at": 1.0,
        "caps": [10, 0],
    }


def test_a_job_id_back_after_gc_with_another_spec_weighs_its_own_spec() -> None:
    h = Harness()
    small, large = ["true"], ["python", "x" * 5000]
    assert h.ok("submit_jobs", {"jobs": [caps_job("j1", small)]})["results"] == [{"id": "j1"}]
    h.ok("cancel_job", {"job_id": "j1", "admin": True})
    assert "alice" not in h.state.user_pending
    h.ok("gc_jobs", {"before": h.now + 10})
    assert "j1" not in h.state.jobs
    assert "j1" not in h.state.spec_sizes  # forgotten with the job: bounded by the jobs
    assert h.ok("submit_jobs", {"jobs": [caps_job("j1", large)]})["results"] == [{"id": "j1"}]
    assert h.state.user_pending["alice"] == (1, spec_bytes(h.state.jobs["j1"].spec))
    # When it leaves pending, exactly its own weight goes.
    h.register("n1")
    h.plan([("j1.0", "n1", [])])
    assert "alice" not in h.state.user_pending


def test_after_a_restore_each_job_weighs_its_own_spec() -> None:
    # The same job ids with other specs in the snapshot restored.
    h, other = Harness(), Harness()
    h.ok("submit_jobs", {"jobs": [caps_job("j1", ["true"]), caps_job("j2", ["true"])]})
    other.ok("submit_jobs", {"jobs": [caps_job("j1", ["a" * 300]), caps_job("j2", ["b" * 900])]})
    h.state.restore(other.state.snapshot())
    assert dict(h.state.user_pending) == dict(other.state.user_pending)
    h.register("n1")
    h.plan([("j2.0", "n1", [])])
    assert h.state.user_pending["alice"] == (1, spec_bytes(h.state.jobs["j1"].spec))
    r = h.cmd("submit_jobs", {"jobs": [dict(caps_job("j3", ["b"]), caps=[1, 0])]})
    assert is_error(r["results"][0], "pending_limit")


def test_register_node_keeps_the_gpus_and_labels_it_validated() -> None:
    h = Harness()
    rec = node_record("n1", gpus=2)
    rec["labels"] = {"zone": "a", "admin/rack": "claimed"}
    h.ok("register_node", {"node": rec})
    node = h.state.nodes["n1"]
    assert node.labels == {"zone": "a"}  # a host's claim to an admin label is dropped
    assert [g["index"] for g in node.gpus] == [0, 1]
    assert list(node.gpus[0]) == ["index", "uuid", "model", "mem_bytes", "domain"]
    dup = node_record("n2", gpus=2)
    dup["gpus"][1]["index"] = 0
    r = h.cmd("register_node", {"node": dup})
    assert is_error(r, "bad_request") and "distinct" in r["error"]["message"]
