"""Reschedule time: a host's agent fails while its task runs; how long until
the task runs again on another node.

3 real masters and 2 agents (simulated GPUs) on loopback. Each repetition
submits a job with one retry whose first attempt runs until killed, then
fails the agent running it; the time is from the failure to the second
attempt's own start stamp (written by the task). The failed agent is brought
back between repetitions.

Causes (`--cause`):
- `kill`: kill -9 of the agent. Its kernel closes its connection; the leader
  reads the end and declares the node down after the confirm window plus its
  margin (`--disconnect-confirm`, agent/lease.py "Disconnects").
- `pause`: SIGSTOP of the agent (a silent host: nothing is closed); only the
  heartbeat TTL applies.
- `restart`: SIGTERM of the agent and a new one started at once on the same
  data dir (`systemctl restart`); counts the restarts whose task was kept
  (same attempt, same process) and times the gap until the new agent renewed
  the lease. The baseline is the same on a cluster with the old settings.
- `stall`: no failure. Every agent's event loop blocks for up to `--stall`
  seconds at random moments, for `--duration` seconds, each running a task;
  counts the nodes wrongly declared down and the tasks wrongly killed (the
  figure must be 0).

Baseline, same run: the same cause on a second cluster with the settings
before the fast path (TTL 10 s, `--disconnect-confirm 0`).

    .venv/bin/python bench/reschedule.py --cause kill [--reps 10] [--baseline-reps 3] [--json]
    .venv/bin/python bench/reschedule.py --cause pause [--reps 5]
    .venv/bin/python bench/reschedule.py --cause stall [--duration 600] [--stall 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.stalls import ENV as STALL_ENV  # noqa: E402
from leptond.config import MasterConfig  # noqa: E402
from tests.harness import Cluster, Proc, wait_for  # noqa: E402

DEFAULTS = MasterConfig(data_dir=Path("."), secret_file=Path("."), admin_token_file=Path("."))
# Issue 15, target 1.
TARGETS = {"kill": {"median_s": 2.0, "max_s": 3.0}, "pause": {"median_s": 5.0}}
# Before the fast path: the TTL was 10 s and only silence counted.
BASELINE = {"ttl_s": 10.0, "confirm_s": 0.0}


def stamp(p: Path) -> float | None:
    try:
        text = p.read_text().strip()
    except FileNotFoundError:
        return None
    return float(text) if text else None


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def start_cluster(tmp: Path, ttl_s: float, confirm_s: float, env: dict[str, str]) -> Cluster:
    c = Cluster(
        tmp / "cluster",
        n_masters=3,
        ttl_s=ttl_s,
        master_args=["--disconnect-confirm", str(confirm_s)],
    )
    c.start_masters()
    for name in ("r1", "r2"):
        c.start_agent(name, gpus="4", extra_env=env)
    c.wait_nodes_ready(2, timeout_s=120)
    return c


def agent_of(c: Cluster, name: str) -> Proc:
    return [a for a in c.agents if a.name == name][-1]


def one(c: Cluster, cause: str, tmp: Path, i: int) -> dict[str, Any]:
    first, second = tmp / f"rep{i}-a1", tmp / f"rep{i}-a2"
    for f in (first, second):
        f.unlink(missing_ok=True)
    script = (
        f'if [ "$LEPTON_ATTEMPT" = 1 ]; then date +%s.%N > {first}; exec sleep 600; fi; '
        f"date +%s.%N > {second}"
    )
    job = c.submit("--gpus", "1", "--retries", "1", "--", "sh", "-c", script)
    wait_for(lambda: stamp(first) or 0.0, 60, "the first attempt to start")
    host = c.status(job)["tasks"][0]["node"]
    victim = agent_of(c, host)
    failed_at = time.time()
    os.kill(victim.pid, signal.SIGKILL if cause == "kill" else signal.SIGSTOP)
    try:
        # The node's state is polled over RPC (about every 0.1 s plus a call).
        down = wait_for(
            lambda: next(
                (n for n in c.nodes() if n["name"] == host and n["state"] == "down"), None
            ),
            120,
            f"{host} to be judged down",
        )
        down_at = time.time()
        again = wait_for(lambda: stamp(second) or 0.0, 120, "the second attempt to start")
        st = c.wait_job(job, {"succeeded", "failed"})
        if st["state"] != "succeeded" or st["tasks"][0]["node"] == host:
            raise SystemExit(f"repetition {i}: unexpected outcome {st}")
    finally:
        if cause == "pause":
            os.kill(victim.pid, signal.SIGCONT)
    if cause == "kill":
        assert victim.popen is not None
        victim.popen.wait(10)
        c.agents.remove(victim)
        c.start_agent(host, gpus="4")
    wait_for(lambda: sum(n["state"] == "ready" for n in c.nodes()) == 2, 120, f"{host} to be back")
    return {"total_s": again - failed_at, "detect_s": down_at - failed_at, "reason": down["reason"]}


def run_cause(cause: str, reps: int, ttl_s: float, confirm_s: float, quiet: bool) -> dict[str, Any]:
    # Not under /tmp, which is each task's own: the tasks' stamps must reach us.
    tmp = Path(tempfile.mkdtemp(prefix="lepton-resched-", dir="/var/tmp"))
    runs: list[dict[str, Any]] = []
    c = None
    try:
        c = start_cluster(tmp, ttl_s, confirm_s, {})
        for i in range(reps):
            runs.append(one(c, cause, tmp, i))
            if not quiet:
                r = runs[-1]
                print(f"  {cause} rep {i}: {r['total_s']:.2f} s (down: {r['reason']})", flush=True)
    finally:
        if c is not None:
            c.close()
        shutil.rmtree(tmp, ignore_errors=True)
    totals = [r["total_s"] for r in runs]
    return {
        "ttl_s": ttl_s,
        "confirm_s": confirm_s,
        "reps": reps,
        "median_s": round(statistics.median(totals), 2),
        "p90_s": round(percentile(totals, 0.9), 2),
        "max_s": round(max(totals), 2),
        "samples_s": [round(t, 2) for t in totals],
        "detect_median_s": round(statistics.median(r["detect_s"] for r in runs), 2),
    }


def restart_once(c: Cluster, tmp: Path, i: int) -> dict[str, Any]:
    mark = tmp / f"restart{i}"
    mark.unlink(missing_ok=True)
    script = f"echo $$ > {mark}; exec sleep 600"
    job = c.submit("--gpus", "1", "--retries", "1", "--", "sh", "-c", script)
    wait_for(lambda: mark.exists() and mark.read_text().strip(), 60, "the task to start")
    pid = int(mark.read_text())
    host = c.status(job)["tasks"][0]["node"]
    lease_file = c.root / f"agent-{host}" / "lease.json"
    old = agent_of(c, host)
    stopped_at = time.time()
    old.stop()
    c.agents.remove(old)
    c.start_agent(host, gpus="4")

    def renewed() -> float:
        # A renewal written after the stop: only the new agent can have.
        try:
            at = float(json.loads(lease_file.read_text())["at"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0
        return at if at > stopped_at else 0.0

    renewed_at = wait_for(renewed, 120, "the new agent to renew the lease")
    wait_for(lambda: sum(n["state"] == "ready" for n in c.nodes()) == 2, 120, f"{host} to be back")
    t = c.status(job)["tasks"][0]
    kept = t["attempt"] == 1 and t["state"] == "running" and os.path.exists(f"/proc/{pid}")
    c.ctl("cancel", job)
    c.wait_job(job, {"cancelled", "failed", "succeeded"})
    return {"gap_s": renewed_at - stopped_at, "kept": kept}


def run_restart(reps: int, ttl_s: float, confirm_s: float, quiet: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="lepton-resched-", dir="/var/tmp"))
    runs: list[dict[str, Any]] = []
    c = None
    try:
        c = start_cluster(tmp, ttl_s, confirm_s, {})
        for i in range(reps):
            runs.append(restart_once(c, tmp, i))
            if not quiet:
                r = runs[-1]
                print(
                    f"  restart rep {i}: lease renewed after {r['gap_s']:.2f} s, kept {r['kept']}"
                )
    finally:
        if c is not None:
            c.close()
        shutil.rmtree(tmp, ignore_errors=True)
    gaps = [r["gap_s"] for r in runs]
    return {
        "ttl_s": ttl_s,
        "confirm_s": confirm_s,
        "reps": reps,
        "kept": sum(r["kept"] for r in runs),
        "gap_median_s": round(statistics.median(gaps), 2),
        "gap_max_s": round(max(gaps), 2),
    }


def run_stall(duration_s: float, stall_s: float, ttl_s: float, confirm_s: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="lepton-resched-", dir="/var/tmp"))
    c = None
    try:
        c = start_cluster(tmp, ttl_s, confirm_s, {STALL_ENV: str(stall_s)})
        jobs = [c.submit("--gpus", "1", "--", "sleep", str(duration_s + 600)) for _ in range(2)]
        for j in jobs:
            wait_for(lambda j=j: c.status(j)["state"] == "running", 60, "the tasks to run")
        start = time.monotonic()
        downs = 0
        while time.monotonic() - start < duration_s:
            time.sleep(0.5)
            downs = max(downs, sum(n["state"] != "ready" for n in c.nodes()))
        marked = sum(
            (c.root / f"master-{m.index}.log").read_text(errors="replace").count("marking it down")
            for m in c.masters
        )
        logs = [
            (c.root / f"agent-{n}.log").read_text(errors="replace").splitlines()
            for n in ("r1", "r2")
        ]
        stalls = [
            float(ln.split()[-1].rstrip("s"))
            for lg in logs
            for ln in lg
            if "blocking the event loop" in ln
        ]
        tasks = [c.status(j)["tasks"][0] for j in jobs]
        restarted = sum(t["attempt"] != 1 or t["state"] != "running" for t in tasks)
        for j in jobs:
            c.ctl("cancel", j)
    finally:
        if c is not None:
            c.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "duration_s": duration_s,
        "stall_max_s": stall_s,
        "ttl_s": ttl_s,
        "confirm_s": confirm_s,
        "stalls": len(stalls),
        "longest_stall_s": round(max(stalls, default=0.0), 3),
        "false_down_events": marked,
        "nodes_seen_not_ready": downs,
        "tasks_restarted": restarted,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cause", choices=("kill", "pause", "restart", "stall"), default="kill")
    ap.add_argument("--reps", type=int, default=10, help="repetitions (kill, pause)")
    ap.add_argument("--baseline-reps", type=int, default=3, help="repetitions of the baseline")
    ap.add_argument(
        "--ttl", type=float, default=DEFAULTS.heartbeat_ttl_s, help="heartbeat TTL in seconds"
    )
    ap.add_argument(
        "--disconnect-confirm",
        type=float,
        default=DEFAULTS.disconnect_confirm_s,
        help="the confirm window in seconds",
    )
    ap.add_argument("--duration", type=float, default=600.0, help="seconds (stall)")
    ap.add_argument("--stall", type=float, default=1.0, help="longest stall in seconds (stall)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    res: dict[str, Any] = {
        "bench": "reschedule",
        "cause": args.cause,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": f"{platform.node()} python {platform.python_version()}",
        "load": [round(x, 2) for x in os.getloadavg()],
    }
    if args.cause == "stall":
        new = run_stall(args.duration, args.stall, args.ttl, args.disconnect_confirm)
        res.update(new)
        res["ok"] = new["false_down_events"] == 0 and new["tasks_restarted"] == 0
        if args.json:
            print(json.dumps(res))
            return 0
        print(
            f"agents' event loops stalled {new['stalls']} times (longest {new['longest_stall_s']} s)"
            f" over {args.duration:g} s, TTL {args.ttl:g} s"
        )
        print(f"nodes declared down: {new['false_down_events']} (target 0)")
        print(f"tasks restarted: {new['tasks_restarted']}")
        print("met" if res["ok"] else "NOT met")
        return 0
    quiet = args.json
    if args.cause == "restart":
        new = run_restart(args.reps, args.ttl, args.disconnect_confirm, quiet)
        base = None
        if args.baseline_reps > 0:
            base = run_restart(args.baseline_reps, BASELINE["ttl_s"], BASELINE["confirm_s"], quiet)
        res.update(new)
        res["baseline"] = base
        res["ok"] = new["kept"] == new["reps"]
        if args.json:
            print(json.dumps(res))
            return 0
        print("SIGTERM of an agent and a new one at once: tasks kept")
        print(f"{'':34}{'new':>10}{'baseline':>10}")
        for k in ("kept", "reps", "gap_median_s", "gap_max_s"):
            print(f"{k:34}{new[k]:>10}{(base[k] if base else '-'):>10}")
        print("met (every task kept)" if res["ok"] else "NOT met")
        return 0
    new = run_cause(args.cause, args.reps, args.ttl, args.disconnect_confirm, quiet)
    base = (
        run_cause(args.cause, args.baseline_reps, BASELINE["ttl_s"], BASELINE["confirm_s"], quiet)
        if args.baseline_reps > 0
        else None
    )
    # Keys of the earlier version of this bench, for the new settings.
    res.update(
        {
            "reps": args.reps,
            "ttl_s": args.ttl,
            "confirm_s": args.disconnect_confirm,
            "median_s": new["median_s"],
            "max_s": new["max_s"],
            "p90_s": new["p90_s"],
            "samples_s": new["samples_s"],
            "baseline": base,
            "baseline_s": base["median_s"] if base else None,
            "detect_median_s": new["detect_median_s"],
            "over_ttl_median_s": round(new["median_s"] - args.ttl, 2),
        }
    )
    target = TARGETS[args.cause]
    res["target"] = target
    res["target_s"] = target["median_s"]
    res["ok"] = all(new[k] <= v for k, v in target.items())
    if args.json:
        print(json.dumps(res))
        return 0
    what = "kill -9" if args.cause == "kill" else "SIGSTOP"
    print(f"{what} of an agent -> task running elsewhere")
    print(f"{'':34}{'new':>10}{'baseline':>10}")
    print(
        f"{'settings (TTL / confirm window)':34}{args.ttl:>5g}/{args.disconnect_confirm:<4g}",
        end="",
    )
    print(f"{BASELINE['ttl_s']:>6g}/{BASELINE['confirm_s']:<4g}" if base else "")
    for k in ("median_s", "p90_s", "max_s", "detect_median_s"):
        print(f"{k:34}{new[k]:>10}{(base[k] if base else '-'):>10}")
    print(f"{'repetitions':34}{args.reps:>10}{(base['reps'] if base else '-'):>10}")
    print("targets: " + ", ".join(f"{k} <= {v:g}" for k, v in target.items()))
    print("met" if res["ok"] else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
