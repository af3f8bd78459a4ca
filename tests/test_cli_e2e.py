"""leptonctl as a new user meets it, on one real master and two agents.

Each test pins down one thing that went wrong when the README was followed:
finished tasks shown stopping, `logs -f` that never returned, `--wait`
without output, jobs that could never run accepted, cryptic errors for a
wrong port, a traceback from `snapshot save`, and the smaller ones.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, Cluster, env, wait_for

FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cl = Cluster(tmp_path_factory.mktemp("ctl") / "cluster", n_masters=1, ttl_s=3.0)
    try:
        cl.start_masters()
        cl.start_agent("h1", gpus="2")
        cl.start_agent("h2", gpus="2")
        cl.wait_nodes_ready(2)
        yield cl
    finally:
        cl.close()


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


def popen_ctl(c: Cluster, *args: str) -> subprocess.Popen[str]:
    e = env()
    e["LEPTON_ADDR"], e["LEPTON_TOKEN"] = c.addrs, c.admin_token
    e["LEPTON_CONFIG"] = str(c.root / "no-config.toml")
    return subprocess.Popen(
        [sys.executable, "-m", "leptonctl.cli", *args],
        env=e,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(p: subprocess.Popen[str], timeout_s: float = 60) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate(timeout=10)
        raise AssertionError(f"leptonctl did not return within {timeout_s}s: {err}") from None
    return p.returncode, out, err


def never_fits(c: Cluster, *extra: str, **kw: Any) -> str:
    """A job that stays pending: more GPUs than any node has."""
    return c.submit("--gpus", "8", "--queue-anyway", *extra, "--", "true", **kw)


# -- 1. finished tasks are never shown stopping ---------------------------------------
def test_a_cancelled_job_shows_no_stopping_once_its_task_exited(c: Cluster) -> None:
    job = c.submit("--gpus", "1", "--", "sleep", "60")
    c.wait_job(job, {"running"})
    assert c.ctl("cancel", job).stdout.split() == [job, "cancelled"]
    # While its task still exits, every view says it is stopping, the same way.
    st = c.status(job)
    if st["tasks"][0]["state"] == "running":
        assert st["stopping"] == 1 and st["tasks"][0]["stopping"] == "cancel"
    st = wait_for(lambda: (s := c.status(job))["finished_at"] and s, 30, "the task to exit")
    assert st["stopping"] == 0 and st["tasks"][0]["stopping"] is None, st
    out = c.ctl("status", job).stdout
    assert "stopping" not in out, out
    row = next(r for r in c.ctl_json("jobs") if r["id"] == job)
    assert (row["state"], row["stopping"]) == ("cancelled", 0)
    table_row = next(ln for ln in lines(c.ctl("jobs").stdout) if ln.startswith(job))
    assert "stopping" not in table_row and " cancelled " in table_row


def test_the_surviving_rank_of_a_failed_gang_shows_no_stopping(c: Cluster) -> None:
    script = 'if [ "$LEPTON_TASK_RANK" = 0 ]; then sleep 1; exit 3; fi; sleep 60'
    job = c.submit("--nodes", "2", "--gpus", "1", "--", "sh", "-c", script)
    st = c.wait_job(job, {"failed"})
    st = wait_for(lambda: (s := c.status(job))["finished_at"] and s, 30, "rank 1 to stop")
    assert [t["stopping"] for t in st["tasks"]] == [None, None], st
    assert "stopping" not in c.ctl("status", job).stdout


# -- 2. logs -f returns, and says why a job waits --------------------------------------
def test_logs_follow_of_a_pending_job_says_why_once_and_returns_when_it_is_cancelled(
    c: Cluster,
) -> None:
    job = never_fits(c)
    p = popen_ctl(c, "logs", "-f", job)
    try:
        wait_for(lambda: c.status(job).get("reason"), 30, "a pending reason")
        time.sleep(2)  # a few polls of logs -f while it is pending
        c.ctl("cancel", job)
        code, out, err = finish(p, 30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert code == 0, err
    assert out == ""
    said = lines(err)
    assert said == [
        f"leptonctl: job {job} is pending: needs 8 GPUs on one node; the largest node has 2"
    ], said


def test_logs_follow_of_a_job_that_never_started_returns_at_once(c: Cluster) -> None:
    job = never_fits(c)
    c.ctl("cancel", job)
    # It has nothing to wait for: exit 0 with no output (a wait would end in
    # the subprocess timeout, or in leptonctl giving up with exit 1).
    out = c.ctl("logs", "-f", job, timeout_s=30)
    assert out.stdout == "" and out.stderr == ""


def test_logs_follow_of_a_finished_job_prints_its_output_and_returns(c: Cluster) -> None:
    job = c.submit("--", "sh", "-c", "echo one; echo two")
    c.wait_job(job, {"succeeded"})
    assert c.ctl("logs", "-f", job, timeout_s=30).stdout == "one\ntwo\n"


# -- 3. submit --wait shows the output -------------------------------------------------
def test_submit_wait_streams_the_output_and_exits_with_the_job_code(c: Cluster) -> None:
    out = c.ctl(
        "submit", "--wait", "--gpus", "1", "--", "sh", "-c",
        'echo "gpus=$CUDA_VISIBLE_DEVICES"; echo oops >&2; exit 3',
        check=False,
    )  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert re.fullmatch(r"gpus=\d\noops\n", out.stdout), out.stdout
    assert re.search(r"submitted j-\w+", out.stderr), out.stderr


def test_submit_wait_all_prefixes_every_rank(c: Cluster) -> None:
    out = c.ctl(
        "submit", "--wait", "--all", "--nodes", "2", "--",
        "sh", "-c", 'echo "hi from $LEPTON_TASK_RANK"',
    )  # fmt: skip
    assert sorted(lines(out.stdout)) == ["[r0] hi from 0", "[r1] hi from 1"], out.stdout


def test_submit_wait_quiet_prints_the_id_alone(c: Cluster) -> None:
    out = c.ctl("submit", "--wait", "--quiet", "--", "sh", "-c", "echo hidden; exit 4", check=False)
    assert out.returncode == 4
    assert re.fullmatch(r"j-\w+\n", out.stdout), out.stdout


# -- 8. a job that can never run is refused ---------------------------------------------
def test_a_job_no_node_could_ever_run_is_refused_with_the_reason(c: Cluster) -> None:
    before = c.ctl_json("jobs", "--all")
    for args, why in (
        (["--gpus", "8"], "needs 8 GPUs on one node (--gpus is per node); the largest node has 2"),
        (["--nodes", "3"], "a gang of 3 needs 3 distinct nodes"),
        (["--constraint", "zone=mars"], "no node has the label zone=mars"),
        (["--gpu-type", "H100", "--gpus", "1"], "no node has GPU model H100"),
    ):
        out = c.ctl("submit", *args, "--", "true", check=False)
        assert out.returncode == 2, (args, out.stderr)
        said = lines(out.stderr)
        assert len(said) == 1 and why in said[0] and "--queue-anyway" in said[0], said
    assert c.ctl_json("jobs", "--all") == before
    job = never_fits(c)  # --queue-anyway: accepted, and waits
    assert c.status(job)["state"] == "pending"
    c.ctl("cancel", job)


# -- 9. the wrong port ----------------------------------------------------------------
def test_the_wrong_port_gets_a_line_that_says_which_port_to_use(c: Cluster) -> None:
    m = c.masters[0]
    http = c.ctl("jobs", addr=f"127.0.0.1:{m.http}", check=False)
    assert http.returncode == 1
    assert lines(http.stderr) == [
        f"leptonctl: 127.0.0.1:{m.http} answered in HTTP: that is leptond's HTTP port (or "
        "another web server); leptonctl and lepton-agent talk to the RPC port (7441 by default)"
    ]
    raft = c.ctl("jobs", addr=f"127.0.0.1:{m.raft}", check=False)
    said = lines(raft.stderr)
    assert raft.returncode == 1 and len(said) == 1, said
    assert "not leptond's RPC port (7441 by default)" in said[0], said


# -- 10. snapshots -------------------------------------------------------------------
def test_snapshot_save_to_a_missing_directory_is_one_line(c: Cluster, tmp_path: Path) -> None:
    out = c.ctl("snapshot", "save", "/nonexistent/x", check=False)
    assert out.returncode == 2
    assert lines(out.stderr) == [
        "leptonctl: error: cannot write /nonexistent/x: no directory /nonexistent"
    ]
    (tmp_path / "d").mkdir()
    out = c.ctl("snapshot", "save", str(tmp_path / "d"), check=False)
    assert out.returncode == 2 and "is a directory" in out.stderr and "Traceback" not in out.stderr


def test_snapshot_restore_asks_first_and_says_what_it_replaces(c: Cluster, tmp_path: Path) -> None:
    snap = tmp_path / "state.snap"
    c.ctl("snapshot", "save", str(snap))
    extra = never_fits(c)  # made after the snapshot: a restore would lose it
    jobs_now = len(c.ctl_json("jobs", "--all"))
    out = c.ctl("snapshot", "restore", str(snap), check=False)
    assert out.returncode == 2
    said = lines(out.stderr)
    assert len(said) == 1 and "--yes" in said[0], said
    assert f"{jobs_now} job(s) and 2 node(s) now" in said[0], said
    assert f"the snapshot's {jobs_now - 1} job(s)" in said[0], said
    assert c.status(extra)["state"] == "pending"  # nothing changed
    c.ctl("cancel", extra)


# -- 12. the smaller ones ---------------------------------------------------------------
def test_logs_of_a_gang_hint_at_other_ranks_and_take_rank_tail_and_all(c: Cluster) -> None:
    job = c.submit(
        "--nodes", "2", "--", "sh", "-c",
        'for i in 1 2 3; do echo "r$LEPTON_TASK_RANK line $i"; done; echo "r$LEPTON_TASK_RANK err" >&2',
    )  # fmt: skip
    c.wait_job(job, {"succeeded"})
    first = c.ctl("logs", job)
    assert lines(first.stdout)[:3] == ["r0 line 1", "r0 line 2", "r0 line 3"]
    assert lines(first.stderr) == [
        f"leptonctl: job {job} has 2 ranks; showing rank 0 (--rank R for another, "
        "--all for every one)"
    ]
    one = c.ctl("logs", job, "--rank", "1", "--tail", "2")
    assert lines(one.stdout) == ["r1 line 3", "r1 err"] and one.stderr == ""
    every = c.ctl("logs", job, "--all")
    assert sorted(lines(every.stdout)) == sorted(
        f"[r{r}] r{r} {w}" for r in (0, 1) for w in ("line 1", "line 2", "line 3", "err")
    )
    err = c.ctl("logs", job, "--stderr", "--all")
    assert sorted(lines(err.stdout)) == ["[r0] r0 err", "[r1] r1 err"]
    stamped = c.ctl("logs", job, "--rank", "0", "--timestamps")
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    for ln in lines(stamped.stdout):
        assert re.fullmatch(rf"{stamp} r0 (line \d|err)", ln), ln
        when = time.mktime(time.strptime(ln[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        assert abs(when - time.time()) < 300, ln


def test_cancel_takes_several_jobs_or_a_user_and_a_state(c: Cluster) -> None:
    a, b = never_fits(c), never_fits(c)
    out = c.ctl("cancel", a, b)
    assert lines(out.stdout) == [f"{a} cancelled", f"{b} cancelled"]
    bob = c.ctl("token", "create", "--role", "submit", "--name", "bob").stdout.strip()
    eve = c.ctl("token", "create", "--role", "submit", "--name", "eve").stdout.strip()
    mine = [never_fits(c, token=bob) for _ in range(2)]
    # Only an admin may cancel someone else's jobs; nothing is cancelled.
    refused = c.ctl("cancel", "--user", "bob", "--state", "pending", token=eve, check=False)
    assert refused.returncode == 1 and len(lines(refused.stderr)) == 1, refused.stderr
    assert all(c.status(j)["state"] == "pending" for j in mine)
    done = c.ctl("cancel", "--user", "bob", "--state", "pending")
    assert sorted(lines(done.stdout)) == sorted(f"{j} cancelled" for j in mine)
    # A user's own, by state: nothing left to cancel is no error.
    again = c.ctl("cancel", "--state", "pending", token=bob)
    assert again.returncode == 0 and "bob has no pending jobs" in again.stderr


def test_jobs_filters_and_time_columns(c: Cluster) -> None:
    done = c.submit("--name", "quick", "--", "true")
    c.wait_job(done, {"succeeded"})
    waiting = never_fits(c, "--name", "stuck")
    pending = c.ctl_json("jobs", "--state", "pending")
    assert waiting in {j["id"] for j in pending} and all(j["state"] == "pending" for j in pending)
    assert c.ctl_json("jobs", "--user", "nobody") == []
    assert len(c.ctl_json("jobs", "--all", "--limit", "1")) == 1
    table = lines(c.ctl("jobs").stdout)
    assert table[0].split() == [
        "ID", "NAME", "USER", "STATE", "GPUS", "NODES", "SUBMITTED", "STARTED", "ENDED", "DURATION",
    ]  # fmt: skip
    row = next(ln.split() for ln in table if ln.startswith(done))
    assert row[7:9] == ["ago", "-"] or "ago" in row[7], row  # started; ended
    stuck = next(ln for ln in table if ln.startswith(waiting))
    assert stuck.split()[4] == "8"
    c.ctl("cancel", waiting)


def test_jobs_watch_shows_the_list_again_and_again(c: Cluster) -> None:
    p = popen_ctl(c, "jobs", "-w", "--interval", "0.3")
    assert p.stdout is not None
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while sum(ln.startswith("ID ") for ln in seen) < 3:
            assert time.monotonic() < deadline, seen
            seen.append(p.stdout.readline())
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    assert sum(ln.startswith("every 0.3s") for ln in seen) >= 3


def test_nodes_show_used_over_total_and_no_utilisation_when_down(c: Cluster) -> None:
    job = c.submit("--gpus", "2", "--cpus", "0.5", "--", "sleep", "60")
    st = c.wait_job(job, {"running"})
    node = st["tasks"][0]["node"]
    row = next(ln.split() for ln in lines(c.ctl("nodes").stdout) if ln.startswith(node))
    assert row[3] == "2/2" and row[-3].startswith("0.5/"), row  # GPUS, CPUS
    c.ctl("cancel", job)
    extra = c.start_agent("h3", gpus="1")
    wait_for(lambda: any(n["name"] == "h3" and n["state"] == "ready" for n in c.nodes()), 30, "h3")
    wait_for(
        lambda: next(n for n in c.nodes() if n["name"] == "h3")["gpu_util_pct"] is not None,
        30,
        "a heartbeat from h3",
    )
    extra.kill9()
    wait_for(lambda: any(n["name"] == "h3" and n["state"] == "down" for n in c.nodes()), 30, "down")
    h3 = next(n for n in c.ctl_json("nodes") if n["name"] == "h3")
    assert h3["gpu_util_pct"] is None and h3["gpus"] == [] and h3["host"] == {}, h3
    row = next(ln.split() for ln in lines(c.ctl("nodes").stdout) if ln.startswith("h3"))
    assert row[2] == "down" and row[4] == "-", row
    c.rpc("node_rm", {"node": "h3", "force": True})


def test_the_workdir_upload_says_what_it_reused(c: Cluster, tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "a.txt").write_text("hello\n")
    first = c.ctl("submit", "--workdir", str(wd), "--", "cat", "a.txt")
    second = c.ctl("submit", "--workdir", str(wd), "--", "cat", "a.txt")
    assert "uploaded" in first.stderr, first.stderr
    assert "all already on the cluster (nothing to upload)" in second.stderr, second.stderr
    assert "0 of" not in second.stderr
    job = second.stdout.strip()
    c.wait_job(job, {"succeeded"})
    assert c.ctl("logs", job).stdout == "hello\n"


# -- 11. cluster status from any master ------------------------------------------------
def test_cluster_status_is_the_same_table_from_any_master(cluster: Cluster) -> None:
    leader = cluster.wait_leader()
    # Followers announce their RPC addresses a moment after they start.
    wait_for(
        lambda: all(m["rpc_addr"] for m in cluster.rpc("cluster_status")["members"]),
        30,
        "every master's RPC address",
    )

    def table_from(addr: str) -> list[list[str]]:
        out = cluster.ctl("cluster", "status", addr=addr).stdout
        return [ln.split() for ln in lines(out) if ln.startswith("127.0.0.1:")]

    want = sorted(
        [m.raft_addr, m.rpc_addr, "leader" if m is leader else "follower"] for m in cluster.masters
    )
    for m in cluster.masters:
        seen: list[list[str]] = []

        def whole(addr: str = m.rpc_addr, seen: list[list[str]] = seen) -> bool:
            # A loaded host may drop a Raft connection for a moment, and the
            # leader then shows that member unreachable until it reconnects:
            # the table must come out whole once the cluster is.
            seen[:] = table_from(addr)
            # Lag is the leader's view of every member: known for all of them.
            return sorted(r[:3] for r in seen) == want and all(
                r[3] != "-" and r[4] != "-" and r[5] == "ok" for r in seen
            )

        try:
            wait_for(whole, 60, f"the whole table from {m.rpc_addr}", interval_s=0.5)
        except AssertionError:
            raise AssertionError((m.rpc_addr, seen, want)) from None


# Another user's command line, as a terminal would take it: a new window
# title, a cleared screen, a line overwritten and a forged one, a reversed
# run of text, a C1 control sequence. Printable text (any script) stays.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\rfake\nline\u202eevil\x9b31m \U0001f680 é"


def test_leptonctl_escapes_what_it_prints_from_the_cluster(c: Cluster) -> None:
    job = c.submit("--name", "hostile", "--", "sh", "-c", "true", HOSTILE)
    c.wait_job(job, FINAL)
    status = c.ctl("status", job).stdout
    listed = c.ctl("jobs", "--all").stdout
    refused = c.ctl("cancel", HOSTILE, check=False)
    assert refused.returncode != 0
    for text in (status, listed, refused.stderr):
        bad = [ch for ch in text if not (ch.isprintable() or ch == "\n")]
        assert bad == [], (bad, text)
    want = "\\x1b]0;pwned\\x07\\x1b[2J\\rfake\\nline\\u202eevil\\x9b31m \U0001f680 é"
    assert want in status, status
    assert want in refused.stderr, refused.stderr
    assert len(lines(refused.stderr)) == 1
    # JSON stays exact: the same command line, character for character.
    assert json.loads(c.ctl("status", job, "-o", "json").stdout)["command"][-1] == HOSTILE
