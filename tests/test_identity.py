"""Which Unix account a task runs as: the token's mapping in the replicated
state, what the launch spec carries, and how a host resolves the name."""

from __future__ import annotations

import os
import pwd

import pytest

from agent import identity
from leptond import views
from raft.state import ClusterState
from tests.isolation_support import passable_dir, unix_users
from tests.test_state_support import Harness, is_error, same_records


def test_a_token_maps_to_a_unix_user_by_default_its_name() -> None:
    h = Harness()
    h.ok("token_create", {"id": "t1", "name": "alice", "role": "submit", "sealed": b"x"})
    h.ok(
        "token_create",
        {"id": "t2", "name": "ci", "role": "submit", "sealed": b"x", "unix_user": "build_bot"},
    )
    assert h.state.tokens["t1"].unix_user == ""  # "": the same as the name
    assert h.state.tokens["t2"].unix_user == "build_bot"
    # The mapping survives a snapshot and a restore.
    copy = ClusterState()
    copy.restore(h.state.snapshot())
    assert copy.tokens["t2"].unix_user == "build_bot"


@pytest.mark.parametrize(
    "bad",
    [
        "0",
        "12345",
        "-rf",
        "a b",
        "a/b",
        "x" * 33,
        "x" * (1 << 20),
        "\u00e9t\u00e9",
        "al\U0001f600ce",
        "a\x00",
        7,
        ["root"],
    ],
)
def test_a_bad_unix_user_is_refused_and_changes_nothing(bad: object) -> None:
    h = Harness()
    before = h.state.snapshot()
    res = h.cmd(
        "token_create",
        {"id": "t1", "name": "alice", "role": "submit", "sealed": b"x", "unix_user": bad},
    )
    assert is_error(res), res
    assert same_records(before, h.state)
    job = {
        "id": "j1",
        "user": "alice",
        "spec": {"argv": ["true"]},
        "submitted_at": 1.0,
        "unix_user": bad,
    }
    (out,) = h.ok("submit_jobs", {"jobs": [job]})["results"]
    assert is_error(out) and "j1" not in h.state.jobs


def test_a_job_keeps_the_account_it_was_submitted_as_and_the_launch_spec_says_it() -> None:
    h = Harness()
    h.register("n1")
    job = {
        "id": "j1",
        "user": "alice",
        "spec": {"argv": ["true"], "cpus": 1.5, "mem_bytes": 64 << 20},
        "submitted_at": 1.0,
        "unix_user": "alice_hpc",
    }
    h.ok("submit_jobs", {"jobs": [job]})
    h.run("j1.0", "n1", [])
    spec = views.launch_spec(h.state, h.task("j1.0"), allow_root=False)
    assert spec["unix_user"] == "alice_hpc" and spec["allow_root"] is False
    assert spec["cpus"] == 1.5 and spec["mem_bytes"] == 64 << 20
    assert views.launch_spec(h.state, h.task("j1.0"), allow_root=True)["allow_root"] is True


def test_a_host_resolves_the_account_from_its_own_databases() -> None:
    with unix_users("id") as (pw,):
        u = identity.resolve(pw.pw_name, allow_root=False, host="gpu-3")
        assert (u.name, u.uid, u.gid, u.home, u.shell) == (
            pw.pw_name,
            pw.pw_uid,
            pw.pw_gid,
            pw.pw_dir,
            pw.pw_shell,
        )
        assert pw.pw_gid in u.groups
        assert set(u.groups) == set(os.getgrouplist(pw.pw_name, pw.pw_gid))


def test_a_missing_account_and_root_are_refused_with_one_line() -> None:
    with pytest.raises(identity.IdentityError) as e:
        identity.resolve("no_such_user_here", allow_root=True, host="gpu-3")
    assert str(e.value) == "user 'no_such_user_here' does not exist on host gpu-3"
    with pytest.raises(identity.IdentityError) as e:
        identity.resolve("root", allow_root=False, host="gpu-3")
    assert "uid 0" in str(e.value) and "--allow-root-tasks" in str(e.value)
    assert identity.resolve("root", allow_root=True, host="gpu-3").uid == 0
    with pytest.raises(identity.IdentityError):
        identity.resolve("", allow_root=True, host="gpu-3")


def test_a_task_user_must_be_able_to_reach_its_directory() -> None:
    with passable_dir("lepton-reach-") as top, unix_users("reach") as (pw,):
        u = identity.resolve(pw.pw_name, allow_root=False, host="h")
        closed = top / "closed"
        closed.mkdir(mode=0o700)
        (closed / "work").mkdir()
        why = identity.unreachable(closed / "work", u)
        assert why is not None and str(closed) in why and "0700" in why
        identity.open_path_for_others(closed)
        assert identity.unreachable(closed / "work", u) is None
        assert oct(closed.stat().st_mode & 0o777) == oct(0o711)
        assert identity.unreachable(closed / "work", identity.resolve("root", True, "h")) is None


def test_giving_a_tree_to_a_user_never_follows_symlinks(tmp_path: object) -> None:
    with passable_dir("lepton-give-") as top, unix_users("give") as (pw,):
        u = identity.resolve(pw.pw_name, allow_root=False, host="h")
        target = top / "roots_own"
        target.write_text("x")
        tree = top / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "sub" / "f").write_text("y")
        (tree / "link").symlink_to(target)
        identity.give_tree(tree, u)
        for p in (tree, tree / "sub", tree / "sub" / "f"):
            assert p.stat().st_uid == pw.pw_uid
        assert (tree / "link").lstat().st_uid == pw.pw_uid
        assert target.stat().st_uid == 0  # what the link points to stays root's
        assert oct(tree.stat().st_mode & 0o777) == oct(0o700)
        assert pwd.getpwuid(tree.stat().st_uid).pw_name == pw.pw_name
