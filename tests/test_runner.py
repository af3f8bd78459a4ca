"""The task runner with real shims and real task processes.

Every test polls for the condition it needs with a deadline, and the
`runner_root` fixture kills (by recorded, verified pid) every shim and task
group a test leaves behind, even when the test fails.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from agent import tasklog
from agent.runner import SUPERVISOR_LOST, RunnerError, TaskExit, TaskRunner, TaskSpec
from agent.runner import _kill_orphaned_group as kill_orphaned_group
from agent.taskdir import SHIM_PID, SPARE_FLAG, STOP, TASK_PID, ProcRecord, is_shim_of

REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 15.0

# A task that waits until a file named `go` appears in its cwd, then exits 7.
GATED = ["sh", "-c", "echo waiting; while [ ! -e go ]; do sleep 0.02; done; exit 7"]


def wait_for(cond: Callable[[], object], what: str, timeout_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def exit_of(runner: TaskRunner, task_id: str, timeout_s: float = DEADLINE_S) -> TaskExit:
    found: list[TaskExit] = []

    def done() -> bool:
        found[:] = [e for e in runner.poll() if e.task_id == task_id]
        return bool(found)

    wait_for(done, f"task {task_id} to finish", timeout_s)
    return found[0]


def log_text(runner: TaskRunner, task_id: str) -> str:
    data, _ = runner.read_log(task_id, 0, 1 << 20)
    return data.decode()


def log_bytes_on_disk(tdir: Path) -> int:
    # Under the log's shared lock, so a rotation cannot happen mid-measurement.
    fd = os.open(tdir / tasklog.LOG_LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return sum(p.stat().st_size for p in tdir.glob("output.log*"))
    finally:
        os.close(fd)


def kill_everything_under(root: Path) -> None:
    """Teardown: SIGKILL the shims and task groups recorded under root."""
    if not root.is_dir():
        return
    for tdir in root.iterdir():
        shim = ProcRecord.load(tdir / SHIM_PID)
        proc = shim.process() if shim else None
        if proc is not None and is_shim_of(proc, tdir):
            proc.kill()
        task = ProcRecord.load(tdir / TASK_PID)
        if task is not None and task.process() is not None:
            os.killpg(task.pid, signal.SIGKILL)
        kill_orphaned_group(tdir)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    r = tmp_path / "tasks"
    try:
        yield r
    finally:
        kill_everything_under(r)


@pytest.fixture(params=["new-shim", "spare"])
def runner(root: Path, request: pytest.FixtureRequest) -> Iterator[TaskRunner]:
    """Every test that takes this runs twice: tasks started under a new shim,
    and handed to a spare shim started ahead of time; they must not differ."""
    r = TaskRunner(root)
    if request.param == "spare":
        r.keep_spare()
    try:
        yield r
    finally:
        r.close()


def spec(task_id: str, argv: list[str], **kw: object) -> TaskSpec:
    kw.setdefault("kill_grace_s", 2.0)
    kw.setdefault("log_cap_bytes", 1 << 20)
    return TaskSpec(task_id=task_id, argv=argv, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- basics


def test_env_and_default_cwd_reach_the_task(
    runner: TaskRunner, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_ONLY_SECRET", "must-not-leak")
    script = 'echo "FOO=$FOO"; echo "HOME=$HOME"; echo "CWD=$(pwd)"; env'
    runner.start(spec("t1", ["sh", "-c", script], env={"FOO": "bar", "HOME": "/nowhere"}))
    ex = exit_of(runner, "t1")
    assert (ex.exit_code, ex.signal) == (0, None)
    out = log_text(runner, "t1")
    assert "FOO=bar\n" in out
    assert "HOME=/nowhere\n" in out  # the spec's env wins over the base env
    assert f"CWD={root / 't1' / 'work'}\n" in out
    assert "PATH=" in out
    assert "must-not-leak" not in out


def test_explicit_cwd(runner: TaskRunner, tmp_path: Path) -> None:
    where = tmp_path / "elsewhere"
    where.mkdir()
    runner.start(spec("t1", ["sh", "-c", "pwd"], cwd=str(where)))
    assert exit_of(runner, "t1").exit_code == 0
    assert log_text(runner, "t1") == f"{where}\n"


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_is_reported(runner: TaskRunner, code: int) -> None:
    runner.start(spec("t1", ["sh", "-c", f"echo out; echo err >&2; exit {code}"]))
    ex = exit_of(runner, "t1")
    assert (ex.exit_code, ex.signal) == (code, None)
    assert ex.message == f"exited with code {code}"
    assert ex.started_at is not None and ex.finished_at is not None
    assert ex.started_at <= ex.finished_at
    assert log_text(runner, "t1") == "out\nerr\n"  # stdout and stderr both land in the log


def test_command_not_found_exits_127_with_a_message_in_the_log(runner: TaskRunner) -> None:
    runner.start(spec("t1", ["no-such-command-anywhere", "x"]))
    ex = exit_of(runner, "t1")
    assert (ex.exit_code, ex.signal) == (127, None)
    assert ex.message == "leptond: command not found: no-such-command-anywhere"
    assert "leptond: command not found: no-such-command-anywhere" in log_text(runner, "t1")


def test_missing_working_directory_is_a_start_failure(runner: TaskRunner, tmp_path: Path) -> None:
    runner.start(spec("t1", ["true"], cwd=str(tmp_path / "gone")))
    ex = exit_of(runner, "t1")
    assert ex.exit_code == 127
    assert ex.message.startswith(f"leptond: cannot enter working directory {tmp_path / 'gone'}")


def test_file_that_is_not_executable_exits_126(runner: TaskRunner, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    runner.start(spec("t1", [str(script)]))
    ex = exit_of(runner, "t1")
    assert ex.exit_code == 126
    assert "permission denied" in log_text(runner, "t1")


def test_start_rejects_a_running_task_id_and_unusable_dirs(
    runner: TaskRunner, tmp_path: Path
) -> None:
    runner.start(spec("t1", GATED))
    with pytest.raises(RunnerError, match="task t1 is already running"):
        runner.start(spec("t1", GATED))
    with pytest.raises(RunnerError, match="invalid task id"):
        runner.start(spec("../escape", GATED))
    with pytest.raises(RunnerError, match="argv must be a non-empty list"):
        runner.start(spec("t2", []))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(RunnerError, match="cannot use task directory"):
        TaskRunner(blocked).start(spec("t3", GATED))
    runner.stop("t1", grace_s=0)
    exit_of(runner, "t1")


# ------------------------------------------------------------ stopping


def test_stop_sends_sigterm_to_the_task_group(runner: TaskRunner) -> None:
    runner.start(spec("t1", ["sh", "-c", "echo ready; sleep 60"]))
    wait_for(lambda: "ready" in log_text(runner, "t1"), "the task to start")
    runner.stop("t1")
    ex = exit_of(runner, "t1")
    assert (ex.exit_code, ex.signal) == (128 + signal.SIGTERM, signal.SIGTERM)
    assert ex.message == "stopped by request"


TRAP_TERM = 'trap "echo got TERM" TERM; echo ready; while :; do sleep 0.05; done'


def test_stop_returns_without_waiting_for_the_grace(runner: TaskRunner) -> None:
    runner.start(spec("t1", ["sh", "-c", TRAP_TERM]))
    wait_for(lambda: "ready" in log_text(runner, "t1"), "the task to install its trap")
    runner.stop("t1", grace_s=3600)
    # stop() has returned, and the task (which ignores SIGTERM) still runs:
    # the SIGKILL comes only after an hour, so stop() did not wait for it.
    wait_for(lambda: "got TERM" in log_text(runner, "t1"), "the task to get SIGTERM")
    assert runner.running() == ["t1"]


def test_stop_escalates_to_sigkill_after_the_grace(runner: TaskRunner) -> None:
    runner.start(spec("t1", ["sh", "-c", TRAP_TERM]))
    wait_for(lambda: "ready" in log_text(runner, "t1"), "the task to install its trap")
    t0 = time.monotonic()
    runner.stop("t1", grace_s=0.5)
    ex = exit_of(runner, "t1")
    assert time.monotonic() - t0 >= 0.5  # not before the grace
    assert (ex.exit_code, ex.signal) == (128 + signal.SIGKILL, signal.SIGKILL)
    assert ex.message == "stopped by request; killed after 0.5s grace"
    assert "got TERM" in log_text(runner, "t1")


def test_stop_request_is_a_file_the_shim_honours_on_its_own(runner: TaskRunner, root: Path) -> None:
    # The agent may die right after asking; the file alone must be enough.
    runner.start(spec("t1", ["sh", "-c", "echo ready; sleep 60"]))
    wait_for(lambda: "ready" in log_text(runner, "t1"), "the task to start")
    (root / "t1" / STOP).write_text('{"grace_s": 1}')
    ex = exit_of(runner, "t1")
    assert ex.exit_code == 128 + signal.SIGTERM
    assert ex.message == "stopped by request"


def test_time_limit_is_enforced_by_the_shim(runner: TaskRunner) -> None:
    runner.start(spec("t1", ["sleep", "60"], time_limit_s=0.5, kill_grace_s=1.0))
    ex = exit_of(runner, "t1")
    assert ex.exit_code == 128 + signal.SIGTERM
    assert ex.message == "time limit of 0.5s exceeded"
    assert ex.started_at is not None and ex.finished_at is not None
    assert ex.finished_at - ex.started_at >= 0.5


def test_kill_all_not_in_stops_only_unexpected_tasks(runner: TaskRunner, root: Path) -> None:
    runner.start(spec("keep", GATED))
    runner.start(spec("drop", GATED))
    for t in ("keep", "drop"):
        wait_for(lambda t=t: "waiting" in log_text(runner, t), f"task {t} to start")  # type: ignore[misc]
    assert runner.kill_all_not_in({"keep"}) == ["drop"]
    assert exit_of(runner, "drop").exit_code == 128 + signal.SIGTERM
    assert runner.running() == ["keep"]
    (root / "keep" / "work" / "go").touch()
    assert exit_of(runner, "keep").exit_code == 7


def test_usage_reports_running_tasks(runner: TaskRunner, root: Path) -> None:
    runner.start(spec("t1", GATED))
    wait_for(lambda: "t1" in runner.usage(), "usage of the running task")
    u = runner.usage()["t1"]
    assert u.rss_bytes > 0 and u.processes >= 1 and u.cpu_s >= 0.0
    (root / "t1" / "work" / "go").touch()
    exit_of(runner, "t1")
    assert runner.usage() == {}


# ----------------------------------------------------------------- logs


def test_log_flood_stays_under_the_cap_and_the_runner_stays_responsive(
    runner: TaskRunner, root: Path
) -> None:
    cap = 64 * 1024
    runner.start(spec("flood", ["yes", "flood-line"], log_cap_bytes=cap, kill_grace_s=1.0))
    tdir = root / "flood"
    wait_for(lambda: tasklog.dropped_bytes(tdir) > 4 * cap, "the cap to drop output")
    # The runner answers while the flood goes on (a hang would trip the
    # test's timeout); the flood is still running after the calls.
    dropped = tasklog.dropped_bytes(tdir)
    for _ in range(20):
        assert runner.running() == ["flood"]
        data, _ = runner.read_log("flood", -4096, 4096)
        assert data.endswith(b"\n") or b"flood-line" in data
        assert log_bytes_on_disk(tdir) <= cap
    wait_for(lambda: tasklog.dropped_bytes(tdir) > dropped, "the flood to go on")
    runner.stop("flood")
    ex = exit_of(runner, "flood")
    assert "bytes of early output dropped by the log cap" in ex.message
    assert log_bytes_on_disk(tdir) <= cap


def test_stderr_is_kept_apart_as_well_as_in_the_output(runner: TaskRunner, root: Path) -> None:
    script = "echo out1; echo err1 >&2; sleep 0.2; echo out2; echo err2 >&2"
    runner.start(spec("t1", ["sh", "-c", script]))
    assert exit_of(runner, "t1").exit_code == 0
    tdir = root / "t1"
    both, _ = tasklog.read_log(tdir, 0, 1 << 20)
    err, _ = tasklog.read_log(tdir, 0, 1 << 20, stream=tasklog.STDERR)
    assert sorted(both.decode().split()) == ["err1", "err2", "out1", "out2"]
    assert err == b"err1\nerr2\n"
    # Each line can be dated: the records cover the output from its start.
    recs = tasklog.read_times(tdir, 0, len(both))
    assert recs and recs[0][0] == 0 and all(abs(t - time.time()) < 60 for _, t in recs)


def test_a_command_that_cannot_start_says_so_on_stderr(runner: TaskRunner) -> None:
    runner.start(spec("t1", ["/no/such/program"]))
    assert exit_of(runner, "t1").exit_code == 127
    err, _ = tasklog.read_log(runner.task_dir("t1"), 0, 1 << 20, stream=tasklog.STDERR)
    assert b"command not found: /no/such/program" in err


def test_read_log_follows_output_across_rotation(runner: TaskRunner, root: Path) -> None:
    # 2000 numbered lines (about 10 KiB) through a 4 KiB cap: the reader,
    # following from offset 0, must see a gap and then a contiguous tail.
    script = "i=0; while [ $i -lt 2000 ]; do echo $i; i=$((i+1)); done"
    runner.start(spec("t1", ["sh", "-c", script], log_cap_bytes=4096))
    exit_of(runner, "t1")
    data, nxt = runner.read_log("t1", 0, 1 << 20)
    lines = data.decode().split("\n")
    assert lines[-1] == "" and lines[-2] == "1999"
    tail = [int(x) for x in lines[1:-1]]  # the first line may be cut by rotation
    assert tail == list(range(tail[0], 2000))
    assert nxt == sum(len(f"{i}\n") for i in range(2000))
    assert nxt - len(data) > 0  # the gap is visible to the caller
    assert runner.read_log("t1", nxt, 100) == (b"", nxt)
    assert runner.read_log("t1", -5, 100) == (b"1999\n", nxt)
    assert runner.log_path("t1") == root / "t1" / "output.log"


# ------------------------------------------------------ exits and acks


def test_exits_are_reported_until_acked_even_across_restarts(root: Path) -> None:
    a = TaskRunner(root)
    a.start(spec("t1", ["true"]))
    a.start(spec("t2", ["false"]))
    exit_of(a, "t1")
    exit_of(a, "t2")
    assert [e.task_id for e in a.poll()] == [e.task_id for e in a.poll()]
    assert {e.task_id for e in a.poll()} == {"t1", "t2"}
    a.ack("t1")
    assert [e.task_id for e in a.poll()] == ["t2"]

    b = TaskRunner(root)  # the agent restarted before the leader recorded t2
    running, exits = b.adopt()
    assert running == []
    assert [(e.task_id, e.exit_code) for e in exits] == [("t2", 1)]
    with pytest.raises(RunnerError, match="not acked"):
        b.cleanup("t2")
    b.ack("t2")
    assert b.poll() == []
    b.cleanup("t1")
    b.cleanup("t2")
    assert not (root / "t1").exists() and not (root / "t2").exists()
    assert TaskRunner(root).adopt() == ([], [])


def test_a_poll_reads_only_the_runs_it_knows_not_every_old_directory(root: Path) -> None:
    a = TaskRunner(root)
    a.start(spec("t1", ["true"]))
    exit_of(a, "t1")
    a.ack("t1")
    assert a.adopt() == ([], [])
    # A finished, unacked run appears on disk behind the runner's back (no
    # runner of this agent ran it). Polls do not rescan the task dirs ...
    planted = root / "t9"
    planted.mkdir()
    (planted / "spec.json").write_text("{}")
    (planted / "exit.json").write_text('{"exit_code": 0, "message": "planted"}')
    for _ in range(3):
        assert a.poll() == []
    # ... only a runner that starts (reads the dirs once) reports it.
    assert [e.task_id for e in TaskRunner(root).adopt()[1]] == ["t9"]


def test_collect_garbage_deletes_runs_acked_before_the_time_given(root: Path) -> None:
    a = TaskRunner(root)
    for t in ("t1", "t2"):
        a.start(spec(t, ["sh", "-c", "echo out; echo scratch > left"]))
        exit_of(a, t)
    a.ack("t1")
    acked_at = time.time()
    assert a.collect_garbage(acked_at - 60) == []  # acked too recently
    assert a.collect_garbage(acked_at + 1) == ["t1"]
    assert not (root / "t1").exists()
    assert (root / "t2" / "work" / "left").exists()  # not acked: kept whatever its age
    assert [e.task_id for e in a.poll()] == ["t2"]
    a.ack("t2")
    # A restarted runner learns the ack times from disk, once.
    b = TaskRunner(root)
    b.adopt()
    assert b.collect_garbage(time.time() - 3600) == []
    assert b.collect_garbage(time.time() + 1) == ["t2"]
    assert sorted(p.name for p in root.iterdir()) == []


def test_an_acked_task_id_can_run_again(runner: TaskRunner) -> None:
    runner.start(spec("t1", ["sh", "-c", "exit 3"]))
    exit_of(runner, "t1")
    with pytest.raises(RunnerError, match="unreported exit"):
        runner.start(spec("t1", ["true"]))
    runner.ack("t1")
    runner.start(spec("t1", ["true"]))
    assert exit_of(runner, "t1").exit_code == 0


# ------------------------------------------------------------- crashes

AGENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from agent.runner import TaskRunner, TaskSpec
    r = TaskRunner(Path(sys.argv[1]))
    argv = sys.argv[2:]
    pid = r.start(TaskSpec(task_id="t1", argv=argv, env={}, cwd=None,
                           time_limit_s=None, log_cap_bytes=1 << 20, kill_grace_s=2.0))
    print(pid, flush=True)
    time.sleep(300)
    """
)


def test_tasks_survive_kill_9_of_the_agent_and_are_adopted(root: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    agent_proc = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(root), *GATED], env=env, stdout=subprocess.PIPE
    )
    try:
        assert agent_proc.stdout is not None
        shim_pid = int(agent_proc.stdout.readline())
        wait_for(lambda: (root / "t1" / TASK_PID).exists(), "the task to start")
        agent_proc.kill()
        agent_proc.wait(timeout=DEADLINE_S)
    finally:
        if agent_proc.poll() is None:
            agent_proc.kill()
            agent_proc.wait()

    shim = ProcRecord.load(root / "t1" / SHIM_PID)
    assert shim is not None and shim.pid == shim_pid
    assert shim.process() is not None, "the shim died with the agent"

    restarted = TaskRunner(root)
    assert restarted.adopt() == (["t1"], [])
    assert restarted.running() == ["t1"]
    assert restarted.poll() == []
    (root / "t1" / "work" / "go").touch()
    ex = exit_of(restarted, "t1")
    assert (ex.exit_code, ex.message) == (7, "exited with code 7")
    assert "waiting" in log_text(restarted, "t1")


def test_killing_the_shim_kills_the_task_and_reports_supervisor_lost(
    runner: TaskRunner, root: Path
) -> None:
    # The task has a child besides its main process; it must die too.
    runner.start(spec("t1", ["sh", "-c", "sleep 60 & echo started; wait"]))
    wait_for(lambda: "started" in log_text(runner, "t1"), "the task to start")
    task = ProcRecord.load(root / "t1" / TASK_PID)
    shim = ProcRecord.load(root / "t1" / SHIM_PID)
    assert task is not None and shim is not None
    group = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == task.pid]
    assert len(group) >= 2

    os.kill(shim.pid, signal.SIGKILL)
    # The shim made the kernel kill the task's main process with it, before
    # any runner notices; the runner then clears out the rest of the group.
    wait_for(lambda: task.process() is None, "the task to die with its shim")
    ex = exit_of(runner, "t1")
    assert (ex.exit_code, ex.signal, ex.message) == (None, None, SUPERVISOR_LOST)
    wait_for(
        lambda: not any(_alive(pid) for pid in group), "every process of the task group to die"
    )


def test_restarted_runner_reports_supervisor_lost_for_a_dead_shim(root: Path) -> None:
    a = TaskRunner(root)
    a.start(spec("t1", GATED))
    wait_for(lambda: (root / "t1" / TASK_PID).exists(), "the task to start")
    task = ProcRecord.load(root / "t1" / TASK_PID)
    shim = ProcRecord.load(root / "t1" / SHIM_PID)
    assert task is not None and shim is not None
    os.kill(shim.pid, signal.SIGKILL)
    wait_for(lambda: shim.process() is None, "the shim to die")

    b = TaskRunner(root)
    running, exits = b.adopt()
    assert running == []
    assert [(e.task_id, e.message) for e in exits] == [("t1", SUPERVISOR_LOST)]
    wait_for(lambda: task.process() is None, "the orphaned task to die")
    assert [e.message for e in a.poll()] == [SUPERVISOR_LOST]  # reaps a's child too


def test_adopt_ignores_a_reused_shim_pid(root: Path) -> None:
    a = TaskRunner(root)
    a.start(spec("t1", GATED))
    wait_for(lambda: (root / "t1" / TASK_PID).exists(), "the task to start")
    real = ProcRecord.load(root / "t1" / SHIM_PID)
    assert real is not None
    # Point shim.pid at a live process that is not this task's shim (this
    # test process): a restarted runner must not take it for the shim.
    ProcRecord.of(os.getpid()).save(root / "t1" / SHIM_PID)  # type: ignore[union-attr]
    running, exits = TaskRunner(root).adopt()
    assert running == []
    assert [e.message for e in exits] == [SUPERVISOR_LOST]
    wait_for(lambda: a.running() == [], "the real shim to finish and be reaped")
    assert [e.message for e in a.poll()] == [SUPERVISOR_LOST]  # exit.json is written once


# -------------------------------------------------------- spare shims


@pytest.fixture
def spared(root: Path) -> Iterator[TaskRunner]:
    r = TaskRunner(root)
    r.keep_spare()
    try:
        yield r
    finally:
        r.close()


def spare_of(runner: TaskRunner) -> ProcRecord:
    pid = runner.spare_pid
    assert pid is not None, "the runner keeps no spare shim"
    rec = ProcRecord.of(pid)
    assert rec is not None
    return rec


def test_a_task_handed_to_the_spare_runs_under_it(spared: TaskRunner, root: Path) -> None:
    spare = spare_of(spared)
    assert spared.start(spec("t1", GATED, env={"CUDA_VISIBLE_DEVICES": "2"})) == spare.pid
    wait_for(lambda: (root / "t1" / TASK_PID).exists(), "the task to start")
    shim = ProcRecord.load(root / "t1" / SHIM_PID)
    assert shim == spare
    proc = shim.process()
    assert proc is not None and is_shim_of(proc, root / "t1")
    assert proc.cwd() == str(root / "t1")
    assert os.getsid(shim.pid) == shim.pid, "the shim runs in its own session"
    # The next spare is already on its way, and is nobody's shim yet.
    assert spared.spare_pid not in (None, spare.pid)
    nxt = spare_of(spared).process()
    assert nxt is not None and not is_shim_of(nxt, root / "t1")
    (root / "t1" / "work" / "go").touch()
    ex = exit_of(spared, "t1")
    assert (ex.exit_code, ex.message) == (7, "exited with code 7")
    assert log_text(spared, "t1") == "waiting\n"


def test_close_stops_the_spare(spared: TaskRunner) -> None:
    spare = spare_of(spared)
    spared.close()
    assert spare.process() is None
    assert spared.spare_pid is None


def test_a_dead_spare_means_a_new_shim(spared: TaskRunner, root: Path) -> None:
    spare = spare_of(spared)
    os.kill(spare.pid, signal.SIGKILL)
    wait_for(lambda: _zombie_or_gone(spare.pid), "the spare to die")
    pid = spared.start(spec("t1", ["sh", "-c", "echo ran"]))
    assert pid != spare.pid
    ex = exit_of(spared, "t1")
    assert (ex.exit_code, log_text(spared, "t1")) == (0, "ran\n")
    assert spare.process() is None, "the dead spare was not reaped"
    assert spare_of(spared).pid != spare.pid, "no new spare after the dead one"


def test_a_spare_that_dies_holding_a_task_is_replaced_by_a_new_shim(
    spared: TaskRunner, root: Path
) -> None:
    # Stopped, the spare takes the task (into its pipe) but cannot start it.
    spare = spare_of(spared)
    os.kill(spare.pid, signal.SIGSTOP)
    assert spared.start(spec("t1", GATED)) == spare.pid
    os.kill(spare.pid, signal.SIGKILL)
    # The runner notices when it next looks (the agent looks every heartbeat).
    wait_for(
        lambda: spared.running() == ["t1"] and (root / "t1" / TASK_PID).exists(),
        "the task to start under a new shim",
    )
    shim = ProcRecord.load(root / "t1" / SHIM_PID)
    assert shim is not None and shim.pid != spare.pid
    (root / "t1" / "work" / "go").touch()
    ex = exit_of(spared, "t1")
    assert (ex.exit_code, log_text(spared, "t1")) == (7, "waiting\n")  # it ran once


AGENT_WITH_SPARE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from agent.runner import TaskRunner, TaskSpec
    r = TaskRunner(Path(sys.argv[1]))
    r.keep_spare()
    pid = r.start(TaskSpec(task_id="t1", argv=sys.argv[2:], kill_grace_s=2.0))
    print(pid, r.spare_pid, flush=True)
    time.sleep(300)
    """
)


def test_kill_9_of_the_agent_ends_its_spare_and_spares_the_task(root: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    agent_proc = subprocess.Popen(
        [sys.executable, "-c", AGENT_WITH_SPARE, str(root), *GATED],
        env=env,
        stdout=subprocess.PIPE,
    )
    try:
        assert agent_proc.stdout is not None
        shim_pid, spare_pid = map(int, agent_proc.stdout.readline().split())
        spare = ProcRecord.of(spare_pid)
        assert spare is not None and spare_pid != shim_pid
        wait_for(lambda: (root / "t1" / TASK_PID).exists(), "the task to start")
        assert SPARE_FLAG in psutil.Process(shim_pid).cmdline()
        agent_proc.kill()
        agent_proc.wait(timeout=DEADLINE_S)
    finally:
        if agent_proc.poll() is None:
            agent_proc.kill()
            agent_proc.wait()
    # The idle spare goes by itself; the one that took t1 is its shim and stays.
    wait_for(lambda: _zombie_or_gone(spare.pid), "the agent's idle spare to exit")
    assert not (root / "t1" / "exit.json").exists()
    restarted = TaskRunner(root)
    assert restarted.adopt() == (["t1"], [])
    (root / "t1" / "work" / "go").touch()
    ex = exit_of(restarted, "t1")
    assert (ex.exit_code, log_text(restarted, "t1")) == (7, "waiting\n")


LAUNCHER = textwrap.dedent(
    """
    import os, subprocess, sys
    spare = subprocess.Popen(
        [sys.executable, "-S", "-m", "agent.shim", "--spare", str(os.getpid())],
        stdin=int(sys.argv[1]),
    )
    print(spare.pid, flush=True)
    """
)


def test_a_spare_exits_when_its_agent_is_gone_even_if_its_pipe_stays_open(root: Path) -> None:
    # Someone else (here: this test) still holds the pipe's write end, so no
    # EOF comes; being reparented must be enough.
    r, w = os.pipe()
    try:
        out = subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(r)],
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=subprocess.PIPE,
            pass_fds=(r,),
            timeout=DEADLINE_S,
            check=True,
        )
        spare = ProcRecord.of(int(out.stdout))
        if spare is not None:  # None: it is already gone
            wait_for(lambda: spare.process() is None, "the orphaned spare to exit")
    finally:
        os.close(r)
        os.close(w)


def _zombie_or_gone(pid: int) -> bool:
    # A spare orphaned by a killed agent is reaped by init, or is at least a zombie.
    return not _alive(pid)


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True
