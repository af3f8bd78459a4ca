"""A small harness that drives ClusterState the way the raft shell does: every
call encodes a command, applies it at the next log index and returns the result.

Shared by the state tests; it holds no tests itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from raft import arrays
from raft.commands import encode
from raft.model import FINAL_TASK_STATES, LIVE_TASK_STATES, NODE_STATES
from raft.state import ClusterState

GiB = 1 << 30


def node_record(
    node_id: str, gpus: int = 4, cpus: float = 32.0, mem_bytes: int = 256 * GiB, **extra: Any
) -> dict[str, Any]:
    return {
        "id": node_id,
        "name": node_id,
        "addr": f"{node_id}:7441",
        "cpus": cpus,
        "mem_bytes": mem_bytes,
        "gpus": [
            {"index": i, "uuid": f"GPU-{node_id}-{i}", "model": "H100", "mem_bytes": 80 * GiB}
            for i in range(gpus)
        ],
        **extra,
    }


def is_error(result: Any, code: str | None = None) -> bool:
    if not isinstance(result, dict) or "error" not in result:
        return False
    return code is None or result["error"]["code"] == code


class Harness:
    """One replica fed with encoded commands at increasing log indexes."""

    def __init__(self) -> None:
        self.state = ClusterState()
        self.index = 0
        self.now = 1_000.0

    def raw(self, data: bytes) -> Any:
        self.index += 1
        return self.state.apply(data, self.index)

    def cmd(self, op: str, args: dict[str, Any], rid: str | None = None) -> Any:
        self.now += 1.0
        return self.raw(encode(op, {"now": self.now, **args}, rid))

    def ok(self, op: str, args: dict[str, Any], rid: str | None = None) -> Any:
        result = self.cmd(op, args, rid)
        assert not is_error(result), result
        return result

    # -- shorthands -------------------------------------------------------------
    def register(self, node_id: str, **kw: Any) -> Any:
        return self.ok("register_node", {"node": node_record(node_id, **kw)})

    def submit(self, job_id: str, user: str = "alice", **spec: Any) -> Any:
        spec.setdefault("argv", ["python", "train.py"])
        job = {"id": job_id, "user": user, "spec": spec, "submitted_at": self.now}
        result = self.ok("submit_jobs", {"jobs": [job]})
        return result["results"][0]

    def plan(
        self,
        placements: Sequence[tuple[str, str, list[int]]] = (),
        preemptions: Sequence[str] = (),
    ) -> Any:
        return self.ok(
            "plan",
            {
                "placements": [
                    {"task_id": t, "node_id": n, "gpus": list(g)} for t, n, g in placements
                ],
                "preemptions": [{"task_id": t, "for_task": "x"} for t in preemptions],
            },
        )

    def event(
        self,
        task_id: str,
        state: str,
        exit_code: int | None = None,
        attempt: int | None = None,
        node_id: str | None = None,
    ) -> Any:
        t = self.state.tasks[task_id]
        ev: dict[str, Any] = {
            "task_id": task_id,
            "attempt": t.attempt if attempt is None else attempt,
            "node_id": t.node_id if node_id is None else node_id,
            "state": state,
            "at": self.now,
        }
        if state == "exited":
            ev["exit_code"] = exit_code
        return self.ok("task_events", {"events": [ev]})

    def run(self, task_id: str, node_id: str, gpus: list[int]) -> None:
        """Place a pending task and report it running."""
        assert self.plan([(task_id, node_id, gpus)])["placed"] == [task_id]
        self.event(task_id, "running")

    def task(self, task_id: str) -> Any:
        return self.state.tasks[task_id]

    def job(self, job_id: str) -> Any:
        return self.state.jobs[job_id]


def records(state: ClusterState) -> dict[str, Any]:
    """The snapshot without its bookkeeping (applied index, recent request ids)."""
    obj = msgpack.unpackb(state.snapshot(), raw=False, strict_map_key=False)
    obj.pop("applied_index")
    obj.pop("recent")
    return obj


def same_records(before: bytes, state: ClusterState) -> bool:
    """True when, since the snapshot `before`, only the bookkeeping moved."""
    old = ClusterState()
    old.restore(before)
    return records(old) == records(state)


def indexes(state: ClusterState) -> tuple[Any, Any, Any, Any]:
    # pending and stopping are compared as sets: their order is not in the
    # snapshot, so a restored replica lists requeued tasks in submission order.
    return (
        dict(state.gpu_owner),
        {k: set(v) for k, v in state.node_tasks.items()},
        set(state.pending),
        set(state.stopping),
    )


def reindexed(state: ClusterState) -> tuple[Any, Any, Any, Any]:
    """What the derived indexes would be if rebuilt from the records alone."""
    fresh = ClusterState()
    fresh.restore(state.snapshot())
    return indexes(fresh)


def expected_job_state(job_state: str, task_states: list[str]) -> str | None:
    """The job state its tasks imply (None: no consistent job state exists)."""
    if job_state == "cancelled":
        return "cancelled"
    if any(s in ("failed", "lost") for s in task_states):
        return "failed"
    if all(s == "succeeded" for s in task_states):
        return "succeeded"
    if any(s in LIVE_TASK_STATES for s in task_states):
        return "running"
    if all(s == "pending" for s in task_states):
        return "pending"
    return None


def expected_array_state(job_state: str, task_states: list[str]) -> str | None:
    """An array runs until every task ended; it failed if any task did."""
    if job_state == "cancelled":
        return "cancelled"
    if all(s in FINAL_TASK_STATES for s in task_states):
        if any(s in ("failed", "lost") for s in task_states):
            return "failed"
        return "succeeded" if all(s == "succeeded" for s in task_states) else "cancelled"
    if all(s == "pending" for s in task_states):
        return "pending"
    return "running"


def check_invariants(state: ClusterState) -> None:
    """DESIGN §7 and the bookkeeping ClusterState promises, checked from scratch."""
    held: dict[tuple[str, int], str] = {}
    use: dict[str, tuple[float, int]] = {}
    for t in state.tasks.values():
        if t.state not in LIVE_TASK_STATES:
            continue
        assert t.node_id is not None, t
        for g in t.gpus:
            key = (t.node_id, g)
            assert key not in held, f"GPU {key} held by {held[key]} and {t.id}"
            held[key] = t.id
        cpus, mem = use.get(t.node_id, (0.0, 0))
        use[t.node_id] = (cpus + t.cpus, mem + t.mem_bytes)
    for node_id, (cpus, mem) in use.items():
        node = state.nodes.get(node_id)
        assert node is not None, f"live task on unknown node {node_id}"
        assert cpus <= node.cpus + 1e-6, f"{node_id} over CPUs: {cpus} > {node.cpus}"
        assert mem <= node.mem_bytes, f"{node_id} over memory: {mem} > {node.mem_bytes}"
        valid = {g["index"] for g in node.gpus}
        assert {g for (n, g) in held if n == node_id} <= valid
    assert indexes(state) == reindexed(state)
    gone: dict[str, set[str]] = {}
    for t in state.tasks.values():
        if t.node_id is not None and t.node_id not in state.nodes:
            gone.setdefault(t.node_id, set()).add(t.id)
    assert state.removed_node_tasks == gone, (state.removed_node_tasks, gone)
    carrying = {t.id for t in state.tasks.values() if t.stop is not None}
    assert set(state.stopping) == carrying, (set(state.stopping), carrying)
    counted: dict[str, dict[str, int]] = {}
    for t in state.tasks.values():
        per_job = counted.setdefault(t.job_id, {})
        per_job[t.state] = per_job.get(t.state, 0) + 1
    kept = {j: {k: n for k, n in c.items() if n} for j, c in state.job_counts.items()}
    assert kept == counted, (kept, counted)
    waiting: dict[str, int] = {}
    for t in state.tasks.values():
        if t.state == "pending":
            user = state.jobs[t.job_id].user
            waiting[user] = waiting.get(user, 0) + 1
    assert state.user_pending_tasks == waiting, (state.user_pending_tasks, waiting)
    for job in state.jobs.values():
        tasks = [state.tasks[tid] for tid in job.tasks]
        states = [t.state for t in tasks]
        if job.spec.get("array") is not None:
            assert len(tasks) == arrays.count(job.spec["array"]), job
            assert job.state == expected_array_state(job.state, states), (job, states)
        elif job.state == "failed" and job.message.startswith("dependency "):
            # Failed while waiting: none of its tasks ever started.
            assert set(states) == {"cancelled"}, (job, states)
        else:
            assert len(tasks) == job.spec["nodes"], job
            assert job.state == expected_job_state(job.state, states), (job, states)
        for dep in job.waiting_on:
            other = state.jobs.get(dep)
            assert other is None or other.finished_at is None or job.state != "pending", (
                job,
                dep,
            )
        if job.state in ("cancelled", "failed"):
            assert "pending" not in states, (job, states)
            assert all(t.stop is not None for t in tasks if t.state in LIVE_TASK_STATES)
        finished = job.state in ("succeeded", "failed", "cancelled") and all(
            s in FINAL_TASK_STATES for s in states
        )
        assert (job.finished_at is not None) == finished, (job, states)
        assert 0 <= job.retries_left <= job.spec["retries"]
    for node in state.nodes.values():
        # A drain (drain_reason) holds while draining and may outlive a down
        # spell; a ready node holds none.
        drained = node.drain_reason is not None
        assert node.state in NODE_STATES, node
        assert node.drain_deadline is None or drained, node
        assert node.state != "draining" or drained, node
        assert node.state != "ready" or not drained, node
    for t in state.tasks.values():
        assert t.job_id in state.jobs, t
        assert (t.state == "pending") == (t.id in state.pending), t
        if t.state == "pending":
            assert t.node_id is None and t.gpus == [] and t.stop is None, t
        if t.state == "assigned":
            # A stop ends a task that never started at once: none waits on an
            # exit that no agent will report.
            assert t.stop is None, t
        if t.state not in LIVE_TASK_STATES:
            # Only a live task can be stopping: an ended one that carried a
            # stop would show "(stopping)" forever.
            assert t.stop is None, t
        if t.stop == "preempt":
            assert state.jobs[t.job_id].spec["preemptible"], t
        node = state.nodes.get(t.node_id or "")
        if node is not None and t.state in LIVE_TASK_STATES:
            # A faulty GPU takes no new work; a task already on it is stopping.
            broken = {f["index"] for f in node.gpu_faults}
            if broken.intersection(t.gpus):
                assert t.stop is not None, t
    check_accounting(state)


def check_accounting(state: ClusterState) -> None:
    """Counters and usage only ever hold finite, non-negative numbers, and the
    histogram's buckets add up to its count."""
    import math

    from raft import accounting as acct

    c = state.counters
    assert all(math.isfinite(v) and v >= 0 for v in c.values()), dict(c)
    buckets = sum(c.get(acct.bucket_key(i), 0) for i in range(len(acct.START_BUCKETS_S)))
    assert buckets <= c.get(acct.START_COUNT, 0)
    # Each task is observed once, when it first runs (a restore starts the
    # counters from the snapshot's, so this holds across restores too).
    started = sum(1 for t in state.tasks.values() if t.first_started_at is not None)
    assert c.get(acct.START_COUNT, 0) >= started, (dict(c), started)
    for (user, day), u in state.usage.items():
        assert (u.user, u.day) == (user, day)
        assert u.gpu_s >= 0 and u.cpu_s >= 0 and math.isfinite(u.gpu_s + u.cpu_s), u
