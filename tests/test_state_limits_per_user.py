"""Apply's side of the per-user rules (command format 3): a submit may use only
its own user's workdir manifest, each user's waiting jobs are capped by what
the proposer put in the command, and a host's registration is bounded.

Pure: ClusterState driven through encoded commands, as the Raft shell does.
Every rule holds at apply, not only in the API, and replays the same way
from an older journal.
"""

from __future__ import annotations

from typing import Any

import msgpack

from raft.state import ClusterState
from raft.validate import MAX_NODE_GPUS, spec_bytes
from tests.test_state_support import Harness, is_error, node_record


def job(jid: str, user: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("argv", ["true"])
    return {"id": jid, "user": user, "spec": spec, "submitted_at": 1.0}


def submit(h: Harness, *jobs: dict[str, Any]) -> list[Any]:
    return list(h.ok("submit_jobs", {"jobs": list(jobs)})["results"])


def test_a_submit_may_use_only_its_own_users_manifest() -> None:
    h = Harness()
    h.ok("put_manifest", {"id": "m1", "manifest": {"files": []}, "user": "alice"})
    [mine] = submit(h, job("a1", "alice", workdir="m1"))
    [theirs] = submit(h, job("b1", "bob", workdir="m1"))
    assert mine == {"id": "a1"}
    # The same words as for a manifest that does not exist: no probe.
    assert is_error(theirs, "bad_request") and "not known" in theirs["error"]["message"]
    assert "b1" not in h.state.jobs
    # An admin's submit (the proposer says so) may use any.
    assert submit(h, dict(job("x1", "root", workdir="m1"), admin=True)) == [{"id": "x1"}]
    # The same content committed by bob too: one manifest, two owners.
    h.ok("put_manifest", {"id": "m1", "manifest": {"files": []}, "user": "bob"})
    assert h.state.manifest_owners["m1"] == ("alice", "bob")
    assert submit(h, job("b2", "bob", workdir="m1")) == [{"id": "b2"}]


def test_an_older_journal_replays_submits_without_the_owner_check() -> None:
    h = Harness()
    h.ok("put_manifest", {"id": "m1", "manifest": {}})  # no user: written before owners
    old = msgpack.packb(
        {
            "op": "submit_jobs",
            "v": 2,
            "rid": "old",
            "args": {"jobs": [job("j1", "bob", workdir="m1")]},
        },
        use_bin_type=True,
    )
    assert h.raw(old) == {"results": [{"id": "j1"}]}
    [now] = submit(h, job("j2", "bob", workdir="m1"))
    assert is_error(now, "bad_request")


def test_owners_survive_a_snapshot_and_go_with_the_manifest() -> None:
    h = Harness()
    h.ok("put_manifest", {"id": "m1", "manifest": {}, "user": "alice"})
    submit(h, job("a1", "alice", workdir="m1"))
    copy = ClusterState()
    copy.restore(h.state.snapshot())
    assert copy.manifest_owners["m1"] == ("alice",)
    h.ok("cancel_job", {"job_id": "a1", "admin": True})
    h.ok("gc_jobs", {"before": h.now + 10})
    assert "m1" not in h.state.manifests and "m1" not in h.state.manifest_owners


def test_waiting_jobs_are_capped_per_user_at_apply() -> None:
    h = Harness()
    caps = [3, 0]
    results = submit(h, *(dict(job(f"j{i}", "erin"), caps=caps) for i in range(5)))
    assert [r.get("id") for r in results[:3]] == ["j0", "j1", "j2"]
    assert all(is_error(r, "pending_limit") for r in results[3:])
    assert h.state.user_pending["erin"][0] == 3
    # Another user has a cap of their own; no caps at all (an admin) is no cap.
    assert submit(h, dict(job("k0", "frank"), caps=caps)) == [{"id": "k0"}]
    assert submit(h, job("r0", "erin")) == [{"id": "r0"}]
    # Leaving `pending` (a cancel, a placement) makes room.
    h.ok("cancel_job", {"job_id": "j0", "user": "erin"})
    h.register("n1", gpus=0)
    h.plan([("j1.0", "n1", [])])
    assert h.state.user_pending["erin"][0] == 2  # j2 and r0
    assert submit(h, dict(job("j5", "erin"), caps=caps)) == [{"id": "j5"}]


def test_spec_bytes_are_capped_per_user_and_rebuilt_on_restore() -> None:
    h = Harness()
    big = ["true", "x" * 100_000]
    size = spec_bytes(job_spec(big))
    caps = [0, 2 * size + 10]
    results = submit(h, *(dict(job(f"j{i}", "frank", argv=big), caps=caps) for i in range(3)))
    assert [is_error(r, "pending_limit") for r in results] == [False, False, True]
    assert "bytes of specs" in results[2]["error"]["message"]
    copy = ClusterState()
    copy.restore(h.state.snapshot())
    assert copy.user_pending == h.state.user_pending
    assert copy.user_pending["frank"] == (2, 2 * size)


def job_spec(argv: list[str]) -> dict[str, Any]:
    from raft.validate import stored_spec, validate_spec

    return stored_spec(validate_spec({"argv": argv}))


def test_a_registration_is_bounded_and_admin_labels_are_the_admins() -> None:
    h = Harness()
    for bad in (
        node_record("n1", gpus=MAX_NODE_GPUS + 1),
        node_record("n1", cpus=1e6),
        node_record("n1", mem_bytes=1 << 62),
        node_record("n1", labels={f"k{i}": "v" for i in range(100)}),
        node_record("n1", labels={"zone": "a" * 1000}),
        node_record("n1", name="x" * 300),
    ):
        assert is_error(h.cmd("register_node", {"node": bad}), "bad_request")
        assert "n1" not in h.state.nodes
    h.ok("register_node", {"node": node_record("n1", labels={"admin/secure": "yes", "z": "a"})})
    assert h.state.nodes["n1"].labels == {"z": "a"}
    h.ok("node_labels", {"node_id": "n1", "set": {"admin/secure": "no", "z": "b"}})
    assert h.state.nodes["n1"].effective_labels() == {"z": "b", "admin/secure": "no"}
    # The host registering again changes its own labels only.
    h.ok("register_node", {"node": node_record("n1", labels={"admin/secure": "yes", "z": "c"})})
    assert h.state.nodes["n1"].effective_labels() == {"z": "b", "admin/secure": "no"}
    h.ok("node_labels", {"node_id": "n1", "unset": ["z"]})
    assert h.state.nodes["n1"].effective_labels() == {"z": "c", "admin/secure": "no"}
    # An older journal's registration replays as it applied then.
    old = msgpack.packb(
        {
            "op": "register_node",
            "v": 2,
            "rid": "old",
            "args": {"node": node_record("n2", cpus=100_000.0), "now": 1.0},
        },
        use_bin_type=True,
    )
    assert not is_error(h.raw(old))
    assert h.state.nodes["n2"].cpus == 100_000.0
