"""What a task leaves behind does not outlive it, and it gets a memory limit
and an ordinary OOM score however it was submitted.

Real processes: one master and one root agent with an OOM score of its own
(its systemd unit sets OOMScoreAdjust=-999; lowering a score needs
CAP_SYS_RESOURCE, which a test host may not grant, so here it is raised with
`choom`: inheriting it shows the same way), a small memory limit for all its
tasks and a short retention for finished tasks' files.
Tasks run as a Unix account made for this module and removed after it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import Cluster, wait_for
from tests.isolation_support import passable_dir, unix_users

HOST = "lohost"
TASKS_MEM = 512 << 20
RETENTION_S = 20
AGENT_OOM_SCORE = 500
PY = "/usr/bin/python3"  # the host's own: the venv's may not be the task user's to run


@dataclass
class Lo:
    cluster: Cluster
    user: str
    token: str  # the user's submit token
    kept: Path  # under /tmp, kept visible to tasks by --keep-visible

    def run_dir(self, job: str) -> Path:
        return self.cluster.root / f"agent-{HOST}" / "tasks" / f"{job}.0_a1"

    def run(self, script: str, *flags: str) -> tuple[dict[str, object], str]:
        """Run `sh -c script` as the user to the end: (status, output)."""
        job = self.cluster.submit(*flags, "--", "sh", "-c", script, token=self.token)
        st = self.cluster.wait_job(job, {"succeeded", "failed"}, timeout_s=60)
        return st, self.cluster.ctl("logs", job, token=self.token).stdout


@pytest.fixture(scope="module")
def lo() -> Iterator[Lo]:
    with (
        passable_dir("lepton-lo-") as top,
        unix_users("carol") as (carol,),
        tempfile.TemporaryDirectory(prefix="lepton-kept-", dir="/tmp") as kept,
    ):
        # A host directory under /tmp the admin keeps visible to tasks.
        os.chmod(kept, 0o755)
        (Path(kept) / "shared.txt").write_text("shared with tasks\n")
        c = Cluster(top / "cluster", n_masters=1, ttl_s=5.0)
        try:
            c.start_masters()
            c.start_agent(
                HOST,
                gpus="1",
                extra=[
                    "--tasks-mem-max", str(TASKS_MEM),
                    "--task-retention", f"{RETENTION_S}s",
                    "--keep-visible", kept,
                ],
                wrap=["choom", "-n", str(AGENT_OOM_SCORE), "--"],
            )  # fmt: skip
            c.wait_nodes_ready(1, timeout_s=60)
            tok = c.ctl(
                "token", "create", "--role", "submit", "--name", "carol",
                "--unix-user", carol.pw_name,
            ).stdout.strip()  # fmt: skip
            yield Lo(c, carol.pw_name, tok, Path(kept))
        finally:
            c.close()


def _shm_script(key: int, create: bool) -> str:
    """Python that makes (or looks for) a SysV shared memory segment."""
    flags = "0o1666" if create else "0"
    size = "1 << 20" if create else "0"
    return (
        f"{PY} -c 'import ctypes; l = ctypes.CDLL(None); "
        f'print("shm", "found" if l.shmget({key}, {size}, {flags}) >= 0 else "none")\''
    )


# ------------------------------------------------------------- /tmp, /dev/shm, IPC


def test_files_in_tmp_and_dev_shm_and_sysv_ipc_do_not_outlive_the_task(lo: Lo) -> None:
    c = lo.cluster
    mark = f"lo-left-{os.getpid()}"
    key = 0x7E570000 + os.getpid() % 0xFFFF
    host_files = [Path("/dev/shm") / mark, Path("/tmp") / mark]
    try:
        # The first task leaves things behind and waits until it is told to end.
        leaver = c.submit(
            "--", "sh", "-c",
            f"echo kept > /dev/shm/{mark} && echo kept > /tmp/{mark} && "
            f"{_shm_script(key, True)} && while [ ! -e go ]; do sleep 0.1; done",
            token=lo.token,
        )  # fmt: skip
        c.wait_job(leaver, {"running"}, timeout_s=60)
        wait_for(
            lambda: "shm found" in c.ctl("logs", leaver, token=lo.token).stdout,
            60,
            "the first task's leftovers",
        )
        look = (
            f"ls /dev/shm/{mark} /tmp/{mark} 2>&1; {_shm_script(key, False)}; "
            f"ipcs -m | grep -ci {key:x} || true"
        )
        # Neither the host nor another task (of the same user) sees them meanwhile.
        assert not any(p.exists() for p in host_files)
        st, meanwhile = lo.run(look)
        assert st["state"] == "succeeded", st
        assert meanwhile.count("No such file or directory") == 2, meanwhile
        assert "shm none" in meanwhile and meanwhile.rstrip().endswith("0"), meanwhile
        (lo.run_dir(leaver) / "work" / "go").touch()
        assert c.wait_job(leaver, {"succeeded", "failed"})["state"] == "succeeded"
        # And after it ended, nothing of it is anywhere.
        st, after = lo.run(look)
        assert after.count("No such file or directory") == 2 and "shm none" in after, after
        assert not any(p.exists() for p in host_files)
        host_ipc = subprocess.run(["ipcs", "-m"], capture_output=True, text=True, timeout=30)
        assert f"{key:x}" not in host_ipc.stdout.lower()
    finally:
        for p in host_files:
            p.unlink(missing_ok=True)
        subprocess.run(["ipcrm", "-M", str(key)], capture_output=True, timeout=30)


def test_the_private_tmp_and_dev_shm_are_sized_to_the_tasks_memory(lo: Lo) -> None:
    mark = f"lo-big-{os.getpid()}"
    try:
        st, out = lo.run(
            f"df -k /dev/shm /tmp | tail -n 2 | tr -s ' ' | cut -d' ' -f2; "
            f"head -c 100000000 /dev/zero > /dev/shm/{mark}; echo rc=$?",
            "--mem", "64M",
        )  # fmt: skip
        sizes = out.splitlines()[:2]
        assert sizes == [str(64 << 10)] * 2, out
        # 100 MB do not fit: the tmpfs is full, or the task's memory is.
        assert "rc=0" not in out, (st, out)
        assert not (Path("/dev/shm") / mark).exists()
    finally:
        (Path("/dev/shm") / mark).unlink(missing_ok=True)


def test_a_directory_kept_visible_is_seen_through_the_private_tmp(lo: Lo) -> None:
    hidden = Path("/tmp") / f"lo-hidden-{os.getpid()}"
    hidden.write_text("not for tasks\n")
    try:
        st, out = lo.run(f"cat {lo.kept}/shared.txt; cat {hidden} 2>&1; df -k {lo.kept} /tmp")
        assert st["state"] == "succeeded", (st, out)
        assert "shared with tasks" in out and "not for tasks" not in out, out
        assert "No such file or directory" in out, out
    finally:
        hidden.unlink(missing_ok=True)


def test_a_cwd_in_the_hosts_tmp_is_refused_not_bound_through_the_private_one(
    lo: Lo, tmp_path: Path
) -> None:
    # A job file may name any absolute cwd; one in the host's /tmp would be
    # kept visible, a hole in the task's own /tmp.
    hostdir = Path(tempfile.mkdtemp(prefix="lo-cwd-", dir="/tmp"))
    try:
        os.chmod(hostdir, 0o777)
        job_toml = tmp_path / "job.toml"
        job_toml.write_text(f'command = "sh -c \'echo x > planted; pwd\'"\ncwd = "{hostdir}"\n')
        job = lo.cluster.submit("-f", str(job_toml), token=lo.token)
        st = lo.cluster.wait_job(job, {"succeeded", "failed"}, timeout_s=60)
        task = st["tasks"][0]  # type: ignore[index]
        assert st["state"] == "failed", st
        assert task["message"] == (
            f"cwd {hostdir} is in the host's /tmp or /dev/shm, which the task does not see "
            "(it has its own): give a directory elsewhere, or a workdir"
        ), task
        assert not (hostdir / "planted").exists()
        # One the admin keeps visible is the host's on purpose.
        job_toml.write_text(f'command = "sh -c \'cat shared.txt\'"\ncwd = "{lo.kept}"\n')
        job = lo.cluster.submit("-f", str(job_toml), token=lo.token)
        st = lo.cluster.wait_job(job, {"succeeded", "failed"}, timeout_s=60)
        assert st["state"] == "succeeded", st
        assert "shared with tasks" in lo.cluster.ctl("logs", job, token=lo.token).stdout
    finally:
        shutil.rmtree(hostdir, ignore_errors=True)


def test_the_agent_refuses_a_keep_visible_that_is_not_a_directory(tmp_path: Path) -> None:
    for bad in ("relative/dir", str(tmp_path / "missing")):
        r = subprocess.run(
            [sys.executable, "-m", "agent.cli", "run", "--masters", "127.0.0.1:1",
             "--data-dir", str(tmp_path / "d"), "--keep-visible", bad],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2, r
        assert r.stderr.strip().splitlines() == [
            f"lepton-agent: --keep-visible: {bad!r} is not an absolute path to a directory"
        ], r.stderr
        assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------ memory


def test_a_task_without_mem_gets_the_hosts_limit_for_tasks(lo: Lo) -> None:
    c = lo.cluster
    node = next(n for n in c.nodes() if n["name"] == HOST)
    assert node["mem_bytes"] == TASKS_MEM  # what the node offers is what it enforces
    st, out = lo.run(
        "cat /sys/fs/cgroup/memory$(grep :memory: /proc/self/cgroup | cut -d: -f3)"
        "/memory.limit_in_bytes"
    )
    assert st["state"] == "succeeded" and out.strip() == str(TASKS_MEM), (st, out)
    # All tasks together are held to it too, in their parent cgroup.
    own = Path("/proc/self/cgroup").read_text()
    mine = next(line.split(":", 2)[2] for line in own.splitlines() if ":memory:" in line)
    parent = Path("/sys/fs/cgroup/memory") / mine.lstrip("/") / f"leptond-{node['id']}"
    assert (parent / "memory.limit_in_bytes").read_text().strip() == str(TASKS_MEM)
    # More than that ends as any out-of-memory task does.
    hog = f"exec {PY} -c 'b = bytearray(768 << 20); print(\"survived\")'"
    st, out = lo.run(hog)
    t = st["tasks"][0]  # type: ignore[index]
    assert st["state"] == "failed" and "survived" not in out, (st, out)
    assert t["message"] == "out of memory (limit 512.0 MiB)" and t["exit_code"] == 137, t


def test_a_task_never_inherits_the_agents_oom_protection(lo: Lo) -> None:
    agent = next(p for p in lo.cluster.agents if p.name == HOST)
    assert Path(f"/proc/{agent.pid}/oom_score_adj").read_text().strip() == str(AGENT_OOM_SCORE)
    st, out = lo.run(
        "cat /proc/self/oom_score_adj; "
        "(echo -500 > /proc/self/oom_score_adj) 2>/dev/null && echo lowered; "
        "cat /proc/self/oom_score_adj"
    )
    assert st["state"] == "succeeded", st
    # Neutral, and the task cannot make itself the last one the kernel kills.
    assert out.split() == ["0", "0"], out


# ------------------------------------------------------- finished tasks' files


def test_a_finished_tasks_directory_goes_after_the_retention(lo: Lo) -> None:
    c = lo.cluster
    job = c.submit("--", "sh", "-c", "echo done; head -c 1000000 /dev/zero > junk", token=lo.token)
    assert c.wait_job(job, {"succeeded", "failed"}, timeout_s=60)["state"] == "succeeded"
    rd = lo.run_dir(job)
    # Kept a while: the output can still be read ...
    assert (rd / "work" / "junk").exists()
    assert c.ctl("logs", job, token=lo.token).stdout == "done\n"
    acked = rd / "acked"
    wait_for(acked.exists, 60, "the exit to be acked")
    # ... then deleted, work dir and all.
    wait_for(lambda: not rd.exists(), RETENTION_S + 60, f"{rd} to be deleted")
    out = c.ctl("logs", job, token=lo.token, check=False)
    assert out.returncode != 0 and f"kept for {RETENTION_S}s" in out.stderr, out
    agent_log = next(p for p in c.agents if p.name == HOST).log.read_text()
    assert "deleted the directories of" in agent_log
    assert not any(p.name.startswith(".gone-") for p in rd.parent.iterdir())
    assert len(out.stderr.strip().splitlines()) == 1
