"""The masters' garbage-collector policy (leptond/gcpolicy.py): what survives
the young collections is frozen, so the state is not walked again; and
reference cycles among frozen objects are still freed in the end, so memory
stays bounded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from leptond import gcpolicy
from tests.harness import ROOT

PROC = ROOT / "tests" / "gc_garbage_proc.py"
# Small enough that the helper's live state (30,000 objects) and a few
# rounds of garbage reach it; the mechanism is the one masters run with.
FLOOR = 100_000


def run_proc(policy: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, str(PROC), str(FLOOR), policy],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(json.loads(out.stdout))


def test_frozen_cycles_are_freed_in_the_end_and_frozen_objects_stay_bounded() -> None:
    r = run_proc("tuned")
    # The long-lived objects were frozen out of the collector's walks ...
    assert int(r["frozen_before_unfreeze"]) >= int(r["live"]), r
    # ... and garbage cycles of frozen objects did not stay forever: once the
    # frozen count passed the bound, a collection walked everything again.
    assert r["first_round_freed"] is True, r
    assert int(r["unfreezes"]) >= 1, r
    # One middle collection's survivors may pass the bound before the check.
    assert int(r["max_frozen"]) <= FLOOR + 20_000, r


# A state growing from nothing to 600,000 tracked objects (some 85,000
# 1-task jobs), as a master's under a stream of submits: under the default
# floor it is frozen as it grows and never walked whole.
GROW = """
import gc, json
from leptond import gcpolicy
stats = gcpolicy.install("tuned")
state = []
for _ in range(600):
    state.append([[i] for i in range(1000)])
print(json.dumps({"unfreezes": stats.unfreezes, "frozen": gc.get_freeze_count(),
                  "walks": stats.pauses[2].count}))
"""


def test_a_growing_state_under_the_floor_is_frozen_and_never_walked_whole() -> None:
    out = subprocess.run(
        [sys.executable, "-c", GROW], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    # The one whole walk is install's own, of what start-up made.
    assert r["unfreezes"] == 0 and r["walks"] == 1, r
    assert r["frozen"] >= 500_000, r


# A live state just under the bound, and objects that live long enough to be
# frozen and are then freed by reference counting (requests, connections):
# the running sum of frozen objects passes the bound again and again while
# the true count stays under it.
NEAR_THE_BOUND = """
import collections, gc, json
from leptond import gcpolicy
stats = gcpolicy.install("tuned", unfreeze_floor=400_000)
# What start-up froze, the state and the batches alive below: some 6,500
# objects under the bound (about a middle collection's survivors).
state = [[i] for i in range(400_000 - gc.get_freeze_count() - 15_500)]
recent = collections.deque(maxlen=3)
while stats.pauses[1].count < 300:
    recent.append([[] for _ in range(3_000)])  # and the oldest batch is freed
print(json.dumps({"middle": stats.pauses[1].count, "recounts": stats.recounts,
                  "unfreezes": stats.unfreezes}))
"""


def test_the_frozen_objects_are_not_counted_at_every_collection_near_the_bound() -> None:
    out = subprocess.run(
        [sys.executable, "-c", NEAR_THE_BOUND],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    # Each count walks every frozen object; one per collection made the
    # collections O(heap) again (254 of 300 here). Now one per 1/16 of the
    # bound frozen since the last (85 of 300).
    assert r["unfreezes"] == 0 and 1 <= r["recounts"] <= r["middle"] // 2, r


def test_the_stock_policy_freezes_nothing_and_frees_the_same_cycles() -> None:
    r = run_proc("stock")
    assert r["first_round_freed"] is True, r
    assert r["max_frozen"] == 0 and r["unfreezes"] == 0, r


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown gc policy 'fast': tuned or stock"):
        gcpolicy.install("fast")
