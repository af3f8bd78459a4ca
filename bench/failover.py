"""Leader failover: seconds from kill -9 of the leader to the next acknowledged write.

Three real `leptond run` masters on 127.0.0.1. One client submits 1-task jobs in
a tight loop through ClusterClient (which follows the leader). The leader is
killed with SIGKILL N times; after each kill the killed master is restarted
and the bench waits until it is back before the next kill, so every kill
leaves a quorum. For each kill: time to the first write acknowledged by a
master other than the killed one, and (from the master logs) time until the
new leader announced itself. Baselines beside it: the Raft election timeout
range the masters run with, and (unless --no-baseline) the same kills on a
second cluster as the masters were before: followers wait for their election
timeout when the leader's connection ends (RaftNode's fast_election=False),
and reconnect to a peer once a second.

    .venv/bin/python bench/failover.py [--kills 20] [--raft-timeouts MIN,MAX] [--no-baseline] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from leptond.config import MasterConfig  # noqa: E402
from leptond.wire.errors import RpcError  # noqa: E402
from tests.cp_support import SPEC, client, rpc  # noqa: E402
from tests.harness import Cluster, Master, wait_for  # noqa: E402

TARGET_P99_S = 1.0  # issue 15, target 4
BECAME_LEADER = re.compile(r"^(\S+ \S+) INFO lepton\.master: became leader")


class Writer:
    """One client in a tight submit loop; records (ack time, master that acked)."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.acks: list[tuple[float, str]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        cl = client(self.c.addrs, self.c.admin_token)
        i = 0
        try:
            while not self._stop.is_set():
                rid = f"failover-{i:09d}"
                while not self._stop.is_set():  # same rid until acknowledged
                    try:
                        await cl.call("submit", {"spec": SPEC, "rid": rid}, timeout_s=30)
                    except RpcError:
                        self.errors += 1
                        continue
                    cur = cl.current
                    self.acks.append((time.monotonic(), f"{cur[0]}:{cur[1]}" if cur else ""))
                    break
                i += 1
        finally:
            await cl.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def first_ack_after(self, t: float, not_from: str, timeout_s: float = 60) -> float:
        def find() -> float | None:
            hits = [at for at, addr in self.acks if at > t and addr != not_from]
            return min(hits) if hits else None

        return float(wait_for(find, timeout_s, "a write acknowledged by the new leader", 0.01))


def became_leader_times(log: Path) -> list[float]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = BECAME_LEADER.match(line)
        if m:
            out.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return out


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))
    return s[k]


# `leptond run` has no flags for the Raft timeouts or the fast election; to
# try other values the bench starts masters through this wrapper, which
# overrides what MasterConfig hands to RaftNode and then runs the normal
# `leptond` entry point.
LAUNCHER = """
import sys
import leptond.master as m
_raft_node = m.RaftNode
def raft_node(*a, **k):
    k.update({overrides!r})
    return _raft_node(*a, **k)
m.RaftNode = raft_node
from leptond.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(kills: int, timeouts: tuple[float, float] | None, fast: bool = True) -> dict[str, Any]:
    cfg = MasterConfig(Path("."), Path("."), Path("."))
    lo, hi = timeouts or (cfg.raft_min_timeout_s, cfg.raft_max_timeout_s)
    # The baseline is the code before: no fast election, and a reconnect to
    # a peer once a second (MasterConfig.raft_connection_retry_s).
    overrides: dict[str, Any] = {} if fast else {"fast_election": False, "connection_retry_s": 1.0}
    if timeouts is not None:
        overrides.update(raft_min_timeout_s=lo, raft_max_timeout_s=hi)
    with tempfile.TemporaryDirectory(prefix="lepton-failover-") as tmp:
        c = Cluster(Path(tmp) / "cluster", n_masters=3)
        try:
            if not overrides:
                c.start_masters(timeout_s=60)
            else:
                peers = [m.raft_addr for m in c.masters]
                for m in c.masters:
                    argv = c._master_argv(m, peers)
                    assert argv[1:3] == ["-m", "leptond.cli"], argv
                    launcher = LAUNCHER.format(overrides=overrides)
                    m.proc.argv = [argv[0], "-c", launcher, *argv[3:]]
                    m.proc.start()
                c.wait_leader(60)
            w = Writer(c)
            w.start()
            wait_for(lambda: len(w.acks) > 20, 60, "writes flowing")
            to_ack: list[float] = []
            to_leader: list[float] = []
            for _ in range(kills):
                old: Master = c.wait_leader(60)
                n_before = len(w.acks)
                wait_for(lambda n=n_before: len(w.acks) > n + 5, 30, "writes to the leader")
                wall, mono = time.time(), time.monotonic()
                old.proc.kill9()
                t_ack = w.first_ack_after(mono, old.rpc_addr)
                to_ack.append(t_ack - mono)
                new = c.wait_leader(60, not_=old)
                elected = [t for t in became_leader_times(new.proc.log) if t >= wall]
                if elected:
                    to_leader.append(min(elected) - wall)
                old.proc.start()
                wait_for(
                    lambda old=old: rpc(old.rpc_addr, c.admin_token, "cluster_status")["leader"],
                    60,
                    f"master-{old.index} back",
                )
            w.stop()
        finally:
            c.close()
    return {
        "kills": kills,
        "p50_s": round(statistics.median(to_ack), 3),
        "p99_s": round(pct(to_ack, 99), 3),
        "max_s": round(max(to_ack), 3),
        "leader_p50_s": round(statistics.median(to_leader), 3) if to_leader else None,
        "leader_p99_s": round(pct(to_leader, 99), 3) if to_leader else None,
        "raft_min_timeout_s": lo,
        "raft_max_timeout_s": hi,
        "fast_election": fast,
        "target_p99_s": TARGET_P99_S,
        "samples_s": [round(x, 3) for x in to_ack],
        "client_errors": w.errors,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument(
        "--raft-timeouts",
        metavar="MIN,MAX",
        help="election timeout range to try instead of MasterConfig's (MIN > 0.3 s)",
    )
    ap.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the second cluster without the fast election",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    timeouts = None
    if a.raft_timeouts:
        lo, hi = (float(x) for x in a.raft_timeouts.split(","))
        timeouts = (lo, hi)
    r = run(a.kills, timeouts)
    base = None if a.no_baseline else run(a.kills, timeouts, fast=False)
    r["baseline"] = base
    r["ok"] = r["p99_s"] <= TARGET_P99_S
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"leader failover, 3 masters, {r['kills']} x kill -9 of the leader")
    print(f"{'':44}{'p50':>8}{'p99':>8}{'max':>8}")
    rows = [("", r)] + ([(" (baseline: no fast election)", base)] if base else [])
    for label, x in rows:
        name = f"kill -> first acked write{label}"
        print(f"{name:44}{x['p50_s']:>8}{x['p99_s']:>8}{x['max_s']:>8}")
        if x["leader_p50_s"] is not None:
            name = f"kill -> new leader serving{label}"
            print(f"{name:44}{x['leader_p50_s']:>8}{x['leader_p99_s']:>8}")
    print(
        f"baseline: raft election timeout {r['raft_min_timeout_s']}-{r['raft_max_timeout_s']} s"
        f" (a follower waits this long without a heartbeat before it stands); "
        f"target p99 <= {r['target_p99_s']} s"
    )
    print("samples:", " ".join(f"{x:.2f}" for x in r["samples_s"]))
    if base:
        print("baseline samples:", " ".join(f"{x:.2f}" for x in base["samples_s"]))
    print("met" if r["ok"] else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
