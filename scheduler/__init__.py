"""Pure placement: (immutable view of nodes, allocations, pending tasks,
policy) -> Plan.  The leader commits the plan and re-checks it at apply time."""

from .baseline import first_fit
from .check import check_plan
from .core import schedule
from .fairshare import queue_report
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
    "queue_report",
    "schedule",
]
