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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from leptond.sim import __main__ as cli

ROOT = Path(__file__).resolve().parent.parent
# The suite's budget (issue 16): 200 seeds of 5,000 steps.
SEEDS, STEPS = 200, 5000
TEST_ID = "tests/test_sim.py::test_the_budget_of_seeds_keeps_every_invariant"


class BudgetRun:
    """`python -m leptond.sim` over the budget's seeds, in its own process group."""

    def __init__(self) -> None:
        # Files, not pipes: nobody reads them until it ends. Closed by stop().
        self.out = tempfile.TemporaryFile(mode="w+", prefix="lepton-sim-budget-")  # noqa: SIM115
        self.err = tempfile.TemporaryFile(mode="w+", prefix="lepton-sim-budget-")  # noqa: SIM115
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


def wait_budget(run: BudgetRun | None, timeout_s: float) -> tuple[int, str, str]:
    """The background run's result, or a run started now when there is none
    (the test collected some other way than by the suite's hook)."""
    started = time.monotonic()
    run = run or BudgetRun()
    try:
        return run.result(max(1.0, timeout_s - (time.monotonic() - started)))
    finally:
        run.stop()
