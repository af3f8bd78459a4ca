"""Scheduler benchmark: our scheduler against first fit, same input, same run.

    python3 bench/scheduler.py                     # 10,000 nodes x 8 GPUs, 100,000 tasks
    python3 bench/scheduler.py --nodes 500 --tasks 5000 --seed 3 --json

Prints placements per second, seconds to the full plan and GPUs left
stranded (free, but on nodes that cannot host any request still pending).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler import (
    Allocation,
    Gpu,
    NodeView,
    Plan,
    Policy,
    TaskRequest,
    first_fit,
    schedule,
)

GIB = 1 << 30
MODELS = (
    ("NVIDIA H100 80GB HBM3", 80 * GIB),
    ("NVIDIA A100-SXM4-40GB", 40 * GIB),
    ("NVIDIA L40S", 48 * GIB),
)
ZONES = ("a", "b", "c", "d")


def build(
    n_nodes: int, n_tasks: int, seed: int
) -> tuple[list[NodeView], list[Allocation], list[TaskRequest]]:
    rng = np.random.default_rng(seed)
    nodes: list[NodeView] = []
    allocs: list[Allocation] = []
    model_of = rng.choice(3, size=n_nodes, p=[0.5, 0.3, 0.2])
    for i in range(n_nodes):
        model, mem = MODELS[int(model_of[i])]
        gpus = tuple(Gpu(k, f"GPU-{i}-{k}", model, mem, domain=k // 4) for k in range(8))
        nid = f"n{i:05d}"
        nodes.append(NodeView(nid, f"h{i}", 128.0, 1024 * GIB, gpus, labels={"zone": ZONES[i % 4]}))
        if rng.random() < 0.3:  # some nodes partly used
            used = int(rng.choice([1, 2, 3, 4, 6]))
            first = int(rng.integers(0, 8 - used + 1))
            allocs.append(
                Allocation(
                    f"run-{i}",
                    f"runjob-{i}",
                    f"u{int(rng.integers(0, 20))}",
                    nid,
                    tuple(range(first, first + used)),
                    8.0 * used,
                    64 * GIB * used,
                    priority=int(rng.integers(0, 2)),
                    started_at=float(rng.integers(0, 10_000)),
                )
            )
    tasks: list[TaskRequest] = []
    k = 0
    while len(tasks) < n_tasks:
        user = f"u{int(rng.integers(0, 20))}"
        prio = int(rng.choice([0, 1, 2], p=[0.6, 0.3, 0.1]))
        at = float(k)
        gpu_type = [None, None, None, "H100", "A100"][int(rng.integers(0, 5))]
        cons = {"zone": ZONES[int(rng.integers(0, 4))]} if rng.random() < 0.1 else {}
        if rng.random() < 0.03:  # a gang of 2-8 nodes, 8 GPUs each
            size = int(rng.integers(2, 9))
            for r in range(size):
                tasks.append(
                    TaskRequest(
                        f"t{k}-{r}",
                        f"j{k}",
                        user,
                        prio,
                        at,
                        gpus=8,
                        cpus=64.0,
                        mem_bytes=512 * GIB,
                        gpu_type=gpu_type,
                        constraints=cons,
                        gang_size=size,
                        rank=r,
                    )
                )
        else:
            g = int(rng.choice([1, 2, 4, 8], p=[0.45, 0.25, 0.18, 0.12]))
            tasks.append(
                TaskRequest(
                    f"t{k}",
                    f"j{k}",
                    user,
                    prio,
                    at,
                    gpus=g,
                    cpus=8.0 * g,
                    mem_bytes=64 * GIB * g,
                    gpu_type=gpu_type,
                    constraints=cons,
                )
            )
        k += 1
    return nodes, allocs, tasks[:n_tasks]


def stranded_gpus(
    nodes: Sequence[NodeView],
    allocs: Sequence[Allocation],
    pending: Sequence[TaskRequest],
    plan: Plan,
) -> int:
    """Free GPUs on nodes where no still-pending request would fit."""
    n = len(nodes)
    index = {nd.node_id: i for i, nd in enumerate(nodes)}
    free = np.array([len(nd.gpus) for nd in nodes], dtype=np.int64)
    cpu = np.array([nd.cpus for nd in nodes], dtype=np.float64)
    mem = np.array([nd.mem_bytes for nd in nodes], dtype=np.float64)
    req = {t.task_id: t for t in pending}
    evicted = {p.task_id for p in plan.preemptions}
    for a in allocs:
        if a.task_id not in evicted:
            i = index[a.node_id]
            free[i] -= len(a.gpus)
            cpu[i] -= a.cpus
            mem[i] -= a.mem_bytes
    for p in plan.placements:
        i, t = index[p.node_id], req[p.task_id]
        free[i] -= len(p.gpus)
        cpu[i] -= t.cpus
        mem[i] -= t.mem_bytes
    for nid, gs in plan.reserved.items():
        free[index[nid]] -= len(gs)  # held, not free
    model = [nd.gpus[0].model.lower() if nd.gpus else "" for nd in nodes]
    gmem = np.array([nd.gpus[0].mem_bytes if nd.gpus else 0 for nd in nodes], dtype=np.float64)
    zone = np.array([nd.labels.get("zone", "") for nd in nodes])
    placed = {p.task_id for p in plan.placements}
    shapes = {
        (
            t.gpus,
            t.cpus,
            t.mem_bytes,
            (t.gpu_type or "").lower(),
            t.gpu_mem_min,
            tuple(sorted(t.constraints.items())),
        )
        for t in pending
        if t.task_id not in placed
    }
    usable = np.zeros(n, dtype=bool)
    for g, c, m, gt, gm, cons in shapes:
        ok = (free >= g) & (cpu + 1e-9 >= c) & (mem >= m) & (gmem >= gm)
        if gt:
            ok &= np.array([gt in x for x in model])
        for k, v in cons:
            ok &= zone == v if k == "zone" else False
        usable |= ok
    return int(free[~usable & (free > 0)].sum())


def run(n_nodes: int, n_tasks: int, seed: int) -> dict[str, float | int]:
    nodes, allocs, tasks = build(n_nodes, n_tasks, seed)
    # Wall time is what the targets are about; CPU time is printed too because
    # on a shared machine it says more about the code than the wall clock does.
    t0, c0 = time.perf_counter(), time.process_time()
    plan = schedule(nodes, allocs, tasks, Policy())
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    base = first_fit(nodes, allocs, tasks)
    base_s, base_cpu = time.perf_counter() - t0, time.process_time() - c0

    def gpus_placed(p: Plan) -> int:
        return sum(len(x.gpus) for x in p.placements)

    def gangs_placed(p: Plan) -> int:
        placed = {x.task_id for x in p.placements}
        return len({t.job_id for t in tasks if t.gang_size > 1 and t.task_id in placed})

    return {
        "nodes": n_nodes,
        "tasks": n_tasks,
        "seed": seed,
        "placements": len(plan.placements),
        "placements_per_s": round(len(plan.placements) / ours_s),
        "plan_s": round(ours_s, 3),
        "plan_cpu_s": round(ours_cpu, 3),
        "stranded_gpus": stranded_gpus(nodes, allocs, tasks, plan),
        "gpus_placed": gpus_placed(plan),
        "gang_jobs_placed": gangs_placed(plan),
        "preemptions": len(plan.preemptions),
        "baseline_placements": len(base.placements),
        "baseline_placements_per_s": round(len(base.placements) / base_s),
        "baseline_plan_s": round(base_s, 3),
        "baseline_plan_cpu_s": round(base_cpu, 3),
        "baseline_stranded_gpus": stranded_gpus(nodes, allocs, tasks, base),
        "baseline_gpus_placed": gpus_placed(base),
        "baseline_gang_jobs_placed": gangs_placed(base),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    r = run(args.nodes, args.tasks, args.seed)
    if args.json:
        print(json.dumps(r))
        return
    print(f"{r['nodes']} nodes x 8 GPUs, {r['tasks']} pending tasks, seed {r['seed']}")
    print(f"{'':22}{'schedule':>12}{'first_fit':>12}")
    for label, ours, base in (
        ("placements", "placements", "baseline_placements"),
        ("placements/s", "placements_per_s", "baseline_placements_per_s"),
        ("seconds to full plan", "plan_s", "baseline_plan_s"),
        ("CPU seconds", "plan_cpu_s", "baseline_plan_cpu_s"),
        ("GPUs placed", "gpus_placed", "baseline_gpus_placed"),
        ("gang jobs placed", "gang_jobs_placed", "baseline_gang_jobs_placed"),
        ("GPUs stranded", "stranded_gpus", "baseline_stranded_gpus"),
    ):
        print(f"{label:22}{r[ours]:>12}{r[base]:>12}")
    print(f"preemptions issued: {r['preemptions']}")


if __name__ == "__main__":
    main()
