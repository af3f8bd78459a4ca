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

Disconnects (the fast path, leptond/config.py `disconnect_confirm_s`). When
the leader reads an end-of-stream on a node's agent connection, the node is
suspect at once and declared down `confirm_s` plus a margin later, unless it
registers again. That end-of-stream can only come from this host: the agent
closed the connection itself, or the agent died and its kernel closed it (a
reset, which anything on the path could forge, does not count). So:

- The agent cuts the lease to end `confirm_s` from now just *before* it closes
  a connection on which it registered (`cap_lease`); the leader reads the end
  later still, and waits `confirm_s` plus the margin from then.
- An agent that dies cannot cut anything, so each shim watches the agent named
  in the lease file through a pidfd (`LeaseReader`): the moment it exits, the
  shim's lease ends `confirm_s` from then, whatever the file says. The kernel
  closes the dead agent's sockets before its pidfd turns readable, but only
  the reading (on another host) of that end starts the leader's count, and
  the margin covers the shim's delay in noticing and its kill.
- Only a lease renewed on a request sent after the shim saw the agent go
  (`sent` in the file), by another agent process (a restart that registered
  again, which clears the leader's suspicion), lifts that cut: so a
  `systemctl restart` that is back within the window keeps its tasks.
- A stopped agent (SIGSTOP) or a silent host closes nothing: only the TTL and
  the lease apply.
- A planned stop (SIGTERM without leave-on-stop, as `systemctl restart` sends)
  marks the lease file `handover` and ends the registered connection with a
  reset: neither the leader nor the shims act on that, so the next agent has
  the rest of the lease, not only the window, to register and renew it.

Either way a task is dead before the leader can declare its node down.
"""

from __future__ import annotations

import json
import os
import select
import zlib
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


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (/proc/PID/stat):
    with the pid, names one process for good (pids are reused)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # Fields after the command name, which may itself hold spaces or parens.
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def can_watch_agents() -> bool:
    """Whether shims here can see the agent die at once (a pidfd): the
    agent offers the fast path only then."""
    try:
        fd = os.pidfd_open(os.getpid())
    except (AttributeError, OSError):
        return False
    os.close(fd)
    return start_ticks(os.getpid()) is not None


def write_lease(
    path: Path,
    expires: float,
    lease_s: float,
    *,
    sent: float | None = None,
    confirm_s: float | None = None,
) -> None:
    """Atomically replace the lease file. Not fsynced: after a crash of the
    host the boot id no longer matches, and the tasks are gone anyway.

    `sent`: when the renewing request was sent (now() clock). `confirm_s`:
    how soon the lease must end once this agent is gone (None: the fast path
    is off). The writing agent names itself, for the shims to watch."""
    body: dict[str, object] = {
        "expires": expires,
        "lease_s": lease_s,
        "boot_id": boot_id(),
        "at": REAL.now(),
    }
    if sent is not None:
        body["sent"] = sent
    if confirm_s is not None and confirm_s > 0:
        body["confirm_s"] = confirm_s
        body["agent"] = [os.getpid(), start_ticks(os.getpid())]
    _replace(path, body)


# The file has a fixed size and is rewritten in place (pwrite), so renewing a
# lease never needs a new disk block: a task that fills the data dir's file
# system must not stop the agent from renewing it, or every task on the host
# dies with the lease. Only the first write (or one over a file of another
# size, from an older agent) creates it, through a temp file and a rename.
LEASE_SIZE = 4096
# A reader may see a write half done (a read and a pwrite of the same page are
# not atomic with each other), so each record starts with the CRC-32 of the
# rest of its JSON, at a fixed place: readers that know it skip a torn record;
# older readers still parse the file as one JSON object (padded with spaces).
_CRC_HEAD = b'{"crc": "'
_CRC_LEN = len(_CRC_HEAD) + 8 + len(b'", ')


def encode(body: dict[str, object]) -> bytes:
    """The file's bytes for `body`: LEASE_SIZE bytes, checksummed, padded."""
    payload = json.dumps(body).encode()[1:]  # after its "{"
    data = _CRC_HEAD + b"%08x" % zlib.crc32(payload) + b'", ' + payload
    if len(data) > LEASE_SIZE:
        raise ValueError(f"a lease record of {len(data)} bytes is over {LEASE_SIZE}")
    return data.ljust(LEASE_SIZE, b" ")


def decode(raw: bytes) -> dict[str, object] | None:
    """The lease in `raw`; None when it is garbled or torn. A record without
    a checksum (written whole by a rename) is taken as it is."""
    if raw.startswith(_CRC_HEAD):
        payload = raw[_CRC_LEN:].rstrip(b" ")
        try:
            crc = int(raw[len(_CRC_HEAD) : len(_CRC_HEAD) + 8], 16)
        except ValueError:
            return None
        if zlib.crc32(payload) != crc:
            return None
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    body.pop("crc", None)
    return body


def _replace(path: Path, body: dict[str, object]) -> None:
    data = encode(body)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        fd = -1
    if fd >= 0:
        try:
            if os.fstat(fd).st_size == LEASE_SIZE:
                # In place: the blocks are the file's already (made real at
                # creation), so this needs no free space. Not fsynced: after
                # a crash of the host the boot id no longer matches anyway.
                os.pwrite(fd, data, 0)
                return
        finally:
            os.close(fd)
    tmp = path.with_name(path.name + ".tmp")
    # 0600: only the root shims read it; tasks running as users have no business there.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.pwrite(fd, data, 0)
        # Once, so that the file's blocks are allocated on the disk and not
        # only reserved: later rewrites in place then need none.
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_raw(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(LEASE_SIZE + 1)
    except OSError:
        return None


def cap_lease(path: Path, until: float) -> bool:
    """Make the lease end by `until` (now() clock) at the latest; True when it
    was cut. An unreadable file is left alone: no shim honours it anyway."""
    body = _read(path)
    if body is None or not _number(body.get("expires")):
        return False
    if float(body["expires"]) <= until:  # type: ignore[arg-type]
        return False
    body["expires"] = until
    body["capped_at"] = REAL.now()
    _replace(path, body)
    return True


def mark_handover(path: Path) -> None:
    """The agent that wrote the lease stops on purpose and another one is to
    take over: shims keep the lease as it is when it exits (only a renewal by
    the next agent extends it). Only this process's own lease is marked: an
    agent that never renewed the lease must not vouch for the one before it,
    which may have died (and whose shims have cut the lease)."""
    body = _read(path)
    if body is None or _agent_of(body) != (os.getpid(), start_ticks(os.getpid())):
        return
    body["handover"] = True
    _replace(path, body)


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _read(path: Path) -> dict[str, object] | None:
    """The lease in the file, read again (a few times) if a write was under
    way: None when there is none, or it stays garbled."""
    for _ in range(_TORN_RETRIES):
        raw = _read_raw(path)
        if raw is None:
            return None
        body = decode(raw)
        if body is not None:
            return body
    return None


# A torn read lasts as long as one pwrite of 4 KiB: a retry or two sees it done.
_TORN_RETRIES = 3


def read_expiry(path: Path) -> float | None:
    """When the lease runs out on `now()`'s clock; None when there is no valid
    lease (no file, a garbled one, or one written before this boot)."""
    body = _read(path)
    if body is None:
        return None
    try:
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

    def write(
        self,
        expires: float,
        lease_s: float,
        *,
        sent: float | None = None,
        confirm_s: float | None = None,
    ) -> None:
        write_lease(self.path, expires, lease_s, sent=sent, confirm_s=confirm_s)

    def cap(self, until: float) -> bool:
        return cap_lease(self.path, until)

    def mark_handover(self) -> None:
        mark_handover(self.path)


class LeaseReader:
    """A shim's view of the lease file (read again only when the file
    changes) and of the agent that wrote it (see "Disconnects" above)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._raw: bytes | None = None
        self._body: dict[str, object] | None = None
        self._agent: tuple[int, int] | None = None  # (pid, start ticks) watched
        self._pidfd: int | None = None
        # When this shim saw the watched agent gone, and which agent it was.
        self._gone_at: float | None = None
        self._gone: tuple[int, int] | None = None

    def fileno(self) -> int | None:
        """A pidfd that turns readable when the watched agent exits (for select)."""
        return self._pidfd

    def _load(self) -> dict[str, object] | None:
        # Read on every look: the file is rewritten in place, so neither its
        # inode nor (within the clock's grain) its mtime tells a new lease.
        raw = _read_raw(self.path)
        if raw is None:
            self._raw, self._body = None, None
            return None
        if raw != self._raw:
            body = decode(raw)
            for _ in range(_TORN_RETRIES - 1):
                if body is not None:
                    break
                raw = _read_raw(self.path) or b""
                body = decode(raw)
            if body is None and raw.startswith(_CRC_HEAD) and self._body is not None:
                # Still torn (a writer under way): the last whole lease,
                # for this look only; the next reads the file again.
                return self._body
            if body is not None and (
                body.get("boot_id", "") != boot_id() or not _number(body.get("expires"))
            ):
                body = None
            self._raw, self._body = raw, body
        return self._body

    def expires(self) -> float | None:
        body = self._load()
        if body is None:
            return None
        exp = float(body["expires"])  # type: ignore[arg-type]
        confirm = body.get("confirm_s")
        agent = _agent_of(body)
        if not _number(confirm) or agent is None or body.get("handover") is True:
            # Written without the fast path, or by an agent that stopped on
            # purpose (ending its connection with a reset, which the leader
            # does not act on): only the lease itself counts.
            return exp
        assert isinstance(confirm, int | float)
        self.poll_agent()
        if self._gone_at is not None:
            sent = body.get("sent")
            if agent != self._gone and _number(sent) and float(sent) > self._gone_at:  # type: ignore[arg-type]
                # Another agent registered again after this one went, and
                # the leader renewed the lease for it: back to normal.
                self._gone_at, self._gone = None, None
            else:
                return min(exp, self._gone_at + float(confirm))
        if agent != self._agent:
            self._watch(agent)
            if self._gone_at is not None:
                return min(exp, self._gone_at + float(confirm))
        return exp

    def expired(self) -> bool:
        exp = self.expires()
        return exp is None or now() >= exp

    def poll_agent(self) -> None:
        """Notice, without waiting, that the watched agent has exited."""
        fd = self._pidfd
        if fd is not None and select.select([fd], [], [], 0)[0]:
            self._went(now())

    def _watch(self, agent: tuple[int, int]) -> None:
        self._close()
        self._agent = agent
        pid, ticks = agent
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._went(now())  # gone already (or it cannot be watched: same)
            return
        # The pidfd names the process that had this pid when it was opened:
        # only if that one started when the file says is it the agent.
        if start_ticks(pid) != ticks:
            os.close(fd)
            self._went(now())
            return
        self._pidfd = fd

    def _went(self, at: float) -> None:
        if self._gone_at is None:
            self._gone_at, self._gone = at, self._agent
        self._close()

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def close(self) -> None:
        self._close()


def _agent_of(body: dict[str, object]) -> tuple[int, int] | None:
    a = body.get("agent")
    if (
        isinstance(a, list)
        and len(a) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in a)
    ):
        return (a[0], a[1])
    return None
