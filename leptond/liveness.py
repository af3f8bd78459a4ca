"""When each node was last heard from, and what it last reported: leader memory.

Written by the agents' RPC handlers (heartbeats, registrations), read by the
liveness loop (controllers.py), node listings and /metrics. Never replicated:
a new leader starts from `reset`, which gives every node a full TTL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
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
        # Nodes whose agent connection ended from the agent's side (the leader
        # read its end-of-stream): node id -> clock.monotonic() when it did.
        # Such a node is declared down after the confirm window unless it
        # registers again (controllers.liveness_pass).
        self.suspects: dict[str, float] = {}
        # Nodes the liveness loop is declaring down right now: their heartbeat
        # answers renew no lease, or a renewal could land after the node_down
        # that requeues their tasks.
        # node id -> clock.monotonic() when its node_down was proposed.
        self.condemned: dict[str, float] = {}
        # Nodes whose agent reports its data disk under its reserve
        # (agent/diskguard.py): node id -> why. Nothing is placed on them;
        # in memory only, as heartbeats are: a new leader hears it again
        # within a heartbeat. `disk_epoch` counts changes, so that the
        # scheduler looks at every pending task again when one ends.
        self.disk_low: dict[str, str] = {}
        self.disk_epoch = 0
        self.on_disk_change: Callable[[], None] | None = None

    def reset(self, node_ids: Iterable[str], grace_s: float) -> None:
        """A new leader: every node counts as heard from `grace_s` from now."""
        self.last_seen = dict.fromkeys(node_ids, self._clock.monotonic() + grace_s)
        self.suspects, self.condemned = {}, {}
        self.disk_low = {}
        self.disk_epoch += 1

    def suspect(self, node_id: str) -> None:
        """The node's agent closed its connection (or died): count from now."""
        self.suspects.setdefault(node_id, self._clock.monotonic())

    def registered(self, node_id: str) -> None:
        """The node registered again: no longer suspect, heard from now. (A
        node_down already proposed stays condemned: it may still apply, after
        this registration, so the answer must not renew the lease.)"""
        self.suspects.pop(node_id, None)
        self.heard(node_id)

    def suspect_for(self, node_id: str) -> float | None:
        """Seconds since the node became suspect; None when it is not."""
        at = self.suspects.get(node_id)
        return None if at is None else self._clock.monotonic() - at

    def heard(self, node_id: str, stats: dict[str, Any] | None = None) -> None:
        now = self._clock.monotonic()
        self.last_seen[node_id] = now
        if stats is not None:
            self.live[node_id] = {**stats, "at": now}

    def overdue(self, node_ids: Iterable[str], ttl_s: float, confirm_s: float | None) -> list[str]:
        """The nodes among `node_ids`, in their order, silent for more than
        `ttl_s` or suspect for more than `confirm_s` (None: suspicion alone
        condemns nobody): what `silent_for` and `suspect_for` would say of
        each, read with one clock reading, as plain dict lookups (the
        liveness loop asks about every node twice a second)."""
        now = self._clock.monotonic()
        seen, suspects = self.last_seen, self.suspects
        out = []
        for nid in node_ids:
            heard = seen.get(nid)
            if heard is None:
                heard = seen[nid] = now  # never heard of: counts from now
            if now - heard > ttl_s:
                out.append(nid)
            elif confirm_s is not None:
                since = suspects.get(nid)
                if since is not None and now - since > confirm_s:
                    out.append(nid)
        return out

    def report_disk(self, node_id: str, low: str | None) -> None:
        """What a heartbeat says of the node's data disk: why it is under its
        reserve, or None when it is not."""
        if self.disk_low.get(node_id) == low:
            return
        if low is None:
            del self.disk_low[node_id]
            log.info("node %s: its disk has room again; it takes tasks again", node_id)
        else:
            if node_id not in self.disk_low:
                log.warning("node %s takes no new tasks: %s", node_id, low)
            self.disk_low[node_id] = low
        self.disk_epoch += 1
        if self.on_disk_change is not None:
            self.on_disk_change()

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
        """The node's last reported stats, with the time since the node was
        last heard from in `age_s` (figures come every few seconds, liveness
        every second)."""
        live = self.live.get(node_id)
        if live is None:
            return None
        heard = max(live["at"], self.last_seen.get(node_id, live["at"]))
        out = dict(live, age_s=round(self._clock.monotonic() - heard, 1))
        low = self.disk_low.get(node_id)
        if low is not None:
            out["disk_low"] = low
        return out
