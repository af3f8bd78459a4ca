"""The leader's liveness pass (leptond/controllers.py) on a real state and
the virtual clock (tests/controllers_support.py): which nodes it declares
down, and which it leaves alone."""

from __future__ import annotations

import pytest

from leptond.liveness import NodeLiveness
from leptond.sim.vtime import SimClock, VirtualLoop
from tests.controllers_support import Leader

pytestmark = pytest.mark.timeout(60)


def states(ld: Leader) -> dict[str, str]:
    return {nid: n.state for nid, n in ld.reader.view().nodes.items()}


def test_silent_and_gone_nodes_go_down_and_the_others_stay(ld: Leader) -> None:
    live = ld.c._liveness
    ttl = ld.c._cfg.heartbeat_ttl_s
    fast = ld.c._cfg.disconnect_down_s
    assert fast is not None and fast < ttl
    for nid in ("quiet", "talks", "gone", "back", "late"):
        ld.h.register(nid, gpus=1)
        live.registered(nid)
    live.suspect("gone")
    live.suspect("back")
    ld.run(ld.clock.sleep(fast + 0.1))
    live.registered("back")  # within the confirm window: no longer suspect
    ld.run(ld.c.liveness_pass())
    assert states(ld) == {
        "quiet": "ready",
        "talks": "ready",
        "gone": "down",
        "back": "ready",
        "late": "ready",
    }
    # Heard from now and then, but for "quiet", which says nothing for the TTL.
    for _ in range(int(2 * ttl)):
        ld.run(ld.clock.sleep(0.5))
        for nid in ("talks", "back", "late"):
            live.heard(nid)
        ld.run(ld.c.liveness_pass())
    assert states(ld) == {
        "quiet": "down",
        "talks": "ready",
        "gone": "down",
        "back": "ready",
        "late": "ready",
    }
    assert not live.suspects and not live.condemned


def test_overdue_reads_what_silent_for_and_suspect_for_would_say() -> None:
    loop = VirtualLoop()
    try:
        clock = SimClock(loop)
        live = NodeLiveness(clock)
        live.heard("a")
        live.heard("b")
        live.suspect("b")
        loop.run_until_complete(clock.sleep(1.5))
        live.heard("c")
        # "d" was never heard of by this leader: it starts counting now.
        assert live.overdue(["a", "b", "c", "d"], ttl_s=2.0, confirm_s=1.0) == ["b"]
        assert live.overdue(["a", "b", "c", "d"], ttl_s=2.0, confirm_s=None) == []
        loop.run_until_complete(clock.sleep(1.0))
        assert live.overdue(["d", "c", "b", "a"], ttl_s=2.0, confirm_s=None) == ["b", "a"]
        assert live.silent_for("d") == pytest.approx(1.0)
    finally:
        loop.close()
