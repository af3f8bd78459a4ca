"""A task's supervisor signals each of its processes once: a second SIGTERM or
warning signal means something to many programs (torchrun and most shells
stop harder on the second), so the process group is not signalled again on
top of the cgroup, which holds it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from agent import shim


class FakeCgroup:
    def __init__(self, pids: set[int]) -> None:
        self._pids = pids
        self.sent: list[int] = []
        self.killed = 0

    def pids(self) -> set[int]:
        return set(self._pids)

    def signal(self, sig: int) -> None:
        self.sent.append(sig)

    def kill(self) -> bool:
        self.killed += 1
        return True


def supervisor(tmp_path: Path, cgroup: FakeCgroup | None, task_pid: int = 4242) -> shim.Shim:
    s = shim.Shim(tmp_path)
    s.task_pid = task_pid
    s.cgroup = cgroup  # type: ignore[assignment]
    return s


@pytest.fixture
def killpg(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(shim, "_killpg", lambda pgid, sig: calls.append((pgid, sig)))
    return calls


def test_a_task_in_its_cgroup_gets_each_signal_once(
    tmp_path: Path, killpg: list[tuple[int, int]]
) -> None:
    cg = FakeCgroup({4242, 4243})
    s = supervisor(tmp_path, cg)
    s.kill_task(signal.SIGTERM)
    s.kill_task(signal.SIGUSR1)
    assert cg.sent == [signal.SIGTERM, signal.SIGUSR1]
    assert killpg == []


def test_a_task_not_yet_in_its_cgroup_is_reached_through_its_group(
    tmp_path: Path, killpg: list[tuple[int, int]]
) -> None:
    cg = FakeCgroup(set())  # forked, not joined yet (it joins before exec)
    s = supervisor(tmp_path, cg)
    s.kill_task(signal.SIGTERM)
    assert killpg == [(4242, signal.SIGTERM)]


def test_sigkill_takes_the_cgroup_and_the_group_and_without_a_cgroup_the_group(
    tmp_path: Path, killpg: list[tuple[int, int]]
) -> None:
    cg = FakeCgroup({4242})
    supervisor(tmp_path, cg).kill_task(signal.SIGKILL)
    assert (cg.killed, killpg) == (1, [(4242, signal.SIGKILL)])
    killpg.clear()
    supervisor(tmp_path, None).kill_task(signal.SIGTERM)
    assert killpg == [(4242, signal.SIGTERM)]
