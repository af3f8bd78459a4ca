"""`leptonctl`: submit and watch work, manage nodes, the cluster and tokens."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from leptond.wire.client import ClusterClient, parse_addrs
from leptond.wire.errors import RpcError

from . import commands
from .commands import UsageError
from .config import ConfigError, load
from .jobfile import JobFileError


class ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # exit code 2 and one line, like every CLI
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _out(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")


def _deadline(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--deadline",
        metavar="DURATION",
        help="e.g. 30s, 10m, 1h: then stop the tasks still running and requeue them elsewhere "
        "(without it they run to completion; a later drain replaces the deadline)",
    )


def parser() -> ArgParser:
    p = ArgParser(prog="leptonctl", description="Use a leptond cluster from the shell")
    p.add_argument("--addr", help="master RPC addresses HOST:PORT,... (env LEPTON_ADDR)")
    p.add_argument("--token", help="access token, or @FILE (env LEPTON_TOKEN)")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the cluster")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=ArgParser)

    s = sub.add_parser("submit", help="submit a job: leptonctl submit --gpus 2 -- python train.py")
    s.add_argument("-f", "--file", help="job.toml with the same fields as the flags")
    s.add_argument("--name")
    s.add_argument("--gpus", type=int)
    s.add_argument("--cpus", type=float)
    s.add_argument("--mem", help="memory per task, e.g. 8G")
    s.add_argument("--nodes", type=int, help="gang size: tasks on distinct nodes")
    s.add_argument("--priority", type=int)
    s.add_argument("--retries", type=int)
    s.add_argument("--env", action="append", default=[], metavar="K=V")
    s.add_argument("--gpu-type", help="GPU model, e.g. A100")
    s.add_argument("--gpu-mem", help="minimum memory per GPU, e.g. 40G")
    s.add_argument("--constraint", action="append", default=[], metavar="LABEL=VALUE")
    s.add_argument("--spread", action="store_true", default=None)
    s.add_argument("--no-preempt", action="store_true", default=None)
    s.add_argument("--time-limit", help="e.g. 90s, 30m, 2h")
    s.add_argument("--workdir", help="directory to send with the job")
    s.add_argument("--wait", action="store_true", help="wait and exit with the job's exit code")
    _out(s)
    s.add_argument("command", nargs=argparse.REMAINDER)

    j = sub.add_parser("jobs", help="list jobs")
    j.add_argument("-a", "--all", action="store_true", help="include old finished jobs")
    _out(j)
    st = sub.add_parser("status", help="one job in detail")
    st.add_argument("job")
    _out(st)
    c = sub.add_parser("cancel", help="cancel a job")
    c.add_argument("job")
    lg = sub.add_parser("logs", help="a task's output")
    lg.add_argument("job")
    lg.add_argument("--rank", type=int, default=0)
    lg.add_argument("-f", "--follow", action="store_true")
    q = sub.add_parser("queue", help="usage, fair share and pending work per user")
    _out(q)

    n = sub.add_parser("nodes", help="list nodes")
    _out(n)
    nd = sub.add_parser("node", help="drain, undrain or remove a node; join tokens for new ones")
    ndsub = nd.add_subparsers(dest="node_cmd", required=True, parser_class=ArgParser)
    for name in ("drain", "undrain", "rm"):
        x = ndsub.add_parser(name)
        x.add_argument("node")
        if name == "drain":
            _deadline(x)
        if name == "rm":
            x.add_argument(
                "--force", action="store_true", help="even with tasks on it (they are lost)"
            )
    jt = ndsub.add_parser("join-token", help="tokens that let a new host join (admin)")
    jtsub = jt.add_subparsers(dest="join_cmd", required=True, parser_class=ArgParser)
    jc = jtsub.add_parser(
        "create", help="print a join token for lepton-agent --join-token-file, alone"
    )
    jc.add_argument(
        "--ttl", default="1h", metavar="DURATION", help="how long it admits hosts (default 1h)"
    )
    jc.add_argument("--uses", type=int, default=1, help="how many hosts it may admit (default 1)")
    _out(jtsub.add_parser("ls"))
    jtsub.add_parser("revoke").add_argument("id")
    p_drain = sub.add_parser("drain", help="same as `node drain`")
    p_drain.add_argument("node")
    _deadline(p_drain)

    cl = sub.add_parser("cluster", help="masters and Raft")
    clsub = cl.add_subparsers(dest="cluster_cmd", required=True, parser_class=ArgParser)
    _out(clsub.add_parser("status"))
    # dest "member", not "addr": that would overwrite the global --addr (where to connect).
    clsub.add_parser("add-master").add_argument("member", metavar="HOST:RAFTPORT")
    clsub.add_parser("remove-master").add_argument("member", metavar="HOST:RAFTPORT")

    sn = sub.add_parser("snapshot", help="back up or restore the cluster state")
    snsub = sn.add_subparsers(dest="snap_cmd", required=True, parser_class=ArgParser)
    snsub.add_parser("save").add_argument("file")
    snsub.add_parser("restore").add_argument("file")

    tk = sub.add_parser("token", help="access tokens")
    tksub = tk.add_subparsers(dest="token_cmd", required=True, parser_class=ArgParser)
    tc = tksub.add_parser("create")
    tc.add_argument("--role", required=True, choices=["admin", "submit", "read"])
    tc.add_argument("--name")
    tc.add_argument(
        "--unix-user", help="the Unix account its jobs run as on the hosts (default: --name)"
    )
    _out(tksub.add_parser("ls"))
    tksub.add_parser("revoke").add_argument("id")
    return p


async def _run(args: argparse.Namespace) -> int:
    cfg = load(args.addr, args.token)
    try:
        addrs = parse_addrs(cfg.addrs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    client = ClusterClient(addrs, key_id=cfg.token.id, psk=cfg.token.psk)
    try:
        return await commands.dispatch(client, args)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "submit" and args.command and args.command[0] == "--":
        args.command = args.command[1:]
    try:
        from leptond.wire.loop import run

        return run(_run(args))
    except UsageError as exc:
        print(f"leptonctl: error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, JobFileError) as exc:
        print(f"leptonctl: {exc}", file=sys.stderr)
        return 2
    except RpcError as exc:
        print(f"leptonctl: {_explain(exc)}", file=sys.stderr)
        return 2 if exc.code == "bad_request" else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def _explain(exc: RpcError) -> str:
    if exc.code == "unauthenticated":
        return f"the cluster refused the token: {exc.message}"
    if exc.code == "unavailable":
        return f"cannot reach the cluster: {exc.message}"
    return exc.message


if __name__ == "__main__":
    sys.exit(main())
