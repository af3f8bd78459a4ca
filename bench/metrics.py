"""What one scrape of the leader's /metrics costs with a large cluster.

A ClusterState of N nodes (8 GPUs each) and J one-task jobs, most of them
pending, some running, as one leader holds it; the ClusterCollector
(leptond/metrics.py) describes it the way /metrics does, and the whole
exposition is rendered as Prometheus reads it. Per size: the median time of
a collection and its size in bytes.

Baseline, same run: the per-user series computed the way `leptonctl queue`
does (the scheduler's inputs for every pending task, then
scheduler.queue_report), which is what /metrics did before it counted them
straight from the view.

    .venv/bin/python bench/metrics.py [--jobs 10000,100000] [--nodes 1000]
        [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from leptond.clock import REAL as clock  # noqa: E402

BATCH = 2000


class _Leader:
    def is_leader(self) -> bool:
        return True


def build(nodes: int, jobs: int) -> Any:
    from raft.commands import encode
    from raft.state import ClusterState

    s = ClusterState()
    index = 0

    def apply(op: str, args: dict[str, Any]) -> Any:
        nonlocal index
        index += 1
        return s.apply(encode(op, {"now": 1000.0, **args}), index)

    for n in range(nodes):
        gpus = [
            {"index": i, "uuid": f"{n}-{i}", "model": "H100", "mem_bytes": 80 << 30}
            for i in range(8)
        ]
        node = {
            "id": f"n{n}",
            "name": f"n{n}",
            "addr": "x",
            "cpus": 64,
            "mem_bytes": 1 << 40,
            "gpus": gpus,
        }
        apply("register_node", {"node": node})
    spec = {"argv": ["train"], "gpus": 1}
    for start in range(0, jobs, BATCH):
        batch = [
            {"id": f"j{i}", "user": f"user{i % 50}", "spec": spec, "submitted_at": 1000.0}
            for i in range(start, min(jobs, start + BATCH))
        ]
        apply("submit_jobs", {"jobs": batch})
    running = min(jobs, nodes * 8)
    placements = [
        {"task_id": f"j{i}.0", "node_id": f"n{i // 8}", "gpus": [i % 8]} for i in range(running)
    ]
    for start in range(0, running, BATCH):
        apply("plan", {"placements": placements[start : start + BATCH], "preemptions": []})
    return s


def median_s(fn: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = clock.monotonic()
        fn()
        times.append(clock.monotonic() - t0)
    return statistics.median(times)


def one(nodes: int, jobs: int, rounds: int) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, generate_latest

    import scheduler as sch
    from leptond import views
    from leptond.liveness import NodeLiveness
    from leptond.metrics import ClusterCollector
    from raft.view import Publisher

    s = build(nodes, jobs)
    reader = Publisher(s, threading.RLock())
    col = ClusterCollector(reader, _Leader(), NodeLiveness(clock), 10.0, clock)
    reg = CollectorRegistry()
    reg.register(col)
    body = generate_latest(reg)
    view = reader.view()

    def users_now() -> None:
        list(col._users(view))

    def users_before() -> None:
        n, a, p = views.scheduler_inputs(view)
        sch.queue_report(n, a, p, sch.Policy())

    return {
        "nodes": nodes,
        "jobs": jobs,
        "pending": len(view.pending),
        "scrape_s": round(median_s(lambda: generate_latest(reg), rounds), 4),
        "bytes": len(body),
        "users_s": round(median_s(users_now, rounds), 4),
        "users_baseline_s": round(median_s(users_before, rounds), 4),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", default="10000,100000", help="job counts, comma-separated")
    p.add_argument("--nodes", type=int, default=1000, help="nodes of 8 GPUs")
    p.add_argument(
        "--rounds", type=int, default=5, help="collections per size (the median is shown)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    rows = [one(args.nodes, int(j), args.rounds) for j in args.jobs.split(",")]
    if args.json:
        print(json.dumps({"bench": "metrics", "rows": rows}))
        return 0
    print(
        f"{'jobs':>8} {'pending':>8} {'scrape':>9} {'bytes':>9} {'users':>9} {'users before':>13}"
    )
    for r in rows:
        print(
            f"{r['jobs']:>8} {r['pending']:>8} {r['scrape_s'] * 1000:>7.0f}ms {r['bytes']:>9} "
            f"{r['users_s'] * 1000:>7.0f}ms {r['users_baseline_s'] * 1000:>11.0f}ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
