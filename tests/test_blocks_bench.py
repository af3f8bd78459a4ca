"""The cache benchmark's own arithmetic: Belady's MIN must be optimal, and
the script must print the figures it promises."""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from leptond.blocks.cache import ByteCache

BENCH = Path(__file__).resolve().parent.parent / "bench" / "cache.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cache", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def brute_force_optimum(trace: list[int], capacity: int) -> int:
    """Most hits any eviction choice can get (exhaustive, tiny traces only)."""

    @functools.cache
    def best(i: int, cached: frozenset[int]) -> int:
        if i == len(trace):
            return 0
        key = trace[i]
        if key in cached:
            return 1 + best(i + 1, cached)
        if len(cached) < capacity:
            return best(i + 1, cached | {key})
        return max(best(i + 1, (cached - {victim}) | {key}) for victim in cached)

    return best(0, frozenset())


def test_belady_is_the_optimum_on_small_traces(bench: ModuleType) -> None:
    rng = random.Random(7)
    for _ in range(60):
        capacity = rng.randint(1, 3)
        trace = [rng.randrange(5) for _ in range(rng.randint(0, 12))]
        assert bench.belady_hits(trace, capacity) == brute_force_optimum(trace, capacity)


def test_belady_bounds_both_policies(bench: ModuleType) -> None:
    trace = bench.zipf_trace(5000, 500, 0.9, seed=3) + bench.scan_trace(5000, 20, 120, 0.5, 3)
    optimum = bench.belady_hits(trace, 50)
    for policy in ("lru", "lfu"):
        cache: ByteCache[int, int] = ByteCache(50, policy)
        for key in trace:
            if cache.get(key) is None:
                cache.put(key, key, 1)
        assert cache.hits <= optimum


def test_rounds_pair_each_policy_and_alternate_who_goes_first(bench: ModuleType) -> None:
    assert bench.round_order(0) == ["lru", "cachetools_lru", "lfu", "cachetools_lfu"]
    assert bench.round_order(1) == ["cachetools_lru", "lru", "cachetools_lfu", "lfu"]
    assert sorted(bench.round_order(2)) == sorted(bench.runners(10))


def test_script_prints_the_promised_json() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--json",
            "--ops",
            "3000",
            "--capacity",
            "50",
            "--rounds",
            "1",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "warning" not in out.stderr  # our hit counts agree with cachetools'
    result = json.loads(out.stdout)
    for key in ("lru", "lfu", "cachetools_lru", "cachetools_lfu"):
        assert result[f"{key}_ops_per_s"] > 0
    assert result["lru_speedup"] > 0 and result["lfu_speedup"] > 0
    for trace in ("zipf", "scan"):
        assert 0 <= result[f"{trace}_hit_ratio_lru"] <= result[f"{trace}_hit_ratio_belady"] <= 1
        assert result[f"{trace}_hit_ratio_lfu"] <= result[f"{trace}_hit_ratio_belady"]
