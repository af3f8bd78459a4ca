"""Faults, drawn from the run's generator, and their healing.

During a stormy phase each step may start one fault; each heals after a
drawn time (a crashed agent is restarted, a paused one resumed, a cut link
mended), and all of them heal at once when a calm phase begins. Message
loss, duplication and lateness are set per stormy phase.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .masters import SimMaster
    from .net import Network
    from .node import SimNode
    from .raftmodel import SimRaft
    from .trace import Trace
    from .vtime import SimClock

# How often each fault strikes in a storm, per second of virtual time.
FAULTS: tuple[tuple[str, float], ...] = (
    ("crash", 0.025),
    ("pause", 0.015),
    ("cut", 0.025),
    ("split", 0.006),
    ("isolate", 0.012),
    ("depose", 0.008),
    ("slow", 0.008),
    ("clock", 0.010),
    ("restart", 0.010),
)
# A draw above this starts no fault (the loop below subtracts each share in
# turn; the margin is far above what rounding could move it by).
_NO_FAULT_ABOVE = sum(p for _, p in FAULTS) * (1 + 1e-9) + 1e-12


class Chaos:
    def __init__(
        self,
        rng: random.Random,
        clock: SimClock,
        net: Network,
        raft: SimRaft,
        masters: Sequence[SimMaster],
        nodes: Sequence[SimNode],
        trace: Trace,
        step_s: float,
    ) -> None:
        self.rng = rng
        self.step_s = step_s
        self.clock = clock
        self.net = net
        self.raft = raft
        self.masters = list(masters)
        self.nodes = list(nodes)
        self.trace = trace
        self.counts: dict[str, int] = {}
        self._acts: dict[str, Callable[[], None]] = {
            "crash": self._crash,
            "pause": self._pause,
            "cut": self._cut,
            "split": self._split,
            "isolate": self._isolate,
            "depose": self._depose,
            "slow": self._slow,
            "clock": self._clock,
            "restart": self._restart_planned,
        }

    def storm(self) -> None:
        """A stormy phase begins: how lossy the network is in it."""
        rng = self.rng
        net = self.net
        net.loss = rng.choice((0.0, 0.0, 0.005, 0.02, 0.05))
        net.dup = rng.choice((0.0, 0.0, 0.01, 0.05))
        net.late = rng.choice((0.0, 0.02, 0.1))
        self.trace(f"storm: loss {net.loss} dup {net.dup} late {net.late}")

    def step(self) -> None:
        """Maybe start one fault (one step of `step_s` seconds passes)."""
        r = self.rng.random() / self.step_s
        if r > _NO_FAULT_ABOVE:
            return  # most steps: past every fault's share, whatever the rounding
        for name, p in FAULTS:
            if r < p:
                self.counts[name] = self.counts.get(name, 0) + 1
                self._acts[name]()
                return
            r -= p

    def calm(self) -> None:
        """Heal everything now (clock offsets stay: nothing sets them back)."""
        net = self.net
        net.loss = net.dup = net.late = 0.0
        net.cut.clear()
        for m in self.masters:
            self.raft.heal(m.member)
        self.raft.slow_until = -1.0
        for n in self.nodes:
            n.resume()
            if not n.up:
                n.start()
        self.trace("calm: every fault healed")

    def _later(self, lo: float, hi: float, fn: Callable[..., Any], *args: Any) -> None:
        self.clock.call_later(self.rng.uniform(lo, hi), fn, *args)

    def _leader(self) -> SimMaster | None:
        cur = self.raft.leader
        return next((m for m in self.masters if m.member is cur), None)

    def _pick_master(self) -> SimMaster:
        lead = self._leader()
        if lead is not None and self.rng.random() < 0.7:
            return lead
        return self.rng.choice(self.masters)

    # -- the faults ------------------------------------------------------------------
    def _crash(self) -> None:
        n = self.rng.choice(self.nodes)
        if not n.up:
            return
        n.crash()
        self._later(0.5, 15.0, self._restart, n, n.lives)

    def _restart(self, n: SimNode, lives: int) -> None:
        if not n.up and n.lives == lives:
            n.start()

    def _restart_planned(self) -> None:
        """`systemctl restart` of an agent: it hands over, and the next one
        starts 0.2-5 s after it exited."""
        n = self.rng.choice(self.nodes)
        if n.up and not n.clock.paused:
            n.stop(self.rng.uniform(0.2, 5.0))

    def _pause(self) -> None:
        n = self.rng.choice(self.nodes)
        if not n.up or n.clock.paused:
            return
        n.pause()
        self._later(1.0, 16.0, n.resume)

    def _cut(self) -> None:
        n = self.rng.choice(self.nodes)
        lead = self._leader()
        targets = [lead] if lead is not None and self.rng.random() < 0.6 else self.masters
        pairs = [frozenset((n.name, m.name)) for m in targets]
        self.trace(f"cut {n.name} from {','.join(m.name for m in targets)}")
        self._apply_cut(pairs, 1.0, 20.0)

    def _apply_cut(self, pairs: list[frozenset[str]], lo: float, hi: float) -> None:
        new = [p for p in pairs if p not in self.net.cut]
        self.net.cut.update(new)
        self._later(lo, hi, self._mend, new)

    def _mend(self, pairs: list[frozenset[str]]) -> None:
        mended = [p for p in pairs if p in self.net.cut]
        if mended:
            self.net.cut.difference_update(mended)
            self.trace(f"mended {len(mended)} link(s)")

    def _split(self) -> None:
        """One master and some agents on one side, the rest on the other."""
        x = self._pick_master()
        side = [n for n in self.nodes if self.rng.random() < 0.5]
        others = [m for m in self.masters if m is not x]
        pairs = [frozenset((x.name, n.name)) for n in self.nodes if n not in side]
        pairs += [frozenset((m.name, n.name)) for m in others for n in side]
        self.trace(f"split: {x.name} with {','.join(n.name for n in side) or 'no agent'}")
        self.raft.isolate(x.member)
        heal_s = self.rng.uniform(1.0, 15.0)
        new = [p for p in pairs if p not in self.net.cut]
        self.net.cut.update(new)
        self.clock.call_later(heal_s, self._mend, new)
        self.clock.call_later(heal_s, self.raft.heal, x.member)

    def _isolate(self) -> None:
        x = self._pick_master()
        self.raft.isolate(x.member)
        self._later(0.5, 10.0, self.raft.heal, x.member)

    def _depose(self) -> None:
        self.raft.depose()

    def _slow(self) -> None:
        seconds = self.rng.uniform(1.0, 8.0)
        self.trace(f"commits slow for {seconds:.1f}s")
        self.raft.slow_commits(seconds)

    def _clock(self) -> None:
        n = self.rng.choice(self.nodes)
        jump = self.rng.uniform(0.1, 600.0) * self.rng.choice((-1, 1))
        n.jump_clock(jump)
        if self.rng.random() < 0.5:
            self._later(5.0, 60.0, n.jump_clock, -jump)
