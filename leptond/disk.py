"""The master's data disk: free space against a reserve, and whether the
Raft journal on it can be written.

Workdir blocks, snapshots and the journal share the data dir. Below the
reserve (`--min-free-disk`) a master refuses new jobs and uploads with one
line, keeps serving reads and running work (cancels, drains, task exits,
placements all go on, and they need a little journal space: that is what the
reserve is for), and says so in /healthz and `cluster status`. It recovers by
itself once space is freed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .clock import REAL
from .wire.errors import RpcError

DISK_LOW = "disk_low"
# statvfs is a cheap system call, but /healthz and submits can come thousands
# of times a second.
REFRESH_S = 0.5


def mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


@dataclass(frozen=True)
class DiskState:
    path: str
    free_bytes: int
    reserve_bytes: int
    read_only: bool
    journal_error: str | None
    # What the audit log takes on this disk (leptond/audit.py): it is
    # rotated by size, and writes no refusals while the disk is low.
    audit_bytes: int = 0

    @property
    def low(self) -> bool:
        return self.free_bytes < self.reserve_bytes

    @property
    def journal_writable(self) -> bool:
        return not self.read_only and self.journal_error is None and self.free_bytes > 0

    def problems(self) -> list[str]:
        """What is wrong, in words; empty when all is well."""
        out = []
        if self.read_only:
            out.append(f"{self.path} is read-only")
        if self.journal_error is not None:
            out.append(f"the Raft journal cannot be written: {self.journal_error}")
        elif self.free_bytes <= 0:
            out.append(f"{self.path} is full")
        if self.low:
            out.append(
                f"disk low: {mib(self.free_bytes)} free on {self.path}, under the reserve "
                f"of {mib(self.reserve_bytes)}"
            )
        return out

    def to_wire(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "low": self.low,
            "journal_writable": self.journal_writable,
            "problems": self.problems(),
        }


class DiskGuard:
    def __init__(
        self,
        path: Path,
        reserve_bytes: int,
        journal_error: Callable[[], str | None] = lambda: None,
        clock: Callable[[], float] = REAL.monotonic,
        audit_bytes: Callable[[], int] = lambda: 0,
    ) -> None:
        self._audit_bytes = audit_bytes
        self.path = path
        self.reserve_bytes = reserve_bytes
        self._journal_error = journal_error
        self._clock = clock
        self._state: DiskState | None = None
        self._at = 0.0

    def state(self) -> DiskState:
        now = self._clock()
        if self._state is None or now - self._at >= REFRESH_S:
            self._state = self._measure()
            self._at = now
        return self._state

    def _measure(self) -> DiskState:
        try:
            st = os.statvfs(self.path)
            free = st.f_bavail * st.f_frsize
            read_only = bool(st.f_flag & os.ST_RDONLY)
        except OSError:
            free, read_only = 0, False
        return DiskState(
            str(self.path),
            free,
            self.reserve_bytes,
            read_only,
            self._journal_error(),
            self._audit_bytes(),
        )

    def check_new_work(self) -> None:
        """Raise the one-line refusal of new jobs and uploads when the disk is low."""
        st = self.state()
        if st.low or not st.journal_writable:
            raise RpcError(
                DISK_LOW,
                f"this master's data disk is too full for new work ({'; '.join(st.problems())}); "
                "new jobs and uploads are refused until space is freed, running work goes on",
            )
