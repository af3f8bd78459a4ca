"""Task cgroups and device rules on this host's real kernel.

This host is hybrid: memory, cpu, pids, devices and freezer are v1
hierarchies (tested here directly, and end to end in test_isolation_e2e),
and the unified (v2) mount has no controllers enabled. A v2 cgroup there
still has cgroup.kill, cgroup.events and cpu.stat, and the eBPF device
program is enforced on it, so those parts of the v2 path are tested for real
too. The v2 memory.max, cpu.max, pids.max and memory.events files cannot be.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent import devfilter, gpudev
from agent.cgroup_task import TaskCgroup, from_json
from agent.cgroups import CgroupManager, Limits, V2Cgroups, detect, mounts
from agent.runner import TaskRunner, TaskSpec
from tests.harness import wait_for
from tests.isolation_support import gone, passable_dir, unix_users

ESCAPE = Path(__file__).resolve().parent / "scripts" / "escape.sh"


@contextlib.contextmanager
def _v1() -> Iterator[CgroupManager]:
    mgr = detect(f"t-{uuid.uuid4().hex[:10]}", "v1")
    try:
        yield mgr
    finally:
        mgr.sweep(set())
        mgr.close()


@contextlib.contextmanager
def _v2() -> Iterator[CgroupManager]:
    v2 = next(m for m in mounts() if m.version == 2)
    # The unified root here: nothing to delegate, no controllers to enable.
    mgr = V2Cgroups(f"t-{uuid.uuid4().hex[:10]}", v2, "/", delegate=False)
    try:
        yield mgr
    finally:
        mgr.sweep(set())
        mgr.close()


@pytest.fixture(params=["v1", "v2"])
def cgroups(request: pytest.FixtureRequest) -> Iterator[CgroupManager]:
    with _v1() if request.param == "v1" else _v2() as mgr:
        yield mgr


@pytest.fixture
def fake_gpus(tmp_path: Path) -> gpudev.GpuDevices:
    devs = gpudev.simulated(tmp_path, 4)
    assert devs.dir is not None and len(devs.paths) == 4
    return devs


def _in_cgroup(cg: TaskCgroup | None, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start `argv` inside `cg` (None: where this process is)."""

    def join() -> None:
        if cg is not None:
            cg.join_self()

    return subprocess.Popen(argv, preexec_fn=join, **kw)


OPEN_ALL = (
    "import errno, os, sys\n"
    "for p in sys.argv[1:]:\n"
    "    try:\n"
    "        os.close(os.open(p, os.O_RDWR))\n"
    "        print(p, 'OK')\n"
    "    except OSError as e:\n"
    "        print(p, errno.errorcode[e.errno])\n"
)


def _open_results(cg: TaskCgroup | None, paths: list[str]) -> dict[str, str]:
    """What opening each path gives a process in `cg`: OK or the errno's name."""
    p = _in_cgroup(cg, [sys.executable, "-c", OPEN_ALL, *paths], stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    pairs = [line.rsplit(" ", 1) for line in out.decode().splitlines()]
    return {k: v for k, v in pairs}


def test_a_task_opens_only_its_own_gpu_and_the_shared_devices(
    cgroups: CgroupManager, fake_gpus: gpudev.GpuDevices
) -> None:
    assert cgroups.filters_devices
    others = fake_gpus.others([2])
    deny = [gpudev.device_number(p) for p in others]
    cg = cgroups.create("gpu2_a1", Limits(deny_devices=tuple(d for d in deny if d)))
    got = _open_results(cg, [*fake_gpus.paths.values(), "/dev/null", "/dev/zero"])
    want = {p: ("EPERM" if p in others else "ENXIO") for p in fake_gpus.paths.values()}
    assert got == {**want, "/dev/null": "OK", "/dev/zero": "OK"}
    assert cg.remove()
    # Outside the task's cgroup nothing is denied: the rules are per task.
    assert set(_open_results(None, list(fake_gpus.paths.values())).values()) == {"ENXIO"}


def test_device_program_allows_exactly_what_it_does_not_list() -> None:
    # The program is small; its branches must send each pair the right way
    # however many GPUs a host has (real hosts: up to 16 per board).
    for deny in ([], [(195, 0)], [(195, m) for m in range(1, 16)], [(10, 200), (195, 7)]):
        code = devfilter.device_program(deny)
        assert len(code) % 8 == 0
        fd = devfilter.load_program(code)  # the kernel's verifier accepts it
        os.close(fd)


def test_kill_takes_every_process_even_setsid_double_forks(
    cgroups: CgroupManager, tmp_path: Path
) -> None:
    cg = cgroups.create("esc_a1", Limits())
    pidfile = tmp_path / "child.pid"
    main = _in_cgroup(cg, ["sh", str(ESCAPE), str(pidfile)], cwd=tmp_path)
    try:
        pid = int(wait_for(lambda: pidfile.read_text().strip(), 30, "the escaped child's pid"))
        child = psutil.Process(pid)
        born = child.create_time()
        assert os.getsid(pid) != os.getsid(main.pid)  # it left the task's session
        assert pid in cg.pids() and main.pid in cg.pids()
        cg.signal(15)  # both ignore SIGTERM
        time.sleep(0.2)
        assert not gone(pid, born)
        assert cg.kill()
        assert main.wait(10) == -9
        assert gone(pid, born)
        assert cg.is_empty()
        assert cg.usage().processes == 0
        assert cg.remove()
        assert cg.remove()  # removing twice is fine
    finally:
        main.kill()
        main.wait(10)


def test_usage_counts_the_cpu_of_every_process(cgroups: CgroupManager) -> None:
    cg = cgroups.create("cpu_a1", Limits())
    p = _in_cgroup(
        cg,
        ["sh", "-c", "(i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done) & wait"],
    )
    assert p.wait(120) == 0
    assert cg.usage().cpu_s > 0.01
    assert cg.remove()


def test_v1_limits_are_written_and_enforced(tmp_path: Path) -> None:
    with _v1() as mgr:
        cg = mgr.create("lim_a1", Limits(mem_bytes=64 << 20, cpus=1.5, pids_max=40))
        d = cg.to_json()["dirs"]
        assert Path(d["memory"], "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
        assert Path(d["cpu"], "cpu.cfs_quota_us").read_text().strip() == "150000"
        assert Path(d["cpu"], "cpu.cfs_period_us").read_text().strip() == "100000"
        assert Path(d["pids"], "pids.max").read_text().strip() == "40"
        # The kernel enforces the memory limit: a 512 MiB allocation is killed.
        hog = "b = bytearray(512 << 20); print('survived')"
        p = _in_cgroup(cg, [sys.executable, "-c", hog], stdout=subprocess.PIPE)
        out, _ = p.communicate(timeout=120)
        assert p.returncode == -9 and b"survived" not in out
        assert cg.oom_kills() >= 1
        assert cg.remove()


def test_a_restarted_agent_sweeps_cgroups_of_tasks_that_are_over(tmp_path: Path) -> None:
    with _v1() as mgr:
        keep = mgr.create("keep_a1", Limits())
        stale = mgr.create("stale_a1", Limits())
        p = _in_cgroup(stale, ["sleep", "1000"])
        try:
            assert mgr.sweep({"keep_a1"}) == ["stale_a1"]
            assert p.wait(10) == -9  # what was left in it is killed
            assert from_json(keep.to_json()) is not None
            assert keep.is_empty() and Path(keep.to_json()["dirs"]["memory"]).is_dir()
        finally:
            p.kill()
            p.wait(10)


def test_without_device_rules_a_private_mount_namespace_covers_other_gpus(
    tmp_path: Path,
) -> None:
    # What a task gets where no device program can be attached: its own mount
    # namespace, where the other GPUs' files are covered by an empty file that
    # only root could open. Nothing changes for the host's view of them.
    with passable_dir("lepton-ns-") as top, unix_users("ns") as (user,):
        from agent.identity import resolve

        devs = gpudev.simulated(top, 4)
        runner = TaskRunner(top / "tasks", cgroups=None)
        script = (
            'for i in 0 1 2 3; do cat $D/nvidia$i 2>&1 | sed "s/^/$i: /"; done; id -un; '
            "grep -c nvidia /proc/self/mountinfo"
        )
        spec = TaskSpec(
            task_id="ns_a1",
            argv=["sh", "-c", script],
            env={"D": str(devs.dir)},
            user=resolve(user.pw_name, False, "here"),
            denied_devices=devs.others([0]),
        )
        runner.start(spec)
        wait_for(lambda: not runner.running(), 60, "the task to end")
        (ex,) = runner.poll()
        out = (runner.task_dir("ns_a1") / "output.log").read_text()
        assert ex.exit_code == 0, (ex, out)
        lines = out.splitlines()
        assert "No such device or address" in lines[0]
        assert all("Permission denied" in line for line in lines[1:4]), out
        assert lines[4] == user.pw_name
        assert lines[5] == "3"  # three covers, in the task's namespace only
        assert "nvidia" not in Path("/proc/self/mountinfo").read_text()
        assert _open_results(None, [devs.paths[1]]) == {devs.paths[1]: "ENXIO"}
