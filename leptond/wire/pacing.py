"""Heartbeat pacing: the leader asks its agents to heartbeat less often as the
cluster grows, so that all of them together send at most a configured rate
(`leptond run --max-heartbeats-per-second`), as Nomad's servers scale each
client's heartbeat TTL with the number of nodes (nomad/heartbeat.go,
`maxHeartbeatsPerSecond`).

The contract, shared by the leader (leptond/agents.py), lepton-agent
(agent/daemon.py) and the benchmark's light agents (bench/heartbeats.py):

- Every registration and heartbeat answer may carry `heartbeat_s`: live
  nodes / the rate, never more than `cap_s(TTL, lease)`. An answer without it
  (an older leader, or pacing off) means "your own interval".
- The agent heartbeats every max(its own interval, the asked one). Once the
  asked one is above its own, each sleep is drawn from +-JITTER around it, so
  that agents that registered together (after a leader change) drift apart.
  A value that is not a finite, non-negative number is ignored; one above
  what the agent's lease allows is clamped (`adopt`).

Why the cap: the leader keeps its TTL (silence after which a node is down)
and the lease it hands out fixed; pacing only stretches the interval within
them. The longest sleep, cap_s(), is at most TTL/3 and lease/2.5. With the
defaults (TTL 4 s, lease 3.2 s) that is 1.28 s; add an event-loop stall of
1 s on the agent (bench/reschedule.py --cause stall) and the gap between two
heartbeats is 2.28 s plus the round trips: 1.72 s inside the TTL (no false
down) and 0.92 s inside the lease (its tasks keep running). A bigger cluster
that wants fewer heartbeats a second raises --heartbeat-ttl, which raises
the cap with it.

No project imports: the agent, the leader and the benchmarks all use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

# An agent sleeps the asked interval times a factor drawn from
# [1 - JITTER, 1 + JITTER]; the cap divides by 1 + JITTER so that no single
# sleep exceeds TTL/3 or lease/2.5.
JITTER = 0.05
TTL_SHARE = 3.0  # the longest sleep is at most TTL / 3 ...
LEASE_SHARE = 2.5  # ... and lease / 2.5


def cap_s(ttl_s: float, lease_s: float) -> float:
    """The longest interval a leader with this TTL and lease may ask."""
    return min(ttl_s / TTL_SHARE, lease_s / LEASE_SHARE) / (1 + JITTER)


def interval_s(live_nodes: int, max_per_s: float, cap: float) -> float:
    """The interval the leader asks of each agent: `live_nodes` agents each
    heartbeating this often send `max_per_s` heartbeats a second, unless that
    is longer than `cap` (then they send more). Agents whose own interval is
    longer keep theirs. Rounded down to the millisecond: never above the
    cap, which the agent checks too."""
    return math.floor(1000 * min(live_nodes / max_per_s, cap)) / 1000


def adopt(asked: Any, own_s: float, lease_s: float | None) -> tuple[float, str]:
    """The interval an agent heartbeats at, given the answer's `heartbeat_s`
    (`asked`; None when the answer has none), its own interval and the lease
    it holds; and, when `asked` was not usable as it came, why (one line for
    the log), else ''. Never raises: the value comes from the network."""
    if asked is None:
        return own_s, ""
    if isinstance(asked, bool) or not isinstance(asked, int | float) or not math.isfinite(asked):
        return own_s, f"ignored the leader's heartbeat interval {asked!r:.40}: not a number"
    if asked < 0:
        return own_s, f"ignored the leader's heartbeat interval {asked!r}: negative"
    if asked <= own_s:
        return own_s, ""
    if lease_s is None:
        # No lease granted yet (a leader that has not heard from a quorum
        # lately grants none): nothing bounds a longer interval, so keep our
        # own until one is. Not the leader's mistake: nothing to say.
        return own_s, ""
    # The agent's own guard: its lease is renewed only by heartbeat answers,
    # so it never sleeps long enough to let it run out, whatever it is told.
    limit = max(own_s, lease_s / LEASE_SHARE / (1 + JITTER))
    if asked > limit:
        return limit, (
            f"the leader's heartbeat interval {asked:g}s is too long for a lease of "
            f"{lease_s}s; heartbeating every {limit:.3g}s"
        )
    return float(asked), ""


def sleep_s(interval: float, own_s: float, draw: Callable[[], float]) -> float:
    """One sleep between heartbeats: `interval` (from `adopt`) with jitter
    from `draw()` in [0, 1); exactly `own_s` while unpaced, so an agent that
    is not paced behaves as before (and draws no random number: the
    simulator's seeded runs stay the same)."""
    if interval <= own_s:
        return own_s
    return max(own_s, interval * (1 + JITTER * (2 * draw() - 1)))
