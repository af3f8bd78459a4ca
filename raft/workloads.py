"""Job arrays and dependencies inside apply.

An array is one job whose spec (stored once) names its indexes; each index is
one small Task record (id `<job>.<index>`, rank = the index), placed, retried
and cancelled on its own. A failed task does not stop the others: the array
ends when every task has, succeeded only if every task did.

A dependency is a list of job ids in the spec (after_ok, after_any). The
ones that have not ended are in the waiting job's `waiting_on`; while any is
left its tasks are not offered to the scheduler (leptond/views.py). A job
that ends releases its dependents here, at apply, so they are part of the
replicated state and survive a failover. A failed after_ok dependency fails
its dependents, and theirs in turn.

Cycles cannot be made: a job may wait only for jobs that exist when it is
submitted, never for itself, and its dependencies never change afterwards.

Copy on write (raft/cow.py) as in raft/tasks.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import accounting, arrays, tasks
from .errors import ArgError
from .model import FINAL_JOB_STATES, FINAL_TASK_STATES, LIVE_TASK_STATES, Job, Task

if TYPE_CHECKING:
    from .state import ClusterState

# How many failed indexes an array's message names before "...".
NAMED_FAILURES = 10


def is_array(job: Job) -> bool:
    return job.spec.get("array") is not None


def new_tasks(job_id: str, spec: dict[str, Any]) -> list[Task]:
    """The tasks of a new job: one per rank of a gang, or one per array index."""
    common = {
        "job_id": job_id,
        "cpus": spec["cpus"],
        "mem_bytes": spec["mem_bytes"],
        "priority": spec["priority"],
    }
    if spec.get("array") is not None:
        ranks: Any = arrays.indexes(spec["array"])
    else:
        ranks = range(spec["nodes"])
    return [Task(id=f"{job_id}.{r}", rank=r, **common) for r in ranks]


def dependencies(s: ClusterState, job_id: str, spec: dict[str, Any]) -> list[str]:
    """The jobs a new job has to wait for (sorted), or ArgError with one line
    for an unknown job, a cycle, or an after_ok job that already failed."""
    waiting = []
    for key in ("after_ok", "after_any"):
        for dep in spec.get(key) or []:
            if dep == job_id:
                raise ArgError("bad_request", f"job {dep} cannot wait for itself (a cycle)")
            other = s.jobs.get(dep)
            if other is None:
                raise ArgError("not_found", f"no job {dep} to wait for")
            if not ended(other):
                waiting.append(dep)
            elif key == "after_ok" and other.state != "succeeded":
                raise ArgError(
                    "conflict", f"job {dep} {other.state}: --after-ok {dep} would never start"
                )
    return sorted(waiting)


def ended(job: Job) -> bool:
    """Whether a job is over for its dependents: final, and every task ended
    (a cancelled job's tasks may still be stopping, holding their GPUs)."""
    return job.state in FINAL_JOB_STATES and job.finished_at is not None


def add_dependents(s: ClusterState, job: Job) -> None:
    for dep in job.waiting_on:
        s.dependents.setdefault(dep, set()).add(job.id)


def release_dependents(s: ClusterState, job_id: str, now: float) -> None:
    """`job_id` has ended: the jobs waiting for it stop waiting, or fail (an
    after_ok dependency that did not succeed), and so on down the chain."""
    ready = [job_id]
    while ready:
        done = s.jobs[ready.pop()]
        for wid in sorted(s.dependents.pop(done.id, ())):
            w = s.jobs.get(wid)
            if w is None or done.id not in w.waiting_on:
                continue
            w = s.jobs.writable(wid)
            w.waiting_on = [d for d in w.waiting_on if d != done.id]
            after_ok = done.id in (w.spec.get("after_ok") or ())
            if w.state == "pending" and after_ok and done.state != "succeeded":
                _fail_waiting(s, w, f"dependency {done.id} {done.state}", now)
                ready.append(w.id)


def _fail_waiting(s: ClusterState, job: Job, why: str, now: float) -> None:
    """A job that never started fails: its tasks end without running."""
    job = s.jobs.writable(job.id)
    for tid in job.tasks:
        if s.tasks[tid].state == "pending":
            s.pending.pop(tid, None)
            t = s.tasks.writable(tid)
            tasks.set_state(s, t, "cancelled")
            t.finished_at, t.message = now, f"never started: {why}"
    job.state, job.message, job.finished_at = "failed", why, now
    accounting.job_ended(s, job, now)  # it ends here, not through refresh_job
    s._pending_changed(job, was_pending=True)
    # Its own dependents go on waiting for nothing else from it.
    for dep in job.waiting_on:
        waiters = s.dependents.get(dep)
        if waiters is not None:
            waiters.discard(job.id)
    job.waiting_on = []


def array_outcome(s: ClusterState, job: Job) -> tuple[str, str]:
    """An array's state and message from the counts of its tasks' states (it
    is not cancelled): it runs until every task has ended, and succeeded
    only if every task did. O(1) until it ends, then one pass to name the
    failed indexes."""
    counts = s.job_counts.get(job.id, {})
    ended = sum(counts.get(st, 0) for st in FINAL_TASK_STATES)
    if ended == len(job.tasks):
        n_bad = counts.get("failed", 0) + counts.get("lost", 0)
        if n_bad:
            bad = []
            for tid in job.tasks:
                if s.tasks[tid].state in ("failed", "lost"):
                    bad.append(s.tasks[tid])
                    if len(bad) > NAMED_FAILURES:
                        break
            named = ", ".join(str(t.rank) for t in bad[:NAMED_FAILURES])
            more = ", ..." if n_bad > NAMED_FAILURES else ""
            first = f"index {bad[0].rank} {bad[0].state}: {bad[0].message}"
            msg = f"{n_bad} of {len(job.tasks)} tasks failed ({named}{more}); {first}"
            return "failed", msg[:1024]
        if counts.get("succeeded", 0) == len(job.tasks):
            return "succeeded", ""
        return "cancelled", job.message or "some tasks were cancelled"
    if ended or array_live(s, job):
        return "running", job.message
    return "pending", job.message


def array_live(s: ClusterState, job: Job) -> int:
    counts = s.job_counts.get(job.id, {})
    return sum(counts.get(st, 0) for st in LIVE_TASK_STATES)


def task_of(s: ClusterState, job: Job, index: Any) -> Task:
    """The task of an array with this index, or ArgError with one line."""
    if not is_array(job):
        raise ArgError("bad_request", f"job {job.id} is not an array; it has no --index")
    if isinstance(index, bool) or not isinstance(index, int):
        raise ArgError("bad_request", "index must be a whole number")
    t = s.tasks.get(f"{job.id}.{index}")
    if t is None or t.job_id != job.id:
        raise ArgError(
            "not_found",
            f"job {job.id} has no index {index} (its indexes are "
            f"{arrays.describe(job.spec['array'])[:80]})",
        )
    return t
