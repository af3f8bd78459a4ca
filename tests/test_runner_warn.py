"""Warning signals with real shims and real task processes: before the time
limit, at a preemption's stop (instead of SIGTERM) and when the leader asks
(a drain deadline is near). exit.json says the task was warned."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runner import TaskRunner, TaskSpec
from tests.test_runner import exit_of, kill_everything_under, log_text, wait_for

# Writes its checkpoint line and exits 0 on SIGUSR1; otherwise runs on. The
# signal goes to the whole group, so a sleep it kills makes the shell print
# "User defined signal 1" on stderr. Ignoring it in the sleep's subshell left
# a window between fork and trap where it still killed; the shell's stderr goes
# to /dev/null instead, so the log holds only the lines the test checks.
CHECKPOINTS = [
    "sh",
    "-c",
    "exec 2>/dev/null; trap 'echo checkpoint; exit 0' USR1; echo ready; "
    "while :; do sleep 0.05; done",
]
USR1 = int(signal.SIGUSR1)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[TaskRunner]:
    root = tmp_path / "tasks"
    r = TaskRunner(root)
    try:
        yield r
    finally:
        r.close()
        kill_everything_under(root)


def spec(task_id: str, **kw: object) -> TaskSpec:
    return TaskSpec(
        task_id=task_id,
        argv=CHECKPOINTS,
        kill_grace_s=2.0,
        log_cap_bytes=1 << 20,
        warn_signal=USR1,
        **kw,  # type: ignore[arg-type]
    )


def test_the_warning_comes_before_the_time_limit(runner: TaskRunner) -> None:
    # Warned 2 s after the start, long before the limit.
    runner.start(spec("t1", time_limit_s=60.0, warn_before_s=58.0))
    ex = exit_of(runner, "t1", timeout_s=30)
    assert (ex.exit_code, ex.warned) == (0, True)
    assert log_text(runner, "t1").startswith("ready\ncheckpoint\n")


def test_a_stop_with_warn_sends_the_signal_instead_of_sigterm(runner: TaskRunner) -> None:
    runner.start(spec("t1"))
    wait_for(lambda: "ready" in log_text(runner, "t1"), "the task to start")
    runner.stop("t1", grace_s=30.0, warn=True)
    ex = exit_of(runner, "t1")
    assert (ex.exit_code, ex.warned) == (0, True)
    assert "checkpoint\n" in log_text(runner, "t1")


def test_the_leader_asks_for_the_warning(runner: TaskRunner) -> None:
    runner.start(spec("t1"))
    wait_for(lambda: "ready" in log_text(runner, "t1"), "the task to start")
    runner.warn("t1")
    ex = exit_of(runner, "t1")
    assert (ex.exit_code, ex.warned) == (0, True)


def test_without_a_warning_signal_nothing_is_sent(runner: TaskRunner) -> None:
    runner.start(TaskSpec(task_id="t1", argv=CHECKPOINTS, kill_grace_s=2.0, log_cap_bytes=1 << 20))
    wait_for(lambda: "ready" in log_text(runner, "t1"), "the task to start")
    runner.warn("t1")  # asked for none: the shim ignores it
    runner.stop("t1")
    ex = exit_of(runner, "t1")
    assert (ex.exit_code, ex.warned) == (128 + signal.SIGTERM, False)
    assert "checkpoint" not in log_text(runner, "t1")
