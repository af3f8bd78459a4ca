"""The three programs: installed entry points, --help, and `leptond init`."""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leptonctl.commands import node_state
from leptonctl.output import clean, table
from leptond.wire.tokens import SECRET_LEN, parse_token
from tests.harness import ROOT, env

PROGRAMS = {"leptond": "leptond.cli", "lepton-agent": "agent.cli", "leptonctl": "leptonctl.cli"}


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env(), cwd=ROOT)


@pytest.mark.parametrize("prog", sorted(PROGRAMS))
def test_each_program_answers_help(prog: str) -> None:
    installed = Path(sys.executable).parent / prog
    if sys.prefix != sys.base_prefix:
        # In the test venv, `pip install .` must have put the console scripts on PATH.
        assert installed.exists(), f"{prog} is not installed next to {sys.executable}"
        out = run(str(installed), "--help")
    else:
        out = run(sys.executable, "-m", PROGRAMS[prog], "--help")
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


DAEMON_MISTAKES = [
    # (program, argv, what the one line says). A TTL of nan would compare
    # false with every silence, so no node would ever go down.
    (
        "leptond.cli",
        ["run", "--heartbeat-ttl", "nan"],
        "argument --heartbeat-ttl: must be a number, 0 or more, not 'nan'",
    ),
    (
        "leptond.cli",
        ["run", "--kill-grace", "inf"],
        "argument --kill-grace: must be a number, 0 or more",
    ),
    (
        "leptond.cli",
        ["run", "--heartbeat-ttl", "-1"],
        "argument --heartbeat-ttl: must be a number, 0 or more",
    ),
    (
        "leptond.cli",
        ["run", "--block-cache-bytes", "-5"],
        "argument --block-cache-bytes: must be a whole number",
    ),
    ("leptond.cli", ["run", "--rpc-port", "x"], "a port is a number from 0 to 65535, not 'x'"),
    ("leptond.cli", ["run"], "the following arguments are required: --data-dir"),
    ("leptond.cli", ["bogus"], "argument cmd: invalid choice: 'bogus'"),
    (
        "agent.cli",
        ["run", "--masters", "m:1", "--data-dir", "d", "--heartbeat", "nan"],
        "argument --heartbeat: must be a number",
    ),
    ("agent.cli", [], "the following arguments are required: cmd"),
]


@pytest.mark.parametrize(("module", "argv", "says"), DAEMON_MISTAKES)
def test_a_daemons_bad_argument_is_one_line(module: str, argv: list[str], says: str) -> None:
    # argparse's own answer is the whole usage, then the error: for
    # `leptond run` thirty lines above the one that matters.
    out = run(sys.executable, "-m", module, *argv)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and says in lines[0] and lines[0].endswith("--help)"), out.stderr


def test_init_creates_private_secrets_and_refuses_to_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "secrets"
    out = run(sys.executable, "-m", "leptond.cli", "init", str(d))
    assert out.returncode == 0, out.stderr
    key, tok = d / "cluster.key", d / "admin.token"
    assert out.stdout.split() == [str(key), str(tok)]
    assert len(key.read_bytes()) == SECRET_LEN
    assert parse_token(tok.read_text()).id == "admin"
    for p in (key, tok):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    before = (key.read_bytes(), tok.read_bytes())
    again = run(sys.executable, "-m", "leptond.cli", "init", str(d))
    assert again.returncode != 0
    assert "refusing to overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert (key.read_bytes(), tok.read_bytes()) == before


def test_master_will_not_start_without_a_usable_secret(tmp_path: Path) -> None:
    (tmp_path / "short.key").write_bytes(b"too short")
    (tmp_path / "admin.token").write_text("nonsense")
    for secret in ("missing.key", "short.key"):
        out = run(
            sys.executable,
            "-m",
            "leptond.cli",
            "run",
            "--data-dir",
            str(tmp_path / "d"),
            "--secret-file",
            str(tmp_path / secret),
            "--admin-token-file",
            str(tmp_path / "admin.token"),
        )
        assert out.returncode == 1
        assert "Traceback" not in out.stderr
        assert secret in out.stderr


def test_usage_errors_exit_2_with_one_line() -> None:
    for argv in (["submit", "--gpus", "two", "--", "true"], ["nodez"], ["submit"]):
        out = run(
            sys.executable,
            "-m",
            "leptonctl.cli",
            "--addr",
            "127.0.0.1:1",
            "--token",
            "ltk_admin_" + "A" * 43,
            *argv,
        )
        assert out.returncode == 2, (argv, out.stderr)
        assert "Traceback" not in out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("leptonctl")


@pytest.mark.parametrize("deadline", ["10x", "soon", "0s", "-5m", "400d", ""])
def test_a_bad_drain_deadline_is_one_line_and_exit_2_before_anything_is_sent(
    deadline: str,
) -> None:
    # The shortcut takes the value as the next word; `--deadline -5m` would be
    # argparse's own error (an option where a value goes), so it gets `=` too.
    shortcut = ["--deadline", deadline] if deadline[:1] != "-" else [f"--deadline={deadline}"]
    for argv in (["node", "drain", "h1", f"--deadline={deadline}"], ["drain", "h1", *shortcut]):
        # Nothing listens at 127.0.0.1:1: reaching the cluster would be another error.
        out = run(
            sys.executable, "-m", "leptonctl.cli", "--addr", "127.0.0.1:1",
            "--token", "ltk_admin_" + "A" * 43, *argv,
        )  # fmt: skip
        assert out.returncode == 2, (argv, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("leptonctl: error: --deadline"), lines


def test_nodes_show_how_long_a_drain_has_left() -> None:
    now = time.time()
    assert node_state("ready", None) == "ready"
    assert node_state("draining", None) == "draining"
    assert node_state("draining", now + 240.2) == "draining (deadline in 4m)"
    assert node_state("draining", now + 30.4) == "draining (deadline in 30s)"
    assert node_state("draining", now + 3599) == "draining (deadline in 1.0h)"
    assert node_state("draining", now + 5 * 86400) == "draining (deadline in 5.0d)"
    assert node_state("draining", now - 1) == "draining (deadline passed)"


def test_init_with_a_group_that_does_not_exist_is_one_line_and_creates_nothing(
    tmp_path: Path,
) -> None:
    d = tmp_path / "secrets"
    out = run(sys.executable, "-m", "leptond.cli", "init", str(d), "--group", "no-such-group-x")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-group-x" in lines[0] and "groupadd" in lines[0], lines
    assert not d.exists()


def test_init_with_a_group_makes_the_secrets_readable_by_that_group_only(tmp_path: Path) -> None:
    import grp

    group = f"ltg{os.getpid() % 100000}"
    made = subprocess.run(["groupadd", "--system", group], capture_output=True, timeout=30)
    assert made.returncode == 0, made.stderr
    try:
        d = tmp_path / "secrets"
        out = run(sys.executable, "-m", "leptond.cli", "init", str(d), "--group", group)
        assert out.returncode == 0, out.stderr
        gid = grp.getgrnam(group).gr_gid
        for p, mode in ((d, 0o750), (d / "cluster.key", 0o640), (d / "admin.token", 0o640)):
            st = os.stat(p)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 0, gid), p
    finally:
        subprocess.run(["groupdel", group], capture_output=True, timeout=30)


@pytest.mark.parametrize(
    "flags, what",
    [
        (["--max-priority", "alice"], "--max-priority"),
        (["--max-priority", "alice=lots"], "--max-priority"),
        (["--max-priority", "alice=5000"], "--max-priority"),
        (["--default-max-priority", "x"], "--default-max-priority"),
        (["--bind", "0.0.0.0"], "wildcard"),
        (["--advertise", "::"], "wildcard"),
    ],
)
def test_bad_master_policy_flags_are_one_line_and_exit_2(
    tmp_path: Path, flags: list[str], what: str
) -> None:
    out = run(
        sys.executable, "-m", "leptond.cli", "run", "--data-dir", str(tmp_path / "d"),
        "--secret-file", str(tmp_path / "k"), "--admin-token-file", str(tmp_path / "t"), *flags,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and what in lines[0], lines
    assert not (tmp_path / "d").exists()


def _undocumented(p: argparse.ArgumentParser, path: str) -> list[str]:
    """Flags and arguments of `p` and its subcommands that have no help text."""
    missing = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _undocumented(sub, f"{path} {name}")
        elif isinstance(action, argparse._HelpAction):
            continue
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_flag_of_every_program_says_what_it_does() -> None:
    from agent.cli import parser as agent_parser
    from leptonctl.cli import parser as ctl_parser
    from leptond.cli import parser as leptond_parser

    missing = (
        _undocumented(ctl_parser(), "leptonctl")
        + _undocumented(leptond_parser(), "leptond")
        + _undocumented(agent_parser(), "lepton-agent")
    )
    assert missing == []


def test_gpus_help_says_it_is_per_node() -> None:
    out = run(sys.executable, "-m", "leptonctl.cli", "submit", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "GPUs per node" in text and "Slurm's --gpus is per job" in text


@pytest.mark.parametrize("prog", ["leptonctl.cli", "leptond.cli"])
def test_version(prog: str) -> None:
    from importlib.metadata import version

    out = run(sys.executable, "-m", prog, "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [prog.split(".")[0], version("leptond")]


CTL = [sys.executable, "-m", "leptonctl.cli", "--addr", "127.0.0.1:1", "--token", "ltk_admin_" + "A" * 43]  # fmt: skip


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["python", "-c", "print(1)", "--gpus", "1"], "--gpus"),
        (["train.py", "--nodes=2"], "--nodes"),
        (["sh", "-c", "true", "--wait"], "--wait"),
    ],
)
def test_a_flag_of_submit_after_the_command_is_refused_with_a_hint(
    argv: list[str], flag: str
) -> None:
    # Nothing listens at 127.0.0.1:1: a submit that went ahead would say so instead.
    out = run(*CTL, "submit", *argv)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and " -- " in lines[0], lines


def test_with_dashes_the_same_words_are_the_command() -> None:
    from leptonctl.cli import check_submit_command

    words = ["--", "python", "-c", "print(1)", "--gpus", "1"]
    assert check_submit_command(words) == words[1:]


@pytest.mark.parametrize("gpus", ["99999999999999999999", "-1", "2000", "two"])
def test_an_impossible_gpu_count_is_one_line_before_anything_is_sent(gpus: str) -> None:
    out = run(*CTL, "submit", "--gpus", gpus, "--", "true")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--gpus" in lines[0] and "Traceback" not in out.stderr, lines


@pytest.mark.parametrize(
    "addr, words",
    [
        ("http://127.0.0.1:7441", ["is a URL", "HOST:PORT", "7441"]),
        ("https://10.0.0.1:7440/", ["is a URL", "e.g. 10.0.0.1:7441"]),
    ],
)
def test_a_url_for_an_address_is_refused_with_a_hint(addr: str, words: list[str]) -> None:
    out = run(sys.executable, "-m", "leptonctl.cli", "--addr", addr, "--token",
              "ltk_admin_" + "A" * 43, "jobs")  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text", "plain text"),
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x7f\x9b\u00a0", "\\x7f\\x9b\\xa0"),
        ("rtl\u202eoverride\u2028", "rtl\\u202eoverride\\u2028"),
        ("\U000e0001 tag", "\\U000e0001 tag"),
        ("日本語 \U0001f680 é", "日本語 \U0001f680 é"),
        (None, ""),
        (42, "42"),
    ],
)
def test_clean_escapes_what_could_drive_a_terminal(raw: object, shown: str) -> None:
    assert clean(raw) == shown


def test_a_table_cell_cannot_forge_a_row(capsys: pytest.CaptureFixture[str]) -> None:
    table(["ID", "NAME"], [["j-1", "x\nj-2  forged\x1b[2K"]])
    out = capsys.readouterr().out
    assert out.splitlines() == ["ID   NAME", "j-1  x\\nj-2  forged\\x1b[2K"]
