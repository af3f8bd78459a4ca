"""The suite's simulation budget runs beside the rest of the suite.

200 seeds of 5,000 steps are about 200 s of one core, and the rest of the
suite mostly waits (on TTLs, leases, elections, tasks' sleeps) with a core to
spare. So, when the budget test is collected, its simulation starts in the
background as soon as collection ends, in one process, and the test only
waits for it and reads its output: the same command and the same checks as
running it in the test, without adding its time to the suite's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from leptond.sim import __main__ as cli

ROOT = Path(__file__).resolve().parent.parent
# The suite's budget (issue 16): 200 seeds of 5,000 steps.
SEEDS, STEPS = 200, 5000
TEST_ID = "tests/test_sim.py::test_the_budget_of_seeds_keeps_every_invariant"


class BudgetRun:
    """`python -m leptond.sim` over the budget's seeds, in its own process group."""

    def __init__(self, into: Path | None = None) -> None:
        # Files, not pipes: nobody reads them until it ends. Closed by stop().
        # With `into`, named files there, and its exit status in `rc` once it
        # ends, for another process to read (SharedBudget).
        if into is None:
            self.out = tempfile.TemporaryFile(mode="w+", prefix="lepton-sim-budget-")  # noqa: SIM115
            self.err = tempfile.TemporaryFile(mode="w+", prefix="lepton-sim-budget-")  # noqa: SIM115
        else:
            self.out = (into / "out").open("w+")
            self.err = (into / "err").open("w+")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "leptond.sim",
                "--seeds", f"0-{SEEDS - 1}", "--steps", str(STEPS), "--jobs", "1",
            ],
            cwd=ROOT,
            stdout=self.out,
            stderr=self.err,
            env=dict(os.environ, PYTHONHASHSEED=cli.HASH_SEED),
            start_new_session=True,
        )  # fmt: skip
        if into is not None:
            threading.Thread(target=self._record_rc, args=(into,), daemon=True).start()

    def _record_rc(self, into: Path) -> None:
        rc = self.proc.wait()
        (into / "rc.tmp").write_text(str(rc))
        (into / "rc.tmp").replace(into / "rc")  # whole, or not there

    def result(self, timeout_s: float) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once it ends; raises TimeoutError
        (after stopping it) if it does not end within `timeout_s`."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError(f"the simulation budget did not end within {timeout_s:g}s") from None
        self.out.seek(0)
        self.err.seek(0)
        return rc, self.out.read(), self.err.read()

    def stop(self) -> None:
        """Stop it by its pid (its group: --jobs may have started workers)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self.out.close()
        self.err.close()


class Budget(Protocol):
    def result(self, timeout_s: float) -> tuple[int, str, str]: ...
    def stop(self) -> None: ...


class SharedBudget:
    """Under pytest-xdist: the run the controller started (XdistBudget), read
    through its files by whichever worker runs the budget's test."""

    def __init__(self, into: Path) -> None:
        self.into = into

    def result(self, timeout_s: float) -> tuple[int, str, str]:
        deadline = time.monotonic() + timeout_s
        while not (self.into / "rc").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the simulation budget did not end within {timeout_s:g}s")
            time.sleep(1.0)
        rc = int((self.into / "rc").read_text())
        return rc, (self.into / "out").read_text(), (self.into / "err").read_text()

    def stop(self) -> None:
        """Nothing: the controller, which started it, stops it at its end."""


class XdistBudget:
    """The controller's side under pytest-xdist. Every worker collects every
    test and which one runs the budget's test is not known when they do, so
    the controller, which runs no test and has nothing else to do, starts the
    run once the first worker says it collected that test."""

    KEY = "lepton_sim_budget_dir"

    def __init__(self) -> None:
        self.into: Path | None = None
        self.run: BudgetRun | None = None

    def pytest_configure_node(self, node: Any) -> None:
        if self.into is None:
            self.into = Path(tempfile.mkdtemp(prefix="lepton-sim-budget-"))
        node.workerinput[self.KEY] = str(self.into)

    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        if self.run is None and self.into is not None and TEST_ID in ids:
            self.run = BudgetRun(into=self.into)

    def stop(self) -> None:
        if self.run is not None:
            self.run.stop()
        if self.into is not None:
            shutil.rmtree(self.into, ignore_errors=True)


def wait_budget(run: Budget | None, timeout_s: float) -> tuple[int, str, str]:
    """The background run's result, or a run started now when there is none
    (the test collected some other way than by the suite's hook)."""
    started = time.monotonic()
    run = run or BudgetRun()
    try:
        return run.result(max(1.0, timeout_s - (time.monotonic() - started)))
    finally:
        run.stop()
