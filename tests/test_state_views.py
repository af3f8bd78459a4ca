"""Published views of the state never change (copy on write, raft/cow.py).

Readers work on `ClusterState.freeze()` views with no lock held while apply
goes on, so apply must never mutate anything a view shares. The random
command log of test_state_machine.py runs here with views taken at random
points (several applies apart, so records made since a view are mutated in
place and older ones are copied first); after every step every view held
must still read exactly as when it was taken, and a fresh view must read
exactly as the live state does.
"""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from raft import cow
from raft.state import ClusterState
from raft.view import SNAPSHOT_VERSION, StateView
from tests.test_state_machine import ReplicatedClusterState
from tests.test_state_support import Harness, check_invariants, is_error

RECORD_MAPS = ("nodes", "jobs", "tasks", "tokens", "members", "join_tokens", "node_creds")


def contents(s: StateView | ClusterState, recent: bool) -> bytes:
    """Everything a reader can see, as bytes (a deep copy that cannot drift)."""
    parts: list[Any] = [[r.to_wire() for r in getattr(s, name).values()] for name in RECORD_MAPS]
    parts += [
        dict(s.manifests),
        {k: list(v) for k, v in s.manifest_owners.items()},
        sorted([k, list(v)] for k, v in s.user_pending.items()),
        sorted([n, g, t] for (n, g), t in s.gpu_owner.items()),
        {k: sorted(v) for k, v in s.node_tasks.items()},
        list(s.pending),
        dict(s.node_cred_of),
        s.restoring,
        s.applied_index,
        s.capacity_epoch,
        dict(s.counters),
        [u.to_wire() for u in s.usage.values()],
    ]
    if recent:
        parts.append(s.recent.to_wire() if s.recent is not None else None)
    return msgpack.packb(parts, use_bin_type=True)


def legacy_snapshot(s: ClusterState) -> bytes:
    """The snapshot as ClusterState.snapshot() packed it before views existed:
    one msgpack.packb of the whole map. The format changes only with
    SNAPSHOT_VERSION."""
    return msgpack.packb(
        {
            "v": SNAPSHOT_VERSION,
            "applied_index": s.applied_index,
            **{name: [r.to_wire() for r in getattr(s, name).values()] for name in RECORD_MAPS},
            "manifests": dict(s.manifests),
            "manifest_owners": {k: list(v) for k, v in s.manifest_owners.items()},
            "recent": s.recent.to_wire(),
            "restoring": s.restoring,
            "counters": dict(s.counters),
            "usage": [u.to_wire() for u in s.usage.values()],
        },
        use_bin_type=True,
    )


class ViewsStayPut(ReplicatedClusterState):
    """The replicated command log, with views taken and checked along the way."""

    def __init__(self) -> None:
        super().__init__()
        self.views: list[tuple[StateView, bool, bytes]] = []

    def apply_bytes(self, data: bytes, well_formed: bool = True) -> Any:
        # No snapshot per command here (the parent compares one after each):
        # each snapshot is a view, and views must also be taken several
        # commands apart for records made since the last one to be written
        # in place.
        self.index += 1
        ra = self.a.apply(data, self.index)
        rb = self.b.apply(data, self.index)
        assert ra == rb
        assert not is_error(ra, "internal"), ra
        if well_formed:
            assert not is_error(ra, "bad_command"), ra
            self.first_result.setdefault(data, ra)
        return ra

    @rule(for_snapshot=st.booleans())
    def take_view(self, for_snapshot: bool) -> None:
        v = self.a.freeze(for_snapshot=for_snapshot)
        self.views = [*self.views[-3:], (v, for_snapshot, contents(v, for_snapshot))]

    @rule()
    def compare_a_fresh_view_with_the_live_state(self) -> None:
        v = self.a.freeze(for_snapshot=True)
        assert contents(v, False) == contents(self.a, False)
        assert v.encode() == legacy_snapshot(self.a)
        assert v.encode() == self.b.snapshot()
        check_invariants(self.a)

    @invariant()
    def views_never_change(self) -> None:
        for v, for_snapshot, before in self.views:
            assert contents(v, for_snapshot) == before, "a published view changed"

    @invariant()
    def replicas_agree_and_invariants_hold(self) -> None:
        pass  # checked by compare_a_fresh_view_with_the_live_state, which freezes


ViewsStayPut.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestViewsStayPut = ViewsStayPut.TestCase


class ViewsStayPutWithOverlays(ViewsStayPut):
    """The same, with every map (however small) frozen as a base plus an
    overlay of the keys written since, and a new base only now and then."""

    def __init__(self) -> None:
        self.saved = (cow.SMALL_MAP, cow.REBASE_DIVISOR)
        cow.SMALL_MAP, cow.REBASE_DIVISOR = 0, 3
        super().__init__()

    def teardown(self) -> None:
        cow.SMALL_MAP, cow.REBASE_DIVISOR = self.saved


ViewsStayPutWithOverlays.TestCase.settings = ViewsStayPut.TestCase.settings
TestViewsStayPutWithOverlays = ViewsStayPutWithOverlays.TestCase


def test_a_large_map_is_frozen_as_an_overlay_in_the_live_order() -> None:
    m: cow.CowMap[str, int] = cow.CowMap({f"k{i}": i for i in range(10_000)})
    m.frozen()
    m["k5"] = -5  # replaced: keeps its place
    del m["k7"]  # deleted
    m["new"] = 1  # inserted: at the end
    del m["k9"]
    m["k9"] = 9  # deleted and inserted again: moves to the end, as in a dict
    f = m.frozen()
    assert isinstance(f, cow.FrozenMap)
    assert list(f) == list(m) and list(f.items()) == list(m.items())
    assert list(f.values()) == list(m.values()) and len(f) == len(m)
    assert f["k5"] == -5 and "k7" not in f and f.get("k7") is None and f["k9"] == 9
    m["k5"] = 55
    del m["new"]
    assert (f["k5"], f["new"], f.get("new")) == (-5, 1, 1), "a frozen copy changed"


def test_a_view_is_reused_until_something_is_applied() -> None:
    h = Harness()
    h.register("n1")
    v = h.state.freeze()
    assert h.state.freeze() is v
    h.submit("a", gpus=1)
    w = h.state.freeze()
    assert w is not v
    # Maps nothing wrote to are shared between the views, not copied again.
    assert w.nodes is v.nodes and w.jobs is not v.jobs
    assert "a" in w.jobs and "a" not in v.jobs


def test_views_are_read_only() -> None:
    h = Harness()
    h.register("n1")
    v = h.state.freeze()
    try:
        v.nodes["n2"] = v.nodes["n1"]  # type: ignore[index]
    except TypeError:
        pass
    else:
        raise AssertionError("a view's map took a write")
    assert list(v.nodes) == ["n1"]


def test_gang_ports_avoid_the_kernels_ephemeral_range_and_change_per_attempt() -> None:
    from leptond.views import gang_port

    lo, hi = 32768, 60999  # Linux's default ip_local_port_range
    ports = [gang_port(f"j-{i:012x}", a) for i in range(2000) for a in (0, 1)]
    assert not [p for p in ports if lo <= p <= hi]
    assert all(1024 < p < 65536 for p in ports)
    assert sum(gang_port(f"j-{i:012x}", 0) != gang_port(f"j-{i:012x}", 1) for i in range(200)) > 190
