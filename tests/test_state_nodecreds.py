"""Join tokens and node credentials in ClusterState: expiry and use counts by
the proposer's clock, the idempotent trade, revocation by `node rm`, and
reserved environment names refused by apply as well as by the API."""

from __future__ import annotations

from typing import Any

import pytest

from raft.state import ClusterState
from raft.validate import RESERVED_ENV, SpecError, validate_spec
from tests.test_state_support import Harness, is_error, same_records

SEALED = b"\x01" * 60


def make_join(h: Harness, jid: str = "jt1", ttl_s: float = 3600, uses: int | None = 1) -> None:
    h.ok(
        "join_token_create",
        {
            "id": jid,
            "sealed": SEALED,
            "expires_at": h.now + ttl_s,
            "max_uses": uses,
            "created_by": "admin",
        },
    )


def join(h: Harness, node_id: str, cred_id: str, jid: str = "jt1", **kw: Any) -> Any:
    return h.cmd(
        "node_join",
        {"join_id": jid, "node_id": node_id, "cred_id": cred_id, "sealed": SEALED, **kw},
    )


def test_a_join_token_admits_as_many_nodes_as_its_uses_and_no_more() -> None:
    h = Harness()
    make_join(h, uses=2)
    assert join(h, "n-a", "na1")["cred_id"] == "na1"
    assert join(h, "n-b", "nb1")["node_id"] == "n-b"
    before = h.state.snapshot()
    res = join(h, "n-c", "nc1")
    assert is_error(res, "forbidden") and "used up" in res["error"]["message"], res
    assert same_records(before, h.state)
    assert h.state.node_cred_of == {"n-a": "na1", "n-b": "nb1"}


def test_an_expired_join_token_admits_nothing_by_the_proposers_clock() -> None:
    h = Harness()
    expires_at = h.now + 10
    make_join(h, ttl_s=10, uses=None)
    assert not is_error(join(h, "n-a", "na1", now=expires_at - 0.5))
    before = h.state.snapshot()
    res = join(h, "n-b", "nb1", now=expires_at)
    assert is_error(res, "forbidden") and "expired" in res["error"]["message"], res
    assert same_records(before, h.state)
    # Even trading again for a node it admitted: an expired token is dead.
    assert is_error(join(h, "n-a", "na2", now=expires_at + 1), "forbidden")
    assert h.state.node_cred_of == {"n-a": "na1"}


def test_trading_again_for_the_same_node_spends_no_use_and_replaces_the_credential() -> None:
    # The agent crashed after the master issued its credential, before saving it.
    h = Harness()
    make_join(h, uses=1)
    assert join(h, "n-a", "na1")["again"] is False
    res = join(h, "n-a", "na2")
    assert (res["again"], res["replaced"]) == (True, "na1"), res
    assert set(h.state.node_creds) == {"na2"}
    assert h.state.join_tokens["jt1"].nodes == ["n-a"]
    # The one use went to n-a, once: another node is still refused.
    assert is_error(join(h, "n-b", "nb1"), "forbidden")


def test_once_a_node_registered_no_token_trades_for_it_again() -> None:
    # A multi-use fleet token admitted n-a and n-b; whoever still holds it
    # (root on n-b, say) must not get n-a's credential by asking for n-a's id.
    h = Harness()
    make_join(h, uses=None)
    join(h, "n-a", "na1")
    join(h, "n-b", "nb1")
    h.register("n-a")
    assert h.state.node_creds["na1"].registered
    assert not h.state.node_creds["nb1"].registered
    before = h.state.snapshot()
    res = join(h, "n-a", "evil")
    assert is_error(res, "conflict") and "registered already" in res["error"]["message"], res
    assert same_records(before, h.state)
    assert h.state.node_cred_of == {"n-a": "na1", "n-b": "nb1"}
    # The same after it left on its own (leave-on-stop keeps its credential).
    h.ok("remove_node", {"node_id": "n-a", "force": True})
    assert "n-a" not in h.state.nodes
    res = join(h, "n-a", "evil")
    assert is_error(res, "conflict"), res
    assert h.state.node_cred_of["n-a"] == "na1"
    # The record was replaced, not changed in place: a view taken before
    # registration still shows it unregistered.
    view = h.state.node_creds["nb1"]
    h.register("n-b")
    assert not view.registered and h.state.node_creds["nb1"].registered
    # A node that registered without a credential of this token is refused too.
    h.register("n-c")
    assert is_error(join(h, "n-c", "nc1"), "conflict")
    # Registration is remembered across a snapshot and a restore.
    fresh = ClusterState()
    fresh.restore(h.state.snapshot())
    assert fresh.node_creds["na1"].registered and fresh.node_creds["nb1"].registered


def test_node_rm_revokes_the_credential_and_the_old_token_cannot_bring_it_back() -> None:
    h = Harness()
    make_join(h, uses=5)
    join(h, "n-a", "na1")
    h.register("n-a")
    res = h.ok("remove_node", {"node_id": "n-a", "revoke": True})
    assert (res["removed"], res["revoked"]) == (True, "na1")
    assert h.state.node_creds == {} and h.state.node_cred_of == {}
    again = join(h, "n-a", "na2")
    assert is_error(again, "forbidden") and "removed" in again["error"]["message"], again
    # A new join token lets it join again, on purpose.
    make_join(h, "jt2")
    assert join(h, "n-a", "na3", jid="jt2")["cred_id"] == "na3"


def test_an_agent_leaving_keeps_its_credential_and_node_rm_can_revoke_it_later() -> None:
    h = Harness()
    make_join(h)
    join(h, "n-a", "na1")
    h.register("n-a")
    # The agent's own deregistration (leave-on-stop) is no revocation.
    assert h.ok("remove_node", {"node_id": "n-a", "force": True}) == {
        "node_id": "n-a",
        "removed": True,
    }
    assert h.state.node_cred_of == {"n-a": "na1"}
    res = h.ok("remove_node", {"node_id": "n-a", "revoke": True})
    assert (res["removed"], res["revoked"]) == (False, "na1")
    assert is_error(h.cmd("remove_node", {"node_id": "n-a", "revoke": True}), "not_found")


def test_a_node_holding_another_tokens_credential_cannot_be_taken_over() -> None:
    h = Harness()
    make_join(h, "jt1")
    make_join(h, "jt2")
    join(h, "n-a", "na1", jid="jt1")
    before = h.state.snapshot()
    assert is_error(join(h, "n-a", "na2", jid="jt2"), "conflict")
    assert same_records(before, h.state)


def test_revoked_or_unknown_join_tokens_and_bad_arguments_change_nothing() -> None:
    h = Harness()
    make_join(h, uses=None)
    h.ok("join_token_revoke", {"id": "jt1"})
    before = h.state.snapshot()
    assert is_error(join(h, "n-a", "na1"), "forbidden")
    assert is_error(join(h, "n-a", "na1", jid="nope"), "forbidden")
    assert same_records(before, h.state)
    make_join(h, "jt2", uses=None)
    before = h.state.snapshot()
    for bad in (
        {"node_id": "../etc"},
        {"node_id": "n" * 300},
        {"node_id": 7},
        {"cred_id": "jt2"},  # a key id in use: ids never collide across kinds
        {"cred_id": "admin"},
        {"sealed": "text"},
        {"sealed": b""},
    ):
        args = {"join_id": "jt2", "node_id": "n-a", "cred_id": "na1", "sealed": SEALED, **bad}
        assert is_error(h.cmd("node_join", args)), bad
    for bad_create in (
        {"max_uses": 0},
        {"max_uses": True},
        {"max_uses": 2.5},
        {"expires_at": float("nan")},
        {"expires_at": "soon"},
        {"id": "jt2"},
        {"id": "cluster"},
    ):
        args = {"id": "jt3", "sealed": SEALED, "expires_at": h.now + 5, **bad_create}
        assert is_error(h.cmd("join_token_create", args)), bad_create
    assert is_error(
        h.cmd("token_create", {"id": "jt2", "name": "x", "role": "read", "sealed": SEALED})
    )
    assert same_records(before, h.state)


def test_credentials_and_join_tokens_survive_a_snapshot_and_a_restore() -> None:
    h = Harness()
    make_join(h, uses=3)
    join(h, "n-a", "na1")
    join(h, "n-b", "nb1")
    fresh = ClusterState()
    fresh.restore(h.state.snapshot())
    assert fresh.snapshot() == h.state.snapshot()
    assert fresh.node_cred_of == {"n-a": "na1", "n-b": "nb1"}
    assert fresh.join_tokens["jt1"].nodes == ["n-a", "n-b"]


def test_gc_forgets_join_tokens_long_expired() -> None:
    h = Harness()
    make_join(h, "old", ttl_s=1)
    make_join(h, "new", ttl_s=10_000)
    res = h.ok("gc_jobs", {"before": h.now + 100})
    assert res["join_tokens_removed"] == 1
    assert set(h.state.join_tokens) == {"new"}


@pytest.mark.parametrize(
    "name",
    [
        *sorted(RESERVED_ENV),
        "LEPTON_JOB_ID",
        "LEPTON_GPU_DEVICE_DIR",
        "LEPTON_ANYTHING",
        "PET_NNODES",
        "PET_MASTER_ADDR",
    ],
)
def test_reserved_env_names_are_refused_naming_the_variable(name: str) -> None:
    with pytest.raises(SpecError) as exc:
        validate_spec({"argv": ["true"], "env": {"OK": "1", name: "0"}})
    msg = str(exc.value)
    assert name in msg and "\n" not in msg
    # Apply refuses it as well, whoever proposed it, and takes nothing.
    h = Harness()
    h.register("n1")
    before = h.state.snapshot()
    job = {"id": "j", "user": "u", "spec": {"argv": ["true"], "env": {name: "0"}}}
    res = h.ok("submit_jobs", {"jobs": [{**job, "submitted_at": h.now}]})
    assert is_error(res["results"][0], "bad_request") and name in str(res["results"][0])
    assert same_records(before, h.state)


def test_names_that_only_look_reserved_are_allowed() -> None:
    env = {"LEPTONX": "1", "MY_RANK": "2", "PETS": "3", "cuda_visible_devices": "4"}
    assert validate_spec({"argv": ["true"], "env": env}).env == env
