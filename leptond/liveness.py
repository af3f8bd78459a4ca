"""When each node was last heard from, and what it last reported: leader memory.

Written by the agents' RPC handlers (heartbeats, registrations), read by the
liveness loop (controllers.py), node listings and /metrics. Never replicated:
a new leader starts from `reset`, which gives every node a full TTL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from .clock import Clock

log = logging.getLogger("lepton.master")


class NodeLiveness:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.last_seen: dict[str, float] = {}  # node id -> clock.monotonic()
        self.live: dict[str, dict[str, Any]] = {}  # node id -> last stats
        # Heartbeat values dropped at arrival as malformed (nodestats.py), ever.
        self.dropped_values = 0
        self.dropped_by_node: dict[str, int] = {}

    def reset(self, node_ids: Iterable[str], grace_s: float) -> None:
        """A new leader: every node counts as heard from `grace_s` from now."""
        self.last_seen = dict.fromkeys(node_ids, self._clock.monotonic() + grace_s)

    def heard(self, node_id: str, stats: dict[str, Any] | None = None) -> None:
        now = self._clock.monotonic()
        self.last_seen[node_id] = now
        if stats is not None:
            self.live[node_id] = {**stats, "at": now}

    def dropped(self, node_id: str, n: int) -> None:
        """Count values of a node's heartbeat that were left out as malformed."""
        first = node_id not in self.dropped_by_node
        self.dropped_values += n
        self.dropped_by_node[node_id] = self.dropped_by_node.get(node_id, 0) + n
        if first:
            log.warning(
                "node %s sent a heartbeat with %d malformed value(s); they are dropped "
                "(counted in lepton_heartbeat_values_dropped_total)",
                node_id,
                n,
            )

    def silent_for(self, node_id: str) -> float:
        """Seconds since the node was last heard from (a node never heard of
        by this leader starts counting now)."""
        now = self._clock.monotonic()
        return now - self.last_seen.setdefault(node_id, now)

    def stats(self, node_id: str) -> dict[str, Any] | None:
        """The node's last reported stats, with their age in `age_s`."""
        live = self.live.get(node_id)
        if live is None:
            return None
        return dict(live, age_s=round(self._clock.monotonic() - live["at"], 1))
