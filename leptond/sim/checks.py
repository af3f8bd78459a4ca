"""The invariants, checked after every step, and convergence after each calm.

Safety, after every step (the state is the committed log applied in order,
raftmodel.SimRaft.oracle; the hosts are what really runs):

- no GPU is held by two live tasks, in the state or on a host;
- no task runs on a node past its lease, nor on two nodes at once for
  longer than a lease (the old node's reconcile, or else its lease, ends
  a run the state stopped before it started);
- no ended task carries a stop;
- every acknowledged job is in the state exactly once, until its retention
  has passed since it finished (no job ever appears twice);
- every pending task has a reason (masters.WatchedLoops, after each pass);
- a job's state agrees with its tasks' states;
- the queue's shares add up to what the live tasks hold and wait for;
- the log grows at the pace of the work, not of a hot loop;
- a preempted task is not placed back on the GPUs it was preempted from
  while its preemptor still waits, and a preemptor preempts no more while
  its earlier victims still stop (pingpong.PreemptionWatch).

Liveness, at the end of each calm phase (every fault healed for a while):
a leader leads; every node whose agent runs is up; every stop asked for has
been carried out; every run on a host is a live task of the state there, and
every live task runs; every master that caught up holds the same state.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import scheduler as sch
from raft.model import FINAL_JOB_STATES, FINAL_TASK_STATES, LIVE_TASK_STATES, Job, Task
from raft.view import StateView

from .. import views
from .pingpong import PreemptionWatch
from .vtime import EPOCH

if TYPE_CHECKING:
    from .host import SimHost
    from .masters import SimMaster
    from .node import SimNode
    from .people import Ledger
    from .raftmodel import SimRaft

EPS = 1e-6
# What runs on a host, and its lease: each moves when that changed.
_versions = attrgetter("version", "lease_version")
_count = attrgetter("count")
# The most entries the simulated cluster may commit in a second: its work
# needs under 30; a hot loop commits a hundred.
MAX_COMMITS_PER_S = 60
# The longest a command may take from its proposal (which sets its time) to
# its commit: commit timeouts, slow commits, and entries adopted by the next
# leader after an election.
MAX_COMMIT_DELAY_S = 30.0


INF = float("inf")


def _lease_limit(h: SimHost, slack_s: float) -> float:
    """The time past which a run on `h` outlives its lease (-inf: it has none)."""
    ends = h.lease_ends()
    return -INF if ends is None else ends + slack_s


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """The very same objects, item by item (not equal ones: maps compare by content)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class Checker:
    def __init__(
        self,
        raft: SimRaft,
        masters: Sequence[SimMaster],
        nodes: Sequence[SimNode],
        ledger: Ledger,
        retention_s: float,
        settle_s: float,
        lease_slack_s: float,
        lease_s: float,
    ) -> None:
        self.raft = raft
        self.masters = masters
        self.nodes = nodes
        self.ledger = ledger
        self.retention_s = retention_s
        self.settle_s = settle_s  # what a stop or a start may take once all is well
        self.lease_slack_s = lease_slack_s  # how late a supervisor may notice its lease ran out
        self.lease_s = lease_s
        self.twice: dict[str, float] = {}  # task running on two nodes -> since when
        self._host_versions: tuple[tuple[int, int], ...] = ()
        self._run_versions: list[int] = []  # the first of each of _host_versions
        self._busy_hosts: list[tuple[SimHost, str]] = []  # hosts running something, a run
        # The first time past which a busy host's run outlives its lease (as
        # it stood at the last look; -inf: one has no lease).
        self._lease_due = INF
        self._doubled: dict[str, tuple[str, str]] = {}  # task -> the two hosts it runs on
        self._gen = -1
        # The maps of the view last found right (compared by identity: a map
        # that changed is a new object, raft/cow.py); None: look at all again.
        self._maps: tuple[Mapping[Any, object], ...] | None = None
        self._acked_seen = 0  # entries of ledger.acked looked at (in order: it only grows)
        self._acked_names: dict[str, str] = {}  # acknowledged job id -> its name
        self._ledger_seen = (-1, -1)  # the sizes of what people were told, last found right
        self._tracked: tuple[object, ...] = ()  # what _track last looked at
        # The log's length at each step where it grew, with the step before
        # it: (time, length, time of the step before or None, length then).
        self._log_marks: deque[tuple[float, int, float | None, int]] = deque()
        self._log_len = -1
        self._last_step: float | None = None
        self.final_seen: dict[str, float] = {}  # job id -> its finished_at
        self.stop_seen: dict[tuple[str, int], float] = {}  # live (task, attempt) with a stop
        self.orphan_seen: dict[tuple[str, str], float] = {}  # (node, run) the state has not
        self.idle_seen: dict[tuple[str, int], float] = {}  # live (task, attempt) with no run
        # Fed each commit (SimRaft.watchers); reads the log's state as of it.
        self.preemptions = PreemptionWatch(lambda: raft.oracle)
        self._inputs = views.InputCache()
        self._hosts_of_nodes = [n.host for n in nodes]
        # The hosts' change counts (one, shared, in a World): each only grows,
        # so their sum moves whenever one does.
        self._changes = list(dict.fromkeys(h.changes for h in self._hosts_of_nodes))
        self._changes_seen = -1
        self._policy: object = None
        self._live: tuple[StateView | None, list[Task]] = (None, [])
        self.checks = 0

    def committed(self, term: int, index: int, data: bytes, result: object) -> None:
        """A command committed at `index`, and what apply returned for it."""
        self.preemptions.committed(term, index, data, result)

    # -- after every step -------------------------------------------------------------
    def step(self, now: float) -> str | None:
        self.checks += 1
        # Most steps commit nothing: the log's pace moves only when it grew.
        if len(self.raft.log) != self._log_len:
            why = self._pace(now)
            if why:
                return why
        self._last_step = now
        why = self.preemptions.problem
        if why:
            return why
        # Only apply writes the log's state: unless its generation moved, the
        # checks of the state would see what they saw a step ago.
        oracle = self.raft.oracle
        gen = oracle.generation
        v = None
        if gen != self._gen:
            self._gen = gen
            v = oracle.freeze()
            why = self._state(v, now)
            if why:
                return why
        # Most steps change no host and pass no lease's end: nothing to look at.
        if (
            sum(map(_count, self._changes)) != self._changes_seen
            or now > self._lease_due
            or self._doubled
            or self.twice
        ):
            why = self._hosts(now)
            if why:
                return why
        # What _track reads: the live tasks (tasks, node_tasks) and the hosts' runs.
        if v is not None or not self._tracked or self._tracked[2] is not self._run_versions:
            v = v or oracle.freeze()
            tracked = (v.tasks, v.node_tasks, self._run_versions)
            if not _same(tracked, self._tracked):
                self._tracked = tracked
                self._track(v, now)
        return None

    def _state(self, v: StateView, now: float) -> str | None:
        """The checks of the log's state, each run again only when a map it
        reads is another object than when it last passed (copy on write: a
        map written since is a new one, raft/cow.py), so what it would find
        is what it found: each is as strong as run at every commit, and a
        broken state is reported at the same step."""
        maps = (v.nodes, v.jobs, v.tasks, v.node_tasks, v.gpu_owner, v.pending)
        last = self._maps
        moved = (
            [True] * 6 if last is None else [a is not b for a, b in zip(maps, last, strict=True)]
        )
        nodes, jobs, tasks, node_tasks, gpu_owner, pending = moved
        ledger = self.ledger
        # What people were told only grows, a name at a time, each written
        # once (people.Ledger): its sizes say whether it moved.
        told_now = (len(ledger.acked), len(ledger.sent))
        told = told_now != self._ledger_seen
        policy = self.masters[0].controllers.policy
        self._maps = None  # unless every check passes
        why = (
            (self._gpus(v) if tasks or node_tasks or gpu_owner else None)
            or (self._stops(v) if tasks else None)
            or (self._jobs(v, now, last) if jobs or told else None)
            or (self._agreement(v, last) if jobs or tasks else None)
            or (
                self._queue(v)
                if nodes or jobs or tasks or node_tasks or pending or policy is not self._policy
                else None
            )
        )
        if why:
            return why
        self._maps = maps
        self._ledger_seen = told_now
        self._policy = policy
        return None

    def _live_tasks(self, v: StateView) -> list[Task]:
        """The view's live tasks, listed once per view (a walk of every task
        on a node) for the checks that read them."""
        if self._live[0] is not v:
            self._live = (v, v.live_tasks())
        return self._live[1]

    def _pace(self, now: float) -> str | None:
        """A control plane in a hot loop (a plan dropped and proposed again at
        once, forever) keeps every invariant but fills the log: the workload
        here commits a few dozen entries a second at most.

        What grew over the last second: the log's length now less its length
        at the first step within that second. The log only grows, so that
        can only pass the limit at a step where it grew: only those steps
        are noted, each with the length at the step before it (the first
        step within the second, unless that was the step itself)."""
        size, before = len(self.raft.log), self._last_step
        marks = self._log_marks
        marks.append((now, size, before, self._log_len))
        self._log_len = size
        since = now - 1.0
        while marks[0][0] < since:
            marks.popleft()
        _, first, prev_at, prev_size = marks[0]
        # The first growth within the second came at a step of its own; the
        # steps before it within the second had the length before it.
        if prev_at is not None and not prev_at < since:
            first = prev_size
        grown = size - first
        if grown > MAX_COMMITS_PER_S:
            return f"{grown} entries committed within a second: a hot loop"
        return None

    def _gpus(self, v: StateView) -> str | None:
        held: dict[tuple[str, int], str] = {}
        for t in self._live_tasks(v):
            if t.node_id is None:
                return f"live task {t.id} has no node"
            for g in t.gpus:
                other = held.setdefault((t.node_id, g), t.id)
                if other != t.id:
                    return f"GPU {g} of {t.node_id} held by live tasks {other} and {t.id}"
                if v.gpu_owner.get((t.node_id, g)) != t.id:
                    return f"GPU {g} of {t.node_id}: owner index says {v.gpu_owner.get((t.node_id, g))}, {t.id} holds it"
        for key, tid in v.gpu_owner.items():
            if held.get(key) != tid:
                return f"GPU {key[1]} of {key[0]}: owner index names {tid}, which does not hold it"
        return None

    def _stops(self, v: StateView) -> str | None:
        for t in v.tasks.values():
            if t.stop is None:
                continue
            if t.state in FINAL_TASK_STATES:
                return f"task {t.id} is {t.state} and still has a stop ({t.stop})"
            if t.state == "assigned":
                # A stop ends a task that never started when it is applied
                # (raft/tasks.request_stop): no exit would ever come back for
                # it, so one that keeps its stop holds its GPUs for good. Seen
                # here at the step it happens, not at the next calm.
                return f"task {t.id} is assigned, never started, and has a stop ({t.stop})"
        return None

    def _jobs(
        self, v: StateView, now: float, last: tuple[Mapping[Any, object], ...] | None
    ) -> str | None:
        jobs = v.jobs
        names = [j.name for j in jobs.values()]
        if len(set(names)) != len(names):  # some name twice: which, and is it ours
            for name, n in Counter(names).items():
                if n > 1 and (name in self.ledger.acked or name in self.ledger.sent):
                    return f"job {name} is in the state {n} times"
        # What passed last time passes again unless its job's record changed
        # or went (a gone job stays gone, and only ages past its retention):
        # look at those records, and at what people were told since.
        last_jobs: Mapping[Any, object] = {} if last is None else last[1]
        if last is None:
            self._acked_seen = 0
        job_was = last_jobs.get
        moved = [j for jid, j in jobs.items() if job_was(jid) is not j]
        gone = [jid for jid in last_jobs if jid not in jobs]
        wall = EPOCH + now  # the masters' clock
        for j in moved:
            if j.state not in FINAL_JOB_STATES or j.finished_at is None:
                continue
            if j.id not in self.final_seen:
                # It finished when the command saying so was proposed: no
                # later than its commit, and not long before.
                late = wall - j.finished_at
                if not -EPS <= late <= MAX_COMMIT_DELAY_S:
                    return (
                        f"job {j.id} finished at {j.finished_at:.3f} by its record, "
                        f"{late:+.1f}s from the commit that finished it"
                    )
            self.final_seen[j.id] = j.finished_at
        acked = self.ledger.acked
        name_of = self._acked_names
        look: list[tuple[str, str]] = []
        if len(acked) != self._acked_seen:
            look = list(itertools.islice(acked.items(), self._acked_seen, None))
            for name, jid in look:
                name_of[jid] = name
        for jid in itertools.chain((j.id for j in moved), gone):
            told = name_of.get(jid)
            if told is not None:
                look.append((told, jid))
        for name, jid in look:
            job = jobs.get(jid)
            if job is not None:
                if job.name != name:
                    return f"acknowledged job {jid} is named {job.name}, not {name}"
                continue
            finished = self.final_seen.get(jid)
            if finished is None:
                return f"acknowledged job {name} ({jid}) is gone, and was not finished a step ago"
            if wall - finished < self.retention_s:
                return (
                    f"acknowledged job {name} ({jid}) is gone {wall - finished:.1f}s "
                    f"after it finished; the retention is {self.retention_s:g}s"
                )
        self._acked_seen = len(acked)
        return None

    def _agreement(self, v: StateView, last: tuple[Mapping[Any, object], ...] | None) -> str | None:
        # Records are copied on write (raft/cow.py): a job whose record and
        # tasks' records are the very objects it was last found right with
        # is right still, and most of them are at each commit. The records
        # that changed are found by identity against the maps last found
        # right (their jobs, for tasks), one look per record.
        jobs, tasks = v.jobs, v.tasks
        if last is None:
            for j in jobs.values():
                why = self._job_agrees(v, j)
                if why:
                    return why
            return None
        last_jobs, last_tasks = last[1], last[2]
        again: set[str] = set()
        if tasks is not last_tasks:
            task_was = last_tasks.get
            again = {t.job_id for tid, t in tasks.items() if task_was(tid) is not t}
        job_was = last_jobs.get
        for jid, j in jobs.items():
            if jid in again or job_was(jid) is not j:
                why = self._job_agrees(v, j)
                if why:
                    return why
        return None

    @staticmethod
    def _job_agrees(v: StateView, j: Job) -> str | None:
        states = [v.tasks[tid].state for tid in j.tasks]
        live = [v.tasks[tid] for tid in j.tasks if v.tasks[tid].state in LIVE_TASK_STATES]
        final = all(st in FINAL_TASK_STATES for st in states)
        why = ""
        if j.state in FINAL_JOB_STATES:
            if "pending" in states:
                why = "a task is still pending"
            elif any(t.stop is None for t in live):
                why = "a task still runs and nothing stops it"
        if j.state == "succeeded" and any(st != "succeeded" for st in states):
            why = "not every task succeeded"
        elif j.state == "failed" and not any(st in ("failed", "lost") for st in states):
            why = "no task failed"
        elif j.state == "pending" and any(st != "pending" for st in states):
            why = "not every task is pending"
        elif j.state == "running" and (
            all(st == "pending" for st in states)
            or all(st == "succeeded" for st in states)
            or any(st in ("failed", "lost") for st in states)
        ):
            why = "its tasks are not running"
        if not why and (j.finished_at is not None) != (j.state in FINAL_JOB_STATES and final):
            why = f"finished_at is {j.finished_at}"
        if why:
            return f"job {j.id} is {j.state} but its tasks are {states}: {why}"
        return None

    def _queue(self, v: StateView) -> str | None:
        nodes, allocs, pending = views.scheduler_inputs(v, cache=self._inputs)
        policy = self.masters[0].controllers.policy
        rows = sch.queue_report(nodes, allocs, pending, policy)
        gpus = sum(len(t.gpus) for t in self._live_tasks(v))
        waiting = len(pending)
        if sum(r.gpus for r in rows) != gpus:
            return f"queue: users hold {sum(r.gpus for r in rows)} GPUs, live tasks {gpus}"
        if sum(r.pending_tasks for r in rows) != waiting:
            return f"queue: {sum(r.pending_tasks for r in rows)} tasks waiting, {waiting} pending"
        if sum(r.pending_gpus for r in rows) != sum(p.gpus for p in pending):
            return "queue: the GPUs waited for do not add up"
        for r in rows:
            if not -EPS <= r.dominant_share <= 1 + EPS:
                return f"queue: {r.user}'s dominant share is {r.dominant_share}"
        if [r.dominant_share for r in rows] != sorted(
            (r.dominant_share for r in rows), reverse=True
        ):
            return "queue: rows are not in order of share"
        return None

    def _hosts(self, now: float) -> str | None:
        # What runs where changes only when a host's version moves, and its
        # lease only when its lease version does (either moves the hosts'
        # change count); a lease runs out with time: a run outlives it at
        # the first step past when it ends.
        changed = sum(map(_count, self._changes))
        if changed != self._changes_seen:
            self._changes_seen = changed
            why = self._host_moved()
            if why:
                return why
        if now > self._lease_due:
            for h, rid in self._busy_hosts:
                # As its supervisors see the lease: cut short when the agent died.
                ends = h.lease_ends()
                if ends is None or now > ends + self.lease_slack_s:
                    return f"{rid} runs on {h.name} past its lease ({ends})"
        if not self._doubled:  # most steps: no task runs on two hosts
            if self.twice:
                self.twice = {}
            return None
        twice: dict[str, float] = {}
        for tid, (other, name) in self._doubled.items():
            # A stop ends a task that has not started yet at once
            # (raft/tasks.py request_stop), and it may be placed again
            # while its old node is still starting it. That run is stopped
            # by the old node's next reconcile, or by its lease: it must not
            # outlive the lease it had.
            since = twice[tid] = self.twice.get(tid, now)
            if now - since > self.lease_s + self.lease_slack_s:
                return (
                    f"task {tid} runs on {other} and {name} at once, "
                    f"since {since:.1f}: past the lease"
                )
        self.twice = twice
        return None

    def _host_moved(self) -> str | None:
        versions = tuple(map(_versions, self._hosts_of_nodes))
        if versions == self._host_versions:
            return None
        self._host_versions = versions
        runs = [v for v, _ in versions]
        why = None
        if runs != self._run_versions:
            self._run_versions = runs
            why = self._host_runs()
        self._lease_due = min(
            (_lease_limit(h, self.lease_slack_s) for h, _ in self._busy_hosts), default=INF
        )
        return why

    def _host_runs(self) -> str | None:
        """After a run started, ran or ended somewhere: no GPU used by two runs
        of a host; which hosts run something (their first run); which tasks
        run on two hosts."""
        where: dict[str, str] = {}
        busy: list[tuple[SimHost, str]] = []
        doubled: dict[str, tuple[str, str]] = {}
        for n in self.nodes:
            h = n.host
            used: dict[int, str] = {}
            for g, rid in h.running_gpus():
                other = used.setdefault(g, rid)
                if other != rid:
                    return f"GPU {g} of {h.name} used by runs {other} and {rid} at once"
            first = None
            for p in h.live.values():
                if p.state != "running":
                    continue
                first = first or p.rid
                other = where.setdefault(p.task_id, h.name)
                if other != h.name:
                    doubled.setdefault(p.task_id, (other, h.name))
            if first is not None:
                busy.append((h, first))
        self._busy_hosts, self._doubled = busy, doubled
        return None

    def _track(self, v: StateView, now: float) -> None:
        """Note since when each thing that must settle has been unsettled."""
        stops: dict[tuple[str, int], float] = {}
        idle: dict[tuple[str, int], float] = {}
        expected: dict[tuple[str, str], int] = {}
        for t in self._live_tasks(v):
            key = (t.id, t.attempt)
            assert t.node_id is not None
            expected[(t.node_id, t.id)] = t.attempt
            if t.stop is not None:
                stops[key] = self.stop_seen.get(key, now)
            idle[key] = self.idle_seen.get(key, now)
        orphans: dict[tuple[str, str], float] = {}
        for n in self.nodes:
            h = n.host
            for p in h.live.values():
                if expected.get((h.node_id, p.task_id)) == p.attempt:
                    idle.pop((p.task_id, p.attempt), None)
                else:
                    key2 = (h.name, p.rid)
                    orphans[key2] = self.orphan_seen.get(key2, now)
        self.stop_seen, self.idle_seen, self.orphan_seen = stops, idle, orphans

    # -- after a calm -------------------------------------------------------------------
    def converged(self, now: float) -> str | None:
        leaders = [m for m in self.masters if m.leads()]
        if len(leaders) != 1:
            return f"{len(leaders)} masters lead after the calm"
        v = self.raft.oracle.freeze()
        for n in self.nodes:
            node = v.nodes.get(n.host.node_id)
            if n.up and (node is None or node.state == "down"):
                return f"node {n.name} is {node.state if node else 'unknown'}, its agent runs"
        late = now - self.settle_s
        for (tid, attempt), since in sorted(self.stop_seen.items()):
            if since <= late:
                return f"task {tid} (attempt {attempt}) was asked to stop at {since:.1f} and still lives"
        for (where, rid), since in sorted(self.orphan_seen.items()):
            if since <= late:
                return f"run {rid} on {where} is no live task there, since {since:.1f}"
        for (tid, attempt), since in sorted(self.idle_seen.items()):
            if since <= late:
                return f"live task {tid} (attempt {attempt}) has no run, since {since:.1f}"
        log_state = self.raft.oracle
        want = log_state.digest()
        for m in self.masters:
            m.member.known = len(self.raft.log)
            m.member.catch_up()
            # The log's state is usually a replica's (SimRaft.oracle): that one
            # is not encoded a second time to be compared with itself.
            if m.state is not log_state and m.state.digest() != want:
                return f"{m.name}'s state differs from the log's at index {m.member.applied}"
        return None
