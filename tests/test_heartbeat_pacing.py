"""Heartbeat pacing (leptond/wire/pacing.py): past --max-heartbeats-per-second
the leader asks each agent to heartbeat less often, within what the TTL and
the lease allow; agents adopt the interval, and take nothing unsafe from it."""

from __future__ import annotations

import math
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leptond.config import MasterConfig
from leptond.wire import pacing
from tests.harness import Cluster, wait_for

ROOT = Path(__file__).resolve().parent.parent


def _cfg(ttl_s: float = 4.0, rate: float = 8000.0) -> MasterConfig:
    p = Path("/nonexistent")
    return MasterConfig(p, p, p, heartbeat_ttl_s=ttl_s, max_heartbeats_per_s=rate)


# -- the leader's side -------------------------------------------------------------------
def test_the_interval_grows_with_the_nodes_up_to_the_cap() -> None:
    cap = _cfg().heartbeat_cap_s
    assert pacing.interval_s(40, 8000, cap) == 0.005  # a small cluster: agents keep their 1 s
    assert pacing.interval_s(8000, 8000, cap) == 1.0
    assert pacing.interval_s(9000, 8000, cap) == 1.125
    assert pacing.interval_s(2000, 1000, cap) == math.floor(1000 * cap) / 1000  # the cap binds
    assert pacing.interval_s(0, 8000, cap) == 0.0


def test_no_sleep_goes_past_a_third_of_the_ttl_or_two_fifths_of_the_lease() -> None:
    for ttl in (3.0, 4.0, 6.0, 10.0, 60.0):
        c = _cfg(ttl_s=ttl)
        longest = c.heartbeat_cap_s * (1 + pacing.JITTER)
        assert longest <= ttl / 3 + 1e-9 and longest <= c.task_lease_s / 2.5 + 1e-9
        # The defaults' arithmetic (module docstring): a 1 s stall on top of
        # the longest sleep stays inside the lease and the TTL.
        if ttl == 4.0:
            assert math.isclose(longest, 1.28) and longest + 1.0 < c.task_lease_s < ttl


def test_a_bad_rate_is_refused_in_one_line() -> None:
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="--max-heartbeats-per-second"):
            _cfg(rate=bad).check()
    _cfg(rate=0).check()  # off


# -- the agent's side --------------------------------------------------------------------
def test_the_agent_adopts_a_longer_interval_and_keeps_its_own_otherwise() -> None:
    assert pacing.adopt(1.5, 1.0, 4.8) == (1.5, "")
    assert pacing.adopt(0.5, 1.0, 4.8) == (1.0, "")  # never faster than its own
    assert pacing.adopt(None, 1.0, 4.8) == (1.0, "")  # an older leader asks nothing
    assert pacing.adopt(0, 1.0, 4.8) == (1.0, "")


@pytest.mark.parametrize(
    "asked",
    [True, False, -1, -0.5, math.nan, math.inf, -math.inf, "2", "x" * 1_000_000, [2], {"s": 2}],
)
def test_the_agent_ignores_what_is_not_an_interval(asked: object) -> None:
    every, why = pacing.adopt(asked, 1.0, 4.8)
    assert every == 1.0
    assert why.startswith("ignored the leader's heartbeat interval") and "\n" not in why
    assert len(why) < 200


@pytest.mark.parametrize("asked", [1e9, 10**30, 3.0])
def test_the_agent_clamps_an_interval_its_lease_cannot_cover(asked: float) -> None:
    every, why = pacing.adopt(asked, 1.0, 3.2)
    assert math.isclose(every * (1 + pacing.JITTER), 3.2 / 2.5)
    assert "too long for a lease" in why and len(why) < 200
    # Without a lease yet it keeps its own interval, and says nothing.
    assert pacing.adopt(asked, 1.0, None) == (1.0, "")


def test_sleeps_are_jittered_only_when_paced() -> None:
    def never() -> float:
        raise AssertionError("an unpaced agent draws no random number")

    assert pacing.sleep_s(1.0, 1.0, never) == 1.0
    rng = random.Random(7)
    sleeps = [pacing.sleep_s(2.0, 1.0, rng.random) for _ in range(2000)]
    assert min(sleeps) >= 2.0 * (1 - pacing.JITTER) and max(sleeps) <= 2.0 * (1 + pacing.JITTER)
    assert len(set(sleeps)) > 1000  # agents that registered together drift apart


# -- end to end: real leader, real agents ------------------------------------------------
TTL_S = 6.0  # a lease of 4.8 s: the cap (1.83 s) is above the agents' own 1 s


@pytest.fixture(scope="module")
def paced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # Half a heartbeat a second for the whole cluster: even one node is paced.
    c = Cluster(
        tmp_path_factory.mktemp("hbpace") / "cluster",
        n_masters=1,
        ttl_s=TTL_S,
        master_args=["--max-heartbeats-per-second", "0.5"],
    )
    try:
        c.start_masters()
        for name in ("p1", "p2"):
            c.start_agent(name, gpus="1")
        c.wait_nodes_ready(2, timeout_s=60)
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def test_paced_agents_stay_ready_and_their_tasks_keep_running(paced: Cluster) -> None:
    cap = math.floor(1000 * _cfg(ttl_s=TTL_S).heartbeat_cap_s) / 1000
    assert cap > 1.0
    said = re.compile(rf"heartbeating every {cap:g}s, as the leader asks")
    for name in ("p1", "p2"):
        log = paced.root / f"agent-{name}.log"
        wait_for(lambda log=log: said.search(log.read_text()), 60, f"{name} to be paced")
        assert "too long" not in log.read_text()  # the leader asks only what the lease allows
    job = paced.submit("--nodes", "2", "--gpus", "1", "--", "sleep", "600")
    wait_for(
        lambda: all(t["state"] == "running" for t in paced.status(job)["tasks"]), 60, "both running"
    )
    # Over several leases' worth of paced heartbeats: both nodes ready, both
    # tasks in their first attempt, and the leader hears each node within
    # its TTL.
    until = time.monotonic() + 3 * 4.8
    while time.monotonic() < until:
        nodes = paced.nodes()
        assert [n["state"] for n in nodes] == ["ready", "ready"], nodes
        for n in nodes:
            assert n["last_heartbeat_s"] is not None and n["last_heartbeat_s"] < TTL_S, n
        tasks = paced.status(job)["tasks"]
        assert [(t["state"], t["attempt"]) for t in tasks] == [("running", 1)] * 2, tasks
        time.sleep(0.2)
    paced.ctl("cancel", job)


def test_a_bad_rate_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "leptond.cli", "run", "--data-dir", str(tmp_path / "m"),
         "--secret-file", str(tmp_path / "s"), "--admin-token-file", str(tmp_path / "a"),
         "--max-heartbeats-per-second", "-5"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode != 0, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--max-heartbeats-per-second" in lines[0], out.stderr
    assert not (tmp_path / "m").exists()
