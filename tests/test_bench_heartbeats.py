"""bench/heartbeats.py end to end at a small scale: its worker processes,
its JSON keys, and one line (no traceback) when the agents do not all
register in time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert "Traceback" not in out.stderr


def test_agents_not_registered_in_time_end_the_run_in_one_line() -> None:
    out = bench("--agents", "40", "--procs", "2", "--window", "0.5", "--register-timeout", "0")
    assert out.returncode == 1
    line = out.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, out.stderr
    assert line.startswith("heartbeats: ") and "of 40 agents registered after" in line
    res = json.loads(out.stdout)
    assert res["ok"] is False and res["register_s"] is None and res["agents"] == 40
