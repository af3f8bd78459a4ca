"""`leptond dev`: a whole cluster on this host, for trying leptond out.

One master and N agents as child processes of this one, each in its own
session (a Ctrl-C reaches only `leptond dev`, which then stops them in
order) and each killed should `leptond dev` itself die. Ctrl-C or SIGTERM
stops them all by pid, with one line. Uses the real GPUs when NVML finds
some, else simulated ones, and says so. Writes a client config that
leptonctl reads with no flags.

It refuses to start twice on one data dir (a lock file holds the running
one's pid) and when a port it needs is taken; it says the cluster is up only
once its own master answers. An agent that dies is reported and started
again after RESTART_AFTER_S (unless --no-restart), so that killing one shows
what the cluster does about a lost host; the master dying ends it all.

The master allows root tasks: the admin token maps to root, and it is the
only token a dev cluster starts with. Run as a normal user, the agents cannot
switch users, so every task runs as that user, which the banner says.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leptond.client import config as client_config

from .clock import REAL as clock
from .wire.client import ClusterClient
from .wire.errors import RpcError
from .wire.tokens import read_token_file

BANNER = "=" * 72
RESTART_AFTER_S = 5.0
LOCK_FILE = "dev.lock"
PR_SET_PDEATHSIG = 1


class DevError(Exception):
    """Why the dev cluster cannot start or go on, in one line."""


def _ensure_secrets(d: Path) -> tuple[Path, Path]:
    key, tok = d / "cluster.key", d / "admin.token"
    if not key.exists() or not tok.exists():
        if key.exists() != tok.exists():
            raise DevError(f"{d} has only one of cluster.key/admin.token; remove it and retry")
        # `leptond init` in its own process: this module is part of the CLI's
        # implementation and does not import it back.
        done = subprocess.run(
            [sys.executable, "-m", "leptond.cli", "init", str(d)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise DevError(done.stderr.strip() or "leptond init failed")
    return key, tok


def _gpu_plan(args: argparse.Namespace) -> tuple[str | None, int, str]:
    """(simulate spec or None for real GPUs, agent count, banner line)."""
    if args.simulate_gpus:
        return args.simulate_gpus, args.agents, f"simulated GPUs: {args.simulate_gpus} per agent"
    from agent.probes import open_nvml

    nvml = open_nvml()
    if nvml is not None:
        n = len(nvml.gpus())
        nvml.close()
        if n:
            # Agents on one host would share the same real GPUs: run one.
            return None, 1, f"real GPUs: {n} found by NVML (one agent owns them)"
    return (
        "2",
        args.agents,
        "NO NVIDIA GPU FOUND: each agent simulates 2 GPUs (set --simulate-gpus to change)",
    )


def lock_data_dir(d: Path) -> int:
    """Hold the data dir's lock for as long as this process lives (the kernel
    drops it when the process ends, however it ends), with our pid in it."""
    fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DevError(f"a dev cluster is already running here (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Each port free to listen on, or one line naming the one in use."""
    for flag, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As the servers bind: a port held only by old connections is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise DevError(
                    f"port {port} ({flag}) on {host} is in use ({exc.strerror}); "
                    f"stop what holds it or choose another with {flag}"
                ) from None


def _die_with_us() -> None:
    """A preexec_fn: the child gets SIGTERM when `leptond dev` dies, even by
    SIGKILL, so no master or agent is left behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def how_it_ended(code: int) -> str:
    if code < 0:
        return f"signal {-code}"
    return f"code {code}"


@dataclass
class Child:
    name: str  # as people see it: master, agent dev-1
    log: Path
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_us,
            )

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


async def _client_call(
    addr: str, tok_path: Path, method: str, args: dict[str, Any], timeout_s: float
) -> Any:
    tok = read_token_file(tok_path)
    host, port = addr.rsplit(":", 1)
    client = ClusterClient([(host, int(port))], key_id=tok.id, psk=tok.psk, connect_timeout_s=1.0)
    try:
        return await client.call(method, args, timeout_s=timeout_s)
    finally:
        await client.close()


def wait_for(
    what: str, check: Callable[[], Any], alive: Callable[[], None], timeout_s: float
) -> Any:
    """Poll `check` (RpcError: not yet) until it returns something; `alive`
    raises DevError when the process it waits on died."""
    deadline = clock.monotonic() + timeout_s
    while True:
        alive()
        try:
            got = check()
            if got:
                return got
        except RpcError:
            pass
        if clock.monotonic() > deadline:
            raise DevError(f"{what} within {timeout_s:g}s")
        clock.block(0.2)


class DevCluster:
    def __init__(self, args: argparse.Namespace, d: Path) -> None:
        self.args = args
        self.d = d
        self.rpc = f"127.0.0.1:{args.rpc_port}"
        self.log_dir = d / "logs"
        self.master: Child | None = None
        self.agents: list[Child] = []

    def master_alive(self) -> None:
        assert self.master is not None
        code = self.master.exit_code()
        if code is not None:
            raise DevError(f"the master exited with {how_it_ended(code)}; see {self.master.log}")

    def call(self, method: str, args: dict[str, Any]) -> Any:
        tok = self.d / "admin.token"
        return asyncio.run(_client_call(self.rpc, tok, method, args, timeout_s=3))

    def start(self) -> tuple[str, Path]:
        args, d = self.args, self.d
        key, tok = _ensure_secrets(d)
        simulate, agents, gpu_line = _gpu_plan(args)
        self.log_dir.mkdir(exist_ok=True, mode=0o700)
        py = sys.executable
        self.master = Child(
            "master",
            self.log_dir / "master.log",
            [
                py, "-m", "leptond.cli", "run",
                "--data-dir", str(d / "master"),
                "--secret-file", str(key),
                "--admin-token-file", str(tok),
                "--rpc-port", str(args.rpc_port),
                "--http-port", str(args.http_port),
                "--raft-port", str(args.raft_port),
                "--heartbeat-ttl", "10",
                "--kill-grace", "3",
                "--allow-root-tasks",
            ],
        )  # fmt: skip
        self.master.start()
        assert self.master.proc is not None
        mine = self.master.proc.pid
        # Our own master, not one that was there already: it says its pid.
        st = wait_for(
            "the master did not come up",
            lambda: (s := self.call("cluster_status", {})).get("is_leader") and s,
            self.master_alive,
            60,
        )
        if st.get("pid") != mine:
            raise DevError(f"another master (pid {st.get('pid')}) answers on {self.rpc}")
        # Agents never see the cluster key: each trades a join token for its own
        # node credential (kept in its data dir, so a restart needs no new
        # token), from a file of its own that it deletes after the trade.
        new = [i for i in range(agents) if not (d / f"agent-{i}" / "node.credential").exists()]
        token = ""
        if new:
            res = self.call("join_token_create", {"ttl_s": 3600, "uses": len(new)})
            token = str(res["token"]) + "\n"
        for i in range(agents):
            join = d / f"agent-{i}.join.token"
            if i in new:
                _write_private(join, token)
            argv = [
                py, "-m", "agent.cli", "run",
                "--masters", self.rpc,
                "--join-token-file", str(join),
                "--data-dir", str(d / f"agent-{i}"),
                "--node-name", f"dev-{i}",
                "--advertise-addr", "127.0.0.1",
                "--kill-grace", "3",
                "--http-port", str(args.agent_http_port + i if args.agent_http_port else 0),
                "--http-bind", "127.0.0.1",
                # A laptop's disk, not a GPU host's: the default reserve (up
                # to 10 GiB) would leave a nearly full one with no node.
                "--disk-reserve", "256M",
            ]  # fmt: skip
            if simulate:
                argv += ["--simulate-gpus", simulate]
            agent = Child(f"agent dev-{i}", self.log_dir / f"agent-{i}.log", argv)
            agent.start()
            self.agents.append(agent)
        (d / "dev.pids").write_text(
            "".join(f"{c.proc.pid}\n" for c in [self.master, *self.agents] if c.proc)
        )
        cfg_path = client_config.default_config_path()
        client_config.write(cfg_path, self.rpc, tok.read_text().strip())
        wait_for(
            "the agents did not register",
            lambda: sum(n["state"] == "ready" for n in self.call("nodes", {})) >= agents,
            self.master_alive,
            60,
        )
        return gpu_line, cfg_path

    def supervise(self) -> None:
        """Until stopped: report an agent that dies and start it again later."""
        while True:
            self.master_alive()
            now = clock.monotonic()
            for a in self.agents:
                code = a.exit_code()
                if code is not None and a.restart_at is None:
                    then = (
                        "not restarting it (--no-restart)"
                        if self.args.no_restart
                        else f"restarting it in {RESTART_AFTER_S:g}s"
                    )
                    say(f"{a.name} exited with {how_it_ended(code)}; {then} (log: {a.log})")
                    a.restart_at = float("inf") if self.args.no_restart else now + RESTART_AFTER_S
                elif a.restart_at is not None and now >= a.restart_at:
                    a.restart_at = None
                    a.start()
                    say(f"{a.name} started again")
            clock.block(0.2)

    def stop_all(self) -> None:
        kids = [c for c in [*self.agents, self.master] if c is not None and c.proc is not None]
        for c in kids:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.terminate()
        deadline = clock.monotonic() + 10
        for c in kids:
            assert c.proc is not None
            try:
                c.proc.wait(max(0.1, deadline - clock.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the cluster the way Ctrl-C does


def say(text: str) -> None:
    print(f"leptond dev: {text}", flush=True)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def isolation_line() -> str:
    """What the banner says about whose account tasks run as."""
    from agent.identity import agent_user, can_switch_users

    if can_switch_users():
        return (
            "tasks run as their token's Unix user (the admin token's is root), "
            "in cgroups with enforced limits"
        )
    me = agent_user()
    return (
        f"tasks run as {me.name} (uid {me.uid}), the user running leptond dev: "
        "not root, so no user switching, cgroup limits or GPU device rules"
    )


def run_dev(args: argparse.Namespace) -> int:
    d = Path(args.data_dir).resolve()
    if args.agents < 1:
        print("leptond dev: --agents must be at least 1", file=sys.stderr)
        return 2
    dev = DevCluster(args, d)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    started = False
    try:
        # 0711: tasks run as their users in the agents' task dirs under it;
        # what is secret in it (keys, tokens, the masters' data, logs) is
        # root's alone already.
        d.mkdir(parents=True, exist_ok=True, mode=0o711)
        lock_data_dir(d)
        agent_ports = {
            f"--agent-http-port (agent dev-{i})": args.agent_http_port + i
            for i in range(args.agents if args.agent_http_port else 0)
        }
        check_ports(
            "127.0.0.1",
            {
                "--rpc-port": args.rpc_port,
                "--http-port": args.http_port,
                "--raft-port": args.raft_port,
                **agent_ports,
            },
        )
        gpu_line, cfg_path = dev.start()
        started = True
        n = len(dev.agents)
        print(BANNER)
        print(
            f"leptond dev cluster is up: 1 master ({dev.rpc}, http 127.0.0.1:"
            f"{args.http_port}), {n} agent(s)"
        )
        print(gpu_line)
        print(isolation_line())
        print(f"leptonctl is configured in {cfg_path}; try: leptonctl nodes")
        print(f"logs in {dev.log_dir}; Ctrl-C stops everything")
        print(BANNER, flush=True)
        dev.supervise()
        return 0
    except KeyboardInterrupt:
        dev.stop_all()
        say(f"stopped the master and {len(dev.agents)} agent(s)" if started else "stopped")
        return 0
    except (DevError, OSError) as exc:
        dev.stop_all()
        tail = "; stopped the rest" if started else ""
        print(f"leptond dev: {exc}{tail}", file=sys.stderr, flush=True)
        return 1
    finally:
        dev.stop_all()  # whatever happened, nothing is left running
