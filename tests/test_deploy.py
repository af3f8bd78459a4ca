"""What ships in deploy/: Prometheus alerts that promtool accepts and whose
unit tests pass, and a Grafana dashboard that is valid JSON. (That every
query names a metric that exists is checked against live masters and agents
in tests/test_metrics_e2e.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tests.harness import ROOT

PROMTOOL = shutil.which("promtool")
DEPLOY = ROOT / "deploy"


def promtool(*args: str, cwd: Path = DEPLOY / "prometheus") -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool is missing: apt-get install prometheus (.ci/run does)"
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_alert_rules() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 8 rules found" in out.stdout, out.stdout


def test_each_alert_fires_on_its_test_series_and_only_there() -> None:
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
    # Every alert of alerts.yml has a test.
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    tests = (DEPLOY / "prometheus" / "alerts_test.yml").read_text()
    alerts = [line.split(":", 1)[1].strip() for line in rules.splitlines() if "- alert:" in line]
    assert len(alerts) == 8
    for name in alerts:
        assert f"alertname: {name}" in tests, f"{name} has no promtool test"


def test_the_alert_tests_can_fail(tmp_path: Path) -> None:
    # The same tests against a rule that no longer fires must fail.
    for name in ("alerts.yml", "alerts_test.yml"):
        shutil.copy(DEPLOY / "prometheus" / name, tmp_path / name)
    rules = tmp_path / "alerts.yml"
    rules.write_text(rules.read_text().replace('{state="down"} == 1', '{state="down"} == 2'))
    out = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert out.returncode != 0 and "LeptonNodeDown" in out.stdout + out.stderr


def test_the_dashboard_is_valid_json_with_a_query_in_every_panel() -> None:
    dash = json.loads((DEPLOY / "grafana" / "leptond.json").read_text())
    assert dash["title"] == "leptond" and dash["uid"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Cluster", "Nodes", "GPUs", "Users", "Raft"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
