"""What the agent's control logic uses of the host (habit 5).

`Agent` registers, heartbeats, reconciles and reports exits; for that it
needs a task runner and a place to keep the node's lease. The real ones are
`runner.TaskRunner` (shims, task directories) and `lease.LeaseFile` (a file
the shims read, on CLOCK_BOOTTIME). A simulation (leptond/sim) gives the
same agent code simulated processes and a simulated lease instead, so it can
run it on a virtual clock. The RPC side is `leptond.wire.client.ClusterClient`,
whose connections come from its `dial`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .runner import TaskExit, TaskSpec, TaskUsage


class Runner(Protocol):
    """Starts, stops and watches runs (task attempts), each named by a run id.

    The runner's state outlives the agent: a restarted agent learns the runs
    still going and the exits not yet reported from `adopt`. Exits are given
    at least once: `poll` returns a finished run until `ack`.
    """

    root: Path

    def task_dir(self, task_id: str) -> Path:
        """Where a run keeps its files (output, spec); RunnerError for a bad id."""
        ...

    def start(self, spec: TaskSpec) -> int:
        """Start a run; RunnerError (one line) when it cannot."""
        ...

    def stop(self, task_id: str, grace_s: float | None = None, warn: bool = False) -> None:
        """Ask a run to stop: SIGTERM (with `warn`, its warning signal
        instead), then SIGKILL after the grace."""
        ...

    def warn(self, task_id: str) -> None:
        """Ask a run's supervisor to send the task its warning signal (once)."""
        ...

    def kill_all_not_in(self, keep: set[str]) -> list[str]: ...

    def running(self) -> list[str]: ...

    def poll(self) -> list[TaskExit]: ...

    def ack(self, task_id: str) -> None: ...

    def collect_garbage(self, acked_before: float) -> list[str]:
        """Forget (delete the files of) runs acked before `acked_before`, a
        time on the agent's wall clock; the ids of those forgotten. May be
        slow: the agent calls it off its event loop."""
        ...

    def gpus(self, task_id: str) -> list[int]:
        """The GPU indexes the run was started on (its CUDA_VISIBLE_DEVICES)."""
        ...

    def finished(self, task_id: str) -> bool:
        """Whether the run has ended (its exit is recorded, acked or not)."""
        ...

    def adopt(self) -> tuple[list[str], list[TaskExit]]: ...

    def usage(self) -> dict[str, TaskUsage]:
        """CPU time and memory of each running run's processes (/metrics)."""
        ...

    def keep_spare(self) -> None: ...

    def close(self) -> None: ...


class Lease(Protocol):
    """The node's lease from the leader, where the task supervisors read it."""

    def now(self) -> float:
        """The clock the lease is measured on (shared with the supervisors)."""
        ...

    def write(
        self,
        expires: float,
        lease_s: float,
        *,
        sent: float | None = None,
        confirm_s: float | None = None,
    ) -> None:
        """The lease now runs out at `expires` on `now()`'s clock; OSError
        when it cannot be recorded (the supervisors then see the old one).
        `sent`: when the renewing request went out; `confirm_s`: how soon the
        lease must end once this agent is gone (None: that fast path is off)."""
        ...

    def cap(self, until: float) -> bool:
        """End the lease by `until` at the latest (this agent is closing its
        connection to the leader); whether it was cut. OSError as write's."""
        ...

    def mark_handover(self) -> None:
        """A planned stop: the next agent adopts the tasks, so the supervisors
        keep the lease as it is rather than treat this exit as a death."""
        ...
