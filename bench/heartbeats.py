"""Leader CPU under heartbeats: many simulated agents against one real leader.

A real `leptond run` master (single member unless --masters 3) on loopback;
this process plays N agents (default 2,000), each with its own sealed RPC
connection under its own node credential, traded (as lepton-agent does) for
one join token made with --uses N. Every agent joins and registers (two Raft
commits each) and then heartbeats at 1 Hz with host and 8 GPU stats, as lepton-agent
does. The leader's CPU is read with psutil over a window (default 25 s) and
reported in percent of one core; the baseline is the same leader's CPU over
the same window with no agents connected, measured first in the same run.

    .venv/bin/python bench/heartbeats.py [--agents 2000] [--window 25] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from leptond.wire.connection import Connection, open_connection  # noqa: E402
from leptond.wire.errors import RpcError  # noqa: E402
from leptond.wire.loop import run  # noqa: E402
from leptond.wire.tokens import Token, parse_token  # noqa: E402
from tests.harness import Cluster  # noqa: E402

TARGET_PCT = 50.0
GPUS = 8
GiB = 1 << 30


def describe(i: int) -> dict[str, Any]:
    nid = f"n-sim{i:06d}"
    return {
        "id": nid,
        "name": f"sim-{i:05d}",
        "addr": "127.0.0.1",
        "cpus": 64.0,
        "mem_bytes": 512 * GiB,
        "labels": {"rack": f"r{i % 40}"},
        "gpus": [
            {
                "index": g,
                "uuid": f"GPU-{uuid.UUID(int=i * 16 + g)}",
                "model": "Simulated H100",
                "mem_bytes": 80 * GiB,
                "domain": g // 4,
            }
            for g in range(GPUS)
        ],
    }


def heartbeat_body(i: int) -> dict[str, Any]:
    """Shaped like agent/daemon.py's heartbeat: host stats, GPU stats, tasks."""
    return {
        "host": {
            "cpu_count": 64,
            "cpu_percent": round(random.uniform(0, 100), 1),
            "load_1": round(random.uniform(0, 64), 2),
            "load_5": 10.0,
            "load_15": 10.0,
            "mem_total_bytes": 512 * GiB,
            "mem_available_bytes": random.randrange(512 * GiB),
            "disk_total_bytes": 4096 * GiB,
            "disk_free_bytes": random.randrange(4096 * GiB),
            "net_bytes_sent": random.randrange(1 << 40),
            "net_bytes_recv": random.randrange(1 << 40),
            "boot_time": 1.7e9,
        },
        "gpus": [
            {
                "index": g,
                "uuid": f"GPU-{uuid.UUID(int=i * 16 + g)}",
                "name": "Simulated H100",
                "mem_total_bytes": 80 * GiB,
                "mem_used_bytes": random.randrange(80 * GiB),
                "util_pct": random.randrange(101),
                "mem_util_pct": random.randrange(101),
                "temperature_c": random.randrange(30, 80),
                "power_w": round(random.uniform(60, 700), 1),
                "ecc_errors": 0,
                "domain": g // 4,
            }
            for g in range(GPUS)
        ],
        "running": [],
        "exited": [],
    }


class Fleet:
    def __init__(self, host: str, port: int, join: Token, n: int) -> None:
        self.host, self.port, self.join, self.n = host, port, join, n
        self.conns: list[Connection] = []
        self.registered = 0
        self.beats = 0
        self.errors = 0
        self.error_codes: Counter[str] = Counter()
        self.stop = asyncio.Event()

    async def agent(self, i: int, sem: asyncio.Semaphore) -> None:
        """One simulated agent: connect, register, then heartbeat at 1 Hz until
        stopped; register again when the leader asks, as lepton-agent does."""
        async with sem:
            cred = await self.trade(describe(i)["id"])
            conn = await open_connection(
                self.host, self.port, key_id=cred.id, psk=cred.psk, timeout_s=60
            )
            self.conns.append(conn)
            await conn.call("agent_register", {"node": describe(i), "running": []}, timeout_s=120)
        self.registered += 1
        # Spread the agents over the second, as real ones are.
        await asyncio.sleep(random.random())
        loop = asyncio.get_running_loop()
        nxt = loop.time()
        # Bodies are made ahead: this process must keep up with N beats a second.
        bodies = [heartbeat_body(i) for _ in range(3)]
        k = 0
        while not self.stop.is_set():
            k += 1
            try:
                await conn.call("heartbeat", bodies[k % 3], timeout_s=30)
                self.beats += 1
            except RpcError as exc:
                self.errors += 1
                self.error_codes[exc.code] += 1
                if exc.code == "unregistered":
                    await conn.call(
                        "agent_register", {"node": describe(i), "running": []}, timeout_s=120
                    )
            nxt += 1.0
            await asyncio.sleep(max(0.0, nxt - loop.time()))

    async def trade(self, node_id: str) -> Token:
        """The join token for this node's own credential, as lepton-agent does."""
        conn = await open_connection(
            self.host, self.port, key_id=self.join.id, psk=self.join.psk, timeout_s=60
        )
        try:
            res = await conn.call("node_join", {"node_id": node_id}, timeout_s=120)
        finally:
            conn.close()
        return parse_token(res["credential"])


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


async def measure(pid: int, window_s: float) -> tuple[float, float]:
    p = psutil.Process(pid)
    c0, t0 = cpu_s(p), time.monotonic()
    await asyncio.sleep(window_s)
    c1, t1 = cpu_s(p), time.monotonic()
    return 100.0 * (c1 - c0) / (t1 - t0), t1 - t0


async def bench(c: Cluster, n: int, window_s: float) -> dict[str, Any]:
    leader = c.wait_leader()
    idle_pct, _ = await measure(leader.proc.pid, window_s)
    join = parse_token(c.rpc("join_token_create", {"ttl_s": 3600, "uses": n})["token"])
    fleet = Fleet("127.0.0.1", leader.rpc, join, n)
    t0 = time.monotonic()
    sem = asyncio.Semaphore(64)
    tasks = [asyncio.create_task(fleet.agent(i, sem)) for i in range(n)]
    while fleet.registered < n:
        if any(t.done() for t in tasks):
            failed = next(t for t in tasks if t.done())
            raise SystemExit(f"a simulated agent stopped: {failed.exception()!r}")
        await asyncio.sleep(0.1)
    register_s = time.monotonic() - t0
    await asyncio.sleep(3.0)  # every agent is in its 1 Hz rhythm
    b0, e0 = fleet.beats, fleet.errors
    me = psutil.Process()
    mine0 = cpu_s(me)
    busy_pct, took_s = await measure(leader.proc.pid, window_s)
    client_pct = 100.0 * (cpu_s(me) - mine0) / took_s
    rate = (fleet.beats - b0) / took_s
    errors = fleet.errors - e0
    fleet.stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for conn in fleet.conns:
        conn.close()
    return {
        "agents": n,
        "window_s": round(took_s, 1),
        "leader_cpu_pct": round(busy_pct, 1),
        "baseline_idle_cpu_pct": round(idle_pct, 1),
        "heartbeats_per_s": round(rate, 1),
        "heartbeat_errors": errors,
        "error_codes": dict(fleet.error_codes),
        "client_cpu_pct": round(client_pct, 1),
        "register_all_s": round(register_s, 1),
        "cpu_ms_per_heartbeat": round(10 * (busy_pct - idle_pct) / rate, 3) if rate else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=2000)
    ap.add_argument("--window", type=float, default=25.0, help="seconds of CPU measurement")
    ap.add_argument("--masters", type=int, default=1, choices=(1, 3))
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * args.agents + 1000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    tmp = Path(tempfile.mkdtemp(prefix="lepton-hb-"))
    c = Cluster(tmp / "cluster", n_masters=args.masters, ttl_s=10.0)
    try:
        c.start_masters()
        res = run(bench(c, args.agents, args.window))
    finally:
        c.close()
        shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "bench": "heartbeats",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": f"{platform.node()} python {platform.python_version()}",
        "masters": args.masters,
        **res,
        "target_pct": TARGET_PCT,
    }
    res["ok"] = res["leader_cpu_pct"] <= TARGET_PCT
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{args.agents} simulated agents heartbeating at 1 Hz to one leader")
    print(f"{'':34}{'value':>10}")
    print(f"{'leader CPU, % of one core':34}{res['leader_cpu_pct']:>10}")
    print(f"{'leader CPU idle (baseline)':34}{res['baseline_idle_cpu_pct']:>10}")
    print(f"{'heartbeats answered per s':34}{res['heartbeats_per_s']:>10}")
    print(f"{'leader CPU ms per heartbeat':34}{res['cpu_ms_per_heartbeat']!s:>10}")
    print(f"{'heartbeat errors':34}{res['heartbeat_errors']:>10}")
    print(f"{'simulating process CPU, %':34}{res['client_cpu_pct']:>10}")
    print(f"{'registering all agents, s':34}{res['register_all_s']:>10}")
    print(f"target <= {TARGET_PCT:g}% of one core: " + ("met" if res["ok"] else "NOT met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
