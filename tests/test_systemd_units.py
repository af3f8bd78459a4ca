"""The unit files must pass systemd's own checker and keep the promised settings."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def _unit(name: str) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((UNITS / name).read_text().replace("\\\n", " "))
    return cp


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("name", ["leptond.service", "lepton-agent.service"])
def test_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    # verify checks that ExecStart's binary exists: stand in executables for it.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for prog in ("leptond", "lepton-agent"):
        (bindir / prog).write_text("#!/bin/sh\nexit 0\n")
        (bindir / prog).chmod(0o755)
    text = (UNITS / name).read_text().replace("/opt/leptond/bin/", f"{bindir}/")
    unit = tmp_path / name
    unit.write_text(text)
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        ln
        for ln in out.stderr.splitlines()
        if name in ln or "Unknown" in ln or "error" in ln.lower()
    ]
    assert out.returncode == 0 and not problems, out.stderr


def test_agent_registers_on_boot_and_survives_its_own_restart() -> None:
    agent = _unit("lepton-agent.service")
    assert agent["Install"]["WantedBy"] == "multi-user.target"
    assert agent["Service"]["Restart"] == "on-failure"
    # Tasks live under their own supervisors: stopping the agent must not kill them.
    assert agent["Service"]["KillMode"] == "process"
    assert agent["Service"]["EnvironmentFile"].endswith("lepton-agent.env")


def test_agent_unit_runs_as_root_with_delegated_cgroups_and_task_limits() -> None:
    text = (UNITS / "lepton-agent.service").read_text()
    svc = _unit("lepton-agent.service")["Service"]
    assert "User" not in svc  # root: it switches to each task's user
    assert "runs as root" in text.lower() and "cgroup" in text
    for key, value in (
        ("Delegate", "yes"),
        ("LimitMEMLOCK", "infinity"),
        ("LimitSTACK", "infinity"),
        ("TasksMax", "infinity"),
        ("OOMScoreAdjust", "-999"),
    ):
        assert svc[key] == value, key
    # It joins with a join token; the cluster key is for masters only.
    assert "--join-token-file" in svc["ExecStart"] and "secret" not in svc["ExecStart"]
    assert svc["ExecStart"].startswith("/opt/leptond/bin/lepton-agent ")


def test_shipped_env_files_keep_tasks_alive_on_restart_and_raft_off_wildcards() -> None:
    agent_env = (UNITS / "lepton-agent.env.example").read_text()
    settings = [ln for ln in agent_env.splitlines() if ln and not ln.startswith("#")]
    assert not any("--leave-on-stop" in ln for ln in settings), settings
    assert "cluster.key" not in agent_env
    master_env = (UNITS / "leptond.env.example").read_text()
    values = dict(ln.split("=", 1) for ln in master_env.splitlines() if ln and ln[0] != "#")
    assert not any("0.0.0.0" in v for v in values.values()), values
    # Raft listens on the advertised address: the master's own.
    assert values["LEPTON_ADVERTISE"] == values["LEPTON_BIND"] != "0.0.0.0"
    assert f"{values['LEPTON_ADVERTISE']}:{values['LEPTON_RAFT_PORT']}" in values["LEPTON_PEERS"]


def test_master_unit_is_hardened_and_restarts() -> None:
    master = _unit("leptond.service")
    svc = master["Service"]
    assert svc["Restart"] == "on-failure"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["ProtectSystem"] == "strict"
    assert "--peers" in svc["ExecStart"]
    assert svc["User"] == "lepton" and svc["ExecStart"].startswith("/opt/leptond/bin/leptond ")


def test_env_templates_name_every_variable_the_units_use() -> None:
    import re

    for unit, env in (
        ("leptond.service", "leptond.env.example"),
        ("lepton-agent.service", "lepton-agent.env.example"),
    ):
        used = set(re.findall(r"\$\{?(LEPTON_[A-Z_]+)", (UNITS / unit).read_text()))
        defined = {
            ln.split("=", 1)[0]
            for ln in (UNITS / env).read_text().splitlines()
            if "=" in ln and not ln.startswith("#")
        }
        assert used <= defined, used - defined
