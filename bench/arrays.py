"""Job arrays at scale: one 10,000-task array against 10,000 separate submits.

Each side runs on a fresh cluster of 3 real masters and 4 agents with 8
simulated GPUs each (32 one-GPU slots), on loopback; every task is
`sleep 0.1` on one GPU. Measured for each, in the same run:

- ack_s: from the first submit call to the last acknowledgement (the array:
  one call; the baseline: 10,000 calls, --inflight at a time). Target for the
  array: <= 1 s.
- fill_s: from the first submit call until all 32 slots are busy at once
  (None if that was not seen within --fill-timeout: with 0.1 s tasks a slot
  may free before the last one fills).
- started_per_s: tasks that left pending per second, over --window seconds
  once the queue is full.
- rss_mib_per_10k: the leader's RSS growth from before the submits to after
  the last acknowledgement, per 10,000 tasks.

    .venv/bin/python bench/arrays.py [--tasks 10000] [--window 20] [--inflight 64] [--json]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the standard library's `array`, which asyncio
# imports: its own directory must not come first on the module path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from leptond.client import calls  # noqa: E402
from leptond.wire.client import ClusterClient, parse_addrs  # noqa: E402
from leptond.wire.tokens import parse_token  # noqa: E402
from tests.harness import Cluster  # noqa: E402

TARGET_ACK_S = 1.0
AGENTS, GPUS = 4, 8
SLOTS = AGENTS * GPUS
POLL_S = 0.05
SPEC: dict[str, Any] = {"argv": ["sleep", "0.1"], "gpus": 1, "cpus": 0.1, "mem_bytes": 64 << 20}


def client(c: Cluster) -> ClusterClient:
    tok = parse_token(c.admin_token)
    return ClusterClient(parse_addrs(c.addrs), key_id=tok.id, psk=tok.psk)


async def submit_array(c: Cluster, n: int) -> float:
    cl = client(c)
    try:
        spec = {**SPEC, "array": [[0, n - 1, 1]]}
        t0 = time.perf_counter()
        await calls.submit(cl, spec, "bench-array", timeout_s=60)
        return time.perf_counter() - t0
    finally:
        await cl.close()


async def submit_many(c: Cluster, n: int, inflight: int) -> float:
    clients = [client(c) for _ in range(4)]
    sem = asyncio.Semaphore(inflight)

    async def one(i: int) -> None:
        async with sem:
            await calls.submit(clients[i % len(clients)], dict(SPEC), f"bench-{i}", timeout_s=120)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0
    finally:
        for cl in clients:
            await cl.close()


async def queue(cl: ClusterClient) -> tuple[int, int]:
    """(GPUs in use, tasks pending) of the admin's work, from the leader."""
    rows = await calls.queue(cl, timeout_s=30)
    row = next((r for r in rows if r["user"] == "admin"), None)
    return (0, 0) if row is None else (int(row["gpus"]), int(row["pending_tasks"]))


async def watch(
    c: Cluster, n: int, t0: float, acked: asyncio.Event, fill_timeout_s: float, window_s: float
) -> dict[str, Any]:
    """fill_s, the most slots seen busy, and the start rate over the window
    (which opens once every submit was acknowledged)."""
    cl = client(c)
    try:
        fill_s, most = None, 0
        while time.perf_counter() - t0 < fill_timeout_s:
            busy, pending = await queue(cl)
            most = max(most, busy)
            if busy >= SLOTS:
                fill_s = time.perf_counter() - t0
                break
            await asyncio.sleep(POLL_S)
        await acked.wait()
        busy, pending = await queue(cl)
        w0, left0 = time.perf_counter(), n - pending
        await asyncio.sleep(window_s)
        busy, pending = await queue(cl)
        w1, left1 = time.perf_counter(), n - pending
        return {
            "fill_s": fill_s,
            "most_busy": max(most, busy),
            "started_per_s": (left1 - left0) / (w1 - w0),
            "pending_at_end": pending,
        }
    finally:
        await cl.close()


def run_side(kind: str, n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    c = Cluster(tmp / f"{kind}-{uuid.uuid4().hex[:6]}", n_masters=3, ttl_s=10.0)
    try:
        c.start_masters(60)
        for i in range(AGENTS):
            c.start_agent(f"h{i}", gpus=str(GPUS))
        c.wait_nodes_ready(AGENTS, timeout_s=120)
        leader = psutil.Process(c.wait_leader(60).proc.pid)
        rss0 = leader.memory_info().rss

        async def go() -> dict[str, Any]:
            t0 = time.perf_counter()
            acked = asyncio.Event()
            watcher = asyncio.ensure_future(watch(c, n, t0, acked, args.fill_timeout, args.window))
            if kind == "array":
                ack = await submit_array(c, n)
            else:
                ack = await submit_many(c, n, args.inflight)
            acked.set()
            rss1 = leader.memory_info().rss
            out = await watcher
            return {"ack_s": ack, "rss_mib_per_10k": (rss1 - rss0) / 2**20 * 10_000 / n, **out}

        return asyncio.run(go())
    finally:
        c.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--window", type=float, default=20.0, help="seconds of the start-rate window")
    p.add_argument("--fill-timeout", type=float, default=60.0)
    p.add_argument("--inflight", type=int, default=64, help="baseline submits in flight")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="lepton-bench-array-", dir="/var/tmp") as d:
        tmp = Path(d)
        array = run_side("array", args.tasks, args, tmp)
        separate = run_side("separate", args.tasks, args, tmp)
    result = {
        "tasks": args.tasks,
        "slots": SLOTS,
        "array": array,
        "baseline_separate_submits": separate,
        "ack_s": array["ack_s"],
        "target_ack_s": TARGET_ACK_S,
        "host": {"cpus": psutil.cpu_count(), "python": platform.python_version()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.tasks} tasks of sleep 0.1 on {SLOTS} GPU slots (3 masters, {AGENTS} agents)")
    print(f"{'':28} {'array':>12} {'separate':>12}")
    rows = [
        ("submit acknowledged (s)", "ack_s", "{:.3f}"),
        ("all slots busy (s)", "fill_s", "{:.2f}"),
        ("most slots busy at once", "most_busy", "{}"),
        ("tasks started per second", "started_per_s", "{:.1f}"),
        ("leader RSS MiB per 10k", "rss_mib_per_10k", "{:.1f}"),
    ]
    for label, key, fmt in rows:
        a, b = array.get(key), separate.get(key)
        fa = "-" if a is None else fmt.format(a)
        fb = "-" if b is None else fmt.format(b)
        print(f"{label:28} {fa:>12} {fb:>12}")
    ok = array["ack_s"] <= TARGET_ACK_S
    print(
        f"array ack {array['ack_s']:.3f} s: {'within' if ok else 'over'} the {TARGET_ACK_S:g} s target"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
