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
    text = (UNITS / name).read_text().replace("/usr/local/bin/", f"{bindir}/")
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


def test_master_unit_is_hardened_and_restarts() -> None:
    master = _unit("leptond.service")
    svc = master["Service"]
    assert svc["Restart"] == "on-failure"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["ProtectSystem"] == "strict"
    assert "--peers" in svc["ExecStart"]


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
