"""The spare shim: one shim started ahead of time, waiting for its task.

A shim is a fresh `python -S` interpreter, and starting one is most of a
task's start latency. So the runner keeps one spare already started (in its
own session, imports loaded) and blocked reading a pipe. Handing it a task is
writing the task dir's path down the pipe and closing it; from then on the
spare is that task's shim, the same as one started with the path on its
command line (agent/shim.py). The runner starts the next spare right away.

Lifetime rules:
- Before it has a task the spare creates no file and starts no process, so
  a spare that ends at that point leaves nothing behind.
- It exits by itself when its stdin reaches EOF without a task (the runner
  closed it, or the agent died and the kernel did) or when it is reparented;
  `close()` also kills it by pid, for an agent that shuts down.
- A spare that is dead or cannot take the task is not used: the runner starts
  a shim the old way. One that died after taking a task but before writing
  shim.pid never started the task, so the runner starts that task again the
  old way (see TaskRunner._refresh).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path

from agent.taskdir import SPARE_FLAG

log = logging.getLogger("lepton.agent")

# Every wait on a spare is bounded; it has no task, so a kill is final.
REAP_TIMEOUT_S = 5.0


class SpareShim:
    def __init__(self, shim_argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self._argv = [*shim_argv, SPARE_FLAG]
        self._cwd = cwd
        self._env = env
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def ensure(self) -> None:
        """Start a spare unless a live one is waiting. Failing to start one only
        costs speed: tasks then start without it."""
        self.reap()
        if self._popen is not None:
            return
        try:
            self._popen = subprocess.Popen(
                [*self._argv, str(os.getpid())],  # the spare lives only as long as we do
                cwd=self._cwd,
                env=self._env,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                # Until it has a task, the spare's errors belong in the agent's log.
                stderr=None,
                start_new_session=True,  # like any shim: outlive the agent once it has a task
                close_fds=True,
            )
        except OSError as e:
            log.warning("cannot start a spare task shim (tasks start without one): %s", e)

    def reap(self) -> None:
        """Forget (and reap) a spare that has exited."""
        if self._popen is not None and self._popen.poll() is not None:
            self._drop(self._popen)
            self._popen = None

    def hand(self, task_dir: Path) -> subprocess.Popen[bytes] | None:
        """Give `task_dir` to the spare; its Popen now supervises that task.
        None when there is no live spare to take it."""
        self.reap()
        popen, self._popen = self._popen, None
        if popen is None:
            return None
        assert popen.stdin is not None
        try:
            # One write of less than PIPE_BUF bytes into an empty pipe: atomic,
            # and it cannot block.
            os.write(popen.stdin.fileno(), os.fsencode(task_dir) + b"\n")
        except OSError as e:  # BrokenPipeError: it died just now
            log.warning("the spare task shim could not take %s: %s", task_dir.name, e)
            self._kill(popen)
            return None
        popen.stdin.close()
        return popen

    def close(self) -> None:
        """Stop the spare, by pid: it has no task, so nothing is lost."""
        popen, self._popen = self._popen, None
        if popen is not None:
            self._kill(popen)

    @staticmethod
    def _kill(popen: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(OSError):
            popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(REAP_TIMEOUT_S)
        SpareShim._drop(popen)

    @staticmethod
    def _drop(popen: subprocess.Popen[bytes]) -> None:
        if popen.stdin is not None:
            with contextlib.suppress(OSError):
                popen.stdin.close()
