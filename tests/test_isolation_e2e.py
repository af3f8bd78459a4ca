"""Tasks run as their users, inside enforced limits, and see only their GPUs.

Real processes throughout: one master and two agents with four simulated
GPUs each, as root, on loopback. Host `v1host` puts tasks in cgroup v1
hierarchies (what this machine has for memory, cpu, pids, devices and
freezer); host `v2host` uses the unified (v2) mount, which here has no
controllers, so it shows the v2 whole-task kill and the eBPF device rules.
Tasks run as Unix accounts made for this module and removed after it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness import Cluster, Proc, env, free_ports, wait_for
from tests.isolation_support import gone, passable_dir, unix_users

ESCAPE = Path(__file__).resolve().parent / "scripts" / "escape.sh"
KILL_GRACE_S = 2.0  # what the harness gives masters and agents
PIDS_MAX = 64
V1, V2 = "v1host", "v2host"


@dataclass
class Iso:
    cluster: Cluster
    top: Path
    user: str  # the Unix account alice's token maps to
    alice: str  # her submit token
    secret: Path  # a root-only 0600 file
    escape: Path  # escape.sh where alice can read it

    def agent_proc(self, name: str) -> Proc:
        return next(p for p in self.cluster.agents if p.name == name)

    def run_dir(self, host: str, job: str, attempt: int = 1) -> Path:
        return self.cluster.root / f"agent-{host}" / "tasks" / f"{job}.0_a{attempt}"

    def spec(self, host: str, job: str, attempt: int = 1) -> dict[str, Any]:
        path = self.run_dir(host, job, attempt) / "spec.json"
        return dict(json.loads(wait_for(lambda: path.read_text(), 30, f"{path}")))

    def cgroup_dirs(self, host: str, job: str, attempt: int = 1) -> list[Path]:
        cg = self.spec(host, job, attempt)["cgroup"]
        dirs = cg["dirs"].values() if cg["version"] == 1 else [cg["dir"]]
        return sorted({Path(d) for d in dirs})

    def submit(self, host: str, *args: str, token: str | None = None) -> str:
        cg = "v1" if host == V1 else "v2"
        return self.cluster.submit("--constraint", f"cg={cg}", *args, token=token)

    def wait_running(self, job: str) -> dict[str, Any]:
        return self.cluster.wait_job(job, {"running"}, timeout_s=60)


@pytest.fixture(scope="module")
def iso() -> Iterator[Iso]:
    with (
        passable_dir("lepton-iso-") as top,
        passable_dir("lepton-iso-", under="/var/tmp") as outside,
        unix_users("alice") as (alice,),
    ):
        # Outside /tmp: a task has a /tmp of its own, and must meet the file.
        secret = outside / "secret"
        secret.write_text("s3cret\n")
        os.chmod(secret, 0o600)
        # alice runs escape.sh; the checkout may be a 0700 directory of root's.
        escape = outside / "escape.sh"
        shutil.copyfile(ESCAPE, escape)
        os.chmod(escape, 0o644)
        c = Cluster(top / "cluster", n_masters=1, ttl_s=5.0)
        try:
            c.start_masters()
            c.start_agent(
                V1,
                gpus="4",
                extra=["--labels", "cg=v1", "--task-pids-max", str(PIDS_MAX)],
            )
            c.start_agent(V2, gpus="4", extra=["--labels", "cg=v2", "--cgroups", "v2"])
            c.wait_nodes_ready(2, timeout_s=60)
            tok = c.ctl(
                "token",
                "create",
                "--role",
                "submit",
                "--name",
                "alice",
                "--unix-user",
                alice.pw_name,
            ).stdout.strip()
            yield Iso(c, top, alice.pw_name, tok, secret, escape)
        finally:
            c.close()


def _escaped_pid(iso: Iso, host: str, job: str, attempt: int = 1) -> tuple[int, float]:
    """The pid (and start time) of escape.sh's double-forked, setsid'd child."""
    pidfile = iso.run_dir(host, job, attempt) / "work" / "child.pid"
    pid = int(wait_for(lambda: pidfile.read_text().strip(), 60, "the escaped child's pid"))
    p = psutil.Process(pid)
    assert p.username() == iso.user
    main = json.loads((iso.run_dir(host, job, attempt) / "task.pid").read_text())["pid"]
    assert os.getsid(pid) != os.getsid(main)  # a session of its own, away from the task's group
    return pid, p.create_time()


def _wait_gone(pid: int, born: float, deadline: float, what: str) -> None:
    """Poll until the process is gone, failing at `deadline` (time.time())."""
    while not gone(pid, born):
        if time.time() > deadline:
            raise AssertionError(f"the escaped child {pid} still runs {what}")
        time.sleep(0.05)


def _wait_task_ended(iso: Iso, job: str) -> dict[str, Any]:
    """A cancelled job is cancelled at once; its task when its exit is in."""
    return dict(
        wait_for(
            lambda: (
                (t := iso.cluster.status(job)["tasks"][0])["state"]
                in ("cancelled", "failed", "succeeded")
                and t
            ),
            60,
            f"the task of {job} to end",
        )
    )


def _wait_cgroups_removed(dirs: list[Path]) -> None:
    wait_for(lambda: not any(d.exists() for d in dirs), 30, f"cgroups {dirs} to be removed")


# ---------------------------------------------------------------- identity


def test_a_task_runs_as_its_user_and_its_files_are_its_own(iso: Iso) -> None:
    c = iso.cluster
    tokens = {t["name"]: t for t in c.ctl_json("token", "ls")}
    assert tokens["alice"]["unix_user"] == iso.user
    assert iso.user in c.ctl("token", "ls").stdout  # the table shows the mapping too
    script = (
        f'id -un; echo "$HOME|$USER|$LOGNAME|$SHELL"; cat {iso.secret} 2>&1; '
        "echo mine > made; stat -c '%U %a' made .; pwd"
    )
    job = iso.submit(V1, "--", "sh", "-c", script, token=iso.alice)
    st = c.wait_job(job, {"succeeded", "failed"})
    assert st["state"] == "succeeded", st
    out = c.ctl("logs", job).stdout.splitlines()
    import pwd

    pw = pwd.getpwnam(iso.user)
    assert out[0] == iso.user
    assert out[1] == f"{pw.pw_dir}|{iso.user}|{iso.user}|{pw.pw_shell}"
    assert "Permission denied" in out[2] and "s3cret" not in "\n".join(out)
    assert out[3] == f"{iso.user} 644"  # what it wrote is its own
    assert out[4] == f"{iso.user} 700"  # and so is its directory, private
    # The run's control files stay the agent's: the task could not touch them.
    rd = iso.run_dir(V1, job)
    assert rd.stat().st_uid == 0 and (rd / "spec.json").stat().st_mode & 0o077 == 0
    assert out[5] == str(rd / "work")


def test_a_task_cannot_read_the_node_credential_or_list_the_agents_files(
    iso: Iso, tmp_path: Path
) -> None:
    c = iso.cluster
    data = c.root / f"agent-{V1}"
    cred = data / "node.credential"
    assert cred.exists()
    # A workdir puts blocks in the host's cache: their ids are what a task
    # could name in a manifest of its own to get another user's files.
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "data.txt").write_text("someone else's\n" * 100)
    wd = iso.submit(V1, "--workdir", str(tmp_path / "wd"), "--", "true")
    assert c.wait_job(wd, {"succeeded", "failed"}, timeout_s=120)["state"] == "succeeded"
    cached = [p for p in (data / "blocks").rglob("*") if p.is_file() and len(p.name) == 64]
    assert cached, "the workdir's block is not in the cache"
    script = (
        f"cat {cred} 2>&1; ls {data} 2>&1; ls {data / 'tasks'} 2>&1; cat {data}/lease.json 2>&1; "
        f"ls {data / 'blocks'} 2>&1; find {data / 'blocks'} -type f 2>&1; "
        f"cat {cached[0]} 2>&1; ls {data / 'dev'} 2>&1; cat {data}/node_id 2>&1"
    )
    job = iso.submit(V1, "--", "sh", "-c", script, token=iso.alice)
    c.wait_job(job, {"succeeded", "failed"})
    out = c.ctl("logs", job).stdout
    assert out.count("Permission denied") == 9, out
    # A listing would name joined.json, and the block only in cat's refusal.
    assert "ltk_" not in out and "joined.json" not in out, out
    assert out.count(cached[0].name) == 1, out
    assert "someone else" not in out and (data / "node_id").read_text().strip() not in out
    # Nothing directly below the data dir is listable or readable by others;
    # tasks only pass through the three directories their own files are in.
    for p in data.iterdir():
        mode = p.lstat().st_mode & 0o777
        if p.is_char_device():
            continue
        want = 0o711 if p.name in ("tasks", "workdirs", "dev") else 0o700
        assert mode & 0o077 == (want & 0o077), f"{p} has mode {mode:o}"


def test_a_task_workdir_is_handed_to_its_user(iso: Iso, tmp_path: Path) -> None:
    c = iso.cluster
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "train.py").write_text("print('hi')\n")
    (src / "run.sh").write_text("echo run\n")
    job = iso.submit(
        V1,
        "--workdir",
        str(src),
        "--",
        "sh",
        "-c",
        "stat -c '%U %a %n' . pkg pkg/train.py run.sh; echo new > made && stat -c '%U' made",
        token=iso.alice,
    )
    st = c.wait_job(job, {"succeeded", "failed"}, timeout_s=120)
    assert st["state"] == "succeeded", st
    out = c.ctl("logs", job).stdout.splitlines()
    assert out[0] == f"{iso.user} 700 ."  # private to its user
    assert all(line.startswith(f"{iso.user} ") for line in out[1:4]), out
    assert out[4] == iso.user


def test_a_missing_account_fails_the_task_at_once_with_the_reason(iso: Iso) -> None:
    c = iso.cluster
    nobody_here = f"lt{os.getpid() % 100000}gone"
    tok = c.ctl(
        "token", "create", "--role", "submit", "--name", "ghost", "--unix-user", nobody_here
    ).stdout.strip()
    job = iso.submit(V1, "--", "true", token=tok)
    st = c.wait_job(job, {"failed", "succeeded"}, timeout_s=30)
    want = f"user '{nobody_here}' does not exist on host {V1}"
    assert st["state"] == "failed" and st["tasks"][0]["message"] == want, st
    assert want in c.ctl("status", job).stdout
    assert not iso.run_dir(V1, job).exists()  # nothing was started


def test_root_tasks_need_allow_root_tasks_and_memory_defaults_per_gpu_and_cpu() -> None:
    with passable_dir("lepton-noroot-") as top:
        c = Cluster(
            top / "cluster",
            n_masters=1,
            ttl_s=5.0,
            allow_root_tasks=False,
            master_args=["--default-mem-per-gpu", "1G", "--default-mem-per-cpu", "256M"],
        )
        try:
            c.start_masters()
            out = c.ctl("submit", "--", "id", check=False)  # the admin token maps to root
            lines = out.stderr.strip().splitlines()
            assert out.returncode != 0 and len(lines) == 1, out.stderr
            assert "root" in lines[0] and "--allow-root-tasks" in lines[0]
            assert c.rpc("jobs", {"all": True}) == []  # nothing was submitted
            # A bad mapping is one line, and no token is made.
            out = c.ctl("token", "create", "--role", "submit", "--unix-user", "1000", check=False)
            assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
            assert c.ctl_json("token", "ls") == []
            tok = c.ctl(
                "token", "create", "--role", "submit", "--name", "carl", "--unix-user", "nobody"
            ).stdout.strip()
            # Jobs without --mem get the default per GPU, or per CPU without
            # GPUs; --mem keeps its own.
            for args, want in (
                (["--gpus", "2"], 2 << 30),
                (["--gpus", "2", "--mem", "5M"], 5 << 20),
                ([], 256 << 20),
                (["--cpus", "3"], 768 << 20),
                (["--cpus", "0.5", "--mem", "1G"], 1 << 30),
            ):
                job = c.submit(*args, "--", "true", token=tok)
                assert c.status(job)["spec"]["mem_bytes"] == want, args
        finally:
            c.close()


# ------------------------------------------------------------------ limits


def test_out_of_memory_ends_failed_with_the_reason_and_137(iso: Iso) -> None:
    c = iso.cluster
    hog = "b = bytearray(512 << 20); print('survived')"
    job = iso.submit(V1, "--mem", "64M", "--cpus", "0.5", "--", sys.executable, "-c", hog)
    dirs = iso.cgroup_dirs(V1, job)
    st = c.wait_job(job, {"failed", "succeeded"})
    t = st["tasks"][0]
    assert st["state"] == "failed", st
    assert t["message"] == "out of memory (limit 64.0 MiB)" and t["exit_code"] == 137, t
    assert "survived" not in c.ctl("logs", job).stdout
    _wait_cgroups_removed(dirs)


def test_a_cpu_quota_holds_four_spinners_to_one_cpu(iso: Iso) -> None:
    c = iso.cluster
    spin = "for i in 1 2 3 4; do (while :; do :; done) & done; wait"
    job = iso.submit(V1, "--cpus", "1", "--", "sh", "-c", spin, token=iso.alice)
    try:
        iso.wait_running(job)
        dirs = iso.spec(V1, job)["cgroup"]["dirs"]
        cpu, acct = Path(dirs["cpu"]), Path(dirs["cpuacct"])
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "100000"
        procs = acct / "cgroup.procs"
        wait_for(lambda: len(procs.read_text().split()) >= 5, 30, "four spinners")
        # The cgroup's own CPU time over a few seconds of wall time.
        u0, t0 = int((acct / "cpuacct.usage").read_text()), time.monotonic()
        time.sleep(4)
        u1, t1 = int((acct / "cpuacct.usage").read_text()), time.monotonic()
        rate = (u1 - u0) / 1e9 / (t1 - t0)
        assert 0.3 < rate <= 1.2, rate
    finally:
        c.ctl("cancel", job, check=False)


def test_a_fork_bomb_stops_at_the_pids_limit_and_the_host_carries_on(iso: Iso) -> None:
    c = iso.cluster
    # It waits for the go-ahead, so the limit is checked before it can fork.
    bomb = (
        "while [ ! -e go ]; do sleep 0.1; done; "
        "bomb() { bomb | bomb & }; bomb; while :; do sleep 1; done"
    )
    job = iso.submit(V1, "--cpus", "1", "--", "sh", "-c", bomb, token=iso.alice)
    try:
        iso.wait_running(job)
        pids = Path(iso.spec(V1, job)["cgroup"]["dirs"]["pids"])
        assert (pids / "pids.max").read_text().strip() == str(PIDS_MAX)
        (iso.run_dir(V1, job) / "work" / "go").touch()

        def refused_forks() -> int:
            for line in (pids / "pids.events").read_text().splitlines():
                if line.startswith("max "):
                    return int(line.split()[1])
            return 0

        wait_for(lambda: refused_forks() > 0, 60, "the bomb to reach the pids limit")
        for _ in range(10):
            assert int((pids / "pids.current").read_text()) <= PIDS_MAX
        # The agent and the host carry on: the node stays ready and runs more work.
        other = iso.submit(V1, "--cpus", "0.5", "--", "true")
        assert c.wait_job(other, {"succeeded", "failed"})["state"] == "succeeded"
        assert next(n for n in c.nodes() if n["name"] == V1)["state"] == "ready"
        assert iso.agent_proc(V1).alive()
    finally:
        c.ctl("cancel", job, check=False)
    dirs = iso.cgroup_dirs(V1, job)
    _wait_task_ended(iso, job)
    _wait_cgroups_removed(dirs)


# ---------------------------------------------------- the whole task goes


@pytest.mark.parametrize("host", [V1, V2])
def test_a_setsid_double_forked_child_is_gone_after_cancel(iso: Iso, host: str) -> None:
    c = iso.cluster
    job = iso.submit(host, "--", "sh", str(iso.escape), "child.pid", token=iso.alice)
    pid, born = _escaped_pid(iso, host, job)
    dirs = iso.cgroup_dirs(host, job)
    c.ctl("cancel", job)
    _wait_gone(pid, born, time.time() + KILL_GRACE_S + 2, "after cancel")
    assert _wait_task_ended(iso, job)["state"] == "cancelled"
    _wait_cgroups_removed(dirs)


def test_a_setsid_double_forked_child_is_gone_after_preemption(iso: Iso) -> None:
    c = iso.cluster
    low = iso.submit(V1, "--gpus", "4", "--", "sh", str(iso.escape), "child.pid", token=iso.alice)
    high = ""
    try:
        pid, born = _escaped_pid(iso, V1, low)
        high = iso.submit(V1, "--gpus", "4", "--priority", "10", "--", "sleep", "2")
        wait_for(
            lambda: (
                (t := c.status(low)["tasks"][0])["stopping"] == "preempt" or t["preemptions"] > 0
            ),
            60,
            "the preemption of the low-priority task",
        )
        _wait_gone(pid, born, time.time() + KILL_GRACE_S + 2, "after the preemption")
        assert c.wait_job(high, {"succeeded", "failed"})["state"] == "succeeded"
    finally:
        for j in (low, high):
            if j:
                c.ctl("cancel", j, check=False)


def test_a_setsid_double_forked_child_is_gone_after_the_time_limit(iso: Iso) -> None:
    c = iso.cluster
    limit_s = 3
    job = iso.submit(
        V1, "--time-limit", f"{limit_s}s", "--", "sh", str(iso.escape), "child.pid", token=iso.alice
    )
    pid, born = _escaped_pid(iso, V1, job)
    # The job reads running once its task is placed; the start time comes
    # with the agent's report that the process runs.
    started = float(
        wait_for(lambda: iso.cluster.status(job)["tasks"][0]["started_at"], 60, f"{job} to start")
    )
    _wait_gone(pid, born, started + limit_s + KILL_GRACE_S + 2, "after the time limit")
    st = c.wait_job(job, {"failed"})
    assert "time limit of 3s exceeded" in st["tasks"][0]["message"], st


# ------------------------------------------------------------- GPU devices


@pytest.mark.parametrize("host", [V1, V2])
def test_a_task_opens_its_own_gpu_and_gets_eperm_on_the_others(iso: Iso, host: str) -> None:
    c = iso.cluster
    probe = (
        'echo "$CUDA_VISIBLE_DEVICES"; for i in 0 1 2 3; do '
        'cat "$LEPTON_GPU_DEVICE_DIR/nvidia$i" 2>&1 | sed "s/^/$i: /"; done'
    )
    job = iso.submit(host, "--gpus", "1", "--", "sh", "-c", probe, token=iso.alice)
    dirs = iso.cgroup_dirs(host, job)
    assert c.wait_job(job, {"succeeded", "failed"})["state"] == "succeeded"
    out = c.ctl("logs", job).stdout.splitlines()
    mine = int(out[0])
    assert mine == c.status(job)["tasks"][0]["gpus"][0]
    for i in range(4):
        line = next(x for x in out[1:] if x.startswith(f"{i}: "))
        want = "No such device or address" if i == mine else "Operation not permitted"
        assert want in line, out
    _wait_cgroups_removed(dirs)


# --------------------------------------------------------- agent restarts


@pytest.mark.parametrize("host", [V1, V2])
def test_a_restarted_agent_readopts_its_tasks_cgroups(iso: Iso, host: str) -> None:
    c = iso.cluster
    job = iso.submit(host, "--", "sh", str(iso.escape), "child.pid", token=iso.alice)
    pid, born = _escaped_pid(iso, host, job)
    dirs = iso.cgroup_dirs(host, job)
    agent = iso.agent_proc(host)
    # Any number: a task an earlier test cancelled may still be stopping here.
    adoptions = re.compile(r"adopted [1-9]\d* running task")
    adopted_before = len(adoptions.findall(agent.log.read_text()))
    agent.stop()  # SIGTERM: the agent goes, its tasks stay
    agent.start()
    wait_for(
        lambda: len(adoptions.findall(agent.log.read_text())) > adopted_before,
        60,
        "the re-adoption",
    )
    c.wait_nodes_ready(2, timeout_s=60)
    # Its cgroup survived the restart, with the escaped child still in it,
    # and the task runs on in its first attempt.
    assert all(d.is_dir() for d in dirs)
    assert str(pid) in (dirs[0] / "cgroup.procs").read_text().split()
    st = c.status(job)
    assert (st["state"], st["tasks"][0]["restarts"]) == ("running", 0)
    c.ctl("cancel", job)
    _wait_gone(pid, born, time.time() + KILL_GRACE_S + 2, "after cancel (agent restarted)")
    _wait_task_ended(iso, job)
    _wait_cgroups_removed(dirs)


# -------------------------------------------------------- a non-root agent


def test_leptond_dev_as_a_normal_user_runs_tasks_as_that_user() -> None:
    with passable_dir("lepton-dev-") as top, unix_users("dev") as (user,):
        data = top / "dev"
        data.mkdir()
        os.chown(data, user.pw_uid, user.pw_gid)
        rpc, http, raft = free_ports(3)
        e = env()
        e["LEPTON_CONFIG"] = str(data / "client.toml")
        e["HOME"] = str(data)
        out_path = top / "dev.out"
        # The interpreter lives under /root (0700) on this host: the account
        # may only read its way there (one capability), it is not root.
        argv = [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
            sys.executable,
            "-m",
            "leptond.cli",
            "dev",
            "--data-dir",
            str(data),
            "--agents",
            "1",
            "--simulate-gpus",
            "1",
            "--rpc-port",
            str(rpc),
            "--http-port",
            str(http),
            "--raft-port",
            str(raft),
        ]
        with open(out_path, "wb") as out:
            dev = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=e,
                cwd=str(Path(__file__).resolve().parent.parent),
                start_new_session=True,
            )
        try:
            banner = wait_for(
                lambda: "Ctrl-C stops everything" in (t := out_path.read_text()) and t,
                120,
                "the dev banner",
            )
            assert f"tasks run as {user.pw_name} (uid {user.pw_uid})" in banner, banner
            admin = (data / "admin.token").read_text().strip()
            ctl_env = env()
            ctl_env.update(
                LEPTON_ADDR=f"127.0.0.1:{rpc}",
                LEPTON_TOKEN=admin,
                LEPTON_CONFIG=str(top / "none.toml"),
            )

            def ctl(*args: str) -> str:
                return subprocess.run(
                    [sys.executable, "-m", "leptonctl.cli", *args],
                    env=ctl_env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                ).stdout

            job = ctl("submit", "--", "id", "-un").strip()
            wait_for(
                lambda: json.loads(ctl("status", job, "-o", "json"))["state"] == "succeeded",
                60,
                "the job to succeed",
            )
            assert ctl("logs", job).strip() == user.pw_name
            # Without root there are no mount namespaces: said once, and on.
            agent_log = (data / "logs" / "agent-0.log").read_text()
            assert agent_log.count("share /tmp, /dev/shm and IPC with the host") == 1, agent_log
        finally:
            dev.send_signal(signal.SIGTERM)
            try:
                dev.wait(30)
            except subprocess.TimeoutExpired:
                pass
            # Whatever is left of the processes this test started, by group.
            try:
                os.killpg(dev.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            dev.wait(10)
