"""The command boundary of ClusterState: bad bytes, bad arguments, duplicate
request ids, snapshots and restores, and job spec validation (DESIGN §4)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from raft.commands import COMMAND_VERSION, encode
from raft.state import ClusterState
from raft.validate import SpecError, validate_spec
from tests.test_state_support import (
    Harness,
    check_invariants,
    indexes,
    is_error,
    node_record,
    same_records,
)


def busy_cluster() -> Harness:
    """A cluster with a bit of everything: nodes in each state, jobs in each state."""
    h = Harness()
    for n in ("n1", "n2", "n3"):
        h.register(n)
    h.submit("done")
    h.run("done.0", "n1", [])
    h.event("done.0", "exited", 0)
    h.submit("running", gpus=2)
    h.run("running.0", "n1", [0, 1])
    h.submit("gang", gpus=1, nodes=2, retries=2)
    assert h.plan([("gang.0", "n1", [2]), ("gang.1", "n2", [0])])["placed"]
    h.submit("waiting", gpus=8)
    h.submit("stopping", gpus=1)
    h.run("stopping.0", "n2", [1])
    h.ok("cancel_job", {"job_id": "stopping", "user": "alice"})
    h.ok("node_state", {"node_id": "n3", "state": "draining", "reason": "maintenance"})
    h.ok("token_create", {"id": "t1", "name": "ci", "role": "submit", "sealed": b"\x01\x02"})
    h.ok("member_info", {"raft_addr": "m1:7442", "rpc_addr": "m1:7441"})
    h.ok("put_manifest", {"id": "m1", "manifest": {"files": [["a.py", "abc"]]}})
    check_invariants(h.state)
    return h


# -- bad commands -------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def cmd(op: str, args: Any, v: int = COMMAND_VERSION, rid: str = "r-bad") -> bytes:
    return pack({"op": op, "v": v, "rid": rid, "args": args})


BAD_BYTES = {
    "not msgpack": b"\xc1\xc1\xc1",
    "truncated": encode("noop", {})[:-3],
    "trailing bytes": encode("noop", {}) + b"\x00",
    "not a map": pack([1, 2, 3]),
    "no op": pack({"v": 1, "rid": "x", "args": {}}),
    "unknown op": cmd("drop_tables", {}),
    "private method as op": cmd("_reindex", {}),
    "future version": cmd("noop", {}, v=COMMAND_VERSION + 1),
    "bool version": pack({"op": "noop", "v": True, "rid": "x", "args": {}}),
    "no request id": pack({"op": "noop", "v": 1, "args": {}}),
    "args not a map": cmd("noop", [1]),
}

BAD_ARGS = {
    "register without node": cmd("register_node", {"now": 1.0}),
    "register with string cpus": cmd(
        "register_node", {"now": 1.0, "node": node_record("n9", cpus="lots")}
    ),
    "re-register with string cpus": cmd(
        "register_node",
        {
            "now": 1.0,
            "node": {**node_record("n1"), "name": "renamed", "addr": "x:1", "cpus": "many"},
        },
    ),
    "register with nan cpus": cmd(
        "register_node", {"now": 1.0, "node": node_record("n9", cpus=float("nan"))}
    ),
    "re-register with negative memory": cmd(
        "register_node", {"now": 1.0, "node": node_record("n1", mem_bytes=-1)}
    ),
    "register with memory beyond 64 bits": cmd(
        "register_node", {"now": 1.0, "node": node_record("n9", mem_bytes=1e300)}
    ),
    "exit code beyond 64 bits": cmd(
        "task_events",
        {
            "events": [
                {"task_id": "gang.0", "attempt": 1, "state": "exited", "exit_code": 1e300, "at": 1}
            ]
        },
    ),
    "node id not a string": cmd("register_node", {"now": 1.0, "node": node_record(7)}),  # type: ignore[arg-type]
    "node_state without now": cmd("node_state", {"node_id": "n3", "state": "ready"}),
    "node_state bad state": cmd("node_state", {"node_id": "n1", "state": "gone", "now": 1.0}),
    "node_down unknown": cmd("node_down", {"node_id": "zz", "now": 1.0}),
    "drain with a text deadline": cmd(
        "node_state", {"node_id": "n1", "state": "draining", "deadline": "soon", "now": 1.0}
    ),
    "drain with an infinite deadline": cmd(
        "node_state",
        {"node_id": "n1", "state": "draining", "deadline": float("inf"), "now": 1.0},
    ),
    "undrain with a deadline": cmd(
        "node_state", {"node_id": "n3", "state": "ready", "deadline": 5.0, "now": 1.0}
    ),
    "drain_expired without now": cmd("drain_expired", {"node_id": "n3"}),
    "drain_expired unknown node": cmd("drain_expired", {"node_id": "zz", "now": 1.0}),
    "re-register with a GPU index twice": cmd(
        "register_node",
        {
            "now": 1.0,
            "node": {**node_record("n1"), "gpus": [{"index": 0}, {"index": 1}, {"index": 0}]},
        },
    ),
    "submit jobs not a list": cmd("submit_jobs", {"jobs": 5}),
    "cancel with list id": cmd("cancel_job", {"job_id": ["waiting"], "now": 1.0}),
    "cancel without now": cmd("cancel_job", {"job_id": "waiting", "user": "alice"}),
    "gc with string cutoff": cmd("gc_jobs", {"before": "yesterday"}),
    "plan with a placement lacking gpus": cmd(
        "plan",
        {
            "now": 1.0,
            "preemptions": [{"task_id": "running.0"}],
            "placements": [
                {"task_id": "waiting.0", "node_id": "n2", "gpus": [2, 3, 4, 5, 6, 7]},
                {"task_id": "gang.0", "node_id": "n2"},
            ],
        },
    ),
    "plan with gpus not a list of ints": cmd(
        "plan",
        {
            "now": 1.0,
            "placements": [{"task_id": "waiting.0", "node_id": "n2", "gpus": [[0]]}],
        },
    ),
    "plan with a malformed preemption": cmd(
        "plan",
        {"now": 1.0, "preemptions": [{"task_id": "running.0"}, "gang.0"]},
    ),
    "events with a malformed second event": cmd(
        "task_events",
        {
            "events": [
                {"task_id": "gang.0", "attempt": 1, "state": "running", "at": 1.0},
                {"task_id": "running.0", "attempt": "one", "state": "exited", "at": 1.0},
            ]
        },
    ),
    "events with a bad exit code": cmd(
        "task_events",
        {
            "events": [
                {"task_id": "gang.1", "attempt": 1, "state": "running", "at": 1.0},
                {"task_id": "gang.0", "attempt": 1, "state": "exited", "exit_code": "x", "at": 1},
            ]
        },
    ),
    "token with bad role": cmd(
        "token_create", {"id": "t2", "name": "x", "role": "god", "sealed": b"", "now": 1.0}
    ),
    "token sealed as text": cmd(
        "token_create", {"id": "t2", "name": "x", "role": "read", "sealed": "s", "now": 1.0}
    ),
    "restore with text": cmd("restore", {"state": "snapshot"}),
    "infinite attempt": cmd(
        "task_events",
        {"events": [{"task_id": "gang.0", "attempt": float("inf"), "state": "running", "at": 1}]},
    ),
}


@pytest.mark.parametrize("data", BAD_BYTES.values(), ids=BAD_BYTES.keys())
def test_undecodable_command_is_an_error_value_and_changes_no_records(data: bytes) -> None:
    h = busy_cluster()
    before = h.state.snapshot()
    result = h.raw(data)
    assert is_error(result, "bad_command") or is_error(result, "unknown_op")
    assert "\n" not in result["error"]["message"]
    assert same_records(before, h.state)


@pytest.mark.parametrize("data", BAD_ARGS.values(), ids=BAD_ARGS.keys())
def test_command_with_bad_arguments_is_an_error_value_and_changes_no_records(data: bytes) -> None:
    h = busy_cluster()
    before = h.state.snapshot()
    result = h.raw(data)
    assert is_error(result)
    assert result["error"]["code"] in ("bad_command", "bad_request", "not_found"), result
    assert "\n" not in result["error"]["message"]
    assert same_records(before, h.state)
    check_invariants(h.state)


def test_a_submit_batch_with_one_malformed_job_still_takes_the_good_ones() -> None:
    h = Harness()
    good = {"id": "ok", "user": "alice", "spec": {"argv": ["true"]}, "submitted_at": 1.0}
    result = h.ok(
        "submit_jobs",
        {
            "jobs": [
                good,
                {"id": "no-spec", "user": "alice", "submitted_at": 1.0},
                "not a job",
                {**good, "id": "bad", "spec": {"argv": ["true"], "gpus": -1}},
            ]
        },
    )["results"]
    assert result[0] == {"id": "ok"}
    assert [is_error(r, "bad_command") for r in result] == [False, True, True, False]
    assert is_error(result[3], "bad_request")
    assert result[3]["error"]["message"] == "gpus must be between 0 and 1024, got -1"
    assert sorted(h.state.jobs) == ["ok"]


def test_submit_with_unknown_workdir_manifest_is_refused() -> None:
    h = Harness()
    job = {"id": "j", "user": "a", "spec": {"argv": ["x"], "workdir": "m9"}, "submitted_at": 1.0}
    [result] = h.ok("submit_jobs", {"jobs": [job]})["results"]
    assert is_error(result, "bad_request")
    assert not h.state.jobs
    h.ok("put_manifest", {"id": "m9", "manifest": {}, "user": "a"})
    assert h.ok("submit_jobs", {"jobs": [job]})["results"] == [{"id": "j"}]


# -- request ids --------------------------------------------------------------------------


def test_duplicate_request_id_returns_the_first_result_and_applies_once() -> None:
    h = Harness()
    h.register("n1")
    job = {"id": "j1", "user": "alice", "spec": {"argv": ["x"]}, "submitted_at": 1.0}
    first = h.ok("submit_jobs", {"jobs": [job]}, rid="rid-1")
    # The same request id, even with other content, is the same request.
    again = h.ok("submit_jobs", {"jobs": [{**job, "id": "j2"}]}, rid="rid-1")
    assert again == first
    assert sorted(h.state.jobs) == ["j1"]

    plan = encode(
        "plan",
        {"now": 5.0, "placements": [{"task_id": "j1.0", "node_id": "n1", "gpus": []}]},
        "p1",
    )
    assert h.raw(plan)["placed"] == ["j1.0"]
    assert h.raw(plan)["placed"] == ["j1.0"]
    assert h.task("j1.0").attempt == 1

    ev = {"task_id": "j1.0", "attempt": 1, "state": "exited", "exit_code": 1, "at": 6.0}
    events = encode("task_events", {"events": [ev]}, "e1")
    assert h.raw(events) == {"applied": 1, "stale": 0}
    assert h.raw(events) == {"applied": 1, "stale": 0}
    assert h.task("j1.0").state == "failed"


def test_an_error_result_is_remembered_too() -> None:
    h = Harness()
    first = h.cmd("cancel_job", {"job_id": "j1", "user": "alice"}, rid="c1")
    assert is_error(first, "not_found")
    h.submit("j1")
    assert h.cmd("cancel_job", {"job_id": "j1", "user": "alice"}, rid="c1") == first
    assert h.job("j1").state == "pending"


def test_request_ids_survive_a_snapshot() -> None:
    h = busy_cluster()
    h.ok("noop", {}, rid="kept")
    restored = ClusterState()
    restored.restore(h.state.snapshot())
    assert restored.apply(encode("node_down", {"node_id": "n1", "now": 9.0}, "kept"), 999) == {
        "ok": True
    }
    assert restored.nodes["n1"].state == "ready"


# -- snapshots ----------------------------------------------------------------------------


def test_snapshot_and_restore_give_the_same_snapshot_and_indexes() -> None:
    h = busy_cluster()
    data = h.state.snapshot()
    restored = ClusterState()
    restored.restore(data)
    assert restored.snapshot() == data
    assert indexes(restored) == indexes(h.state)
    assert restored.applied_index == h.state.applied_index
    assert restored.node_assignments("n1") == h.state.node_assignments("n1")
    # Both go on to the same future.
    for s in (h.state, restored):
        s.apply(encode("node_down", {"node_id": "n1", "now": 50.0}, "d1"), 500)
    assert restored.snapshot() == h.state.snapshot()


def test_apply_restore_replaces_the_state_but_keeps_request_ids() -> None:
    source = busy_cluster()
    h = Harness()
    h.register("other")
    h.ok("noop", {}, rid="mine")
    result = h.ok("restore", {"state": source.state.snapshot()})
    assert result == {"jobs": len(source.state.jobs), "nodes": 3}
    assert sorted(h.state.nodes) == ["n1", "n2", "n3"]
    assert indexes(h.state) == indexes(source.state)
    assert "mine" in h.state.recent
    check_invariants(h.state)


BAD_SNAPSHOTS = {
    "not msgpack": b"\xc1",
    "not a map": pack([]),
    "future version": pack({"v": 99}),
    "no nodes": pack({"v": 1, "jobs": [], "tasks": [], "tokens": [], "members": [], "recent": []}),
    "node without fields": pack(
        {
            "v": 1,
            "nodes": [{"id": "x"}],
            "jobs": [],
            "tasks": [],
            "tokens": [],
            "members": [],
            "recent": [],
        }
    ),
    "recent not pairs": pack(
        {"v": 1, "nodes": [], "jobs": [], "tasks": [], "tokens": [], "members": [], "recent": [1]}
    ),
    "bad applied index": pack(
        {
            "v": 1,
            "nodes": [],
            "jobs": [],
            "tasks": [],
            "tokens": [],
            "members": [],
            "recent": [],
            "applied_index": "ten",
        }
    ),
}


@pytest.mark.parametrize("data", BAD_SNAPSHOTS.values(), ids=BAD_SNAPSHOTS.keys())
def test_restore_of_a_bad_snapshot_is_an_error_and_leaves_state_untouched(data: bytes) -> None:
    h = busy_cluster()
    before = h.state.snapshot()
    result = h.cmd("restore", {"state": data})
    assert is_error(result)
    assert same_records(before, h.state)
    assert indexes(h.state) == indexes(busy_cluster().state)


@pytest.mark.parametrize("data", BAD_SNAPSHOTS.values(), ids=BAD_SNAPSHOTS.keys())
def test_restore_method_raises_value_error_on_a_bad_snapshot(data: bytes) -> None:
    with pytest.raises(ValueError, match="snapshot"):
        ClusterState().restore(data)


# -- job spec validation ----------------------------------------------------------------------


def test_minimal_spec_gets_the_defaults() -> None:
    spec = validate_spec({"argv": ["python", "-c", "pass"]})
    assert (spec.gpus, spec.cpus, spec.mem_bytes, spec.nodes, spec.retries) == (0, 1.0, 0, 1, 0)
    assert spec.preemptible is True


BAD_SPECS = {
    "no argv": ({}, "a job needs a command: give it after --"),
    "empty argv": ({"argv": []}, "a job needs a command: give it after --"),
    "argv not strings": ({"argv": ["x", 1]}, "a job needs a command: give it after --"),
    "empty program": ({"argv": [""]}, "command contains an empty program name or a NUL byte"),
    "negative gpus": ({"gpus": -1}, "gpus must be between 0 and 1024, got -1"),
    "absurd gpus": ({"gpus": 100_000}, "gpus must be between 0 and 1024, got 100000"),
    "fractional gpus": ({"gpus": 1.5}, "gpus must be a whole number, got 1.5"),
    "zero cpus": ({"cpus": 0}, "cpus must be between 0.01 and 4096, got 0"),
    "negative cpus": ({"cpus": -2.0}, "cpus must be between 0.01 and 4096, got -2"),
    "nan cpus": ({"cpus": float("nan")}, "cpus must be between 0.01 and 4096, got nan"),
    "negative memory": ({"mem_bytes": -1}, "mem_bytes must be between 0 and 7.03687e+13, got -1"),
    "absurd memory": (
        {"mem_bytes": 1 << 50},
        "mem_bytes must be between 0 and 7.03687e+13, got 1.1259e+15",
    ),
    "zero nodes": ({"nodes": 0}, "nodes must be between 1 and 1024, got 0"),
    "string gpus": ({"gpus": "2"}, "gpus must be a number, got '2'"),
    "bool gpus": ({"gpus": True}, "gpus must be a number, got True"),
    "too many retries": ({"retries": 101}, "retries must be between 0 and 100, got 101"),
    "unknown fields": ({"gpu": 1, "memory": 2}, "unknown job field(s): gpu, memory"),
    "bad env name": ({"env": {"1X": "y"}}, "env: '1X' is not a valid environment variable name"),
    "env value not text": ({"env": {"X": 1}}, "env: value of X must be a string"),
    "spread not bool": ({"spread": 1}, "spread must be true or false"),
    "zero time limit": (
        {"time_limit_s": 0},
        "time_limit_s must be between 1 and 3.16224e+07, got 0",
    ),
}


@pytest.mark.parametrize(("patch", "message"), BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_job_spec_is_refused_with_one_line(patch: dict[str, Any], message: str) -> None:
    spec = {"argv": ["python", "train.py"], **patch}
    if "argv" in patch or patch == {}:
        spec = dict(patch)
    with pytest.raises(SpecError) as err:
        validate_spec(spec)
    assert str(err.value) == message


def test_huge_integer_is_a_spec_error_not_a_crash() -> None:
    # JSON from the HTTP API can carry integers far beyond a float.
    with pytest.raises(SpecError, match="gpus must be between"):
        validate_spec({"argv": ["x"], "gpus": 10**400})
