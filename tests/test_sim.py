"""The seeded simulation of the control plane (leptond/sim, docs/simulator.md).

Runs go through `python -m leptond.sim`, which pins PYTHONHASHSEED, so that
what a test sees is what a replay from the command line sees.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from leptond.sim import SimResult, checks, run
from leptond.sim import __main__ as cli
from leptond.sim.world import SimConfig, World
from raft.state import ClusterState
from tests import sim_budget

ROOT = Path(__file__).resolve().parent.parent
SEEDS, STEPS = sim_budget.SEEDS, sim_budget.STEPS


def sim(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "leptond.sim", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dict(os.environ, PYTHONHASHSEED=cli.HASH_SEED),
    )


def digest(out: str) -> str:
    last = out.strip().splitlines()[-1]
    assert last.startswith("digest ") and len(last.split()[1]) == 32, last
    return last.split()[1]


def test_a_seed_replays_the_same_trace() -> None:
    first = sim("--seed", "7", "--steps", "1500", "--trace")
    second = sim("--seed", "7", "--steps", "1500", "--trace")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # The whole trace, line for line, and so its digest: the last line.
    assert first.stdout == second.stdout
    assert digest(first.stdout) == digest(second.stdout)
    lines = first.stdout.splitlines()
    assert len(lines) > 100 and any(" commit " in line for line in lines)
    other = sim("--seed", "8", "--steps", "1500")
    assert digest(other.stdout) != digest(first.stdout)


def test_the_hash_seed_is_pinned_for_a_replay() -> None:
    # Started with another PYTHONHASHSEED, the command line runs itself again
    # with the pinned one: the same digest.
    env = dict(os.environ, PYTHONHASHSEED="12345")
    args = [sys.executable, "-m", "leptond.sim", "--seed", "11", "--steps", "800"]
    other = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert digest(other.stdout) == digest(sim("--seed", "11", "--steps", "800").stdout)


INSPECT = """
from leptond.sim import run
seen = []
r = run(7, 600, inspect=lambda w: seen.append((w.trace.digest(), len(w.raft.log), w.step_no)))
assert seen and seen[0][0] == r.digest and seen[0][1] > 0, seen
print(seen[0][2])
print("digest", r.digest)
"""


def test_a_replay_in_python_stops_where_the_command_line_does_and_shows_the_world() -> None:
    # docs/simulator.md: run(seed, steps, inspect=...) hands over the world
    # where the run stopped; with the hash seed pinned it is the command
    # line's run, digest for digest.
    env = dict(os.environ, PYTHONHASHSEED=cli.HASH_SEED)
    out = subprocess.run(
        [sys.executable, "-c", INSPECT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[0] == "599"  # the last step's number: steps count from 0
    assert digest(out.stdout) == digest(sim("--seed", "7", "--steps", "600").stdout)


@pytest.mark.timeout(0)  # the wait below has its own
def test_the_budget_of_seeds_keeps_every_invariant(
    sim_budget_run: sim_budget.Budget | None,
) -> None:
    # Started when collection ended and run beside the other tests
    # (tests/sim_budget.py); its deadline counts from here, long enough for a
    # suite that kept both cores busy all along.
    rc, out, err = sim_budget.wait_budget(sim_budget_run, timeout_s=1200)
    failures = [line for line in out.splitlines() if "VIOLATION" in line]
    assert rc == 0 and not failures, "\n".join(failures) or err[-3000:]
    assert f"{SEEDS} seeds, 0 with a violation" in out
    assert out.count(f": {STEPS} steps, ") == SEEDS


@pytest.mark.soak
@pytest.mark.timeout(0)
def test_soak(request: pytest.FixtureRequest) -> None:
    """As long as asked: pytest --soak --soak-minutes N tests/test_sim.py."""
    minutes = float(request.config.getoption("--soak-minutes"))
    # 0 minutes: the hundred seeds once, without going on past them.
    longer = ["--minutes", str(minutes)] if minutes > 0 else []
    out = sim(
        "--seeds", "100000-100099", "--steps", str(STEPS), "--jobs", "2", *longer,
        timeout_s=60 * minutes + 900,
    )  # fmt: skip
    failures = [line for line in out.stdout.splitlines() if "VIOLATION" in line]
    assert out.returncode == 0 and not failures, "\n".join(failures)


def test_a_violation_prints_the_seed_the_step_a_trace_and_the_digest_last(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A limit no run keeps: the first commits break it.
    monkeypatch.setattr(checks, "MAX_COMMITS_PER_S", 0)
    assert cli.main(["--seed", "3", "--steps", "400"]) == 1
    out = capsys.readouterr().out.splitlines()
    head = next(line for line in out if "VIOLATION at step" in line)
    assert head.startswith("seed 3: VIOLATION at step ")
    assert "entries committed within a second" in head
    assert "the trace up to it (the last lines):" in out
    assert any(line.startswith("  ") and " commit " in line for line in out)
    # The replay line names this very interpreter, so it works pasted.
    replay = next(line for line in out if line.startswith("replay: "))
    words = shlex.split(replay.removeprefix("replay: "))
    assert os.path.samefile(words[0], sys.executable)
    step = int(head.split("VIOLATION at step ")[1].split()[0])
    assert words[1:] == ["-m", "leptond.sim", "--seed", "3", "--steps", str(step + 1), "--trace"]
    assert out[-1].startswith("digest ")


def test_a_run_stops_at_its_first_violation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "MAX_COMMITS_PER_S", 0)
    r = run(3, 400)
    assert not r.ok and r.at_step is not None and r.steps == r.at_step + 1 < 400
    assert r.violation is not None and r.tail[-1].endswith(f"VIOLATION {r.violation}")


BAD_ARGUMENTS = [
    (["--seed", "abc"], "a seed is a whole number from 0 to 2**63-1, not 'abc'"),
    (["--seed", "-1"], "a seed is a whole number"),
    (["--seed", "99999999999999999999999"], "a seed is a whole number"),
    (["--seed", "\udcff\x01"], "not '\\udcff\\x01'"),  # bytes that were not UTF-8
    (["--seed", "1", "--steps", "0"], "steps are a whole number from 1 to 100,000,000"),
    (["--seed", "1", "--steps", "-5"], "steps are a whole number"),
    (["--seed", "1", "--steps", "1e9"], "steps are a whole number"),
    (["--seed", "1", "--steps", "99999999999999999999"], "steps are a whole number"),
    (["--seeds", "5-3"], "no seeds in '5-3'"),
    (["--seeds", "1-"], "seeds are N or FIRST-LAST, not '1-'"),
    (["--seeds", "a-b"], "seeds are N or FIRST-LAST"),
    (["--seeds", "0-99999999999999999999999"], "seeds go up to 2**63-1"),
    (["--seeds", "0-1", "--minutes", "nan"], "must be a number, 0 or more, not 'nan'"),
    (["--seeds", "0-1", "--minutes", "inf"], "must be a number, 0 or more, not 'inf'"),
    (["--seeds", "0-1", "--minutes", "-1"], "must be a number, 0 or more"),
    (["--seeds", "0-1", "--minutes", "0"], "minutes are more than 0"),
    (["--seeds", "0-1", "--jobs", "0"], "processes are a whole number from 1 to"),
    (["--seeds", "0-1", "--jobs", "10000"], "processes are a whole number from 1 to"),
    (["--seed", "1", "--jobs", "2"], "--jobs and --minutes go with --seeds, not --seed"),
    (["--seed", "1", "--minutes", "1"], "--jobs and --minutes go with --seeds, not --seed"),
    (["--seed", "1", "--seeds", "1-2"], "not allowed with argument --seed"),
    ([], "one of the arguments --seed --seeds is required"),
]


@pytest.mark.parametrize(
    ("argv", "says"), BAD_ARGUMENTS, ids=[" ".join(a) or "none" for a, _ in BAD_ARGUMENTS]
)
def test_a_bad_argument_is_one_line_and_runs_nothing(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[Any] = []
    monkeypatch.setattr(cli, "_one", lambda args: ran.append(args))
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and not ran
    assert err.count("\n") == 1 and err.startswith("python -m leptond.sim: error: "), err
    assert says in err and err.endswith("(see python -m leptond.sim --help)\n"), err


def test_a_huge_bad_argument_is_shown_cut_short(capsys: pytest.CaptureFixture[str]) -> None:
    # An argument can be 128 KiB of 4-byte characters; the line is for a person.
    with pytest.raises(SystemExit):
        cli.main(["--seed", "\U0001f600" * 30_000])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 700, len(err)
    assert err.startswith("python -m leptond.sim: error: argument --seed: a seed is a whole number")
    assert "more characters) (see python -m leptond.sim --help)" in err


def test_bad_arguments_are_one_line_from_the_command_line() -> None:
    out = sim("--seeds", "5-2")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "python -m leptond.sim: error: argument --seeds: no seeds in '5-2' "
        "(see python -m leptond.sim --help)"
    ]


def _result(**kw: Any) -> SimResult:
    base: dict[str, Any] = {
        "seed": 1,
        "steps": 10,
        "violation": None,
        "at_step": None,
        "at_s": 0.5,
        "tail": [],
        "digest": "0" * 32,
        "stats": {
            "virtual_s": 0.5,
            "commits": 1,
            "terms": 1,
            "jobs_acked": 0,
            "runs": 2,
            "faults": {},
        },
    }
    return SimResult(**{**base, **kw})


def test_a_clean_run_says_what_it_did() -> None:
    out: list[str] = []
    cli.report(_result(), out)
    assert out == [
        "seed 1: 10 steps, 0.5s of cluster time, ok "
        "(1 commit, 1 term, 0 jobs, 2 runs; faults: none)"
    ]


def test_the_log_state_is_a_replicas_and_each_entry_is_applied_once_per_replica(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The checker judges the committed log applied in order; a replica that
    has applied exactly the log holds that state, so no fourth copy applies
    every entry again (raftmodel.SimRaft.oracle)."""
    applies = 0
    real_apply = ClusterState.apply

    def counted(self: ClusterState, command: bytes, index: int) -> Any:
        nonlocal applies
        applies += 1
        return real_apply(self, command, index)

    monkeypatch.setattr(ClusterState, "apply", counted)
    world = World(4, SimConfig())
    try:
        world.boot()
        # Past the first storm and the calm after it (faults, elections), to
        # the check that every master caught up with the log.
        assert world.run(2001) == 2001 and not world.problems, world.problems
        log = [data for _, data in world.raft.log]
        assert all(m.member.applied == len(log) for m in world.masters)
        assert applies <= len(world.masters) * len(log)
    finally:
        world.close()
    monkeypatch.setattr(ClusterState, "apply", real_apply)
    fresh = ClusterState()
    for i, data in enumerate(log, 1):
        fresh.apply(data, i)
    assert world.raft.oracle.digest() == fresh.digest()
