"""`lepton-agent run`: the host daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from pathlib import Path

from leptond.cliargs import OneLineParser, count, number
from leptond.wire.tokens import SecretError

from .cgroups import DEFAULT_TASK_PIDS_MAX


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise argparse.ArgumentTypeError(f"labels are k=v,...; got {item!r}")
        out[k.strip()] = v.strip()
    return out


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lepton-agent", description="leptond host agent")
    p.add_argument(
        "--log-level",
        default=os.environ.get("LEPTON_LOG", "info"),
        help="debug, info, warning or error (env LEPTON_LOG; default info)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the agent")
    r.add_argument("--masters", required=True, help="HOST:RPCPORT,... of the masters")
    r.add_argument(
        "--join-token-file",
        help="join token to trade for this node's credential at its first registration "
        "(`leptonctl node join-token create`); deleted once the credential is saved",
    )
    r.add_argument(
        "--data-dir", required=True, help="node id, credential, task dirs, block cache (0700)"
    )
    r.add_argument("--node-name", default="", help="name people see (default: the host name)")
    r.add_argument("--labels", type=_labels, default={}, help="K=V,... for --constraint to match")
    r.add_argument(
        "--advertise-addr", default="", help="address other hosts reach this one at (gangs)"
    )
    r.add_argument(
        "--simulate-gpus",
        default=None,
        metavar="N[:MODEL[:MEM]]",
        help="pretend to have these GPUs (for trying things out)",
    )
    r.add_argument("--heartbeat", type=number, default=1.0, help="seconds between heartbeats")
    r.add_argument(
        "--stats-every",
        type=number,
        default=10.0,
        metavar="SECONDS",
        help="host and GPU figures in one heartbeat this often; the others carry "
        "liveness, tasks and GPU faults only",
    )
    r.add_argument("--leave-on-stop", action="store_true", help="drain and deregister on SIGTERM")
    r.add_argument("--log-cap", type=count, default=64 << 20, help="bytes of output kept per task")
    r.add_argument(
        "--kill-grace", type=number, default=10.0, help="seconds between SIGTERM and SIGKILL"
    )
    r.add_argument(
        "--cache-bytes", type=count, default=10 << 30, help="disk budget of the workdir block cache"
    )
    r.add_argument(
        "--cache-policy",
        choices=["lru", "lfu"],
        default="lru",
        help="which blocks the cache drops first",
    )
    r.add_argument(
        "--cgroups",
        choices=["auto", "v1", "v2", "off"],
        default="auto",
        help="per-task cgroups with enforced limits (auto: v2 where usable, else v1); "
        "off runs tasks without enforced memory, CPU and pids limits",
    )
    r.add_argument(
        "--http-port",
        type=_port,
        default=7443,
        help="port of the agent's /metrics and /healthz (default 7443; 0: none)",
    )
    r.add_argument(
        "--http-bind",
        default="0.0.0.0",
        help="address the agent's HTTP port listens on (default 0.0.0.0)",
    )
    r.add_argument(
        "--task-pids-max",
        type=_positive_int,
        default=DEFAULT_TASK_PIDS_MAX,
        help="most processes and threads one task may have at once",
    )
    r.add_argument(
        "--tasks-mem-max",
        type=_size,
        default=0,
        metavar="SIZE",
        help="memory all tasks on this host may use together, and the limit of a task "
        "without --mem, e.g. 200G (default: the host's memory less 10%%, at least 1G "
        "and at most 8G kept for the system); also what the node offers the scheduler",
    )
    r.add_argument(
        "--task-retention",
        type=_duration,
        default=86400.0,
        metavar="DURATION",
        help="how long a finished task's output and working directory are kept after "
        "the leader has its exit, e.g. 30m, 12h, 7d (default 1d)",
    )
    r.add_argument(
        "--disk-reserve",
        type=_size,
        default=None,
        metavar="SIZE",
        help="free space kept on the data dir's disk, e.g. 20G: under it the task whose "
        "files take the most there is stopped (evicted) and the node takes no new task "
        "until space is back (default: 5%% of the disk, at least 1G, at most 10G and a quarter of it); "
        "free inodes are watched the same way, against 5%% of the disk's inodes (at least 10,000, "
        "at most 1,000,000)",
    )
    r.add_argument(
        "--keep-visible",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory under /tmp or /dev/shm that tasks still see at its path "
        "through their private /tmp and /dev/shm (a shared scratch or software "
        "directory); repeatable",
    )
    return p


def _port(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {v!r}") from None
    if not 0 <= n < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {v}")
    return n


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(v: str) -> int:
    """'200G', '512M', '1.5GiB' or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT](?:i?[bB])?|[bB])?\s*", v)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {v!r} (try 200G or 512M)")
    unit = (m.group(2) or "").lower()[:1]
    n = int(float(m.group(1)) * _UNITS.get(unit, 1))
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {v!r}")
    return n


def _duration(v: str) -> float:
    """'90', '90s', '30m', '12h' or '7d' in seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", v)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {v!r} (try 30m, 12h or 7d)")
    s = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if s <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0s, got {v!r}")
    return s


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {v!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _reserve_over_disk(data_dir: Path, reserve: int | None) -> str | None:
    """Why a reserve given is no good: one the size of the data dir's whole
    disk or more would hold the node full for ever and evict every task."""
    if reserve is None:
        return None
    where = data_dir.absolute()
    while not where.exists():  # the data dir may not be made yet
        where = where.parent
    st = os.statvfs(where)
    total = st.f_blocks * st.f_frsize
    if reserve < total:
        return None
    return (
        f"{reserve} bytes is not less than the whole disk under {where} ({total} bytes): "
        "the node would never take a task"
    )


async def _main(args: argparse.Namespace) -> int:
    from .cgroup_task import CgroupError
    from .daemon import Agent, AgentConfig
    from .probes import parse_simulate_spec

    if args.simulate_gpus is not None:
        try:
            parse_simulate_spec(args.simulate_gpus)
        except ValueError as exc:
            print(f"lepton-agent: --simulate-gpus: {exc}", file=sys.stderr)
            return 2
    if not 0.05 <= args.heartbeat <= 60:
        # 0 would heartbeat in a hot loop; past a minute every TTL has passed.
        print("lepton-agent: --heartbeat must be between 0.05 and 60 seconds", file=sys.stderr)
        return 2
    if not 0 <= args.stats_every <= 3600:
        print("lepton-agent: --stats-every must be between 0 and 3600 seconds", file=sys.stderr)
        return 2
    keep = tuple(Path(k) for k in args.keep_visible)
    bad = next((k for k in keep if not k.is_absolute() or not k.is_dir()), None)
    if bad is not None:
        print(
            f"lepton-agent: --keep-visible: {str(bad)!r} is not an absolute path to a directory",
            file=sys.stderr,
        )
        return 2
    too_big = _reserve_over_disk(Path(args.data_dir), args.disk_reserve)
    if too_big is not None:
        print(f"lepton-agent: --disk-reserve: {too_big}", file=sys.stderr)
        return 2
    cfg = AgentConfig(
        masters=args.masters,
        join_token_file=Path(args.join_token_file) if args.join_token_file else None,
        data_dir=Path(args.data_dir),
        node_name=args.node_name,
        labels=args.labels,
        advertise_addr=args.advertise_addr,
        simulate_gpus=args.simulate_gpus,
        heartbeat_s=args.heartbeat,
        stats_s=args.stats_every,
        leave_on_stop=args.leave_on_stop,
        log_cap_bytes=args.log_cap,
        kill_grace_s=args.kill_grace,
        cache_bytes=args.cache_bytes,
        cache_policy=args.cache_policy,
        cgroups=args.cgroups,
        task_pids_max=args.task_pids_max,
        http_port=args.http_port,
        http_bind=args.http_bind,
        tasks_mem_max=args.tasks_mem_max,
        task_retention_s=args.task_retention,
        disk_reserve_bytes=args.disk_reserve,
        keep_visible=keep,
    )
    try:
        agent = Agent(cfg)
    except (SecretError, ValueError) as exc:
        print(f"lepton-agent: {exc}", file=sys.stderr)
        return 1
    except CgroupError as exc:
        print(
            f"lepton-agent: cannot set up task cgroups: {exc} "
            "(--cgroups off runs tasks without enforced limits)",
            file=sys.stderr,
        )
        return 1
    try:
        await agent.start_http()
    except OSError as exc:
        print(
            f"lepton-agent: cannot serve /metrics on {args.http_bind}:{args.http_port}: "
            f"{exc.strerror or exc} (--http-port picks another port, 0 none)",
            file=sys.stderr,
        )
        agent.runner.close()
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_stop)
    await agent.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from leptond.wire.loop import run

    return run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
