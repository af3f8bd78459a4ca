"""The README's bare-metal install, followed literally on this one machine.

Every command in the section's shell blocks is run as written, under a
private root: /opt, /etc and /var/lib map into a temporary directory, one for
the master host and one for the GPU host, and the `lepton` user is a fresh
name of its own (created by the README's own commands, deleted afterwards).
What needs a real systemd is done the way systemd would: `systemctl enable
--now UNIT` becomes `systemd-analyze verify` of the installed unit, then its
ExecStart run with its EnvironmentFile, as its User, with its StateDirectory.
The site settings the README asks for (addresses, ports; simulated GPUs here)
are written into the env files after they are copied.
"""

from __future__ import annotations

import configparser
import contextlib
import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.harness import ROOT, free_ports, wait_for

SECTION = "## Installing on bare-metal hosts"
# Which host each of the section's shell blocks runs on, in order.
HOSTS = ["every", "master", "master", "admin", "gpu"]


def readme_blocks() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    blocks = []
    for body in re.findall(r"```sh\n(.*?)```", section, re.S):
        lines = [ln.split(" #", 1)[0].strip() for ln in body.splitlines()]
        blocks.append([ln for ln in lines if ln and not ln.startswith("#")])
    return blocks


@dataclass
class Site:
    """Two hosts' roots on one machine, and what ran on them."""

    top: Path
    user: str
    ports: dict[str, int]
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)

    def root(self, host: str) -> Path:
        return self.top / ("gpu" if host == "gpu" else "master")

    def rewrite(self, text: str, host: str) -> str:
        """A path or command of the README as it reads under this host's root."""
        r = self.root(host)
        text = text.replace("/opt/leptond", str(self.top / "opt" / "leptond"))
        for d in ("/etc/systemd/system", "/etc/lepton", "/var/lib/lepton"):
            text = re.sub(rf"(?<![\w/]){re.escape(d)}", str(r) + d, text)
        # The user and group name (never a path, a program or StateDirectory=).
        for pattern in (
            r"(?m)^((?:User|Group)=)lepton$",
            r"((?:--gid|--group|groupadd --system) )lepton\b(?!-)",
            r"(?m)^(useradd .* )lepton$",
        ):
            text = re.sub(pattern, rf"\g<1>{self.user}", text)
        return text

    def run(self, line: str, host: str) -> None:
        if line == "systemctl daemon-reload":
            return  # nothing to reload: units are read where they are installed
        m = re.fullmatch(r"systemctl enable --now (\S+)", line)
        if m:
            self.start_unit(m.group(1), host)
            return
        m = re.fullmatch(r"export (\w+)=(.*)", line)
        if m:
            self.env[m.group(1)] = self.site_value(m.group(1), self.rewrite(m.group(2), host))
            return
        cmd = self.rewrite(line, host)
        work = self.top / "work"
        env = {**os.environ, **self.env, "LEPTON_CONFIG": str(work / "no-config.toml")}
        out = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", cmd],
            cwd=work, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert out.returncode == 0, f"README step failed: {line}\n{out.stderr[-3000:]}"
        self.outputs[line] = out.stdout
        m = re.fullmatch(r"cp systemd/(\S+) (\S+)", line)
        if m:
            self.installed(Path(self.rewrite(m.group(2), host)), m.group(1), host)

    def site_value(self, name: str, value: str) -> str:
        if name == "LEPTON_ADDR":  # the masters of this site: the one started here
            return f"127.0.0.1:{self.ports['rpc']}"
        return value

    def installed(self, dest: Path, name: str, host: str) -> None:
        """A file just copied from systemd/: the same install, under this root,
        with this site's settings where the README says to set them."""
        path = dest / name if dest.is_dir() else dest
        text = self.rewrite(path.read_text(), host)
        settings = {
            "leptond.env.example": {
                "LEPTON_BIND": "127.0.0.1",
                "LEPTON_ADVERTISE": "127.0.0.1",
                "LEPTON_RPC_PORT": str(self.ports["rpc"]),
                "LEPTON_HTTP_PORT": str(self.ports["http"]),
                "LEPTON_RAFT_PORT": str(self.ports["raft"]),
                "LEPTON_PEERS": f"127.0.0.1:{self.ports['raft']}",
            },
            "lepton-agent.env.example": {
                "LEPTON_MASTERS": f"127.0.0.1:{self.ports['rpc']}",
                # No NVIDIA GPU on this machine.
                "LEPTON_AGENT_ARGS": "--simulate-gpus 2 --advertise-addr 127.0.0.1 "
                f"--node-name baremetal-gpu1 --http-bind 127.0.0.1 "
                f"--http-port {self.ports['agent_http']}",
            },
        }.get(name, {})
        for key, value in settings.items():
            text, n = re.subn(rf"(?m)^{key}=.*$", f"{key}={value}", text)
            assert n == 1, f"{name} has no {key}= line to set"
        path.write_text(text)

    def start_unit(self, unit: str, host: str) -> None:
        path = self.root(host) / "etc/systemd/system" / f"{unit}.service"
        verify = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        problems = [
            ln
            for ln in verify.stderr.splitlines()
            if path.name in ln or "Unknown" in ln or "error" in ln.lower()
        ]
        assert verify.returncode == 0 and not problems, verify.stderr
        svc = service_section(path)
        env = dict(os.environ)
        for ln in Path(svc["EnvironmentFile"]).read_text().splitlines():
            if ln and not ln.startswith("#") and "=" in ln:
                k, v = ln.split("=", 1)
                env[k] = v
        argv: list[str] = []
        for word in shlex.split(svc["ExecStart"]):
            if re.fullmatch(r"\$\w+", word):  # systemd splits $VAR into words
                argv += env.get(word[1:], "").split()
            else:
                argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
        state = self.root(host) / "var/lib" / svc["StateDirectory"]
        state.mkdir(parents=True, exist_ok=True)
        os.chmod(state, int(svc.get("StateDirectoryMode", "0755"), 8))
        if "User" in svc:
            pw = pwd.getpwnam(svc["User"])
            os.chown(state, pw.pw_uid, grp.getgrnam(svc["Group"]).gr_gid)
            argv = [
                "setpriv", f"--reuid={svc['User']}", f"--regid={svc['Group']}",
                "--init-groups", *argv,
            ]  # fmt: skip
        log = open(self.top / f"{unit}.log", "ab")  # noqa: SIM115 - handed to the child
        self.procs.append(
            subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/")
        )
        log.close()
        if unit == "leptond":
            self.wait_healthy(unit, f"http://127.0.0.1:{self.ports['http']}/healthz")

    def wait_healthy(self, unit: str, url: str, timeout_s: float = 90) -> None:
        proc, log = self.procs[-1], self.top / f"{unit}.log"
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{unit} exited {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(url, timeout=2).status == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{url} not healthy in {timeout_s:g}s: {log.read_text()[-2000:]}"
                )
            time.sleep(0.2)

    def close(self) -> None:
        for p in reversed(self.procs):  # the agent, then the master
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        # Anything an agent left behind (a spare task supervisor) runs from here.
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if str(self.top) in " ".join(proc.info.get("cmdline") or []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()


def service_section(path: Path) -> dict[str, str]:
    cp = configparser.RawConfigParser(strict=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text().replace("\\\n", " "))
    return dict(cp["Service"])


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    top = Path(tempfile.mkdtemp(prefix="lepton-baremetal-", dir="/tmp"))
    top.chmod(0o755)  # the masters' user reaches the venv and its key through it
    (top / "work").mkdir()
    # What a Debian host has before the README's steps.
    for host in ("master", "gpu"):
        for d in ("etc/systemd/system", "var/lib"):
            (top / host / d).mkdir(parents=True)
    os.symlink(ROOT / "systemd", top / "work" / "systemd")
    os.symlink(ROOT, top / "work" / "leptond")  # `./leptond`: a checkout
    rpc, http, raft, agent_http = free_ports(4)
    ports = {"rpc": rpc, "http": http, "raft": raft, "agent_http": agent_http}
    s = Site(top, f"lpt{os.getpid() % 100000}", ports)
    blocks = readme_blocks()
    assert len(blocks) == len(HOSTS), "the README's install steps changed: update HOSTS"
    try:
        for host, lines in zip(HOSTS, blocks, strict=True):
            for line in lines:
                s.run(line, host)
        yield s
    finally:
        s.close()
        subprocess.run(["userdel", s.user], capture_output=True, timeout=30)
        subprocess.run(["groupdel", s.user], capture_output=True, timeout=30)
        shutil.rmtree(top, ignore_errors=True)


def mode_owner(p: Path) -> tuple[int, str, str]:
    st = p.stat()
    return (
        stat.S_IMODE(st.st_mode),
        pwd.getpwuid(st.st_uid).pw_name,
        grp.getgrgid(st.st_gid).gr_name,
    )


def test_the_programs_run_from_the_venv_the_units_point_at(site: Site) -> None:
    venv = site.top / "opt" / "leptond"
    for prog, unit in (("leptond", "leptond"), ("lepton-agent", "lepton-agent")):
        host = "gpu" if unit == "lepton-agent" else "master"
        svc = service_section(site.root(host) / "etc/systemd/system" / f"{unit}.service")
        assert svc["ExecStart"].split()[0] == str(venv / "bin" / prog)
        assert os.access(venv / "bin" / prog, os.X_OK)


def test_init_group_lets_the_masters_user_and_no_one_else_read_the_secrets(site: Site) -> None:
    etc = site.root("master") / "etc" / "lepton"
    assert mode_owner(etc) == (0o750, "root", site.user)
    for name in ("cluster.key", "admin.token"):
        assert mode_owner(etc / name) == (0o640, "root", site.user), name
    # The master unit's user started and reads its key: it is up, and it is not root.
    master = site.procs[0]
    assert master.poll() is None, (site.top / "leptond.log").read_text()[-2000:]
    assert psutil.Process(master.pid).uids().real == pwd.getpwnam(site.user).pw_uid


def test_the_gpu_host_joined_with_its_join_token_and_holds_no_cluster_key(site: Site) -> None:
    import json

    def nodes() -> list[dict[str, object]]:
        out = subprocess.run(
            [str(site.top / "opt/leptond/bin/leptonctl"), "nodes", "-o", "json"],
            env={**os.environ, **site.env, "LEPTON_CONFIG": "/nonexistent"},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return list(json.loads(out.stdout)) if out.returncode == 0 else []

    wait_for(
        lambda: any(n["name"] == "baremetal-gpu1" and n["state"] == "ready" for n in nodes()),
        90,
        "the GPU host to join",
    )
    gpu = site.root("gpu")
    assert not (gpu / "etc/lepton/cluster.key").exists()
    # Traded for the node's credential, then deleted: it could admit other hosts.
    assert not (gpu / "etc/lepton/join.token").exists()
    state = gpu / "var/lib/lepton-agent"
    # 0711 (as StateDirectoryMode in the unit): tasks pass through to their
    # own directories; nobody else lists or reads it.
    assert mode_owner(state) == (0o711, "root", "root")
    assert mode_owner(state / "node.credential")[:2] == (0o600, "root")
    # The people's token the README makes works, alone on its line.
    made = next(v for k, v in site.outputs.items() if "token create --role submit" in k)
    assert re.fullmatch(r"ltk_[a-z0-9]+_[A-Za-z0-9_-]{43}\n", made), made
    join = (site.top / "work" / "join.token").read_text()
    assert re.fullmatch(r"ltk_j[a-z0-9]+_[A-Za-z0-9_-]{43}\n", join), join
