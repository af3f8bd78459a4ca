"""Job arrays and dependencies end to end: leptonctl, three real masters and a
real agent. An array runs each index once with LEPTON_ARRAY_INDEX, keeps to
--max-running, lists its failed index, and is addressed with --index;
dependencies hold a job with the reason named and outlive the leader."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Cluster, wait_for

FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cl = Cluster(tmp_path_factory.mktemp("workloads") / "cluster", n_masters=3, ttl_s=3.0)
    try:
        cl.start_masters(60)
        cl.start_agent("h1", gpus="4")
        cl.wait_nodes_ready(1, timeout_s=60)
        yield cl
    finally:
        cl.close()


def live(st: dict[str, Any]) -> int:
    counts = st["task_states"]
    return int(counts.get("running", 0) + counts.get("assigned", 0))


def test_an_array_runs_every_index_within_its_limit_and_names_the_failed_one(c: Cluster) -> None:
    # Index 3 fails; each task runs long enough for the limit to matter.
    script = 'echo "index=$LEPTON_ARRAY_INDEX"; sleep 1; [ "$LEPTON_ARRAY_INDEX" != 3 ]'
    job = c.submit("--array", "0-6", "--max-running", "2", "--gpus", "1", "--", "sh", "-c", script)
    seen_reason = False
    most = 0

    def ended() -> dict[str, Any] | None:
        nonlocal seen_reason, most
        st = c.status(job)
        most = max(most, live(st))
        seen_reason |= "--max-running 2" in (st.get("reason") or "")
        return st if st["state"] in FINAL else None

    st = wait_for(ended, 120, f"array {job} to end")
    # Four GPUs free, yet never more than two of its tasks at once.
    assert most <= 2, most
    assert seen_reason
    assert st["state"] == "failed"
    assert st["task_states"] == {"succeeded": 6, "failed": 1}
    assert st["message"].startswith("1 of 7 tasks failed (3)")
    assert [t["rank"] for t in st["tasks"]] == [3]
    # One row in `jobs`, with its counts.
    rows = [r for r in c.ctl_json("jobs", "--all") if r["id"] == job]
    assert len(rows) == 1 and rows[0]["array_tasks"] == 7
    text = c.ctl("jobs", "--all").stdout
    assert "[6 succeeded, 1 failed]" in text
    shown = c.ctl("status", job).stdout
    assert "array     7 tasks (0-6); at most 2 at once" in shown
    assert "failed tasks:" in shown
    # --index addresses one task, in status and logs.
    one = c.ctl_json("status", job, "--index", "5")
    assert [(t["rank"], t["state"]) for t in one["tasks"]] == [(5, "succeeded")]
    assert c.ctl("logs", job, "--index", "5").stdout == "index=5\n"
    wrong = c.ctl("logs", job, "--index", "9", check=False)
    assert wrong.returncode != 0 and f"job {job} has no index 9" in wrong.stderr
    whole = c.ctl("logs", job, check=False)
    assert whole.returncode != 0 and "give --index I" in whole.stderr


def test_cancel_one_index_of_an_array(c: Cluster) -> None:
    job = c.submit("--array", "1,5,9", "--cpus", "0.1", "--mem", "64M", "--", "sleep", "600")
    wait_for(lambda: live(c.status(job)) == 3, 60, "three tasks running")
    out = c.ctl("cancel", job, "--index", "5").stdout.split()
    assert out[:3] == [job, "--index", "5"]
    wait_for(
        lambda: c.status(job)["task_states"] == {"running": 2, "cancelled": 1}, 60, "index 5 ended"
    )
    assert c.status(job)["state"] == "running"
    c.ctl("cancel", job)
    assert c.wait_job(job, FINAL)["state"] == "cancelled"


def test_dependencies_wait_name_the_job_and_survive_a_failover(c: Cluster) -> None:
    first = c.submit("--cpus", "0.1", "--mem", "64M", "--", "sleep", "600")
    c.wait_job(first, {"running"})
    ok = c.submit("--after-ok", first, "--", "true")
    anyway = c.submit("--after", first, "--", "sh", "-c", 'echo "after $LEPTON_JOB_ID"')
    st = wait_for(lambda: (s := c.status(ok)).get("reason") and s, 30, "a pending reason")
    assert st["reason"] == f"waiting for job {first} to succeed"
    assert st["state"] == "pending" and st["waiting_on"] == [first]
    assert f"waits for {first}" in c.ctl("status", anyway).stdout
    # A new leader knows what waits for what.
    old = c.wait_leader(60)
    old.proc.kill9()
    c.wait_leader(60, not_=old)
    c.masters.remove(old)
    assert c.status(ok)["waiting_on"] == [first]
    c.ctl("cancel", first)
    st = c.wait_job(ok, FINAL)
    assert (st["state"], st["message"]) == ("failed", f"dependency {first} cancelled")
    assert c.wait_job(anyway, FINAL)["state"] == "succeeded"
    assert c.ctl("logs", anyway).stdout == f"after {anyway}\n"


def test_unknown_or_bad_dependencies_are_one_line_and_change_nothing(c: Cluster) -> None:
    before = len(c.ctl_json("jobs", "--all"))
    for args, words in [
        (["--after-ok", "j-000000000000"], "no job j-000000000000 to wait for"),
        (["--array", "5-1"], "indexes go from 0"),
        (["--array", "0-3", "--nodes", "2"], "takes no --nodes"),
        (["--max-running", "2"], "give --array too"),
    ]:
        out = c.ctl("submit", *args, "--", "true", check=False)
        assert out.returncode != 0, args
        err = out.stderr.strip()
        assert words in err and len(err.splitlines()) == 1, (args, err)
    assert len(c.ctl_json("jobs", "--all")) == before


# Counts to 30, a step per 0.1 s, from its checkpoint; on SIGUSR1 it writes
# the checkpoint and exits 0.
CHECKPOINTING = """
n=0
trap 'echo $n > "$1/ck"; echo "checkpoint n=$n"; exit 0' USR1
[ -e "$1/ck" ] && n=$(cat "$1/ck")
echo "start n=$n restart=$LEPTON_RESTART_COUNT"
while [ $n -lt 30 ]; do sleep 0.1 & wait $!; n=$((n+1)); done
echo "done n=$n"
"""


def test_a_checkpointing_task_is_warned_before_its_time_limit_and_resumes(
    c: Cluster, shared_path: Path
) -> None:
    # Warned 2 s into each run: the count cannot finish in one.
    job = c.submit(
        "--time-limit", "10s", "--signal", "USR1@8s", "--cpus", "0.1", "--mem", "64M",
        "--", "sh", "-c", CHECKPOINTING, "checkpointing", str(shared_path),
    )  # fmt: skip
    st = c.wait_job(job, FINAL, timeout_s=120)
    assert st["state"] == "succeeded", st
    t = st["tasks"][0]
    assert t["restarts"] >= 1 and st["retries_left"] == 0
    out = c.ctl("logs", job).stdout
    # The last run resumed from a checkpoint and told how often it restarted.
    start = re.search(r"start n=(\d+) restart=(\d+)", out)
    assert start is not None and int(start.group(1)) > 0, out
    assert int(start.group(2)) == t["restarts"]
    assert out.endswith("done n=30\n")


def test_exit_85_runs_again_without_spending_a_retry(c: Cluster) -> None:
    script = '[ "$LEPTON_RESTART_COUNT" = 2 ] || exit 85; echo "run $LEPTON_ATTEMPT"'
    job = c.submit("--cpus", "0.1", "--mem", "64M", "--", "sh", "-c", script)
    st = c.wait_job(job, FINAL)
    assert st["state"] == "succeeded" and st["tasks"][0]["restarts"] == 2
    assert c.ctl("logs", job).stdout == "run 3\n"


def test_a_preempt_grace_over_the_maximum_is_refused(c: Cluster) -> None:
    out = c.ctl("submit", "--signal", "USR1@1m", "--preempt-grace", "1h", "--", "true", check=False)
    assert out.returncode != 0 and "over this cluster's maximum of 300s" in out.stderr


# Says which signal it got, in a file that outlives its attempts; on USR1 it
# checkpoints (a second) and exits 0.
WARNED = """
echo "start restart=$LEPTON_RESTART_COUNT" >> "$1/events"
trap 'echo "got USR1" >> "$1/events"; sleep 1; exit 0' USR1
trap 'echo "got TERM" >> "$1/events"; exit 143' TERM
while :; do sleep 0.1 & wait $!; done
"""


def events(shared: Path) -> list[str]:
    p = shared / "events"
    return p.read_text().splitlines() if p.exists() else []


def test_a_preempted_task_gets_its_signal_and_grace_and_runs_again(
    c: Cluster, shared_path: Path
) -> None:
    low = c.submit(
        "--gpus", "4", "--cpus", "0.1", "--mem", "64M", "--signal", "USR1@30s",
        "--preempt-grace", "20s", "--", "sh", "-c", WARNED, "warned", str(shared_path),
    )  # fmt: skip
    wait_for(lambda: events(shared_path) == ["start restart=0"], 60, "the task to start")
    high = c.submit("--gpus", "1", "--priority", "100", "--cpus", "0.1", "--", "true")
    assert c.wait_job(high, FINAL, timeout_s=90)["state"] == "succeeded"
    st = wait_for(
        lambda: (s := c.status(low))["tasks"][0]["attempt"] >= 2 and s, 90, "the task again"
    )
    t = st["tasks"][0]
    assert (t["preemptions"], t["restarts"]) == (1, 1)
    wait_for(lambda: "start restart=1" in events(shared_path), 60, "the second start")
    assert events(shared_path)[:3] == ["start restart=0", "got USR1", "start restart=1"]
    c.ctl("cancel", low)
    c.wait_job(low, FINAL)


def test_a_drain_deadline_is_warned_ahead(c: Cluster, shared_path: Path) -> None:
    job = c.submit(
        "--cpus", "0.1", "--mem", "64M", "--signal", "USR1@55s",
        "--", "sh", "-c", WARNED, "warned", str(shared_path),
    )  # fmt: skip
    wait_for(lambda: events(shared_path) == ["start restart=0"], 60, "the task to start")
    node = c.status(job)["tasks"][0]["node"]
    c.ctl("node", "drain", node, "--deadline", "60s")
    try:
        # Warned 55 s ahead of the deadline, so about 5 s into the drain; it
        # checkpoints and goes back to pending (its node is draining).
        wait_for(lambda: "got USR1" in events(shared_path), 60, "the warning")
        st = wait_for(
            lambda: (s := c.status(job))["tasks"][0]["state"] == "pending" and s, 60, "requeued"
        )
        assert st["tasks"][0]["restarts"] == 1 and "got TERM" not in events(shared_path)
    finally:
        c.ctl("node", "undrain", node)
    wait_for(lambda: "start restart=1" in events(shared_path), 60, "the run after the drain")
    c.ctl("cancel", job)
    c.wait_job(job, FINAL)
