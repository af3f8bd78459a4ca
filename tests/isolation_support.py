"""Real Unix accounts and places a task running as one of them can reach.

Tests that run tasks as other users create those users here and remove
them afterwards (useradd/userdel, so root only). A test cluster whose tasks
run as such users lives in a directory under /tmp that every account may
pass through (mode 0711): pytest's own tmp dirs are 0700 root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# Another test run on the same host may be changing /etc/passwd at the same
# moment; useradd then says it cannot lock it. Retry for this long.
USERADD_RETRY_S = 30.0


def _run_retrying(argv: list[str]) -> None:
    deadline = time.monotonic() + USERADD_RETRY_S
    while True:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            return
        if time.monotonic() > deadline or "lock" not in out.stderr:
            raise AssertionError(f"{' '.join(argv)} failed: {out.stderr.strip()}")
        time.sleep(0.2)


@contextlib.contextmanager
def unix_users(*tags: str) -> Iterator[list[pwd.struct_passwd]]:
    """Fresh accounts (no home dir, shell /bin/sh), one per tag, removed after."""
    made: list[str] = []
    try:
        for tag in tags:
            # Unique per process, so parallel runs never share an account.
            name = f"lt{os.getpid() % 100000}{tag}"
            _run_retrying(["useradd", "--no-create-home", "--shell", "/bin/sh", name])
            made.append(name)
        yield [pwd.getpwnam(n) for n in made]
    finally:
        for name in made:
            with contextlib.suppress(AssertionError):
                _run_retrying(["userdel", name])


@contextlib.contextmanager
def passable_dir(prefix: str, under: str = "/tmp") -> Iterator[Path]:
    """A fresh directory under /tmp (or `under`) that other accounts may pass
    through. A task has a /tmp of its own, so what it should see of the host
    (other than the agent's data dir) must live elsewhere, such as /var/tmp."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=under))
    try:
        os.chmod(d, 0o711)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def gone(pid: int, create_time: float) -> bool:
    """Whether the process `pid` that started at `create_time` no longer runs
    (exited, a zombie, or the pid now belongs to another process)."""
    import psutil

    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - create_time) > 1.0:
            return True
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
