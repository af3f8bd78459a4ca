"""Counters and usage, kept inside apply so that they are the cluster's, not a
master's: every replica counts the same, a new leader goes on from where the
old one was, and nothing is lost to a restart or to job garbage collection.

- `counters`: cumulative totals (tasks started and ended by reason,
  preemptions, reschedules, jobs submitted and ended by state) and the
  submit-to-start histogram, observed once per task when it first runs.
  Prometheus reads them from the leader (leptond/metrics.py).
- `usage`: GPU- and CPU-seconds per user per UTC day, and the jobs that
  ended that day by final state (`leptonctl usage`, decayed fair share).
  A run is charged when it ends, split over the days it spanned.

Rules of apply hold here: no clock (times come in the command, from the
proposer or the agent's event), no randomness, nothing raises. Times an
agent sent are clamped before they are used: a run starts no earlier than it
was placed, lasts no longer than MAX_CHARGE_DAYS, and a time outside
[0, MAX_TIME) charges nothing (a day number must stay a msgpack int).
Counter values are never mutated in place: each write puts a new number,
and a usage record is copied before it changes (raft/cow.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .model import Job, Task, UsageDay

if TYPE_CHECKING:
    from .state import ClusterState

DAY_S = 86400
MAX_TIME = 1e11  # seconds since the epoch; year 5138
MAX_CHARGE_DAYS = 400
# Upper bounds of the submit-to-start histogram's buckets, seconds.
START_BUCKETS_S = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
)  # fmt: skip
# Why an attempt ended. "evicted": stopped to run again elsewhere at no cost
# to its retries (a drain deadline, a node back with less, a faulty GPU, a
# gang member's restart). "requeued": the task asked to run again from its
# checkpoint (exit 85, or exit 0 after its warning signal), also at no cost.
END_REASONS = (
    "succeeded", "failed", "oom", "preempted", "lost", "cancelled", "evicted", "requeued",
)  # fmt: skip

JOBS_SUBMITTED = "jobs_submitted"
TASKS_STARTED = "tasks_started"
PREEMPTIONS = "preemptions"
RESCHEDULES = "reschedules"
GPU_SECONDS = "gpu_seconds"
CPU_SECONDS = "cpu_seconds"
START_COUNT = "start_latency:count"
START_SUM = "start_latency:sum"


def ended_key(reason: str) -> str:
    return f"tasks_ended:{reason}"


def job_ended_key(state: str) -> str:
    return f"jobs_ended:{state}"


def bucket_key(i: int) -> str:
    """Observations in bucket i alone (not cumulative; the exporter sums)."""
    return f"start_latency:le:{i}"


def bump(s: ClusterState, key: str, by: float = 1) -> None:
    s.counters[key] = s.counters.get(key, 0) + by


def day_of(t: float) -> int | None:
    return int(t // DAY_S) if _sane(t) else None


def _sane(t: float) -> bool:
    return isinstance(t, _NUMBERS) and math.isfinite(t) and 0 <= t < MAX_TIME


_NUMBERS = (int, float)  # a tuple: `int | float` would be built at each call


# -- events of the task lifecycle (raft/tasks.py calls these) ---------------------
def job_submitted(s: ClusterState) -> None:
    bump(s, JOBS_SUBMITTED)


def task_started(s: ClusterState, t: Task, job: Job, at: float) -> None:
    """A writable task began running at `at`: counted, and observed in the
    submit-to-start histogram if it is the task's first run."""
    bump(s, TASKS_STARTED)
    if t.first_started_at is not None:
        return
    t.first_started_at = at
    latency = at - job.submitted_at
    if not (math.isfinite(latency) and latency > 0):
        latency = 0.0  # an agent's clock behind the master's
    latency = min(latency, MAX_TIME)
    bump(s, START_COUNT)
    bump(s, START_SUM, latency)
    for i, bound in enumerate(START_BUCKETS_S):
        if latency <= bound:
            bump(s, bucket_key(i))
            break


def attempt_ended(s: ClusterState, t: Task, job: Job, reason: str, end: float) -> None:
    """A live attempt of writable task `t` ended for `reason`: counted, and
    its run (if it started) charged to the job and to the user's days."""
    bump(s, ended_key(reason))
    start = t.started_at
    if start is None or not _sane(start):
        return
    if t.assigned_at is not None and _sane(t.assigned_at):
        start = max(start, t.assigned_at)
    end = min(max(start, end), start + MAX_CHARGE_DAYS * DAY_S)  # max() drops a NaN end
    if not end > start:
        return
    gpus, cpus = len(t.gpus), max(0.0, float(t.cpus))
    seconds = end - start
    j = s.jobs.writable(job.id)
    j.gpu_s += gpus * seconds
    j.cpu_s += cpus * seconds
    bump(s, GPU_SECONDS, gpus * seconds)
    bump(s, CPU_SECONDS, cpus * seconds)
    day = int(start // DAY_S)
    t0 = start
    while t0 < end:
        t1 = min(end, (day + 1) * DAY_S)
        _charge_day(s, j.user, day, gpus * (t1 - t0), cpus * (t1 - t0))
        t0, day = t1, day + 1


def rescheduled(s: ClusterState) -> None:
    bump(s, RESCHEDULES)


def preempted(s: ClusterState) -> None:
    bump(s, PREEMPTIONS)


def job_ended(s: ClusterState, job: Job, now: float) -> None:
    """The job reached its final state (every task final) at `now`."""
    bump(s, job_ended_key(job.state))
    day = day_of(now)
    if day is None:
        return
    rec = _writable_day(s, job.user, day)
    rec.jobs = {**rec.jobs, job.state: rec.jobs.get(job.state, 0) + 1}


def end_reason(stop: str | None, outcome: str, message: str) -> str:
    """The reason of a final end (no requeue): cancel, success, loss, OOM, failure."""
    if stop == "cancel":
        return "cancelled"
    if outcome == "succeeded":
        return "succeeded"
    if outcome == "lost":
        return "lost"
    if message.startswith("out of memory"):
        return "oom"
    return "failed"


# -- the usage records ----------------------------------------------------------------
def _charge_day(s: ClusterState, user: str, day: int, gpu_s: float, cpu_s: float) -> None:
    rec = _writable_day(s, user, day)
    rec.gpu_s += gpu_s
    rec.cpu_s += cpu_s


def _writable_day(s: ClusterState, user: str, day: int) -> UsageDay:
    key = (user, day)
    if key in s.usage:
        return s.usage.writable(key)
    rec = UsageDay(user=user, day=day)
    s.usage[key] = rec
    return rec


def forget_usage_before(s: ClusterState, before: float) -> int:
    """Drop usage records of days that ended before `before`; how many went."""
    day = day_of(before)
    if day is None:
        return 0
    old = [k for k in s.usage if k[1] < day]
    for k in old:
        del s.usage[k]
    return len(old)
