"""A process under the masters' garbage-collector policy that keeps making
reference cycles out of objects old enough to be frozen, then drops them
(tests/test_gcpolicy.py). Prints one JSON object when the first round's
cycles have been freed, or when it gives up after MAX_ROUNDS.

    python tests/gc_garbage_proc.py UNFREEZE_FLOOR [stock|tuned]
"""

from __future__ import annotations

import gc
import json
import sys
import weakref

from leptond import gcpolicy

CYCLES_PER_ROUND = 2_000
# Without a bound on frozen garbage this many rounds hold some 100 MiB.
MAX_ROUNDS = 150
LIVE_OBJECTS = 30_000


class Marker:
    """One object of a round's cycles that a weak reference can watch."""

    def __init__(self) -> None:
        self.me = self


def main() -> int:
    floor = int(sys.argv[1])
    policy = sys.argv[2] if len(sys.argv) > 2 else "tuned"
    stats = gcpolicy.install(policy, unfreeze_floor=floor)
    live = [[i] for i in range(LIVE_OBJECTS)]  # the long-lived state
    freed: set[int] = set()
    watchers = []
    max_frozen = frozen_live = 0
    rounds = 0
    while rounds < MAX_ROUNDS and 0 not in freed:
        batch: list[object] = []
        for _ in range(CYCLES_PER_ROUND):
            a: list[object] = []
            a.append([a])
            batch.append(a)
        marker = Marker()
        batch.append(marker)
        watchers.append(weakref.ref(marker, lambda _, r=rounds: freed.add(r)))
        # Allocate until a middle or full collection has run while the round
        # was alive: the policy has frozen it by then. (Collections follow
        # allocations net of frees: what is allocated here is kept a while.)
        seen = stats.pauses[1].count + stats.pauses[2].count
        churn: list[object] = []
        while stats.pauses[1].count + stats.pauses[2].count == seen:
            churn.append([])
        del batch, marker, a, churn
        # Now each of the round's cycles is garbage, frozen.
        count = gc.get_freeze_count()
        max_frozen = max(max_frozen, count)
        frozen_live = max(frozen_live, count if stats.unfreezes == 0 else 0)
        rounds += 1
    print(
        json.dumps(
            {
                "rounds": rounds,
                "first_round_freed": 0 in freed,
                "rounds_freed": len(freed),
                "max_frozen": max_frozen,
                "frozen_before_unfreeze": frozen_live,
                "unfreezes": stats.unfreezes,
                "live": len(live),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
