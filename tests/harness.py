"""Real leptond masters and lepton-agents as processes on 127.0.0.1.

Every process is started by a `Cluster` and stopped by it, by pid, in
`close()` (which the fixture calls even when a test fails). Waits poll a
condition with a deadline; nothing sleeps and then asserts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


# Ports handed out by free_ports: below Linux's ephemeral range (32768 and
# up by default), so no outgoing connection takes one between its pick and
# its daemon's bind, and a slice of their own to each pytest-xdist worker
# (and to a process outside xdist), so that two workers never pick the same
# one. Within a slice they go round in turn: a port comes back only after
# the slice's other ports did, long after the test that used it ended.
_PORT_LOW, _PORT_HIGH, _PORT_SLICES = 10_000, 32_000, 8


def _port_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1"...
    index = int(worker[2:]) + 1 if worker[2:].isdigit() else 0
    size = (_PORT_HIGH - _PORT_LOW) // _PORT_SLICES
    start = _PORT_LOW + (index % _PORT_SLICES) * size
    return range(start, start + size)


_port_next: list[int] = []  # the next port to try, per process


def free_ports(n: int) -> list[int]:
    """`n` distinct ports on 127.0.0.1 that nothing listens on or is bound
    to now, for daemons that this test starts."""
    span = _port_slice()
    if not _port_next:
        # A random start, so that processes that run in turn in the same
        # slice (benches, a test rerun) do not all begin at its first port.
        _port_next.append(span.start + int.from_bytes(os.urandom(2), "big") % len(span))
    ports: list[int] = []
    for _ in range(len(span)):
        if len(ports) == n:
            return ports
        port = _port_next[0]
        _port_next[0] = span.start + (port + 1 - span.start) % len(span)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken by something else; try the next
        ports.append(port)
    raise RuntimeError(f"no {n} free ports in {span.start}-{span.stop - 1}")


def _listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def listening_on(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port`, from
    /proc/net/tcp{,6} (psutil formats them with socket.inet_ntop, which
    pysyncobj replaces when imported)."""
    found: set[str] = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            # The kernel prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.IPv6Address(words) if v6 else ipaddress.IPv4Address(words)))
    return found


def wait_for(cond: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Poll `cond` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while True:
        try:
            v = cond()
            if v:
                return v
        except Exception as exc:  # the condition may fail while things start
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:g}s waiting for {what}"
                + (f" (last error: {last_exc})" if last_exc else "")
            )
        time.sleep(interval_s)


def _write_new(path: Path, text: str) -> None:
    """A new 0600 file (a token): refuses to replace one that exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("LEPTON_ADDR", None)
    e.pop("LEPTON_TOKEN", None)
    return e


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        f = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.popen = subprocess.Popen(
            self.argv,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**env(), **self.extra_env},
            cwd=str(ROOT),
        )
        f.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill9(self) -> None:
        if self.popen is not None and self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout_s: float = 10) -> None:
        if self.popen is None:
            return
        if self.alive():
            os.kill(self.pid, signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Master:
    index: int
    rpc: int
    http: int
    raft: int
    proc: Proc

    @property
    def rpc_addr(self) -> str:
        return f"127.0.0.1:{self.rpc}"

    @property
    def raft_addr(self) -> str:
        return f"127.0.0.1:{self.raft}"


@dataclass
class Cluster:
    root: Path
    n_masters: int = 3
    ttl_s: float = 3.0
    master_args: list[str] = field(default_factory=list)
    # Added to the masters' environment (e.g. the test-only fault hooks).
    master_env: dict[str, str] = field(default_factory=dict)
    # The admin token maps to root: test clusters let its jobs run.
    allow_root_tasks: bool = True
    masters: list[Master] = field(default_factory=list)
    agents: list[Proc] = field(default_factory=list)
    # Agent name -> its /metrics port (kept across restarts of that agent).
    agent_http_ports: dict[str, int] = field(default_factory=dict)
    extra: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        secrets = self.root / "secrets"
        # `leptond init` itself is tested in test_cli_basics; here it runs in-process.
        import contextlib
        import io

        from leptond.cli import main as leptond_main

        with contextlib.redirect_stdout(io.StringIO()):
            assert leptond_main(["init", str(secrets)]) == 0
        self.secret = secrets / "cluster.key"
        self.admin_token_file = secrets / "admin.token"
        self.admin_token = self.admin_token_file.read_text().strip()
        ports = free_ports(3 * self.n_masters)
        for i in range(self.n_masters):
            self.masters.append(self._master(i, ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]))

    def _master(
        self, i: int, rpc: int, http: int, raft: int, peers: list[str] | None = None
    ) -> Master:
        log = self.root / f"master-{i}.log"
        return Master(i, rpc, http, raft, Proc(f"master-{i}", [], log, extra_env=self.master_env))

    def _master_argv(self, m: Master, peers: list[str]) -> list[str]:
        return [
            sys.executable,
            "-m",
            "leptond.cli",
            "run",
            "--data-dir",
            str(self.root / f"master-{m.index}"),
            "--secret-file",
            str(self.secret),
            "--admin-token-file",
            str(self.admin_token_file),
            "--bind",
            "127.0.0.1",
            "--rpc-port",
            str(m.rpc),
            "--http-port",
            str(m.http),
            "--raft-port",
            str(m.raft),
            "--peers",
            ",".join(peers),
            "--heartbeat-ttl",
            str(self.ttl_s),
            "--kill-grace",
            "2",
            *(["--allow-root-tasks"] if self.allow_root_tasks else []),
            *self.master_args,
        ]

    @property
    def addrs(self) -> str:
        return ",".join(m.rpc_addr for m in self.masters)

    def start_masters(self, timeout_s: float = 30) -> Master:
        peers = [m.raft_addr for m in self.masters]
        for m in self.masters:
            m.proc.argv = self._master_argv(m, peers)
            m.proc.start()
        return self.wait_leader(timeout_s)

    def add_master_proc(self) -> Master:
        """Start one more master, with a fresh data dir, that joins the masters
        in `masters` (for add-master)."""
        rpc, http, raft = free_ports(3)
        # A new index: a master dropped from `masters` keeps its data dir.
        used = {m.index for m in self.masters}
        used |= {int(p.name.split("-")[1]) for p in self.root.glob("master-*") if p.is_dir()}
        index = 1 + max(used)
        m = self._master(index, rpc, http, raft)
        peers = [x.raft_addr for x in self.masters] + [m.raft_addr]
        m.proc.argv = self._master_argv(m, peers)
        self.masters.append(m)
        m.proc.start()
        # add-master checks that the newcomer answers at its Raft address:
        # wait until it listens (a loaded machine starts Python slowly).
        wait_for(lambda: _listens(raft), 60, f"master-{index} to listen on its Raft port")
        return m

    def restart_master(self, m: Master) -> None:
        m.proc.stop()
        m.proc.start()

    def join_token_file(self, agent: str | None = None) -> Path:
        """One multi-use join token for every agent this cluster starts, made
        on first use (the masters must be up). Each agent gets its own copy
        (`agent`), as hosts of a fleet would: an agent deletes its copy once it
        has its credential, which it keeps in its data dir, so a restarted
        agent does not trade again."""
        path = self.root / "join.token"
        if not path.exists():
            res = self.rpc("join_token_create", {"ttl_s": 86400, "uses": None})
            _write_new(path, res["token"] + "\n")
        if agent is None:
            return path
        mine = self.root / f"join-{agent}.token"
        if not (self.root / f"agent-{agent}" / "node.credential").exists() and not mine.exists():
            _write_new(mine, path.read_text())
        return mine

    def start_agent(
        self,
        name: str,
        gpus: str = "2",
        extra: list[str] | None = None,
        wrap: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Proc:
        """Start an agent; `wrap` goes before its command (a program that execs
        the rest, such as `choom -n -999 --`, as its systemd unit would)."""
        extra = list(extra or [])
        if "--http-port" not in extra:
            # Every agent serves /metrics; many share this host.
            port = self.agent_http_ports.setdefault(name, free_ports(1)[0])
            extra += ["--http-port", str(port), "--http-bind", "127.0.0.1"]
        if "--disk-reserve" not in extra:
            # The default reserve (up to 10 GiB) is for a host's data disk; a
            # test machine with less free would make every test node full.
            extra += ["--disk-reserve", "256M"]
        p = Proc(
            name,
            [
                *(wrap or []),
                sys.executable,
                "-m",
                "agent.cli",
                "run",
                "--masters",
                self.addrs,
                "--join-token-file",
                str(self.join_token_file(name)),
                "--data-dir",
                str(self.root / f"agent-{name}"),
                "--node-name",
                name,
                "--advertise-addr",
                "127.0.0.1",
                "--simulate-gpus",
                gpus,
                "--kill-grace",
                "2",
                # Tasks run the tests' scripts from the checkout, which may be a
                # clone under /tmp: tasks have a private /tmp of their own.
                "--keep-visible",
                str(ROOT),
                *extra,
            ],
            self.root / f"agent-{name}.log",
            extra_env=dict(extra_env or {}),
        )
        p.start()
        self.agents.append(p)
        return p

    # -- leptonctl -----------------------------------------------------------------
    def ctl(
        self,
        *args: str,
        token: str | None = None,
        timeout_s: float = 60,
        addr: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        e = env()
        e["LEPTON_ADDR"] = addr or self.addrs
        e["LEPTON_TOKEN"] = token or self.admin_token
        e["LEPTON_CONFIG"] = str(self.root / "no-config.toml")
        out = subprocess.run(
            [sys.executable, "-m", "leptonctl.cli", *args],
            env=e,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"leptonctl {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}"
            )
        return out

    def ctl_json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self.ctl(*args, "-o", "json", **kw).stdout)

    # -- observations ----------------------------------------------------------------
    # Polling goes over RPC from this process: starting a leptonctl process per
    # poll costs a second or more on a loaded 2-core machine. The CLI itself is
    # exercised through ctl().
    def rpc(
        self,
        method: str,
        args: dict[str, Any] | None = None,
        addr: str | None = None,
        timeout_s: float = 20,
        token: Any = None,
    ) -> Any:
        """One call as the admin, or as `token` (a leptond.wire.tokens.Token)."""
        from leptond.wire.client import ClusterClient, parse_addrs
        from leptond.wire.tokens import parse_token

        tok = token or parse_token(self.admin_token)

        async def go() -> Any:
            c = ClusterClient(
                parse_addrs(addr or self.addrs), key_id=tok.id, psk=tok.psk, connect_timeout_s=2
            )
            try:
                return await c.call(method, args or {}, timeout_s=timeout_s)
            finally:
                await c.close()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(go())
        # Called from async code (a benchmark): run on a thread with its own loop.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, go()).result()

    def leader(self) -> Master | None:
        for m in self.masters:
            if not m.proc.alive():
                continue
            try:
                st = self.rpc("cluster_status", addr=m.rpc_addr, timeout_s=5)
            except Exception:
                continue
            if st.get("is_leader"):
                return m
        return None

    def wait_leader(self, timeout_s: float = 30, not_: Master | None = None) -> Master:
        """The leader (controllers running), optionally one other than `not_`."""
        return wait_for(
            lambda: (m := self.leader()) is not None and m is not not_ and m,
            timeout_s,
            "a leader with its controllers running"
            + (f" other than master-{not_.index}" if not_ else ""),
        )

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.rpc("nodes"))

    def wait_nodes_ready(self, n: int, timeout_s: float = 30) -> list[dict[str, Any]]:
        return wait_for(
            lambda: (ns := self.nodes()) and sum(x["state"] == "ready" for x in ns) >= n and ns,
            timeout_s,
            f"{n} ready nodes",
        )

    def status(self, job: str) -> dict[str, Any]:
        return dict(self.rpc("status", {"job_id": job}))

    def wait_job(self, job: str, states: set[str], timeout_s: float = 60) -> dict[str, Any]:
        return wait_for(
            lambda: (st := self.status(job))["state"] in states and st,
            timeout_s,
            f"job {job} to reach {states}",
        )

    def submit(self, *args: str, **kw: Any) -> str:
        return self.ctl("submit", *args, **kw).stdout.strip()

    def close(self) -> None:
        for p in [*self.agents, *self.extra, *(m.proc for m in self.masters)]:
            try:
                p.stop()
            except Exception:
                pass
        self.kill_strays()

    def kill_strays(self) -> None:
        """Task shims run in their own sessions so they outlive a killed agent; end them too,
        and whatever is left in the agents' task cgroups."""
        try:
            import psutil
        except ImportError:
            return
        self.remove_task_cgroups()
        root = str(self.root)
        for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
            cmd = " ".join(p.info.get("cmdline") or [])
            # Tasks run in directories under the root: a task orphaned by a
            # killed shim is found by its working directory.
            cwd = p.info.get("cwd") or ""
            if (root in cmd or cwd.startswith(root)) and p.pid != os.getpid():
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    p.kill()
                except psutil.Error:
                    pass

    def remove_task_cgroups(self) -> None:
        from agent.cgroups import remove_agent_tree

        for d in self.root.glob("agent-*"):
            try:
                nid = (d / "node_id").read_text().strip()
            except OSError:
                continue
            try:
                remove_agent_tree(nid)
            except Exception:
                pass

    def logs(self) -> str:
        parts = []
        for p in [*(m.proc for m in self.masters), *self.agents]:
            parts.append(f"--- {p.name} ---\n{p.tail(40)}")
        return "\n".join(parts)
