"""etcd baseline: durable puts per second into a 3-member etcd cluster on loopback.

The raw replicated store users would otherwise put their job queue in: each
put is committed by a majority of 3 etcd members, each of which fsyncs its
WAL before it answers (etcd's default; nothing here turns that off).

etcd comes from Debian's `etcd-server` package (`apt-get install etcd-server`,
etcd 3.4); when no `etcd` binary is on PATH the benchmark prints
"skipped: etcd is not installed (apt-get install etcd-server)" (`{"skipped":
...}` with --json) and exits 0. Each member gets free loopback ports and its
own directory in a temporary data dir; every member is stopped by its pid at
the end, also after Ctrl-C, SIGTERM or an error.

The client: Python asyncio, client worker processes (like bench/submit.py's)
each holding a few connections with many puts in flight (256 in all by
default), each put a new key, for --duration seconds after a warm-up.
`--client aetcd` is the asyncio gRPC client `aetcd` (1.0; `pip install
aetcd`); `--client gateway` is a small aiohttp client of etcd's
gRPC-gateway JSON API (`POST /v3/kv/put`, base64 key and value; the prefix,
`/v3/` or `/v3beta/`, is asked of the server). `auto` (the default) takes
aetcd when it can be imported, else the gateway client; the output names the
one used.

    .venv/bin/python bench/etcd_baseline.py [--duration 20] [--procs 2] [--conns 4] [--inflight 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import free_ports  # noqa: E402

SKIPPED = "etcd is not installed (apt-get install etcd-server)"
WARMUP_S = 2.0
MEMBERS = 3
START_TIMEOUT_S = 30.0


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))]


def etcd_binary() -> str | None:
    return shutil.which("etcd")


def etcd_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split(":", 1)[-1].strip() if first else "unknown"


def pick_client(choice: str) -> str:
    if choice != "auto":
        return choice
    return "aetcd" if importlib.util.find_spec("aetcd") is not None else "gateway"


# -- the cluster ---------------------------------------------------------------------
@contextmanager
def etcd_cluster(binary: str, data_dir: Path) -> Iterator[list[str]]:
    """Three etcd members on loopback; yields their client URLs. Every member
    is stopped by pid on the way out, whatever ended the block."""
    ports = free_ports(2 * MEMBERS)
    client = [f"http://127.0.0.1:{ports[2 * i]}" for i in range(MEMBERS)]
    peer = [f"http://127.0.0.1:{ports[2 * i + 1]}" for i in range(MEMBERS)]
    initial = ",".join(f"m{i}={peer[i]}" for i in range(MEMBERS))
    # The package's /etc/default/etcd is for its own service; none of it here.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(MEMBERS):
            mdir = data_dir / f"m{i}"
            mdir.mkdir(parents=True)
            cmd = [
                binary,
                f"--name=m{i}",
                f"--data-dir={mdir / 'data'}",
                f"--listen-client-urls={client[i]}",
                f"--advertise-client-urls={client[i]}",
                f"--listen-peer-urls={peer[i]}",
                f"--initial-advertise-peer-urls={peer[i]}",
                f"--initial-cluster={initial}",
                "--initial-cluster-state=new",
                f"--initial-cluster-token=bench-{os.getpid()}",
                "--logger=zap",
                "--log-level=warn",
            ]
            with open(mdir / "etcd.log", "wb") as logf:
                procs.append(
                    subprocess.Popen(
                        cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True
                    )
                )
        _wait_healthy(client, procs, data_dir)
        yield client
    finally:
        for p in procs:
            _stop(p)


def _wait_healthy(urls: list[str], procs: list[subprocess.Popen[bytes]], data_dir: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = set(urls)
    while pending:
        for p in procs:
            if p.poll() is not None:
                log = (data_dir / f"m{procs.index(p)}" / "etcd.log").read_text(errors="replace")
                raise RuntimeError(f"etcd member exited with {p.returncode}: {log[-500:]}")
        for url in list(pending):
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if json.loads(r.read()).get("health") == "true":
                        pending.discard(url)
            except (OSError, ValueError):
                pass
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"etcd members not healthy after {START_TIMEOUT_S:g} s: {pending}")
        if pending:
            time.sleep(0.1)


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is not None:
        return
    os.kill(p.pid, signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)


def gateway_prefix(url: str) -> str:
    """`/v3/` (etcd >= 3.4) or `/v3beta/` (3.3): whichever answers a range."""
    for prefix in ("/v3/", "/v3beta/"):
        req = urllib.request.Request(
            url + prefix + "kv/range",
            data=json.dumps({"key": base64.b64encode(b"probe").decode()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                r.read()
                return prefix
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
    raise RuntimeError(f"{url} serves neither /v3/ nor /v3beta/ of the gRPC gateway")


# -- the client ----------------------------------------------------------------------
Put = Callable[[bytes, bytes], Awaitable[None]]


async def _aetcd_conn(url: str) -> tuple[Put, Callable[[], Awaitable[None]]]:
    import aetcd

    host, port = url.removeprefix("http://").rsplit(":", 1)
    cl = aetcd.Client(host=host, port=int(port), timeout=30)
    await cl.connect()

    async def put(key: bytes, value: bytes) -> None:
        await cl.put(key, value)

    return put, cl.close


async def _gateway_conn(url: str, prefix: str) -> tuple[Put, Callable[[], Awaitable[None]]]:
    import aiohttp

    # One HTTP/1.1 connection per request in flight (the gateway has no
    # pipelining); `limit=0` lets the pool open as many as are in flight.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
    )
    endpoint = url + prefix + "kv/put"

    async def put(key: bytes, value: bytes) -> None:
        body = {"key": base64.b64encode(key).decode(), "value": base64.b64encode(value).decode()}
        async with session.post(endpoint, json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"put: HTTP {r.status}: {(await r.text())[:200]}")
            await r.read()

    return put, session.close


def _worker(
    wid: int, kind: str, urls: list[str], prefix: str, conns: int, inflight: int,
    value_bytes: int, start: float, end: float, q: Any,
) -> None:  # fmt: skip
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    q.put(run(_work(wid, kind, urls, prefix, conns, inflight, value_bytes, start, end)))


async def _work(
    wid: int, kind: str, urls: list[str], prefix: str, conns: int, inflight: int,
    value_bytes: int, start: float, end: float,
) -> dict[str, Any]:  # fmt: skip
    lat: list[float] = []
    errors: list[str] = []
    value = (b"v" * value_bytes)[:value_bytes]

    async def one(put: Put, k: int) -> None:
        i = 0
        while (now := time.time()) < end:
            key = f"bench/{wid}/{k}/{i:09d}".encode()
            while True:  # the same put until acknowledged
                t0 = time.perf_counter()
                try:
                    await put(key, value)
                    break
                except Exception as exc:  # counted and retried, as submit.py does
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    if len(errors) > 1000:
                        raise
            if now >= start:
                lat.append(time.perf_counter() - t0)
            i += 1

    # Clients spread over the members, as a client given all endpoints would;
    # etcd forwards a follower's puts to its leader.
    made = [
        await (_aetcd_conn(u) if kind == "aetcd" else _gateway_conn(u, prefix))
        for u in (urls[(wid * conns + c) % len(urls)] for c in range(conns))
    ]
    try:
        await asyncio.gather(
            *(
                one(put, c * inflight + j)
                for c, (put, _) in enumerate(made)
                for j in range(inflight)
            )
        )
    finally:
        for _, close in made:
            await close()
    return {"lat": lat, "errors": len(errors), "first_error": errors[0] if errors else None}


def bench_etcd(
    duration_s: float, procs: int = 2, conns: int = 4, inflight: int = 32,
    client: str = "auto", value_bytes: int = 256,
) -> dict[str, Any]:  # fmt: skip
    """Run the baseline; `{"skipped": why}` when etcd is not installed."""
    binary = etcd_binary()
    if binary is None:
        return {"skipped": SKIPPED}
    kind = pick_client(client)
    with (
        tempfile.TemporaryDirectory(prefix="lepton-etcd-") as tmp,
        etcd_cluster(binary, Path(tmp)) as urls,
    ):
        prefix = gateway_prefix(urls[0]) if kind == "gateway" else ""
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        start = time.time() + 2.0 + WARMUP_S  # workers need ~2 s to start up
        end = start + duration_s
        ps = [
            ctx.Process(
                target=_worker,
                args=(w, kind, urls, prefix, conns, inflight, value_bytes, start, end, q),
            )
            for w in range(procs)
        ]
        for p in ps:
            p.start()
        results: list[dict[str, Any]] = []
        try:
            results = [q.get(timeout=duration_s + 120) for _ in ps]
        finally:
            # After Ctrl-C or an error the workers are not waited for.
            for p in ps:
                p.join(30 if len(results) == len(ps) else 0)
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, signal.SIGKILL)
                    p.join(10)
    lat = [x for r in results for x in r["lat"]]
    first = next((r["first_error"] for r in results if r["first_error"]), None)
    return {
        "etcd_puts": len(lat),
        "etcd_puts_per_s": round(len(lat) / duration_s, 1),
        "etcd_p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
        "etcd_p99_ms": round(pct(lat, 99) * 1000, 2) if lat else None,
        "etcd_errors": sum(r["errors"] for r in results),
        "etcd_first_error": first,
        "etcd_in_flight": procs * conns * inflight,
        "etcd_client": kind,
        "etcd_version": etcd_version(binary),
        "etcd_value_bytes": value_bytes,
    }


def _raise_on_sigterm() -> None:
    # SIGTERM unwinds like Ctrl-C, so the members are stopped by the finally blocks.
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds measured")
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--conns", type=int, default=4, help="connections per client process")
    ap.add_argument("--inflight", type=int, default=32, help="puts in flight per connection")
    ap.add_argument("--client", choices=("auto", "aetcd", "gateway"), default="auto")
    ap.add_argument("--value-bytes", type=int, default=256, help="bytes in each value")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    _raise_on_sigterm()
    try:
        r = bench_etcd(a.duration, a.procs, a.conns, a.inflight, a.client, a.value_bytes)
    except KeyboardInterrupt:
        print("interrupted: every etcd member was stopped", file=sys.stderr)
        return 130
    if "skipped" not in r:
        r["duration_s"] = a.duration
        r["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    if a.json:
        print(json.dumps(r))
        return 0
    if "skipped" in r:
        print(f"skipped: {r['skipped']}")
        return 0
    print(
        f"etcd {r['etcd_version']}, {MEMBERS} members on loopback, durable puts, "
        f"{a.duration:g} s measured after {WARMUP_S:g} s warm-up"
    )
    print(f"{'':46}{'per s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    label = f"etcd puts ({r['etcd_client']}, {r['etcd_in_flight']} in flight)"
    print(f"{label:46}{r['etcd_puts_per_s']:>10}{r['etcd_p50_ms']!s:>9}{r['etcd_p99_ms']!s:>9}")
    print(f"client errors retried: {r['etcd_errors']}; load average {r['load_avg']}")
    if r["etcd_first_error"]:
        print(f"first error: {r['etcd_first_error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
