"""Pure placement: (immutable view of nodes, allocations, pending tasks,
policy) -> Plan.  The leader commits the plan and re-checks it at apply time.

- `schedule`: priority, then Dominant Resource Fairness between users; best
  fit (or spread) with topology-aware GPU choice and a cache-aware tie-break;
  gangs all or nothing on distinct nodes, with nodes held back for the first
  gang that cannot start; preemption on one node for tasks that fit nowhere;
  a reason in words for every task left pending.
- `first_fit`: the plain baseline the benchmark compares against.
- `never_fits`: why no known node could ever host a job (asked at submit).
- `queue_report`: per-user shares and demand for `leptonctl queue`.
- `check_plan`: invariant violations of a plan (empty list = ok).

Modules: types (the values), cluster (working copy of the view and node
choice), fairshare (queue order, quotas), preempt (victim choice), explain
(reasons), fit (can a job ever run), core (the pass), baseline, check.
"""

from .baseline import first_fit
from .check import check_plan
from .core import schedule
from .fairshare import queue_report
from .fit import never_fits
from .types import (
    Allocation,
    Gpu,
    NodeView,
    Placement,
    Plan,
    Policy,
    Preemption,
    TaskRequest,
    UserShare,
)

__all__ = [
    "Allocation",
    "Gpu",
    "NodeView",
    "Placement",
    "Plan",
    "Policy",
    "Preemption",
    "TaskRequest",
    "UserShare",
    "check_plan",
    "first_fit",
    "never_fits",
    "queue_report",
    "schedule",
]
