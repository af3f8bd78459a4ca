"""Working directories to hosts: first upload, start on 2 hosts, resubmit after a change.

3 masters and 2 agents as real processes on loopback. A workdir of N files
(default 100 files, 1 GiB of random bytes) is uploaded with a 2-node gang job
whose tasks record when they start; then one 10 MiB file changes and the job
is submitted again. Baseline in the same run: copying the same tree locally
(shutil.copytree), the floor for moving those bytes on this disk.

    python bench/workdir.py [--mib 1024] [--files 100] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from leptonctl.workdir import upload_workdir  # noqa: E402
from leptond.wire.client import ClusterClient, parse_addrs  # noqa: E402
from leptond.wire.tokens import parse_token  # noqa: E402
from tests.harness import Cluster  # noqa: E402

START_PROBE = "import time,os; print('START', time.time(), flush=True)"


def make_tree(d: Path, files: int, total: int) -> None:
    d.mkdir(parents=True)
    per = total // files
    for i in range(files):
        with open(d / f"shard-{i:03d}.bin", "wb") as f:
            f.write(os.urandom(per))


async def upload(cluster: Cluster, wd: Path) -> tuple[str, dict[str, int], float]:
    tok = parse_token(cluster.admin_token)
    c = ClusterClient(parse_addrs(cluster.addrs), key_id=tok.id, psk=tok.psk)
    stats: dict[str, int] = {}
    t0 = time.perf_counter()
    try:
        mid = await upload_workdir(c, wd, timeout_s=1800, stats=stats)
    finally:
        await c.close()
    return mid, stats, time.perf_counter() - t0


async def submit(cluster: Cluster, mid: str) -> str:
    tok = parse_token(cluster.admin_token)
    c = ClusterClient(parse_addrs(cluster.addrs), key_id=tok.id, psk=tok.psk)
    try:
        spec = {"argv": [sys.executable, "-c", START_PROBE], "nodes": 2, "workdir": mid}
        res = await c.call("submit", {"spec": spec, "rid": os.urandom(8).hex()}, timeout_s=60)
        return str(res["id"])
    finally:
        await c.close()


def started_at(cluster: Cluster, job: str) -> float:
    """The later of the two tasks' own start times (as they printed them)."""
    st = cluster.wait_job(job, {"succeeded", "failed"}, timeout_s=600)
    if st["state"] != "succeeded":
        raise SystemExit(f"job {job} {st['state']}: {st.get('message')}")
    times = []
    for rank in (0, 1):
        out = cluster.ctl("logs", job, "--rank", str(rank)).stdout.split()
        times.append(float(out[out.index("START") + 1]))
    return max(times)


def run(mib: int, files: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="lepton-bench-") as tmp:
        base = Path(tmp)
        wd = base / "wd"
        make_tree(wd, files, mib << 20)
        t0 = time.perf_counter()
        shutil.copytree(wd, base / "copy")
        copy_s = time.perf_counter() - t0
        shutil.rmtree(base / "copy")

        cluster = Cluster(base / "cluster", n_masters=3, ttl_s=10)
        try:
            cluster.start_masters()
            for name in ("h1", "h2"):
                cluster.start_agent(name, gpus="1", extra=["--cache-bytes", str(4 * (mib << 20))])
            cluster.wait_nodes_ready(2, timeout_s=60)

            t_submit = time.time()
            mid, _, up_s = asyncio.run(upload(cluster, wd))
            job1 = asyncio.run(submit(cluster, mid))
            start1 = started_at(cluster, job1) - t_submit

            # Change one 10 MiB file (or the first shard when shards are smaller).
            victim = wd / "shard-000.bin"
            size = min(10 << 20, victim.stat().st_size)
            with open(victim, "r+b") as f:
                f.write(os.urandom(size))
            t_submit = time.time()
            mid2, st2, up2_s = asyncio.run(upload(cluster, wd))
            job2 = asyncio.run(submit(cluster, mid2))
            start2 = started_at(cluster, job2) - t_submit
        finally:
            cluster.close()
    total = mib << 20
    return {
        "workdir_bytes": total,
        "files": files,
        "upload_s": round(up_s, 3),
        "upload_mb_s": round(total / up_s / 1e6, 1),
        "first_start_s": round(start1, 3),
        "resubmit_bytes": st2["bytes"],
        "resubmit_blocks": st2["blocks"],
        "resubmit_upload_s": round(up2_s, 3),
        "resubmit_start_s": round(start2, 3),
        "baseline_local_copy_s": round(copy_s, 3),
        "baseline_local_copy_mb_s": round(total / copy_s / 1e6, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = run(args.mib, args.files)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"workdir: {args.files} files, {args.mib} MiB, 3 masters, 2 agents (2-node gang job)")
    print(f"  first upload        {r['upload_s']:8.2f} s   {r['upload_mb_s']:8.1f} MB/s")
    print(f"  both tasks started  {r['first_start_s']:8.2f} s after submit (upload included)")
    print(
        f"  resubmit, 1 file changed: uploaded {r['resubmit_bytes'] / 2**20:.1f} MiB in "
        f"{r['resubmit_blocks']} block(s), {r['resubmit_upload_s']:.2f} s; started {r['resubmit_start_s']:.2f} s after"
    )
    print(
        f"  baseline: local copytree {r['baseline_local_copy_s']:.2f} s ({r['baseline_local_copy_mb_s']:.1f} MB/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
