"""The leader's own CPU per agent heartbeat, in one process, without sockets.

What bench/heartbeats.py measures end to end (real processes on loopback)
includes the kernel, the event loop's reads and writes and, on a shared
machine, whatever other load does to them. This isolates the leader's
Python side of one heartbeat: N sealed agent connections (the real
`Connection`, after a real handshake) to the real `AgentRegistry.heartbeat`
(behind `RpcStats`, as the master serves it) over a real `ClusterState` of N
registered nodes. Each connection is fed sealed heartbeat frames as an agent
seals them (sealed beforehand, not counted); what the server writes is
counted, not sent. CPU time (process_time) per heartbeat, best of --repeat
rounds, for:

- inline: the handler as the master runs it, a plain function answered in
  the read that brought the request;
- task (baseline, same run): the same handler behind an `async def`, which
  the connection serves as its own asyncio task, as every request was
  served before plain-function handlers were answered inline.

    .venv/bin/python bench/heartbeat_path.py [--nodes 2000] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from leptond.agents import AgentRegistry  # noqa: E402
from leptond.clock import REAL  # noqa: E402
from leptond.config import MasterConfig  # noqa: E402
from leptond.liveness import NodeLiveness  # noqa: E402
from leptond.rpcstats import RpcStats  # noqa: E402
from leptond.wire.codec import encode_body  # noqa: E402
from leptond.wire.connection import Connection, Handler  # noqa: E402
from leptond.wire.loop import run  # noqa: E402
from raft.commands import encode  # noqa: E402
from raft.state import ClusterState  # noqa: E402
from raft.validate import validate_node  # noqa: E402
from raft.view import Publisher  # noqa: E402

PSK = b"p" * 32
BEATS_PER_ROUND = 5


def describe(i: int) -> dict[str, Any]:
    gpus = [
        {"index": g, "uuid": f"GPU-{i:08d}-{g}", "model": "Simulated H100", "mem_bytes": 80 << 30}
        for g in range(8)
    ]
    return {
        "id": f"n-sim{i:06d}",
        "name": f"sim-{i:05d}",
        "addr": "127.0.0.1",
        "cpus": 64.0,
        "mem_bytes": 512 << 30,
        "gpus": gpus,
    }


class Pipe(asyncio.Transport):
    """One side's transport: what it writes is kept for the other side
    (`deliver`), or only counted once `counting` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[bytes] = []
        self.counting = False
        self.writes = 0
        self.closing = False

    def write(self, data: Any) -> None:
        self.writes += 1
        if not self.counting:
            self.pending.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def deliver(self, to: Connection) -> bool:
        out, self.pending = self.pending, []
        for data in out:
            to.data_received(data)
        return bool(out)


class Agent:
    """A server-side connection after a real sealed handshake, and the
    client side that seals frames for it."""

    def __init__(self, handlers: dict[str, Handler], node_id: str) -> None:
        self.server = Connection(
            is_client=False, handlers=handlers, psk_lookup=lambda k: PSK if k == "node" else None
        )
        self.client = Connection(is_client=True, psk=PSK, key_id="node")
        self.to_server, self.to_client = Pipe(), Pipe()
        self.server.connection_made(self.to_client)
        self.client.connection_made(self.to_server)
        self.node_id = node_id
        self.i = 0

    async def handshake(self) -> None:
        """Pass the hellos back and forth until both sides are ready (replies
        may wait for the loop's next turn)."""
        for _ in range(100):
            if self.server.ready.done() and self.client.ready.done() and not self.to_server.pending:
                break
            if not (self.to_server.deliver(self.server) | self.to_client.deliver(self.client)):
                await asyncio.sleep(0)
        else:
            raise RuntimeError("the in-memory handshake did not complete")
        self.server.context.update(role="node", user=self.node_id, node_id=self.node_id)
        self.to_client.counting = True

    def frames(self, n: int, body: dict[str, Any]) -> list[bytes]:
        """`n` sealed heartbeat requests, in the order the server must read them."""
        sealer = self.client._sealer
        assert sealer is not None
        out = []
        for _ in range(n):
            self.i += 1
            msg = {"t": "q", "i": self.i, "m": "heartbeat", "a": body}
            out.append(bytes(sealer.seal_frame(encode_body(msg))))
        return out


def registry(n: int, tmp: Path) -> AgentRegistry:
    state = ClusterState()
    for i in range(n):
        state.apply(
            encode("register_node", {"node": validate_node(describe(i)), "now": 1.0}), i + 1
        )
    cfg = MasterConfig(data_dir=tmp, secret_file=tmp / "secret", admin_token_file=tmp / "admin")

    class Gate:
        def ensure_leader(self) -> None:
            pass

    return AgentRegistry(
        cfg,
        None,  # type: ignore[arg-type]  # heartbeats propose nothing
        Publisher(state, threading.RLock()),
        Gate(),  # type: ignore[arg-type]
        NodeLiveness(REAL),
        lambda window_s: True,
        REAL,
    )


async def measure(handler: Handler, n: int, repeat: int) -> tuple[float, int]:
    """Best per-heartbeat CPU microseconds over `repeat` rounds, and the
    server's writes per heartbeat * 1000 (one reply, one write each)."""
    handlers = RpcStats().wrap({"heartbeat": handler})
    agents = [Agent(handlers, describe(i)["id"]) for i in range(n)]
    for a in agents:
        await a.handshake()
    bare = {"running": [], "exited": []}
    best = float("inf")
    writes0 = sum(a.to_client.writes for a in agents)
    for _ in range(repeat):
        frames = [a.frames(BEATS_PER_ROUND, bare) for a in agents]
        t0 = time.process_time()
        for k in range(BEATS_PER_ROUND):
            for a, f in zip(agents, frames, strict=True):
                a.server.data_received(f[k])
            # Replies of task-served requests are sent when their tasks run.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        best = min(best, (time.process_time() - t0) / (n * BEATS_PER_ROUND))
    writes = sum(a.to_client.writes for a in agents) - writes0
    for a in agents:
        a.server.connection_lost(None)
        a.client.connection_lost(None)
    return best * 1e6, round(1000 * writes / (n * BEATS_PER_ROUND * repeat))


async def bench(n: int, repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lepton-hbpath-") as tmp:
        reg = registry(n, Path(tmp))

        async def as_task(conn: Connection, a: Any) -> dict[str, Any]:
            return reg.heartbeat(conn, a)

        task_us, task_writes = await measure(as_task, n, repeat)
        inline_us, inline_writes = await measure(reg.heartbeat, n, repeat)
        task_us2, _ = await measure(as_task, n, repeat)
    return {
        "bench": "heartbeat_path",
        "nodes": n,
        "inline_us_per_heartbeat": round(inline_us, 2),
        "task_us_per_heartbeat": round(min(task_us, task_us2), 2),
        "speedup": round(min(task_us, task_us2) / inline_us, 2),
        "writes_per_1000_heartbeats": {"inline": inline_writes, "task": task_writes},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2000, help="registered nodes and connections")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; the best is reported")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if args.nodes < 1 or args.repeat < 1:
        print("heartbeat_path: --nodes and --repeat must be positive", file=sys.stderr)
        return 2
    res = run(bench(args.nodes, args.repeat))
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"leader CPU per heartbeat, its Python side, {args.nodes} sealed agent connections")
    print(f"{'inline (plain-function handler)':36}{res['inline_us_per_heartbeat']:>8} us")
    print(f"{'task per request (baseline)':36}{res['task_us_per_heartbeat']:>8} us")
    print(f"{'speedup':36}{res['speedup']:>8}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
