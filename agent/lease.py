"""The node's lease from the leader, in a file every task supervisor reads.

Fencing (DESIGN §5): the leader renews each ready node's lease in its answers
to heartbeats. The agent writes when the lease runs out, on this host's clock,
to `lease.json` in its data dir; each shim reads it and kills its task once
the lease has run out, even while the agent itself is stopped or dead. The
leader declares a node down only after its heartbeat TTL, which is longer
than the lease plus a margin, so a task is never still running when its
replacement starts elsewhere.

The expiry counts from when the agent *sent* the heartbeat that was answered:
the leader renewed the lease later than that, never earlier, so the agent's
view of the lease always ends before the leader's. The clock is
CLOCK_BOOTTIME, shared by every process on the host and, unlike
CLOCK_MONOTONIC, still running while the host is suspended; the boot id in
the file makes a lease from before a reboot worthless.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from leptond.clock import REAL, boottime

LEASE_FILE = "lease.json"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def now() -> float:
    """The host clock leases are measured on (seconds since boot)."""
    return boottime()


def boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def write_lease(path: Path, expires: float, lease_s: float) -> None:
    """Atomically replace the lease file. Not fsynced: after a crash of the
    host the boot id no longer matches, and the tasks are gone anyway."""
    tmp = path.with_name(path.name + ".tmp")
    body = {"expires": expires, "lease_s": lease_s, "boot_id": boot_id(), "at": REAL.now()}
    # 0600: only the root shims read it; tasks running as users have no business there.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(body))
    os.replace(tmp, path)


def read_expiry(path: Path) -> float | None:
    """When the lease runs out on `now()`'s clock; None when there is no valid
    lease (no file, a garbled one, or one written before this boot)."""
    try:
        body = json.loads(path.read_text())
        expires = body["expires"]
        if body.get("boot_id", "") != boot_id():
            return None
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            return None
        return float(expires)
    except (OSError, ValueError, TypeError, KeyError):
        return None


class LeaseFile:
    """The agent's side of the lease (agent/ports.py `Lease`): the file in
    its data dir, on the host's boot clock."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def now(self) -> float:
        return now()

    def write(self, expires: float, lease_s: float) -> None:
        write_lease(self.path, expires, lease_s)


class LeaseReader:
    """A shim's view of the lease file: read again only when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._expires: float | None = None

    def expires(self) -> float | None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns)
        except OSError:
            self._stamp, self._expires = None, None
            return None
        if stamp != self._stamp:
            self._stamp, self._expires = stamp, read_expiry(self.path)
        return self._expires

    def expired(self) -> bool:
        exp = self.expires()
        return exp is None or now() >= exp
