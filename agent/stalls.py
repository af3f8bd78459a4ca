"""Event-loop stalls, for benchmarks only (`bench/reschedule.py --cause stall`).

`LEPTON_AGENT_TEST_STALL=MAX_S` makes the agent block its own event loop for
a random time up to MAX_S seconds, at random moments 1-5 s apart, as a long
garbage collection, a slow disk or an overloaded host would. Such an agent
must never be judged down. Inert without the variable.
"""

from __future__ import annotations

import logging
import os
import random

from leptond.clock import Clock

log = logging.getLogger("lepton.agent")
ENV = "LEPTON_AGENT_TEST_STALL"


def from_env() -> float | None:
    """The longest stall asked for, or None; ValueError for a bad value."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        max_s = float(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be a number of seconds, not {raw!r}") from None
    if not 0 < max_s <= 10:
        raise ValueError(f"{ENV} must be between 0 and 10 seconds, not {raw}")
    return max_s


async def stall_now_and_then(clock: Clock, max_s: float, seed: int | None = None) -> None:
    rng = random.Random(seed)
    n = 0
    while True:
        await clock.sleep(rng.uniform(1.0, 5.0))
        s = rng.uniform(0.0, max_s)
        n += 1
        log.info("test stall %d: blocking the event loop for %.3fs", n, s)
        clock.block(s)
