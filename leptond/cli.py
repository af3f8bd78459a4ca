"""`leptond`: create a cluster's secrets, run a master, or run a dev cluster."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .wire.tokens import ADMIN_TOKEN_ID, SECRET_LEN, SecretError, new_token, write_private


def cmd_init(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    key, tok = d / "cluster.key", d / "admin.token"
    existing = [str(p) for p in (key, tok) if p.exists()]
    if existing:
        print(f"leptond init: refusing to overwrite {', '.join(existing)}", file=sys.stderr)
        return 1
    write_private(key, os.urandom(SECRET_LEN))
    write_private(tok, (str(new_token(ADMIN_TOKEN_ID)) + "\n").encode())
    print(key)
    print(tok)
    return 0


def _port(v: str) -> int:
    p = int(v)
    if not 0 <= p < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {v}")
    return p


def _size(v: str) -> int:
    from leptonctl.jobfile import JobFileError, parse_size

    try:
        return parse_size(v)
    except JobFileError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_run(args: argparse.Namespace) -> int:
    from .config import MasterConfig
    from .master import Master
    from .wire.loop import run

    peers = tuple(p.strip() for p in (args.peers or "").split(",") if p.strip())
    quotas: dict[str, int] = {}
    for q in args.quota or []:
        user, _, n = q.partition("=")
        if not user or not n.isdigit():
            print(f"leptond: --quota takes USER=GPUS, got {q!r}", file=sys.stderr)
            return 2
        quotas[user] = int(n)
    if args.snapshot_every < 10:
        print("leptond: --snapshot-every must be at least 10 entries", file=sys.stderr)
        return 2
    if not 0.3 < args.raft_min_timeout < args.raft_max_timeout:
        print("leptond: need 0.3 < --raft-min-timeout < --raft-max-timeout", file=sys.stderr)
        return 2
    cfg = MasterConfig(
        data_dir=Path(args.data_dir),
        secret_file=Path(args.secret_file),
        admin_token_file=Path(args.admin_token_file),
        bind=args.bind,
        advertise=args.advertise or "",
        rpc_port=args.rpc_port,
        http_port=args.http_port,
        raft_port=args.raft_port,
        peers=peers,
        heartbeat_ttl_s=args.heartbeat_ttl,
        kill_grace_s=args.kill_grace,
        preemption=not args.no_preemption,
        quotas=quotas,
        no_preempt=args.no_preempt_protects,
        raft_min_timeout_s=args.raft_min_timeout,
        raft_max_timeout_s=args.raft_max_timeout,
        snapshot_every=args.snapshot_every,
        block_cache_bytes=args.block_cache_bytes,
        block_cache_policy=args.block_cache_policy,
        allow_root_tasks=args.allow_root_tasks,
        default_mem_per_gpu=args.default_mem_per_gpu,
    )
    try:
        master = Master(cfg)
    except SecretError as exc:
        print(f"leptond: {exc}", file=sys.stderr)
        return 1
    try:
        run(master.run_forever())
    except OSError as exc:
        print(f"leptond: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from .dev import run_dev

    return run_dev(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leptond", description="leptond: a cluster manager for GPU machines"
    )
    p.add_argument("--log-level", default=os.environ.get("LEPTON_LOG", "info"))
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="create a cluster secret and an admin token in DIR")
    i.add_argument("dir")
    i.set_defaults(fn=cmd_init)
    r = sub.add_parser("run", help="run one master")
    r.add_argument("--data-dir", required=True)
    r.add_argument("--secret-file", required=True)
    r.add_argument("--admin-token-file", required=True)
    r.add_argument("--bind", default="127.0.0.1")
    r.add_argument("--advertise", help="address other hosts reach this master at (default: --bind)")
    r.add_argument("--rpc-port", type=_port, default=7441)
    r.add_argument("--http-port", type=_port, default=7440)
    r.add_argument("--raft-port", type=_port, default=7442)
    r.add_argument("--peers", default="", help="other masters as HOST:RAFTPORT,...")
    r.add_argument(
        "--heartbeat-ttl", type=float, default=10.0, help="seconds of silence before a node is down"
    )
    r.add_argument(
        "--kill-grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL"
    )
    r.add_argument("--no-preemption", action="store_true")
    r.add_argument(
        "--no-preempt-protects",
        choices=["within-quota", "always"],
        default="within-quota",
        help="when a job's --no-preempt holds: only while its user is within quota, or always",
    )
    r.add_argument("--quota", action="append", help="USER=GPUS, repeatable")
    r.add_argument(
        "--raft-min-timeout", type=float, default=0.35, help="election timeout range, seconds"
    )
    r.add_argument("--raft-max-timeout", type=float, default=0.8)
    r.add_argument(
        "--snapshot-every",
        type=int,
        default=5000,
        help="Raft log entries between state snapshots (log compaction)",
    )
    r.add_argument(
        "--block-cache-bytes", type=int, default=256 << 20, help="in-memory hot block cache"
    )
    r.add_argument("--block-cache-policy", choices=["lru", "lfu"], default="lru")
    r.add_argument(
        "--allow-root-tasks",
        action="store_true",
        help="let tasks run as uid 0 (tokens mapped to root, such as the admin token)",
    )
    r.add_argument(
        "--default-mem-per-gpu",
        type=_size,
        default=0,
        metavar="SIZE",
        help="memory limit per GPU for jobs without --mem, e.g. 32G (default 0: none)",
    )
    r.set_defaults(fn=cmd_run)
    d = sub.add_parser("dev", help="a whole cluster on this host: one master and N agents")
    d.add_argument("--data-dir", default=".lepton-dev")
    d.add_argument("--agents", type=int, default=2)
    d.add_argument(
        "--simulate-gpus", default=None, help="N[:MODEL[:MEM]] per agent (default: NVML, else 2)"
    )
    d.add_argument("--rpc-port", type=_port, default=7441)
    d.add_argument("--http-port", type=_port, default=7440)
    d.add_argument("--raft-port", type=_port, default=7442)
    d.set_defaults(fn=cmd_dev)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
