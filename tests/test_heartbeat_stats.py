"""Host and GPU figures travel every few seconds, liveness every second
(lepton-agent --stats-every): the leader keeps a node's last figures through
the heartbeats that carry none, and reports when it last heard from it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Cluster, wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("hbstats") / "cluster", n_masters=1)
    try:
        c.start_masters()
        c.start_agent("a1", gpus="2", extra=["--stats-every", "6"])
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def test_figures_stay_between_the_heartbeats_that_carry_them(cluster: Cluster) -> None:
    wait_for(
        lambda: (ns := cluster.nodes()) and ns[0]["state"] == "ready" and ns[0]["host"],
        60,
        "a ready node with host figures",
    )
    # Over more than one stats period (liveness-only heartbeats between),
    # every listing shows the figures and a recent heartbeat.
    polls = 0
    until = time.monotonic() + 10
    while time.monotonic() < until:
        (n,) = cluster.nodes()
        assert n["state"] == "ready"
        assert n["host"].get("cpu_count", 0) > 0, n
        assert len(n["gpus"]) == 2, n
        assert n["gpu_util_pct"] is not None, n
        # Heard from within the TTL, though the figures are up to 6 s old.
        assert n["last_heartbeat_s"] is not None and n["last_heartbeat_s"] < cluster.ttl_s, n
        polls += 1
        time.sleep(0.2)
    assert polls >= 10


def test_a_bad_stats_interval_is_refused_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--masters", "127.0.0.1:1",
         "--data-dir", str(tmp_path / "agent"), "--stats-every", "-1"],
        capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert out.returncode == 2, out
    assert out.stderr.strip() == (
        "lepton-agent run: error: argument --stats-every: must be a number, 0 or more, "
        "not '-1' (see lepton-agent run --help)"
    )
    assert not (tmp_path / "agent").exists()


@pytest.mark.parametrize("every", ["0", "0.001", "61"])
def test_a_heartbeat_interval_out_of_range_is_refused_in_one_line(
    tmp_path: Path, every: str
) -> None:
    # 0 would send heartbeats in a hot loop at the leader.
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--masters", "127.0.0.1:1",
         "--data-dir", str(tmp_path / "agent"), "--heartbeat", every],
        capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert out.returncode == 2, out
    assert out.stderr.strip() == "lepton-agent: --heartbeat must be between 0.05 and 60 seconds"
    assert not (tmp_path / "agent").exists()
