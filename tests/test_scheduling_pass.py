"""The leader's scheduling pass (leptond/controllers.py) on a real state
(tests/controllers_support.py): what an idle pass does and does not redo."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import scheduler
from tests.controllers_support import Leader

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ld(tmp_path: Path) -> Iterator[Leader]:
    leader = Leader(tmp_path)
    yield leader
    leader.close()


def test_an_idle_pass_over_a_state_it_planned_nothing_for_is_not_redone(
    ld: Leader, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[int] = []
    real = scheduler.schedule

    def counted(*args: Any) -> scheduler.Plan:
        passes.append(1)
        return real(*args)

    monkeypatch.setattr(scheduler, "schedule", counted)
    h = ld.h
    h.register("n1", gpus=1)
    h.submit("a", gpus=1)
    h.run("a.0", "n1", [0])
    h.ok("cancel_job", {"job_id": "a", "user": "alice"})  # a stop to carry out
    h.submit("big", gpus=2)  # fits nowhere
    ld.idle_pass()
    assert len(passes) == 1 and ld.c.reasons["big.0"]
    ld.idle_pass()
    # Nothing was committed since: the same plan (none) is not worked out again,
    # but the stop still goes out again, in case the agent missed it.
    assert len(passes) == 1
    assert ld.channel.stops == [("n1", ["a.0"]), ("n1", ["a.0"])]
    assert ld.c.reasons["big.0"]
    h.submit("small", gpus=1)
    ld.idle_pass()
    assert len(passes) == 2
