"""The leader's scheduling pass (leptond/controllers.py) on a real state
(tests/controllers_support.py): what an idle pass does and does not redo."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import scheduler
from leptond import controllers
from tests.controllers_support import Leader

pytestmark = pytest.mark.timeout(60)


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


def test_a_burst_of_registrations_with_work_waiting_costs_a_few_passes_not_one_each(
    ld: Leader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each registration commits and wakes the pass, and frees capacity, so
    each asks for a full one (every node, every pending task). Passes are
    paced by what they cost: 100 registrations 5 ms apart, with passes that
    take 20 ms, are taken by a few passes, and the work still gets placed."""
    passes: list[float] = []
    real = scheduler.schedule

    def costly(*args: Any) -> scheduler.Plan:
        passes.append(ld.clock.monotonic())
        ld.loop.now.t += 0.02  # this pass takes 20 ms (virtual time)
        return real(*args)

    monkeypatch.setattr(scheduler, "schedule", costly)
    h = ld.h
    h.submit("big", gpus=16)  # fits nowhere, ever: every pass has work to look at

    async def scenario() -> None:
        loop_task = asyncio.ensure_future(_passes_forever(ld))
        for i in range(100):
            h.register(f"n{i:03d}", gpus=1)
            ld.c.wake()  # as the Proposer does after each registration commits
            await ld.clock.sleep(0.005)
        h.submit("small", gpus=1)
        ld.c.wake()
        await ld.clock.sleep(1.0)
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)

    ld.run(scenario())
    # 0.5 s of registrations, passes of 20 ms each followed by a 60 ms gap:
    # about one pass per 80 ms, not one per registration.
    assert 2 <= len(passes) <= 15, len(passes)
    assert ld.task("small.0").state == "assigned"
    assert ld.c.reasons["big.0"]


def test_a_stream_of_submit_batches_costs_a_few_incremental_passes_not_one_each(
    ld: Leader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each submit batch commits and wakes the pass, but frees no capacity,
    so each asks only for an incremental one, which still costs O(pending).
    Those are paced by what they cost too: 100 batches 5 ms apart, with
    passes that take 20 ms, are taken by a few passes, and every new task is
    still looked at (it gets a reason, or a node)."""
    passes: list[float] = []
    real = scheduler.schedule

    def costly(*args: Any) -> scheduler.Plan:
        passes.append(ld.clock.monotonic())
        ld.loop.now.t += 0.02  # this pass takes 20 ms (virtual time)
        return real(*args)

    h = ld.h
    h.register("n1", gpus=1)
    h.submit("big", gpus=16)  # fits nowhere, ever
    ld.idle_pass()  # the full pass: from here on, only submits commit

    monkeypatch.setattr(scheduler, "schedule", costly)

    async def scenario() -> None:
        loop_task = asyncio.ensure_future(_passes_forever(ld))
        for i in range(100):
            h.submit(f"w{i:03d}", gpus=8)  # fits nowhere either
            ld.c.wake()  # as the Proposer does after each submit batch commits
            await ld.clock.sleep(0.005)
        h.submit("small", gpus=1)
        ld.c.wake()
        await ld.clock.sleep(1.0)
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)

    ld.run(scenario())
    # 0.5 s of batches, passes of 20 ms each followed by a 200 ms gap: about
    # one pass per 220 ms; back to back they would be 25 or more.
    assert 2 <= len(passes) <= 10, len(passes)
    assert ld.task("small.0").state == "assigned"
    assert all(ld.c.reasons[f"w{i:03d}.0"] for i in range(100))


async def _passes_forever(ld: Leader) -> None:
    while True:
        await ld.c.scheduling_pass()


def test_a_full_pass_over_a_long_queue_reads_it_in_a_thread_and_plans_the_same(
    ld: Leader, monkeypatch: pytest.MonkeyPatch
) -> None:
    threaded: list[str] = []
    real = asyncio.to_thread

    async def noted(fn: Any, *args: Any, **kw: Any) -> Any:
        threaded.append(getattr(fn, "__name__", "?"))
        return await real(fn, *args, **kw)

    monkeypatch.setattr(asyncio, "to_thread", noted)
    h = ld.h
    h.register("n1", gpus=2)
    n = controllers.FULL_PASS_IN_THREAD_PENDING + 10
    h.now += 1.0
    jobs = [
        {
            "id": f"j{i:05d}",
            "user": "alice",
            "spec": {"argv": ["true"], "gpus": 1},
            "submitted_at": h.now,
        }
        for i in range(n)
    ]
    h.ok("submit_jobs", {"jobs": jobs})
    ld.idle_pass()
    assert "inputs" in threaded
    # The two oldest are placed, the rest wait with a reason, as inline.
    assert [ld.task(f"j{i:05d}.0").state for i in range(3)] == ["assigned", "assigned", "pending"]
    assert ld.c.reasons[f"j{n - 1:05d}.0"]
