"""A task's own IPC namespace and private /dev/shm and /tmp (what Slurm's
job_container/tmpfs does), so that nothing a task leaves there outlives it.

In the task's child, before exec, as root (the shim's ChildSetup):
- a new mount namespace and a new IPC namespace; "/" becomes a slave mount, so
  nothing mounted here ever reaches the host (host mounts still come in);
- /dev/shm and /tmp become fresh tmpfs mounts of the task's own, nosuid and
  nodev, each sized to the task's memory limit. Their pages are charged to the
  memory cgroup of the process that touches them, the task's, so they count
  against that limit as well;
- a POSIX message queue file system of the new IPC namespace on /dev/mqueue,
  where the host has that directory.

Every process of the task is in these namespaces and the whole task is killed
when it ends (its cgroup), so the namespaces go with it, and with them the
tmpfs contents, SysV shared memory, semaphores and message queues: no cleanup
step can be skipped by an agent crash.

A directory the task must still reach below /tmp or /dev/shm (an agent data
dir under /tmp, as on test hosts) is bound back at the same path, under copies
of its parent directories with the host's owners and modes.

Standard library only: the shim imports this module.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19
PRIVATE_DIRS = ("/dev/shm", "/tmp")
MQUEUE_DIR = "/dev/mqueue"
PROBE_FLAG = "--probe"


@dataclass(frozen=True)
class _Parent:
    path: str
    mode: int
    uid: int
    gid: int


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def below(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _kept(keep: Sequence[str]) -> list[str]:
    """The directories to bind back: those below a private dir, outermost
    only (one below another is carried along with it)."""
    out: list[str] = []
    for k in sorted({os.path.abspath(k) for k in keep if k}):
        if not any(below(k, d) for d in PRIVATE_DIRS) or not os.path.isdir(k):
            continue
        if any(below(k, o) for o in out):
            continue
        out.append(k)
    return out


def _parents(path: str) -> list[_Parent]:
    """The directories from below the private dir down to `path`'s parent,
    with their host modes and owners, outermost first."""
    top = next(d for d in PRIVATE_DIRS if below(path, d))
    out: list[_Parent] = []
    d = os.path.dirname(path)
    while below(d, top) and d != top:
        st = os.stat(d)
        out.append(_Parent(d, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))
        d = os.path.dirname(d)
    return list(reversed(out))


def enter(size_bytes: int, keep: Sequence[str] = ()) -> None:
    """Give the calling process (a task's child, as root, before exec) its own
    mount and IPC namespaces with a private /dev/shm and /tmp of `size_bytes`
    each, `keep` still reachable at their paths. OSError says what failed."""
    if size_bytes <= 0:
        raise OSError(errno.EINVAL, "a private /tmp needs a size")
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare(CLONE_NEWNS|CLONE_NEWIPC)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "making / a slave mount")
    # Opened in the new namespace (a bind mount's source must be in the
    # caller's) and before anything covers them.
    held: list[tuple[str, int, list[_Parent]]] = []
    try:
        for k in _kept(keep):
            held.append((k, os.open(k, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), _parents(k)))
        opts = f"size={size_bytes},mode=1777".encode()
        for d in PRIVATE_DIRS:
            if os.path.isdir(d):
                _check(
                    libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts),
                    f"mounting a private {d}",
                )
        for path, fd, parents in held:
            for p in parents:
                try:
                    os.mkdir(p.path, 0o700)
                except FileExistsError:
                    continue  # made for another kept directory
                os.chown(p.path, p.uid, p.gid)
                os.chmod(p.path, p.mode)
            os.mkdir(path, 0o700)
            _check(
                libc.mount(
                    f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC, None
                ),
                f"binding {path} into the private /tmp",
            )
        if os.path.isdir(MQUEUE_DIR):
            _check(
                libc.mount(
                    b"mqueue",
                    MQUEUE_DIR.encode(),
                    b"mqueue",
                    MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    None,
                ),
                f"mounting the task's own {MQUEUE_DIR}",
            )
    finally:
        for _, fd, _ in held:
            os.close(fd)


def probe() -> str | None:
    """None when tasks can get their own namespaces on this host, else why
    not. Tried in a child process, so nothing here changes for the agent."""
    try:
        out = subprocess.run(
            [sys.executable, "-S", "-m", "agent.taskns", PROBE_FLAG],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": _package_root()},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run the probe: {e}"
    if out.returncode == 0:
        return None
    return out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"


def _package_root() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)


def _probe_main() -> int:
    try:
        enter(1 << 20)
        # What a task would do: use the new /dev/shm.
        with open("/dev/shm/.lepton-probe", "wb") as f:
            f.write(b"x")
    except OSError as e:
        print(e.strerror or str(e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == [PROBE_FLAG]:
        sys.exit(_probe_main())
    print(f"usage: python -m agent.taskns {PROBE_FLAG}", file=sys.stderr)
    sys.exit(2)
