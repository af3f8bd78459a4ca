"""Who used what: `leptonctl usage` and the decayed fair share, from a view.

Usage lives in the replicated state as GPU- and CPU-seconds per user per UTC
day, charged when a run ends (raft/accounting.py), so it outlives the jobs.
What runs now is added at read time, from its start (or the window's) to
now. A window (`since`) counts whole UTC days: the records have no finer
grain.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from raft.accounting import DAY_S, day_of
from raft.model import FINAL_JOB_STATES, LIVE_TASK_STATES, Task
from raft.view import StateView

JOB_STATES = ("succeeded", "failed", "cancelled")
# A user whose decayed share of recent usage is below this is left out of
# the scheduler's policy (it would not change any order).
MIN_PAST_SHARE = 1e-3


def _running_seconds(t: Task, since: float, now: float) -> float:
    """Seconds a live task has run within [since, now]."""
    if t.state not in LIVE_TASK_STATES or t.started_at is None:
        return 0.0
    start = max(t.started_at, t.assigned_at or t.started_at, since)
    return max(0.0, now - start)


def _live(s: StateView) -> Iterable[Task]:
    return s.live_tasks()


def by_user(s: StateView, now: float, since_s: float) -> list[dict[str, Any]]:
    """One row per user: GPU-hours, CPU-hours and jobs by final state in the
    window of whole days that holds `now - since_s`."""
    first_day = day_of(max(0.0, now - since_s)) or 0
    window_start = first_day * DAY_S
    rows: dict[str, dict[str, Any]] = {}

    def row(user: str) -> dict[str, Any]:
        r = rows.get(user)
        if r is None:
            r = rows[user] = {
                "user": user,
                "gpu_hours": 0.0,
                "cpu_hours": 0.0,
                "jobs": dict.fromkeys(JOB_STATES, 0),
                "running_tasks": 0,
            }
        return r

    for (user, day), u in s.usage.items():
        if day < first_day:
            continue
        r = row(user)
        r["gpu_hours"] += u.gpu_s / 3600
        r["cpu_hours"] += u.cpu_s / 3600
        for state, n in u.jobs.items():
            r["jobs"][state] = r["jobs"].get(state, 0) + n
    for t in _live(s):
        secs = _running_seconds(t, window_start, now)
        if t.state == "running":
            r = row(s.jobs[t.job_id].user)
            r["gpu_hours"] += len(t.gpus) * secs / 3600
            r["cpu_hours"] += t.cpus * secs / 3600
            r["running_tasks"] += 1
    out = sorted(rows.values(), key=lambda r: (-r["gpu_hours"], -r["cpu_hours"], r["user"]))
    for r in out:
        r["gpu_hours"] = round(r["gpu_hours"], 4)
        r["cpu_hours"] = round(r["cpu_hours"], 4)
    return out


def by_job(s: StateView, now: float, since_s: float) -> list[dict[str, Any]]:
    """One row per job the cluster still holds that ran in the window (jobs
    are forgotten after their retention; their usage stays in `by_user`)."""
    since = now - since_s
    out: list[dict[str, Any]] = []
    for j in s.jobs.values():
        if j.state in FINAL_JOB_STATES and (j.finished_at or 0.0) < since:
            continue
        gpu_s, cpu_s = j.gpu_s, j.cpu_s
        # A job that has ended runs nothing: no need to look at its (maybe
        # 100,000 array) tasks.
        for tid in j.tasks if j.finished_at is None else ():
            t = s.tasks[tid]
            secs = _running_seconds(t, 0.0, now)
            gpu_s += len(t.gpus) * secs
            cpu_s += t.cpus * secs
        if gpu_s == 0 and cpu_s == 0 and j.state == "pending":
            continue  # never ran
        row: dict[str, Any] = {
            "job": j.id,
            "name": j.name,
            "user": j.user,
            "state": j.state,
            "gpu_hours": round(gpu_s / 3600, 4),
            "cpu_hours": round(cpu_s / 3600, 4),
            "submitted_at": j.submitted_at,
            "finished_at": j.finished_at,
        }
        out.append(row)
    out.sort(key=lambda r: (-float(r["gpu_hours"]), -float(r["cpu_hours"]), str(r["job"])))
    return out


def past_shares(s: StateView, now: float, half_life_s: float) -> dict[str, float]:
    """Each user's share (0 to 1) of the cluster's recent usage, each day's
    weighed by 0.5 ** (its age / half_life): GPU-seconds, or CPU-seconds where
    that share is larger (CPU-only work counts too). What runs now is left
    out: the dominant share it is added to counts it already."""
    gpu: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for (user, day), u in s.usage.items():
        age = max(0.0, now - (day + 0.5) * DAY_S)
        w = 0.5 ** (age / half_life_s)
        gpu[user] = gpu.get(user, 0.0) + u.gpu_s * w
        cpu[user] = cpu.get(user, 0.0) + u.cpu_s * w
    total_g, total_c = sum(gpu.values()), sum(cpu.values())
    out = {}
    for user in gpu:
        share = max(
            gpu[user] / total_g if total_g > 0 else 0.0,
            cpu[user] / total_c if total_c > 0 else 0.0,
        )
        if share >= MIN_PAST_SHARE:
            out[user] = share
    return out
