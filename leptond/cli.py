"""`leptond`: create a cluster's secrets, run a master, or run a dev cluster."""

from __future__ import annotations

import argparse
import grp
import logging
import os
import sys
from pathlib import Path

from .cliargs import OneLineParser, count, number
from .wire.codec import MAX_FRAME
from .wire.tokens import ADMIN_TOKEN_ID, SECRET_LEN, SecretError, new_token, write_private


def cmd_init(args: argparse.Namespace) -> int:
    """Write the cluster key and the admin token, 0600. With --group, the
    masters' group may read them (0640, and the directory 0750): the master
    unit runs as that group's user, not as root."""
    gid = None
    if args.group is not None:
        try:
            gid = grp.getgrnam(args.group).gr_gid
        except KeyError:
            print(
                f"leptond init: no group {args.group!r} on this host "
                f"(create it first: groupadd --system {args.group})",
                file=sys.stderr,
            )
            return 1
    d = Path(args.dir)
    key, tok = d / "cluster.key", d / "admin.token"
    existing = [str(p) for p in (key, tok) if p.exists()]
    if existing:
        print(f"leptond init: refusing to overwrite {', '.join(existing)}", file=sys.stderr)
        return 1
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(key, os.urandom(SECRET_LEN))
        write_private(tok, (str(new_token(ADMIN_TOKEN_ID)) + "\n").encode())
        if gid is not None:
            for path, mode in ((key, 0o640), (tok, 0o640), (d, 0o750)):
                os.chown(path, -1, gid)
                os.chmod(path, mode)
    except OSError as exc:
        print(f"leptond init: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    print(key)
    print(tok)
    return 0


def _port(v: str) -> int:
    try:
        p = int(v)
    except ValueError:
        p = -1
    if not 0 <= p < 65536:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, not {v!r}")
    return p


def _size(v: str) -> int:
    from leptonctl.jobfile import JobFileError, parse_size

    try:
        return parse_size(v)
    except JobFileError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(v: str) -> float:
    from leptonctl.jobfile import JobFileError, parse_duration

    try:
        seconds = parse_duration(v)
    except JobFileError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 0 <= seconds <= 3650 * 86400:
        raise argparse.ArgumentTypeError(f"must be from 0 to 3650d, got {v!r}")
    return seconds


def cmd_run(args: argparse.Namespace) -> int:
    from raft.errors import RaftError

    from . import gcpolicy
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
    caps: dict[str, int] = {}
    for q in args.max_priority or []:
        user, _, n = q.partition("=")
        if not user or not _is_priority(n):
            print(
                f"leptond: --max-priority takes USER=N with N from -1000 to 1000, got {q!r}",
                file=sys.stderr,
            )
            return 2
        caps[user] = int(n)
    if args.default_max_priority is not None and not _is_priority(args.default_max_priority):
        print("leptond: --default-max-priority must be from -1000 to 1000", file=sys.stderr)
        return 2
    host = args.advertise or args.bind
    if host in ("0.0.0.0", "::", ""):
        print(
            "leptond: Raft listens on --advertise (or --bind) and other masters dial it there: "
            "give this master's own address, not a wildcard",
            file=sys.stderr,
        )
        return 2
    if args.snapshot_every < 10:
        print("leptond: --snapshot-every must be at least 10 entries", file=sys.stderr)
        return 2
    if args.max_buffered_bytes < MAX_FRAME:
        print(
            f"leptond: --max-buffered-bytes must be at least {MAX_FRAME >> 20}M "
            "(one frame of the largest size)",
            file=sys.stderr,
        )
        return 2
    if args.max_connections < 16:
        print("leptond: --max-connections must be at least 16", file=sys.stderr)
        return 2
    if args.max_connections_per_key < 0:
        print("leptond: --max-connections-per-key must be 0 (no cap) or more", file=sys.stderr)
        return 2
    if args.max_pending_jobs < 0 or args.max_pending_tasks < 0:
        print(
            "leptond: --max-pending-jobs and --max-pending-tasks must not be negative",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.max_preempt_grace <= 86400:
        print("leptond: --max-preempt-grace must be from 0 to 86400 seconds", file=sys.stderr)
        return 2
    if args.audit_log_size < 1 << 20:
        print("leptond: --audit-log-size must be at least 1M", file=sys.stderr)
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
        max_preempt_grace_s=args.max_preempt_grace,
        preemption=not args.no_preemption,
        quotas=quotas,
        no_preempt=args.no_preempt_protects,
        raft_min_timeout_s=args.raft_min_timeout,
        raft_max_timeout_s=args.raft_max_timeout,
        snapshot_every=args.snapshot_every,
        block_cache_bytes=args.block_cache_bytes,
        block_cache_policy=args.block_cache_policy,
        max_priority=caps,
        default_max_priority=(
            None if args.default_max_priority is None else int(args.default_max_priority)
        ),
        max_buffered_bytes=args.max_buffered_bytes,
        max_connections=args.max_connections,
        max_connections_per_key=args.max_connections_per_key,
        block_store_bytes=args.block_store_bytes,
        upload_quota_bytes=args.upload_quota_bytes,
        min_free_disk_bytes=args.min_free_disk,
        lease_s=args.task_lease,
        lease_margin_s=args.lease_margin,
        disconnect_confirm_s=args.disconnect_confirm,
        max_heartbeats_per_s=args.max_heartbeats_per_second,
        disconnect_margin_s=args.disconnect_margin,
        allow_root_tasks=args.allow_root_tasks,
        default_mem_per_gpu=args.default_mem_per_gpu,
        fair_share_half_life_s=args.fair_share_half_life,
        default_mem_per_cpu=args.default_mem_per_cpu,
        max_pending_jobs=args.max_pending_jobs,
        max_pending_spec_bytes=args.max_pending_spec_bytes,
        max_pending_tasks=args.max_pending_tasks,
        audit_log_bytes=args.audit_log_size,
    )
    try:
        cfg.check()
    except ValueError as exc:
        print(f"leptond: {exc}", file=sys.stderr)
        return 2
    # The collector is the process's: its policy is set here, once, not by
    # Master (which tests may build in their own process).
    gc_stats = gcpolicy.install(args.gc_policy)
    try:
        master = Master(cfg, gc_stats=gc_stats)
    except SecretError as exc:
        print(f"leptond: {exc}", file=sys.stderr)
        return 1
    try:
        run(master.run_forever())
    except (OSError, RaftError) as exc:
        # RaftError: a damaged journal or snapshot, or a data dir in use;
        # its message says what to do.
        print(f"leptond: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _is_priority(text: str) -> bool:
    try:
        return -1000 <= int(text) <= 1000
    except ValueError:
        return False


def cmd_recover(args: argparse.Namespace) -> int:
    """Rewrite a stopped master's membership (README, Operations)."""
    from raft.errors import RaftError
    from raft.membership import recover_data_dir

    members = [m.strip() for m in args.members.split(",") if m.strip()]
    raft_dir = Path(args.data_dir) / "raft"
    try:
        res = recover_data_dir(raft_dir, members)
    except (RaftError, OSError) as exc:
        print(f"leptond recover: {exc}", file=sys.stderr)
        return 1
    print(
        f"recovered {raft_dir}: members {', '.join(members)}; "
        f"{res['membership_entries']} earlier membership change(s) in its log made no-ops; "
        "start the master again"
    )
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from .dev import run_dev

    return run_dev(args)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="leptond", description="leptond: a cluster manager for GPU machines")
    p.add_argument(
        "--log-level",
        default=os.environ.get("LEPTON_LOG", "info"),
        help="debug, info, warning or error (env LEPTON_LOG; default info)",
    )
    p.add_argument(
        "--version", action="version", version=f"leptond {_version()}", help="print the version"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="create a cluster secret and an admin token in DIR")
    i.add_argument("dir", help="where to write cluster.key and admin.token")
    i.add_argument(
        "--group",
        help="make the files readable by this group (the masters' user, e.g. lepton): 0640",
    )
    i.set_defaults(fn=cmd_init)
    r = sub.add_parser("run", help="run one master")
    r.add_argument("--data-dir", required=True, help="this master's state: Raft log, blocks")
    r.add_argument("--secret-file", required=True, help="cluster.key from `leptond init`")
    r.add_argument("--admin-token-file", required=True, help="admin.token from `leptond init`")
    r.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    r.add_argument("--advertise", help="address other hosts reach this master at (default: --bind)")
    r.add_argument("--rpc-port", type=_port, default=7441, help="RPC port (default 7441)")
    r.add_argument("--http-port", type=_port, default=7440, help="HTTP port (default 7440)")
    r.add_argument("--raft-port", type=_port, default=7442, help="Raft port (default 7442)")
    r.add_argument("--peers", default="", help="other masters as HOST:RAFTPORT,...")
    r.add_argument(
        "--heartbeat-ttl", type=number, default=4.0, help="seconds of silence before a node is down"
    )
    r.add_argument(
        "--task-lease",
        type=number,
        default=None,
        help="seconds a node's tasks keep running without word from the leader "
        "(default: the TTL less twice the margin)",
    )
    r.add_argument(
        "--lease-margin",
        type=number,
        default=None,
        help="seconds between a lease running out and the TTL (default: a tenth "
        "of the TTL, at most 1)",
    )
    r.add_argument(
        "--max-heartbeats-per-second",
        type=number,
        default=8000.0,
        help="heartbeats all agents together send a second, at most: past this many "
        "nodes, each agent is asked to heartbeat every nodes/rate seconds, never longer "
        "than a third of the TTL and 40%% of the task lease; 0: off (default 8000)",
    )
    r.add_argument(
        "--disconnect-confirm",
        type=number,
        default=1.0,
        help="seconds a node whose agent closed its connection (or died) has to "
        "register again before it is declared down; 0: wait for the TTL (default 1)",
    )
    r.add_argument(
        "--disconnect-margin",
        type=number,
        default=0.5,
        help="seconds added to --disconnect-confirm for the host's task supervisors "
        "to kill its tasks (default 0.5)",
    )
    r.add_argument(
        "--kill-grace", type=number, default=10.0, help="seconds between SIGTERM and SIGKILL"
    )
    r.add_argument(
        "--max-preempt-grace",
        type=number,
        default=300.0,
        metavar="SECONDS",
        help="the longest a preemption waits for a job's --preempt-grace (default 300)",
    )
    r.add_argument(
        "--no-preemption", action="store_true", help="never stop work for higher priority work"
    )
    r.add_argument(
        "--no-preempt-protects",
        choices=["within-quota", "always"],
        default="within-quota",
        help="when a job's --no-preempt holds: only while its user is within quota, or always",
    )
    r.add_argument("--quota", action="append", help="USER=GPUS, repeatable")
    r.add_argument(
        "--max-priority",
        action="append",
        metavar="USER=N",
        help="highest priority USER may submit at, repeatable (admins are not capped)",
    )
    r.add_argument(
        "--default-max-priority",
        metavar="N",
        help="highest priority for users without their own --max-priority (default: no cap)",
    )
    r.add_argument(
        "--raft-min-timeout", type=number, default=0.35, help="election timeout range, seconds"
    )
    r.add_argument(
        "--raft-max-timeout", type=number, default=0.8, help="election timeout range, seconds"
    )
    r.add_argument(
        "--snapshot-every",
        type=count,
        default=5000,
        help="Raft log entries between state snapshots (log compaction)",
    )
    r.add_argument(
        "--block-cache-bytes", type=count, default=256 << 20, help="in-memory hot block cache"
    )
    r.add_argument(
        "--block-cache-policy",
        choices=["lru", "lfu"],
        default="lru",
        help="which blocks the hot cache drops first",
    )
    r.add_argument(
        "--block-store-bytes",
        type=_size,
        default=16 << 30,
        help="workdir blocks this master keeps, in all; uploads over it are refused",
    )
    r.add_argument(
        "--upload-quota-bytes",
        type=_size,
        default=4 << 30,
        help="workdir blocks each user's uploads may hold (0: no per-user limit)",
    )
    r.add_argument(
        "--min-free-disk",
        type=_size,
        default=512 << 20,
        help="free space kept on the data disk: below it new jobs and uploads are refused",
    )
    r.add_argument(
        "--max-buffered-bytes",
        type=_size,
        default=256 << 20,
        help="RPC: bytes all connections together may hold in partly received frames "
        "(at least 16M, one largest frame)",
    )
    r.add_argument(
        "--max-connections",
        type=count,
        default=16384,
        help="RPC connections open at once (one per agent, plus clients); the open-file "
        "limit is raised to fit, up to its hard limit",
    )
    r.add_argument(
        "--max-connections-per-key",
        type=count,
        default=256,
        help="RPC connections one token or node key may hold open at once (0: no cap), so "
        "that one user cannot take every connection from the others and the agents",
    )
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
        help="memory limit per GPU for jobs with GPUs and without --mem, e.g. 32G "
        "(default 0: none; the host's limit for all its tasks applies)",
    )
    r.add_argument(
        "--default-mem-per-cpu",
        type=_size,
        default=0,
        metavar="SIZE",
        help="memory limit per CPU for jobs without --mem (and GPU jobs when there is no "
        "--default-mem-per-gpu), e.g. 4G (default 0: none; the host's limit for all its "
        "tasks applies)",
    )
    r.add_argument(
        "--max-pending-jobs",
        type=count,
        default=10_000,
        metavar="N",
        help="jobs each user may have waiting to start; more submits are refused "
        "(default 10000, 0: no cap)",
    )
    r.add_argument(
        "--max-pending-spec-bytes",
        type=_size,
        default=64 << 20,
        metavar="SIZE",
        help="bytes of job specs (commands, env) each user's waiting jobs may hold "
        "(default 64M, 0: no cap)",
    )
    r.add_argument(
        "--max-pending-tasks",
        type=count,
        default=200_000,
        metavar="N",
        help="tasks each user may have waiting to start, counting each task of an array; "
        "more submits are refused (default 200000, 0: no cap)",
    )
    r.add_argument(
        "--audit-log-size",
        type=_size,
        default=64 << 20,
        metavar="SIZE",
        help="rotate the audit log at this size, keeping four old files (default 64M)",
    )
    r.add_argument(
        "--fair-share-half-life",
        type=_duration,
        default=0.0,
        metavar="DURATION",
        help="let fair share count each user's recent usage, decayed with this half-life "
        "(e.g. 1d, like Slurm's PriorityDecayHalfLife; default 0: only what runs now)",
    )
    r.add_argument(
        "--gc-policy",
        choices=("tuned", "stock"),
        default="tuned",
        help="tuned (default): freeze what survives each full garbage collection, so pauses do "
        "not grow with the cluster's state, walking everything again when it has doubled; "
        "stock: CPython's own collector settings. /metrics shows the pauses either way",
    )
    r.set_defaults(fn=cmd_run)
    rc = sub.add_parser(
        "recover",
        help="make a stopped master's membership exactly --members, for a cluster that "
        "lost its quorum for good (like etcd's --force-new-cluster)",
    )
    rc.add_argument("--data-dir", required=True, help="the stopped master's --data-dir")
    rc.add_argument(
        "--members",
        required=True,
        help="HOST:RAFTPORT,... of the surviving masters, this one included",
    )
    rc.set_defaults(fn=cmd_recover)
    d = sub.add_parser(
        "dev",
        help="a whole cluster on this host: one master and N agents",
        description="Run one master and N agents as children of this process; "
        "Ctrl-C stops them all. An agent that dies is started again after 5s.",
    )
    d.add_argument(
        "--data-dir",
        default=".lepton-dev",
        help="where the cluster keeps its secrets, state, logs and a lock "
        "(default .lepton-dev; one dev cluster per data dir)",
    )
    d.add_argument("--agents", type=count, default=2, help="how many agents (default 2)")
    d.add_argument(
        "--simulate-gpus",
        default=None,
        metavar="N[:MODEL[:MEM]]",
        help="GPUs each agent simulates (default: the real ones NVML finds, else 2)",
    )
    d.add_argument("--rpc-port", type=_port, default=7441, help="the master's RPC port")
    d.add_argument("--http-port", type=_port, default=7440, help="the master's HTTP port")
    d.add_argument("--raft-port", type=_port, default=7442, help="the master's Raft port")
    d.add_argument(
        "--agent-http-port",
        type=_port,
        default=7443,
        help="agent dev-N serves /metrics on this port + N (default 7443; 0: none)",
    )
    d.add_argument(
        "--no-restart",
        action="store_true",
        help="leave an agent that exits stopped (default: start it again after 5s)",
    )
    d.set_defaults(fn=cmd_dev)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("leptond")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
