"""What a master keeps of a heartbeat (leptond/nodestats.py): all of a real
agent's report, and nothing malformed."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from agent.probes import host_stats, make_gpu_probe
from agent.workdir import WorkdirCache
from leptond.nodestats import Cleaner


def test_a_real_agents_report_loses_nothing(tmp_path: Path) -> None:
    probe = make_gpu_probe("2", seed="h1")
    cache = WorkdirCache(tmp_path / "blocks", 1 << 30)
    beat = {
        "host": asdict(host_stats(tmp_path)),
        "gpus": [asdict(g) for g in probe.gpus()],
        "cache": cache.stats(),
    }
    clean = Cleaner()
    kept = clean.heartbeat(beat)
    assert clean.dropped == 0
    assert kept["stats"] == beat["host"]
    assert kept["gpus"] == beat["gpus"]
    # Unset limits (None) are left out; the tiers' figures are kept.
    want = {k: v for k, v in beat["cache"].items() if v is not None}
    assert kept["cache"] == json.loads(json.dumps(want))
    assert kept["cache"]["disk"]["hits"] == 0


def test_nested_cache_figures_are_checked_too() -> None:
    clean = Cleaner()
    kept = clean.flat({"disk": {"hits": 3, "bad": [1], "deep": {"x": 1}}, "n": float("nan")})
    assert kept == {"disk": {"hits": 3}}
    assert clean.dropped == 3
