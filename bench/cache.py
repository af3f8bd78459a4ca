"""Cache policy benchmark: our LRU/LFU against cachetools, and hit ratios
against Belady's offline optimum (MIN), all on the same traces in one run.

    .venv/bin/python bench/cache.py            # readable table
    .venv/bin/python bench/cache.py --json     # one JSON object

Needs `pip install .` and `cachetools` (the baseline), which the `test`
extra brings.

Times are the process's CPU time (``time.process_time``), so other load on
the machine does not distort the comparison; each figure is the best of
several interleaved rounds.  Every item has size 1, so our byte budget
equals cachetools' maxsize and the two libraries must agree on hit ratios;
a disagreement is reported as a bug.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cachetools

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from leptond.blocks.cache import ByteCache

Trace = list[int]


def zipf_trace(n_ops: int, n_keys: int, alpha: float, seed: int) -> Trace:
    """Keys ranked by popularity with P(rank r) proportional to 1 / r**alpha."""
    rng = random.Random(seed)
    weights = [1.0 / (rank**alpha) for rank in range(1, n_keys + 1)]
    keys = list(range(n_keys))
    rng.shuffle(keys)  # popularity must not follow key order
    return rng.choices(keys, weights=weights, k=n_ops)


def scan_trace(n_ops: int, hot: int, loop: int, hot_share: float, seed: int) -> Trace:
    """A small hot set mixed with sequential loops over a larger working set:
    the pattern (repeated full scans of a dataset) that defeats LRU."""
    rng = random.Random(seed)
    trace: Trace = []
    pos = 0
    for _ in range(n_ops):
        if rng.random() < hot_share:
            trace.append(rng.randrange(hot))
        else:
            trace.append(hot + pos)
            pos = (pos + 1) % loop
    return trace


def belady_hits(trace: Trace, capacity: int) -> int:
    """Offline MIN: on a miss with a full cache, evict the key used furthest
    in the future.  O(n log n) with a lazy max-heap of next-use positions."""
    never = len(trace)
    next_use = [never] * len(trace)
    last_seen: dict[int, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        next_use[i] = last_seen.get(trace[i], never)
        last_seen[trace[i]] = i
    cached: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []
    hits = 0
    for i, key in enumerate(trace):
        if key in cached:
            hits += 1
        elif len(cached) >= capacity:
            while True:
                neg_next, victim = heapq.heappop(heap)
                if cached.get(victim) == -neg_next:
                    del cached[victim]
                    break
        cached[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], key))
    return hits


def run_ours(cache: ByteCache[int, int], trace: Trace) -> tuple[float, int]:
    get = cache.get
    put = cache.put
    start = time.process_time()
    for key in trace:
        if get(key) is None:
            put(key, key, 1)
    elapsed = time.process_time() - start
    return elapsed, cache.hits


def run_cachetools(cache: Any, trace: Trace) -> tuple[float, int]:
    get = cache.get
    start = time.process_time()
    for key in trace:
        if get(key) is None:
            cache[key] = key
    elapsed = time.process_time() - start
    return elapsed, cachetools_hits(type(cache)(cache.maxsize), trace)


def cachetools_hits(cache: Any, trace: Trace) -> int:
    """cachetools keeps no counters: count in a second, untimed pass."""
    hits = 0
    for key in trace:
        if cache.get(key) is None:
            cache[key] = key
        else:
            hits += 1
    return hits


Runner = Callable[[Trace], tuple[float, int]]


def runners(capacity: int) -> dict[str, Runner]:
    return {
        "lru": lambda t: run_ours(ByteCache(capacity, "lru"), t),
        "lfu": lambda t: run_ours(ByteCache(capacity, "lfu"), t),
        "cachetools_lru": lambda t: run_cachetools(cachetools.LRUCache(capacity), t),
        "cachetools_lfu": lambda t: run_cachetools(cachetools.LFUCache(capacity), t),
    }


def round_order(round_no: int) -> list[str]:
    """Run names for one round: each policy's two runs back to back, ours
    first in even rounds and cachetools first in odd ones, so that neither
    side always gets the warmer (or the more disturbed) slot."""
    order: list[str] = []
    for policy in ("lru", "lfu"):
        pair = [policy, f"cachetools_{policy}"]
        order += pair if round_no % 2 == 0 else pair[::-1]
    return order


def measure(
    trace: Trace, capacity: int, rounds: int
) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
    """Ops/s (best of ``rounds``), hits, and speedups.

    Implementations run interleaved so machine noise hits all alike.  The
    speedup of a policy is the median over rounds of the ratio of the two
    runs made back to back, which is steadier than a ratio of two bests.
    """
    times: dict[str, list[float]] = {}
    hits: dict[str, int] = {}
    for round_no in range(rounds):
        run_by_name = runners(capacity)
        for name in round_order(round_no):
            elapsed, h = run_by_name[name](trace)
            times.setdefault(name, []).append(elapsed)
            hits[name] = h
    ops = {name: len(trace) / min(ts) for name, ts in times.items()}
    speedups = {
        policy: statistics.median(
            theirs / ours
            for ours, theirs in zip(times[policy], times[f"cachetools_{policy}"], strict=True)
        )
        for policy in ("lru", "lfu")
    }
    return ops, hits, speedups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--capacity", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    zipf = zipf_trace(args.ops, 50 * args.capacity, 0.9, args.seed)
    scan = scan_trace(args.ops, args.capacity // 2, 3 * args.capacity, 0.5, args.seed)

    ops, zipf_hits, speedups = measure(zipf, args.capacity, args.rounds)
    _, scan_hits, _ = measure(scan, args.capacity, 1)
    zipf_hits["belady"] = belady_hits(zipf, args.capacity)
    scan_hits["belady"] = belady_hits(scan, args.capacity)

    for policy in ("lru", "lfu"):
        for hits in (zipf_hits, scan_hits):
            if hits[policy] != hits[f"cachetools_{policy}"]:
                print(f"warning: {policy} hit counts differ from cachetools", file=sys.stderr)

    result: dict[str, Any] = {f"{name}_ops_per_s": round(v) for name, v in ops.items()}
    result["lru_speedup"] = round(speedups["lru"], 2)
    result["lfu_speedup"] = round(speedups["lfu"], 2)
    for trace_name, trace, hits in (("zipf", zipf, zipf_hits), ("scan", scan, scan_hits)):
        for name in ("lru", "lfu", "belady"):
            result[f"{trace_name}_hit_ratio_{name}"] = round(hits[name] / len(trace), 4)
    result["ops"] = args.ops
    result["capacity_items"] = args.capacity

    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    print(
        f"zipf trace: {args.ops} ops, cache {args.capacity} items, ops/s best of "
        f"{args.rounds} rounds, speedup the median of per-round ratios (CPU time)"
    )
    print(f"{'':16}{'ours ops/s':>14}{'cachetools ops/s':>18}{'speedup':>9}")
    for policy in ("lru", "lfu"):
        print(
            f"{policy:16}{ops[policy]:>14,.0f}{ops['cachetools_' + policy]:>18,.0f}"
            f"{result[policy + '_speedup']:>8.2f}x"
        )
    print()
    print(f"{'hit ratio':16}{'LRU':>8}{'LFU':>8}{'Belady':>8}")
    for trace_name in ("zipf", "scan"):
        row = [result[f"{trace_name}_hit_ratio_{n}"] for n in ("lru", "lfu", "belady")]
        print(f"{trace_name:16}" + "".join(f"{r:>8.3f}" for r in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
