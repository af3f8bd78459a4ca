"""The simulator's speed: how much faster than real time it runs the cluster.

Runs seeds of the simulation (leptond/sim) in this process, one at a time,
and reports per run CPU time per step and the speed: seconds of cluster time
per second of CPU. Baseline beside it, from the same run: the same seeds
with the invariant checks off (what checking after every step costs), and
the target of issue 16: 1,000 times real time. Seeds alternate between the
two so that a busy machine slows both alike.

    .venv/bin/python bench/sim.py [--seeds 10] [--steps 5000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from leptond.sim import SimConfig, run  # noqa: E402

TARGET_X = 1000.0


def one(seed: int, steps: int, check: bool) -> dict[str, float]:
    cfg = replace(SimConfig(), check=check)
    t0 = time.process_time()
    r = run(seed, steps, cfg)
    cpu = time.process_time() - t0
    virtual = float(r.stats["virtual_s"])
    return {"seed": seed, "steps": r.steps, "cpu_s": cpu, "virtual_s": virtual, "ok": r.ok}


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    cpu = sum(r["cpu_s"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    virtual = sum(r["virtual_s"] for r in rows)
    per_seed = [r["cpu_s"] for r in rows]
    return {
        "seeds": len(rows),
        "steps": steps,
        "cpu_s": round(cpu, 2),
        "us_per_step": round(cpu / steps * 1e6, 1),
        "x_real_time": round(virtual / cpu, 1),
        "seed_cpu_s_median": round(statistics.median(per_seed), 3),
        "seed_cpu_s_max": round(max(per_seed), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10, help="seeds per variant (default 10)")
    ap.add_argument("--steps", type=int, default=5000, help="steps per seed (default 5000)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    checked: list[dict[str, float]] = []
    unchecked: list[dict[str, float]] = []
    for seed in range(a.seeds):
        checked.append(one(seed, a.steps, True))
        unchecked.append(one(seed, a.steps, False))
    out = {
        "target_x_real_time": TARGET_X,
        "checked": summary(checked),
        "baseline_unchecked": summary(unchecked),
        "violations": sum(1 for r in checked if not r["ok"]),
    }
    if a.json:
        print(json.dumps(out))
        return
    for name in ("checked", "baseline_unchecked"):
        s = out[name]
        assert isinstance(s, dict)
        print(
            f"{name:20s} {s['seeds']} seeds x {a.steps} steps: {s['us_per_step']} us/step, "
            f"{s['x_real_time']}x real time, {s['seed_cpu_s_median']}s CPU per seed "
            f"(max {s['seed_cpu_s_max']}s)"
        )
    print(f"target               {TARGET_X:g}x real time; violations: {out['violations']}")
    budget = out["checked"]["us_per_step"] * 200 * 5000 / 1e6  # type: ignore[index]
    print(f"the suite's 200 seeds x 5000 steps: about {budget:.0f}s of CPU")


if __name__ == "__main__":
    main()
