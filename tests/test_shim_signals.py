"""A task's supervisor signals each of its processes once: a second SIGTERM or
warning signal means something to many programs (torchrun and most shells
stop harder on the second). The task's process group gets it in one call (a
shell signalled apart from its child could wake from the child's death first
and print "Terminated" into the log), and only the members of its cgroup
outside that group (setsid, setpgid) get it one by one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from agent import cgroup_task, shim
from tests.harness import wait_for


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


# Process groups of the fake task's processes: 4242 leads the task's group
# (4243 is its child), 5000 left it with setsid and 5001 is that one's child.
GROUPS = {4242: 4242, 4243: 4242, 5000: 5000, 5001: 5000}


@pytest.fixture
def killpg(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(shim, "_killpg", lambda pgid, sig: calls.append((pgid, sig)))
    monkeypatch.setattr(shim, "_pgid", GROUPS.get)
    return calls


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(
        shim, "signal_pids", lambda pids, sig: calls.extend((p, sig) for p in sorted(pids))
    )
    return calls


def test_a_task_in_its_cgroup_gets_each_signal_once(
    tmp_path: Path, killpg: list[tuple[int, int]], kills: list[tuple[int, int]]
) -> None:
    cg = FakeCgroup(set(GROUPS))
    s = supervisor(tmp_path, cg)
    s.kill_task(signal.SIGTERM)
    s.kill_task(signal.SIGUSR1)
    # The group in one call each time, the two outside it one by one.
    assert killpg == [(4242, signal.SIGTERM), (4242, signal.SIGUSR1)]
    assert kills == [
        (5000, signal.SIGTERM), (5001, signal.SIGTERM),
        (5000, signal.SIGUSR1), (5001, signal.SIGUSR1),
    ]  # fmt: skip
    assert cg.sent == []  # not the whole cgroup on top of its group


def test_a_task_not_yet_in_its_cgroup_is_reached_through_its_group(
    tmp_path: Path, killpg: list[tuple[int, int]], kills: list[tuple[int, int]]
) -> None:
    cg = FakeCgroup(set())  # forked, not joined yet (it joins before exec)
    s = supervisor(tmp_path, cg)
    s.kill_task(signal.SIGTERM)
    assert (killpg, kills) == ([(4242, signal.SIGTERM)], [])


def test_sigkill_takes_the_cgroup_and_the_group_and_without_a_cgroup_the_group(
    tmp_path: Path, killpg: list[tuple[int, int]]
) -> None:
    cg = FakeCgroup({4242})
    supervisor(tmp_path, cg).kill_task(signal.SIGKILL)
    assert (cg.killed, killpg) == (1, [(4242, signal.SIGKILL)])
    killpg.clear()
    supervisor(tmp_path, None).kill_task(signal.SIGTERM)
    assert killpg == [(4242, signal.SIGTERM)]


class ProcsCgroup(FakeCgroup):
    """Real processes: the members are the task's process tree."""

    def __init__(self, root: int) -> None:
        super().__init__(set())
        self.root = root

    def pids(self) -> set[int]:
        p = psutil.Process(self.root)
        return {self.root, *(c.pid for c in p.children(recursive=True))}

    def signal(self, sig: int) -> None:
        cgroup_task.signal_pids(self.pids(), sig)


def test_real_processes_in_and_out_of_the_group_each_get_a_signal_once(tmp_path: Path) -> None:
    got = tmp_path / "got"
    loop = "while :; do sleep 0.05; done"

    def member(name: str) -> str:
        return f"trap 'echo {name} TERM >> {got}' TERM; trap 'echo {name} XCPU >> {got}' XCPU; "

    script = (
        f"{member('leader')}"
        f'sh -c "{member("child")} touch {tmp_path}/child; {loop}" & '
        f'setsid sh -c "{member("escapee")} touch {tmp_path}/escapee; {loop}" & '
        f"{loop}"
    )
    task = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        wait_for(
            lambda: (tmp_path / "child").exists() and (tmp_path / "escapee").exists(),
            30,
            "the child and the escapee to start",
        )
        s = supervisor(tmp_path, ProcsCgroup(task.pid), task_pid=task.pid)
        s.kill_task(signal.SIGTERM)
        # XCPU (24) after TERM (15): a second TERM sent by that call would be
        # handled before it, so once every XCPU is written, every TERM is.
        s.kill_task(signal.SIGXCPU)

        def lines() -> list[str]:
            return got.read_text().splitlines() if got.exists() else []

        wait_for(lambda: sum("XCPU" in x for x in lines()) == 3, 30, "three XCPU traps")
        terms = sorted(x for x in lines() if "TERM" in x)
        assert terms == ["child TERM", "escapee TERM", "leader TERM"], lines()
    finally:
        for p in ProcsCgroup(task.pid).pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        task.wait(timeout=30)
