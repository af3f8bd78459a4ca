"""Scheduler benchmark: our scheduler against first fit, same input, same run.

    .venv/bin/python bench/scheduler.py                      # both scenarios, 10,000 nodes x 8 GPUs
    .venv/bin/python bench/scheduler.py --scenario balanced  # only the one where demand ~ capacity
    .venv/bin/python bench/scheduler.py --nodes 500 --tasks 5000 --seed 3 --repeat 1 --json

Scenarios (same cluster, 30% of nodes partly busy):
- backlog: 100,000 pending tasks, far more than fits; measures the pass's
  speed when most of the queue must be turned down with a reason.
- balanced: pending GPU demand about equal to the free GPUs; the packing
  shows in what is left: GPUs stranded (free, but on nodes that cannot host
  any request still pending) and GPUs placed.

placements/s is placements made divided by the seconds of one full plan
(every pending task placed, preempted for or given a reason), once by wall
time and once by the process's CPU time; each plan runs --repeat times, the
two planners in alternation, and the medians are printed.  The speedup is
the median of the rounds' own ratios (first fit's seconds over ours).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
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
    n_nodes: int, n_tasks: int, seed: int, gpu_demand: float | None = None
) -> tuple[list[NodeView], list[Allocation], list[TaskRequest]]:
    """The cluster and queue for a seed.  With `gpu_demand`, the queue stops
    (before `n_tasks`) once it asks for that share of the free GPUs."""
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
    free_gpus = 8 * n_nodes - sum(len(a.gpus) for a in allocs)
    wanted = n_tasks * 8 if gpu_demand is None else int(gpu_demand * free_gpus)
    asked = 0
    while len(tasks) < n_tasks and asked < wanted:
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
            asked += 8 * size
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
            asked += g
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


def timed(
    ours: Callable[[], Plan], base: Callable[[], Plan], repeat: int
) -> tuple[tuple[Plan, float, float], tuple[Plan, float, float], float, float]:
    """Both planners `repeat` times in alternation (ours first in even rounds,
    first fit first in odd ones), so that load from elsewhere on a shared
    machine falls on both alike.  Returns, for each, the plan and the median
    wall and CPU seconds, then the speedups (first fit's seconds over ours)
    as the medians of the rounds' own ratios, by wall and by CPU time.  CPU
    time is printed beside wall time: on a shared machine it says more about
    the code than the wall clock does."""
    runs: dict[str, tuple[list[float], list[float]]] = {"ours": ([], []), "base": ([], [])}
    plans: dict[str, Plan] = {}
    planners = {"ours": ours, "base": base}
    for r in range(repeat):
        for name in ("ours", "base") if r % 2 == 0 else ("base", "ours"):
            t0, c0 = time.perf_counter(), time.process_time()
            plans[name] = planners[name]()
            runs[name][0].append(time.perf_counter() - t0)
            runs[name][1].append(time.process_time() - c0)
    (ow, oc), (bw, bc) = runs["ours"], runs["base"]
    speedup_wall = statistics.median(b / o for o, b in zip(ow, bw, strict=True))
    speedup_cpu = statistics.median(b / o for o, b in zip(oc, bc, strict=True))
    return (
        (plans["ours"], statistics.median(ow), statistics.median(oc)),
        (plans["base"], statistics.median(bw), statistics.median(bc)),
        speedup_wall,
        speedup_cpu,
    )


def run(
    n_nodes: int, n_tasks: int, seed: int, repeat: int, gpu_demand: float | None = None
) -> dict[str, float | int]:
    nodes, allocs, tasks = build(n_nodes, n_tasks, seed, gpu_demand)
    (plan, ours_s, ours_cpu), (base, base_s, base_cpu), speedup_wall, speedup_cpu = timed(
        lambda: schedule(nodes, allocs, tasks, Policy()),
        lambda: first_fit(nodes, allocs, tasks),
        repeat,
    )
    free_before = 8 * n_nodes - sum(len(a.gpus) for a in allocs)

    def gpus_placed(p: Plan) -> int:
        return sum(len(x.gpus) for x in p.placements)

    def gangs_placed(p: Plan) -> int:
        placed = {x.task_id for x in p.placements}
        return len({t.job_id for t in tasks if t.gang_size > 1 and t.task_id in placed})

    def figures(p: Plan, wall_s: float, cpu_s: float) -> dict[str, float | int]:
        return {
            "placements": len(p.placements),
            "placements_per_wall_s": round(len(p.placements) / wall_s),
            "placements_per_cpu_s": round(len(p.placements) / cpu_s),
            "plan_s": round(wall_s, 3),
            "plan_cpu_s": round(cpu_s, 3),
            "gpus_placed": gpus_placed(p),
            "gang_jobs_placed": gangs_placed(p),
            "tasks_pending": len(tasks) - len(p.placements),
            "stranded_gpus": stranded_gpus(nodes, allocs, tasks, p),
            "preemptions": len(p.preemptions),
        }

    out: dict[str, float | int] = {
        "nodes": n_nodes,
        "tasks": len(tasks),
        "seed": seed,
        "repeat": repeat,
        "free_gpus_before": free_before,
        "gpus_asked": sum(t.gpus for t in tasks),
    }
    out.update(figures(plan, ours_s, ours_cpu))
    out.update({f"baseline_{k}": v for k, v in figures(base, base_s, base_cpu).items()})
    out["speedup_wall"] = round(speedup_wall, 2)
    out["speedup_cpu"] = round(speedup_cpu, 2)
    return out


ROWS = (
    ("placements", "placements"),
    ("placements/s (wall)", "placements_per_wall_s"),
    ("placements/s (CPU)", "placements_per_cpu_s"),
    ("seconds to full plan", "plan_s"),
    ("CPU seconds", "plan_cpu_s"),
    ("GPUs placed", "gpus_placed"),
    ("gang jobs placed", "gang_jobs_placed"),
    ("tasks left pending", "tasks_pending"),
    ("GPUs stranded", "stranded_gpus"),
    ("preemptions", "preemptions"),
)


def print_table(title: str, r: dict[str, float | int]) -> None:
    print(
        f"{title}: {r['nodes']} nodes x 8 GPUs ({r['free_gpus_before']} free), "
        f"{r['tasks']} pending tasks asking for {r['gpus_asked']} GPUs, seed {r['seed']}, "
        f"median of {r['repeat']}"
    )
    print(f"{'':24}{'schedule':>12}{'first_fit':>12}")
    for label, key in ROWS:
        print(f"{label:24}{r[key]:>12}{r['baseline_' + key]:>12}")
    print(f"{'speedup (wall, CPU)':24}{r['speedup_wall']:>11}x{r['speedup_cpu']:>11}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs per plan; medians are printed")
    ap.add_argument(
        "--scenario",
        choices=("backlog", "balanced", "both"),
        default="both",
        help="backlog: --tasks pending; balanced: pending GPUs ~ free GPUs",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    results: dict[str, dict[str, float | int]] = {}
    if args.scenario in ("backlog", "both"):
        results["backlog"] = run(args.nodes, args.tasks, args.seed, args.repeat)
    if args.scenario in ("balanced", "both"):
        results["balanced"] = run(args.nodes, args.tasks, args.seed, args.repeat, gpu_demand=1.0)
    if args.json:
        print(json.dumps(results))
        return
    for i, (name, r) in enumerate(results.items()):
        if i:
            print()
        print_table(name, r)
    print(
        "\nplacements/s = placements made / seconds of one full plan (wall, or this "
        "process's CPU);\nGPUs stranded = free GPUs on nodes that cannot host any "
        "request still pending;\nspeedup = median over rounds (the planners alternate) "
        "of first fit's seconds / ours."
    )


if __name__ == "__main__":
    main()
