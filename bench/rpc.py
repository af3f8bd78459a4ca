"""RPC benchmark on loopback: sealed protocol against the same framing unsealed.

The server is tests/wire_server_proc.py in its own process (uvloop); the
client runs here (uvloop). Measures:

  round trips/s on one connection with 1, 16 and 256 requests in flight,
  sealed and plain (no encryption, no compression), side by side, in
  alternating windows (both servers run throughout) so that load from
  elsewhere falls on both alike; the ratio is the median of the windows';
  bulk throughput of 1 MiB bodies, sealed: upload (calls to `sink`) and
  download (a `stream` of 1 MiB items), random (incompressible) and compressible.

    .venv/bin/python bench/rpc.py [--duration 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from leptond.wire import Connection, open_connection  # noqa: E402
from leptond.wire.loop import run  # noqa: E402

SERVER = ROOT / "tests" / "wire_server_proc.py"
PSK = os.urandom(32)
MiB = 1024 * 1024
IN_FLIGHT = (1, 16, 256)


def start_server(plain: bool) -> tuple[subprocess.Popen[bytes], int]:
    env = {**os.environ, "LEPTON_TEST_PSK": PSK.hex()}
    args = [sys.executable, str(SERVER), "--idle-timeout-s", "600"]
    if plain:
        args.append("--plain")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip():
        proc.kill()
        raise SystemExit("benchmark server did not start")
    return proc, int(line)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


async def timed(duration_s: float, workers: int, one: Callable[[], Awaitable[int]]) -> float:
    """Runs `workers` loops of `one` for duration_s; returns units of work per second."""
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration_s
    done = 0

    async def worker() -> None:
        nonlocal done
        while loop.time() < stop_at:
            n = await one()  # not `done += await one()`: that reads `done` before awaiting
            done += n

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(workers):
            tg.create_task(worker())
    return done / (time.perf_counter() - t0)


class CpuMeter:
    """CPU seconds used by this process and the server together.

    The machine may be shared, so besides rates we report CPU time per unit of
    work, which other load disturbs much less.
    """

    def __init__(self, server_pid: int) -> None:
        self.server = psutil.Process(server_pid)

    def now(self) -> float:
        t = self.server.cpu_times()
        return time.process_time() + t.user + t.system


async def round_trips(
    conn: Connection, cpu: CpuMeter, in_flight: int, duration_s: float
) -> tuple[float, float, float]:
    """(round trips, seconds, CPU seconds of both sides) in one window."""

    async def one() -> int:
        await conn.call("echo", 7)
        return 1

    c0, t0 = cpu.now(), time.perf_counter()
    rate = await timed(duration_s, in_flight, one)
    seconds = time.perf_counter() - t0
    return rate * seconds, seconds, cpu.now() - c0


async def paired_round_trips(
    conns: dict[str, tuple[Connection, CpuMeter]],
    in_flight: int,
    duration_s: float,
    rounds: int,
    out: dict[str, float],
) -> None:
    """Sealed and plain round trips in alternating windows (sealed first in
    even rounds, plain first in odd ones), so that load from elsewhere on a
    shared machine falls on both alike.  Rates and CPU per round trip are
    over all windows; the ratio is the median of the rounds' own ratios."""
    for conn, cpu in conns.values():
        await round_trips(conn, cpu, in_flight, min(0.3, duration_s))  # warm up
    done = dict.fromkeys(conns, 0.0)
    secs = dict.fromkeys(conns, 0.0)
    cpu_s = dict.fromkeys(conns, 0.0)
    ratios: list[float] = []
    names = list(conns)
    for r in range(rounds):
        rates: dict[str, float] = {}
        for name in names if r % 2 == 0 else names[::-1]:
            conn, cpu = conns[name]
            n, s, c = await round_trips(conn, cpu, in_flight, duration_s / rounds)
            done[name] += n
            secs[name] += s
            cpu_s[name] += c
            rates[name] = n / s
        ratios.append(rates["sealed"] / rates["plain"])
    for name in names:
        out[f"{name}_rps_{in_flight}"] = done[name] / secs[name]
        out[f"{name}_cpu_us_{in_flight}"] = cpu_s[name] / done[name] * 1e6
    out[f"sealed_plain_ratio_{in_flight}"] = statistics.median(ratios)


async def upload(conn: Connection, body: bytes, duration_s: float) -> float:
    async def one() -> int:
        n = await conn.call("sink", body)
        assert n == len(body)
        return len(body)

    return await timed(duration_s, 4, one) / 1e6


async def download(conn: Connection, random: bool, duration_s: float) -> float:
    loop = asyncio.get_running_loop()
    total = 0
    t0 = time.perf_counter()
    stop_at = loop.time() + duration_s
    while loop.time() < stop_at:
        args = {"n": 64, "size": MiB} if random else {"n": 64, "size": MiB, "zeros": True}
        async for item in conn.stream("stream", args):
            total += len(item)
    return total / (time.perf_counter() - t0) / 1e6


async def bulk(
    plain: bool, conn: Connection, cpu: CpuMeter, duration_s: float, out: dict[str, float]
) -> None:
    name = "plain" if plain else "sealed"
    random_body = os.urandom(MiB)
    zeros_body = bytes(MiB)
    runs: list[tuple[str, Awaitable[float]]] = [
        (f"{name}_up_random", upload(conn, random_body, duration_s)),
        (f"{name}_down_random", download(conn, True, duration_s)),
    ]
    if not plain:
        runs += [
            ("sealed_up_compressible", upload(conn, zeros_body, duration_s)),
            ("sealed_down_compressible", download(conn, False, duration_s)),
        ]
    for key, run_it in runs:
        c0, t0 = cpu.now(), time.perf_counter()
        rate = await run_it
        mb = rate * (time.perf_counter() - t0)
        out[f"{key}_mb_s"] = rate
        out[f"{key}_cpu_ms_per_mb"] = (cpu.now() - c0) / mb * 1e3


async def bench(duration_s: float, rounds: int) -> dict[str, float]:
    out: dict[str, float] = {}
    procs: list[subprocess.Popen[bytes]] = []
    conns: dict[str, tuple[Connection, CpuMeter]] = {}
    try:
        for plain in (False, True):
            proc, port = start_server(plain)
            procs.append(proc)
            conn = await open_connection(
                "127.0.0.1", port, key_id="cluster", psk=PSK, sealed=not plain
            )
            conns["plain" if plain else "sealed"] = (conn, CpuMeter(proc.pid))
        for k in IN_FLIGHT:
            await paired_round_trips(conns, k, duration_s, rounds, out)
        for plain in (False, True):
            conn, cpu = conns["plain" if plain else "sealed"]
            await bulk(plain, conn, cpu, duration_s, out)
    finally:
        for conn, _ in conns.values():
            conn.close()
        for proc in procs:
            stop_server(proc)
    out["bulk_mb_s"] = min(out["sealed_up_random_mb_s"], out["sealed_down_random_mb_s"])
    return out


def table(r: dict[str, float]) -> str:
    rows = [f"{'':28}{'sealed':>12}{'plain':>12}{'ratio':>8}"]
    for k in IN_FLIGHT:
        s, p = r[f"sealed_rps_{k}"], r[f"plain_rps_{k}"]
        ratio = r[f"sealed_plain_ratio_{k}"]
        rows.append(f"{f'round trips/s, {k} in flight':28}{s:12,.0f}{p:12,.0f}{ratio:8.2f}")
    for k in IN_FLIGHT:
        s, p = r[f"sealed_cpu_us_{k}"], r[f"plain_cpu_us_{k}"]
        rows.append(f"{f'CPU us/round trip, {k} in fl.':28}{s:12,.1f}{p:12,.1f}{s / p:8.2f}")
    for d in ("up", "down"):
        s, p = r[f"sealed_{d}_random_mb_s"], r[f"plain_{d}_random_mb_s"]
        rows.append(f"{f'1 MiB random {d}, MB/s':28}{s:12,.0f}{p:12,.0f}{s / p:8.2f}")
    for d in ("up", "down"):
        s, p = r[f"sealed_{d}_random_cpu_ms_per_mb"], r[f"plain_{d}_random_cpu_ms_per_mb"]
        rows.append(f"{f'CPU ms/MB, random {d}':28}{s:12,.2f}{p:12,.2f}{s / p:8.2f}")
    for d in ("up", "down"):
        s = r[f"sealed_{d}_compressible_mb_s"]
        rows.append(f"{f'1 MiB zeros {d}, MB/s':28}{s:12,.0f}{'-':>12}")
    rows.append(f"bulk_mb_s (min of sealed random up/down): {r['bulk_mb_s']:,.0f}")
    rows.append(
        "round trips: sealed and plain in alternating windows; the ratio is the median"
        " of the windows' ratios"
    )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description="RPC benchmark (sealed vs plain, loopback)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    p.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="alternating sealed/plain windows per in-flight level (each duration/rounds long)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    result = run(bench(args.duration, max(1, args.rounds)))
    if args.json:
        print(json.dumps({k: round(v, 3 if "ratio" in k else 1) for k, v in result.items()}))
    else:
        print(
            f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores"
        )
        print(table(result))


if __name__ == "__main__":
    main()
