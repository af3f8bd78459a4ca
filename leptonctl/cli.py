"""`leptonctl`: submit and watch work, manage nodes, the cluster and tokens."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from leptond.cliargs import OneLineParser
from leptond.client import AsyncClient
from leptond.client.config import ConfigError
from leptond.wire.errors import RpcError

from . import commands
from .jobfile import JobFileError
from .jobs import UsageError
from .output import say


def _out(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default="table",
        help="table for people (default) or json for scripts",
    )


def _deadline(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--deadline",
        metavar="DURATION",
        help="e.g. 30s, 10m, 1h: then stop the tasks still running and requeue them elsewhere "
        "(without it they run to completion; a later drain replaces the deadline)",
    )


def _count(what: str, lo: int, hi: int) -> Any:
    """An argparse type: a whole number from lo to hi, or one clear line."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be a whole number, got {text!r}"
            ) from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be from {lo} to {hi}, got {text}")
        return n

    return parse


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < v <= 1e6:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return v


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("leptond")
    except PackageNotFoundError:
        return "unknown (not installed)"


JOB_STATES = ["pending", "running", "succeeded", "failed", "cancelled"]


def _submit(sub: Any) -> None:
    s = sub.add_parser(
        "submit",
        help="submit a job: leptonctl submit --gpus 2 -- python train.py",
        description="Submit a job; its flags go before the command, the command after --.",
    )
    _job_flags(s)
    s.add_argument(
        "--wait",
        action="store_true",
        help="stream the job's output (rank 0, or every rank with --all) until it ends, "
        "then exit with its exit code",
    )
    s.add_argument(
        "--all",
        action="store_true",
        help="with --wait: every rank's output, each line prefixed [rN]",
    )
    s.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="with --wait: print only the job id, show no output",
    )
    _out(s)
    _command(s)


def _run_parser(sub: Any) -> None:
    r = sub.add_parser(
        "run",
        help="run a job and attach to it: leptonctl run --gpus 1 -it -- bash",
        description="Place a job like submit, wait for it to start and attach this terminal "
        "to it (with -t, on a terminal of its own on the host); the job ends when the "
        "session does. Exits with the job's exit code.",
    )
    _job_flags(r)
    _session_flags(r)
    _command(r)


def _exec_parser(sub: Any) -> None:
    e = sub.add_parser(
        "exec",
        help="run a command inside a running task: leptonctl exec JOB -it -- bash",
        description="Run a command in a running task's environment: as its user, in its "
        "cgroup, namespaces and GPUs. Exits with the command's exit code.",
    )
    e.add_argument("job", help="the job id")
    e.add_argument("--rank", type=_count("--rank", 0, 1 << 20), help="which task (default 0)")
    _session_flags(e)
    _command(e)


def _session_flags(p: Any) -> None:
    p.add_argument(
        "-i", "--interactive", action="store_true", help="send this terminal's input (with -t)"
    )
    p.add_argument(
        "-t", "--tty", action="store_true", help="a terminal on the host: window size, Ctrl-C"
    )


def _command(p: Any) -> None:
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="the command and its arguments, after --",
    )


def _job_flags(s: Any) -> None:
    """The flags of a job's spec, shared by submit and run."""
    s.add_argument("-f", "--file", help="job.toml with the same fields as the flags")
    s.add_argument("--name", help="a name for the job (letters, digits, . _ -)")
    s.add_argument(
        "--gpus",
        type=_count("--gpus", 0, 1024),
        help="GPUs per node, that is per task (Slurm's --gpus is per job): "
        "--nodes 2 --gpus 4 uses 8 GPUs on 2 nodes",
    )
    s.add_argument("--cpus", type=float, help="CPUs per task (default 1)")
    s.add_argument("--mem", help="memory per task, e.g. 8G")
    s.add_argument(
        "--nodes",
        type=_count("--nodes", 1, 1024),
        help="gang size: one task on each of N distinct nodes, started together",
    )
    s.add_argument(
        "--priority",
        type=_count("--priority", -1000, 1000),
        help="-1000 to 1000; higher runs first and may preempt lower (default 0)",
    )
    s.add_argument(
        "--retries",
        type=_count("--retries", 0, 100),
        help="times a failed task runs again (default 0)",
    )
    s.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="an environment variable for the tasks (repeatable)",
    )
    s.add_argument("--gpu-type", help="GPU model, e.g. A100")
    s.add_argument("--gpu-mem", help="minimum memory per GPU, e.g. 40G")
    s.add_argument(
        "--constraint",
        action="append",
        default=[],
        metavar="LABEL=VALUE",
        help="run only on nodes with this label (repeatable)",
    )
    s.add_argument(
        "--spread",
        action="store_true",
        default=None,
        help="prefer emptier nodes over packing (default: pack)",
    )
    s.add_argument(
        "--no-preempt",
        action="store_true",
        default=None,
        help="higher-priority work may not preempt this job",
    )
    s.add_argument("--time-limit", help="stop the tasks after this long, e.g. 90s, 30m, 2h")
    s.add_argument(
        "--signal",
        metavar="NAME@DURATION",
        help="warn the tasks with this signal DURATION before their time limit, a drain "
        "deadline or a preemption, e.g. USR1@120s; a task that exits 0 after it, or "
        "exits 85 at any time, runs again without spending a retry (LEPTON_RESTART_COUNT)",
    )
    s.add_argument(
        "--preempt-grace",
        metavar="DURATION",
        help="with --signal: how long a preemption waits for the task to exit after the "
        "signal (at most the cluster's maximum; default the --signal lead time)",
    )
    s.add_argument(
        "--array",
        metavar="INDEXES",
        help="a job array: one task per index, e.g. 0-999, 0-999:10 (a step) or 1,5,9; "
        "each task gets LEPTON_ARRAY_INDEX",
    )
    s.add_argument(
        "--max-running",
        type=_count("--max-running", 1, 1_000_000),
        metavar="N",
        help="with --array: at most N of its tasks run at once",
    )
    s.add_argument(
        "--after",
        action="append",
        metavar="JOB[,JOB]",
        help="start after these jobs ended, whatever their state (repeatable)",
    )
    s.add_argument(
        "--after-any",
        action="append",
        metavar="JOB[,JOB]",
        help="the same as --after",
    )
    s.add_argument(
        "--after-ok",
        action="append",
        metavar="JOB[,JOB]",
        help="start after these jobs succeeded (an array: every task); if one fails, "
        "this job fails without running (repeatable)",
    )
    s.add_argument(
        "--workdir",
        help="directory to send with the job; tasks start in a copy of it "
        "(without it they start in an empty directory of their own)",
    )
    s.add_argument(
        "--queue-anyway",
        action="store_true",
        help="accept a job that no node the cluster knows could run (it waits for one)",
    )


def parser() -> OneLineParser:
    p = OneLineParser(prog="leptonctl", description="Use a leptond cluster from the shell")
    p.add_argument(
        "--version", action="version", version=f"leptonctl {version()}", help="print the version"
    )
    p.add_argument("--addr", help="master RPC addresses HOST:PORT,... (env LEPTON_ADDR)")
    p.add_argument("--token", help="access token, or @FILE (env LEPTON_TOKEN)")
    p.add_argument(
        "--timeout",
        type=_positive,
        default=20.0,
        help="seconds to wait for the cluster (default 20)",
    )
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)

    _submit(sub)
    _run_parser(sub)
    _exec_parser(sub)

    j = sub.add_parser("jobs", help="list jobs")
    j.add_argument(
        "-a", "--all", action="store_true", help="include jobs that ended over an hour ago"
    )
    j.add_argument(
        "--state",
        action="append",
        choices=JOB_STATES,
        help="only jobs in this state (repeatable)",
    )
    j.add_argument("--user", help="only this user's jobs")
    j.add_argument(
        "--limit",
        type=_count("--limit", 1, 100_000),
        help="at most this many, the newest (default 1000)",
    )
    j.add_argument(
        "-w", "--watch", action="store_true", help="show the list again every --interval seconds"
    )
    j.add_argument(
        "--interval",
        type=_positive,
        default=2.0,
        help="with --watch: seconds between updates (default 2)",
    )
    _out(j)
    st = sub.add_parser("status", help="one job in detail")
    st.add_argument("job", help="the job id")
    st.add_argument("--index", type=_count("--index", 0, 9_999_999), help=INDEX_HELP)
    _out(st)
    c = sub.add_parser(
        "cancel",
        help="cancel jobs: by id, or by --user and --state",
        description="Cancel the jobs named, or every job of --user (default: you) in "
        "--state (default: pending and running). A submit token cancels only its own jobs.",
    )
    c.add_argument("jobs", nargs="*", metavar="JOB", help="job ids")
    c.add_argument("--user", help="cancel this user's jobs (someone else's: admins only)")
    c.add_argument(
        "--index",
        type=_count("--index", 0, 9_999_999),
        help="only this task of a job array (one JOB); the others go on",
    )
    c.add_argument(
        "--state",
        action="append",
        choices=["pending", "running"],
        help="only jobs in this state (repeatable)",
    )
    lg = sub.add_parser("logs", help="a job's output")
    lg.add_argument("job", help="the job id")
    lg.add_argument("--rank", type=_count("--rank", 0, 1 << 20), help="which task (default 0)")
    lg.add_argument("--index", type=_count("--index", 0, 9_999_999), help=INDEX_HELP)
    lg.add_argument(
        "--all", action="store_true", help="every rank, each line prefixed with its rank: [r1]"
    )
    lg.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep showing new output until the job ends (waits while it is pending)",
    )
    lg.add_argument(
        "--tail", type=int, metavar="N", help="start with the last N lines (then -f goes on)"
    )
    lg.add_argument(
        "-t",
        "--timestamps",
        action="store_true",
        help="prefix each line with when it was written (UTC, to within 0.1 s)",
    )
    lg.add_argument(
        "--stderr",
        action="store_true",
        help="only what the tasks wrote to stderr (default: stdout and stderr as they came)",
    )
    q = sub.add_parser("queue", help="usage, fair share and pending work per user")
    _out(q)

    sub.add_parser(
        "top",
        help="the cluster on one screen, refreshed every second (q quits)",
        description="Nodes and their GPUs as a grid (# in use, . free, x unhealthy, - node "
        "down), running jobs, and pending jobs with why they wait. Refreshes every second; "
        "q quits.",
    )
    us = sub.add_parser(
        "usage",
        help="GPU-hours, CPU-hours and jobs by final state, per user or per job",
        description="What each user used (GPU-hours, CPU-hours, jobs by final state) over "
        "the last --since, counted by whole UTC days; it outlives the jobs themselves. "
        "--by job lists the jobs the cluster still holds. Work running now counts up to now.",
    )
    us.add_argument(
        "--since", default="7d", metavar="DURATION", help="how far back, e.g. 1d, 7d, 30d (7d)"
    )
    us.add_argument("--by", choices=["user", "job"], default="user", help="one row per (user)")
    us.add_argument(
        "-o",
        "--output",
        choices=["table", "json", "csv"],
        default="table",
        help="table for people (default), json or csv for scripts",
    )

    n = sub.add_parser("nodes", help="list nodes: GPUs, CPUs and memory as used/total")
    _out(n)
    nd = sub.add_parser("node", help="drain, undrain or remove a node; join tokens for new ones")
    ndsub = nd.add_subparsers(dest="node_cmd", required=True, parser_class=OneLineParser)
    node_help = {
        "drain": "place nothing new on a node; running tasks finish",
        "undrain": "lift a drain",
        "rm": "forget a node and revoke its credential",
    }
    for name, what in node_help.items():
        x = ndsub.add_parser(name, help=what)
        x.add_argument("node", help="node name or id")
        if name == "drain":
            _deadline(x)
        if name == "rm":
            x.add_argument(
                "--force", action="store_true", help="even with tasks on it (they are lost)"
            )
    gp = ndsub.add_parser("gpu", help="put an unhealthy GPU back in service (admin)")
    gpsub = gp.add_subparsers(dest="gpu_cmd", required=True, parser_class=OneLineParser)
    gr = gpsub.add_parser(
        "reset",
        help="run a burn-in on the GPU and, if it passes, mark it healthy",
        description="The host's agent runs a short burn-in on the GPU (a torch matmul and a "
        "memory pattern check; skipped with a note where torch is not installed). If it "
        "passes, the GPU is marked healthy and takes work again.",
    )
    gr.add_argument("node", help="node name or id")
    gr.add_argument("gpu", type=_count("GPU", 0, 1 << 20), help="the GPU's index")
    jt = ndsub.add_parser("join-token", help="tokens that let a new host join (admin)")
    jtsub = jt.add_subparsers(dest="join_cmd", required=True, parser_class=OneLineParser)
    jc = jtsub.add_parser(
        "create", help="print a join token for lepton-agent --join-token-file, alone"
    )
    jc.add_argument(
        "--ttl", default="1h", metavar="DURATION", help="how long it admits hosts (default 1h)"
    )
    jc.add_argument("--uses", type=int, default=1, help="how many hosts it may admit (default 1)")
    _out(jtsub.add_parser("ls", help="list join tokens"))
    jtsub.add_parser("revoke", help="revoke a join token").add_argument(
        "id", help="the join token's id"
    )
    p_drain = sub.add_parser("drain", help="same as `node drain`")
    p_drain.add_argument("node", help="node name or id")
    _deadline(p_drain)

    cl = sub.add_parser("cluster", help="masters and Raft")
    clsub = cl.add_subparsers(dest="cluster_cmd", required=True, parser_class=OneLineParser)
    _out(
        clsub.add_parser(
            "status", help="every master, the leader, each one's lag and health (any master)"
        )
    )
    # dest "member", not "addr": that would overwrite the global --addr (where to connect).
    clsub.add_parser("add-master", help="add a running master").add_argument(
        "member", metavar="HOST:RAFTPORT", help="its Raft address"
    )
    clsub.add_parser("remove-master", help="take a master out").add_argument(
        "member", metavar="HOST:RAFTPORT", help="its Raft address"
    )

    sn = sub.add_parser("snapshot", help="back up or restore the cluster state (admin)")
    snsub = sn.add_subparsers(dest="snap_cmd", required=True, parser_class=OneLineParser)
    snsub.add_parser("save", help="write the whole state to FILE").add_argument(
        "file", help="where to write it (0600)"
    )
    sr = snsub.add_parser("restore", help="replace the whole state with FILE's")
    sr.add_argument("file", help="a file written by snapshot save")
    sr.add_argument(
        "--yes",
        action="store_true",
        help="do not ask (without it: a typed confirmation on a terminal, a refusal elsewhere)",
    )

    tk = sub.add_parser("token", help="access tokens")
    tksub = tk.add_subparsers(dest="token_cmd", required=True, parser_class=OneLineParser)
    tc = tksub.add_parser("create", help="make a token and print it, alone")
    tc.add_argument(
        "--role", required=True, choices=["admin", "submit", "read"], help="what it may do"
    )
    tc.add_argument("--name", help="the user it speaks for")
    tc.add_argument(
        "--unix-user", help="the Unix account its jobs run as on the hosts (default: --name)"
    )
    _out(tksub.add_parser("ls", help="list tokens"))
    tksub.add_parser("revoke", help="revoke a token").add_argument("id", help="the token's id")
    return p


INDEX_HELP = "which task of a job array (its LEPTON_ARRAY_INDEX)"


def submit_flags() -> set[str]:
    """Every option string of `submit`, e.g. --gpus, -f."""
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[
        "submit"
    ]
    return {o for a in sub._actions for o in a.option_strings}


def check_submit_command(command: list[str]) -> list[str]:
    """The command of a submit, without the `--` before it. Without `--`, a
    flag of submit's own after the command is refused: it would silently
    become part of the command (`submit python x.py --gpus 1`)."""
    if command and command[0] == "--":
        return command[1:]
    ours = submit_flags()
    for i, word in enumerate(command[1:], 1):
        flag = word.split("=", 1)[0]
        if flag in ours:
            fixed = shlex.join(["leptonctl", "submit", *command[i:], "--", *command[:i]])
            raise UsageError(
                f"{flag} comes after the command, so it would be passed to the command; "
                f"put submit's flags first and the command after --: {fixed}"
            )
    return command


def exec_command(args: argparse.Namespace) -> list[str]:
    """The command of an exec. Flags after the job id (`exec J -it -- sh`)
    reach here with it (argparse keeps everything after J together): take
    them off, up to `--` or the first word that is no flag of exec's."""
    words = list(args.command)
    while words:
        w = words.pop(0)
        if w == "--":
            return words
        if w in ("-i", "--interactive"):
            args.interactive = True
        elif w in ("-t", "--tty"):
            args.tty = True
        elif w in ("-it", "-ti"):
            args.interactive = args.tty = True
        elif w == "--rank" or w.startswith("--rank="):
            value = w.partition("=")[2] if "=" in w else (words.pop(0) if words else "")
            if not value.isdigit():
                raise UsageError(f"--rank takes a task's rank, 0 or more, got {value!r}")
            args.rank = int(value)
        else:
            return [w, *words]
    return []


async def _run(args: argparse.Namespace) -> int:
    # The SDK's client: the same configuration, connection and calls as
    # Python programs get (leptond.client).
    client = AsyncClient(args.addr, args.token, timeout_s=args.timeout)
    try:
        return await commands.dispatch(client.wire, args)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.cmd in ("submit", "run"):
            args.command = check_submit_command(args.command)
        elif args.cmd == "exec":
            args.command = exec_command(args)
        from leptond.wire.loop import run

        return run(_run(args))
    except UsageError as exc:
        say(f"leptonctl: error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, JobFileError) as exc:
        say(f"leptonctl: {exc}", file=sys.stderr)
        return 2
    except RpcError as exc:
        say(f"leptonctl: {_explain(exc)}", file=sys.stderr)
        return 2 if exc.code in ("bad_request", "unschedulable") else 1
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
