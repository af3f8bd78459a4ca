from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import sim_budget
from tests.controllers_support import Leader
from tests.harness import Cluster

BUDGET = pytest.StashKey[sim_budget.BudgetRun]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False, help="run long soak tests")
    parser.addoption(
        "--soak-minutes",
        type=float,
        default=10.0,
        help="with --soak: how long the simulation soak runs (default 10)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    # The simulation budget runs beside the other tests (tests/sim_budget.py).
    if session.config.option.collectonly:
        return
    # Under pytest-xdist every worker collects every test but runs only its
    # share: the controller starts the run (sim_budget.XdistBudget).
    if hasattr(session.config, "workerinput"):
        return
    if any(item.nodeid == sim_budget.TEST_ID for item in session.items):
        session.config.stash[BUDGET] = sim_budget.BudgetRun()


XDIST_BUDGET = pytest.StashKey[sim_budget.XdistBudget]()


def pytest_configure(config: pytest.Config) -> None:
    # Its hooks are called only in pytest-xdist's controller, so only there
    # (and only where pytest-xdist is, which declares them).
    if config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput"):
        config.stash[XDIST_BUDGET] = sim_budget.XdistBudget()
        config.pluginmanager.register(config.stash[XDIST_BUDGET], "lepton-sim-budget")


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(BUDGET, None)
    if run is not None:
        run.stop()
    shared = config.stash.get(XDIST_BUDGET, None)
    if shared is not None:
        shared.stop()


@pytest.fixture
def sim_budget_run(request: pytest.FixtureRequest) -> sim_budget.Budget | None:
    """The simulation budget started when collection ended, if it was."""
    into = getattr(request.config, "workerinput", {}).get(sim_budget.XdistBudget.KEY)
    if into is not None and (Path(into) / "out").exists():
        return sim_budget.SharedBudget(Path(into))
    return request.config.stash.get(BUDGET, None)


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Three real masters on loopback (agents are started by the test)."""
    c = Cluster(tmp_path / "cluster", n_masters=3, ttl_s=3.0)
    try:
        c.start_masters()
        yield c
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(c.logs())
        c.close()


@pytest.fixture
def shared_path() -> Iterator[Path]:
    """A fresh directory a test and its tasks both see: not under /tmp, which
    is each task's own (agent/taskns.py), so not tmp_path."""
    d = Path(tempfile.mkdtemp(prefix="lepton-test-", dir="/var/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def ld(tmp_path: Path) -> Iterator[Leader]:
    """The leader's controllers on a real state (tests/controllers_support.py)."""
    leader = Leader(tmp_path)
    yield leader
    leader.close()
