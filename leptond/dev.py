"""`leptond dev`: a whole cluster on this host, for trying leptond out.

One master and N agents as child processes of this one; Ctrl-C (or SIGTERM)
stops them all by pid. Uses the real GPUs when NVML finds some, else simulated
ones, and says so. Writes a client config that leptonctl reads with no flags.

The master allows root tasks: the admin token maps to root, and it is the
only token a dev cluster starts with. Run as a normal user, the agents cannot
switch users, so every task runs as that user, which the banner says.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from leptonctl import config as client_config

from .wire.client import ClusterClient
from .wire.errors import RpcError
from .wire.tokens import read_token_file

BANNER = "=" * 72


def _ensure_secrets(d: Path) -> tuple[Path, Path]:
    key, tok = d / "cluster.key", d / "admin.token"
    if not key.exists() or not tok.exists():
        from .cli import main as leptond_main

        if key.exists() != tok.exists():
            raise SystemExit(
                f"leptond dev: {d} has only one of cluster.key/admin.token; remove it and retry"
            )
        with open(os.devnull, "w") as devnull:
            saved = sys.stdout
            sys.stdout = devnull
            try:
                leptond_main(["init", str(d)])
            finally:
                sys.stdout = saved
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


async def _join_token(
    addr: str, tok_path: Path, agents: int, timeout_s: float, master: subprocess.Popen[bytes]
) -> str:
    """A join token for the dev agents, made as soon as the master leads."""
    tok = read_token_file(tok_path)
    host, port = addr.rsplit(":", 1)
    client = ClusterClient([(host, int(port))], key_id=tok.id, psk=tok.psk, connect_timeout_s=1.0)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                res = await client.call(
                    "join_token_create", {"ttl_s": 3600, "uses": max(agents, 1)}, timeout_s=3
                )
                return str(res["token"])
            except RpcError:
                if master.poll() is not None:
                    raise SystemExit(
                        f"leptond dev: the master exited with code {master.returncode}; see its log"
                    ) from None
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"leptond dev: the master did not come up within {timeout_s:g}s"
                    ) from None
            await asyncio.sleep(0.2)
    finally:
        await client.close()


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


async def _wait_ready(addr: str, tok_path: Path, agents: int, timeout_s: float) -> None:
    tok = read_token_file(tok_path)
    host, port = addr.rsplit(":", 1)
    client = ClusterClient([(host, int(port))], key_id=tok.id, psk=tok.psk, connect_timeout_s=1.0)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                nodes = await client.call("nodes", {}, timeout_s=3)
                if sum(1 for n in nodes if n["state"] == "ready") >= agents:
                    return
            except RpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"leptond dev: the cluster did not come up within {timeout_s:g}s")
            await asyncio.sleep(0.2)
    finally:
        await client.close()


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
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    key, tok = _ensure_secrets(d)
    simulate, agents, gpu_line = _gpu_plan(args)
    rpc = f"127.0.0.1:{args.rpc_port}"
    py = sys.executable
    log_dir = d / "logs"
    log_dir.mkdir(exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, argv: list[str]) -> None:
        with open(log_dir / f"{name}.log", "ab") as out:
            procs.append(
                subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            )

    def stop_all(*_: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    try:
        spawn(
            "master",
            [
                py,
                "-m",
                "leptond.cli",
                "run",
                "--data-dir",
                str(d / "master"),
                "--secret-file",
                str(key),
                "--admin-token-file",
                str(tok),
                "--rpc-port",
                str(args.rpc_port),
                "--http-port",
                str(args.http_port),
                "--raft-port",
                str(args.raft_port),
                "--heartbeat-ttl",
                "10",
                "--kill-grace",
                "3",
                "--allow-root-tasks",
            ],
        )
        # Agents never see the cluster key: each trades a join token for its own
        # node credential (kept in its data dir, so a restart needs no new token).
        join = d / "join.token"
        _write_private(join, asyncio.run(_join_token(rpc, tok, agents, 60, procs[0])) + "\n")
        for i in range(agents):
            argv = [
                py,
                "-m",
                "agent.cli",
                "run",
                "--masters",
                rpc,
                "--join-token-file",
                str(join),
                "--data-dir",
                str(d / f"agent-{i}"),
                "--node-name",
                f"dev-{i}",
                "--advertise-addr",
                "127.0.0.1",
                "--kill-grace",
                "3",
            ]
            if simulate:
                argv += ["--simulate-gpus", simulate]
            spawn(f"agent-{i}", argv)
        (d / "dev.pids").write_text("".join(f"{p.pid}\n" for p in procs))
        cfg_path = client_config.default_config_path()
        client_config.write(cfg_path, rpc, tok.read_text().strip())
        asyncio.run(_wait_ready(rpc, tok, agents, 60))
        print(BANNER)
        print(
            f"leptond dev cluster is up: 1 master ({rpc}, http 127.0.0.1:{args.http_port}), {agents} agent(s)"
        )
        print(gpu_line)
        print(isolation_line())
        print(f"leptonctl is configured in {cfg_path}; try: leptonctl nodes")
        print(f"logs in {log_dir}; Ctrl-C stops everything")
        print(BANNER, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        dead = [
            p.args[3] if isinstance(p.args, list) else "?" for p in procs if p.poll() is not None
        ]
        print(
            f"leptond dev: a process exited ({', '.join(map(str, dead))}); see {log_dir}",
            file=sys.stderr,
        )
        return 1
    except (KeyboardInterrupt, SystemExit) as exc:
        code = exc.code if isinstance(exc, SystemExit) else 0
        if isinstance(code, str):
            print(code, file=sys.stderr)
            return 1
        return int(code or 0)
    finally:
        stop_all()
