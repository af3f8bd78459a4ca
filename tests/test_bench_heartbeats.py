"""bench/heartbeats.py end to end at a small scale: its worker processes,
its JSON keys, and one line (no traceback) when the agents do not all
register in time."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from leptond.wire import pacing

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "heartbeats.py"


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_small_fleet_in_two_processes_reports_every_figure() -> None:
    out = bench("--agents", "40", "--procs", "2", "--window", "1")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["worker_processes"] == 2
    assert res["agents"] == 40 and res["stats_every"] == 10
    assert res["register_s"] is not None and res["register_all_s"] == res["register_s"]
    assert res["heartbeat_errors"] == 0 and res["heartbeats_per_s"] > 0
    assert 0 <= res["leader_system_cpu_pct"] <= res["leader_cpu_pct"]
    assert res["register_leader_cpu_s"] >= 0
    # The silent agent's node was declared down, and no other.
    assert res["detect_silent_s"] > 0 and res["false_down"] == 0
    # The slowest poll of the leader is reported, and within the whole wait.
    assert 0 <= res["detect_poll_max_s"] <= res["detect_silent_s"]
    assert "Traceback" not in out.stderr
    # 40 agents are far below the default rate: each keeps its own 1 s.
    assert res["max_heartbeats_per_s"] == 8000
    assert res["paced_interval_s"] == res["paced_interval_max_s"] == 1.0
    assert res["pace_values_refused"] == 0


def test_light_agents_take_the_interval_the_leader_asks() -> None:
    # 40 agents at 20 heartbeats a second: each asked for 2 s, which the
    # default TTL (4 s: a lease of 3.2 s) caps at a third of the TTL and
    # two fifths of the lease, jitter included.
    out = bench(
        "--agents", "40", "--procs", "1", "--window", "2", "--max-heartbeats-per-second", "20"
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    cap = pacing.cap_s(4.0, 3.2)
    assert res["max_heartbeats_per_s"] == 20
    assert (
        res["paced_interval_min_s"] == res["paced_interval_max_s"] == math.floor(1000 * cap) / 1000
    )
    assert res["pace_values_refused"] == 0 and res["heartbeat_errors"] == 0
    assert res["detect_silent_s"] > 0 and res["false_down"] == 0


def test_agents_not_registered_in_time_end_the_run_in_one_line() -> None:
    out = bench("--agents", "40", "--procs", "2", "--window", "0.5", "--register-timeout", "0")
    assert out.returncode == 1
    line = out.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, out.stderr
    assert line.startswith("heartbeats: ") and "of 40 agents registered after" in line
    res = json.loads(out.stdout)
    assert res["ok"] is False and res["register_s"] is None and res["agents"] == 40
