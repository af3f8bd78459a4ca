"""An invariant on the committed log: a preemption buys its preemptor the room.

A plan that preempts task V for task P stops V so that P can have V's GPUs.
Should a later plan place V on those GPUs again while P still waits, the
preemption was for nothing, and the next pass that looks at P preempts V
once more: a ping-pong that burns V's runs and keeps P waiting. Between the
two plans nothing may have happened that could rightly change the picture:
no new job, no cancel, no change to a node, no new leader (which starts
from the state alone). Otherwise a re-placement is the scheduler's fresh
call and is not judged.

A preemptor whose victims still stop waits for them; it preempts no more
work meanwhile, under this leader or the next (whose first passes know of
the victims only from the state). Otherwise it stops more than it needs,
and what its first victims leave goes to someone else.

It sees each command as it commits, with what apply made of it (the
evictions it carried out, the placements it kept) and the state after it,
so it judges what happened, not what a plan asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from raft.model import Task

from .raftmodel import decoded


class Tasks(Protocol):
    """The state the watch reads (the committed log applied: SimRaft.oracle)."""

    @property
    def tasks(self) -> Mapping[str, Task]: ...


# Commands after which a victim may rightly be placed back where it was.
RESETS = frozenset(
    {
        "submit_jobs",
        "cancel_job",
        "register_node",
        "node_state",
        "node_labels",
        "node_down",
        "remove_node",
        "drain_expired",
        "restore",
    }
)


class PreemptionWatch:
    def __init__(self, state: Callable[[], Tasks]) -> None:
        self.state = state  # the committed log applied, up to the command seen
        # Preemptor -> its victims that were still stopping: (task, attempt).
        self.stopping_for: dict[str, set[tuple[str, int]]] = {}
        self.placed_on: dict[str, tuple[str, frozenset[int]]] = {}  # task -> its node, GPUs
        # Victim -> (its preemptor, the node and GPUs it was preempted from).
        self.claims: dict[str, tuple[str, str, frozenset[int]]] = {}
        self.term = 0
        self.problem: str | None = None

    def committed(self, term: int, index: int, data: bytes, result: Any) -> None:
        if term != self.term:
            self.term = term
            self.claims.clear()
        cmd = decoded(data)
        if isinstance(cmd, str):
            return  # not a command: apply refused it
        if cmd.op in RESETS:
            self.claims.clear()
            return
        if cmd.op != "plan" or not isinstance(result, dict) or "placed" not in result:
            return
        args = cmd.args
        wanted_by = {str(p["task_id"]): str(p.get("for_task")) for p in args.get("preemptions", [])}
        self._more_than_needed(result["preempting"], wanted_by, index)
        for victim in result["preempting"]:
            where = self.placed_on.get(victim)
            if where is not None and victim in wanted_by:
                self.claims[victim] = (wanted_by[victim], *where)
        placed = set(result["placed"])
        # A preemptor placed now has what it preempted for.
        for victim, (for_task, _, _) in list(self.claims.items()):
            if for_task in placed:
                del self.claims[victim]
        for p in args.get("placements", []):
            tid = str(p["task_id"])
            if tid not in placed:
                continue
            node, gpus = str(p["node_id"]), frozenset(int(g) for g in p["gpus"])
            self.placed_on[tid] = (node, gpus)
            claim = self.claims.pop(tid, None)
            if claim is None or self.problem is not None:
                continue
            for_task, was_node, was_gpus = claim
            if node == was_node and gpus & was_gpus:
                self.problem = (
                    f"task {tid}, preempted for {for_task}, placed again on GPUs "
                    f"{sorted(gpus & was_gpus)} of {node} at commit {index} while "
                    f"{for_task} still waits: a preemption ping-pong"
                )

    def _more_than_needed(self, victims: list[str], wanted_by: dict[str, str], index: int) -> None:
        tasks = self.state().tasks
        for victim in victims:
            for_task = wanted_by.get(victim, "?")
            earlier = self.stopping_for.get(for_task, set())
            still = sorted(
                tid
                for tid, attempt in earlier
                if tid in tasks
                and tasks[tid].stop == "preempt"
                and tasks[tid].attempt == attempt
                and tid not in victims
            )
            if still and self.problem is None:
                self.problem = (
                    f"{for_task} preempted {victim} at commit {index} while {', '.join(still)}, "
                    "preempted for it before, still stop: more work stopped than it needs"
                )
        for victim in victims:
            t = tasks.get(victim)
            if t is not None and t.stop == "preempt":
                self.stopping_for.setdefault(wanted_by.get(victim, "?"), set()).add(
                    (victim, t.attempt)
                )
