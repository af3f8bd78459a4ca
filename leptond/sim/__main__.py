"""python -m leptond.sim --seed N --steps S: run the simulation of one seed, or many.

On a violation it prints the seed, the step, what was violated, the last
lines of the trace and the command that replays it; the last line printed
is always `digest HEX`, a hash of the whole trace (of every seed's, with
--seeds), the same on every run of the same seed and steps.
docs/simulator.md says how to read a failure.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import shlex
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor

from ..cliargs import OneLineParser, number
from ..clock import REAL
from . import SimResult, run

# Iteration over sets of ids follows their hashes: a replay needs the same
# string hashing as the run it replays.
HASH_SEED = "0"


MAX_SEED = 2**63 - 1
MAX_STEPS = 100_000_000  # about an hour and a half of one core for one seed
MAX_MINUTES = 1_000_000.0


def _whole(what: str, lo: int, hi: int, upto: str) -> Callable[[str], int]:
    """An argument type: a whole number from `lo` to `hi` (`upto` says `hi`
    to people), else one line that names `what` and the range."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = lo - 1
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(
                f"{what} a whole number from {lo} to {upto}, not {text!r}"
            )
        return n

    return parse


def _seeds(text: str) -> range:
    lo, sep, hi = text.partition("-")
    try:
        first = int(lo)
        last = int(hi) if sep else first
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are N or FIRST-LAST, not {text!r}") from None
    if last > MAX_SEED:
        raise argparse.ArgumentTypeError(f"seeds go up to 2**63-1, not {text!r}")
    if first < 0 or last < first:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return range(first, last + 1)


def _minutes(text: str) -> float:
    m = number(text)
    if not 0 < m <= MAX_MINUTES:
        raise argparse.ArgumentTypeError(
            f"minutes are more than 0 and at most {MAX_MINUTES:g}, not {text!r}"
        )
    return m


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m leptond.sim",
        description="Run the seeded simulation of the control plane (docs/simulator.md).",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--seed", type=_whole("a seed is", 0, MAX_SEED, "2**63-1"), help="the seed to run"
    )
    which.add_argument("--seeds", type=_seeds, help="a range of seeds, FIRST-LAST")
    steps = _whole("steps are", 1, MAX_STEPS, f"{MAX_STEPS:,}")
    p.add_argument("--steps", type=steps, default=5000, help="steps per seed (default 5000)")
    p.add_argument("--trace", action="store_true", help="print the whole trace of a seed")
    most = 4 * (os.cpu_count() or 1)
    jobs = _whole("processes are", 1, most, f"{most} (4 per CPU)")
    p.add_argument("--jobs", type=jobs, help="with --seeds: processes to run them in (default 1)")
    p.add_argument(
        "--minutes",
        type=_minutes,
        help="with --seeds: keep going with further seeds until this long has passed",
    )
    return p


def _one(args: tuple[int, int, bool]) -> SimResult:
    seed, steps, trace = args
    return run(seed, steps, keep_trace=trace)


def _n(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


def report(r: SimResult, out: list[str]) -> None:
    """What is printed for one seed (without the digest line)."""
    if r.trace is not None:
        out.extend(r.trace)
    if r.ok:
        st = r.stats
        faults = ", ".join(f"{k} {v}" for k, v in st["faults"].items()) or "none"
        counts = ", ".join(
            _n(st[key], what) for key, what in (("commits", "commit"), ("terms", "term"))
        )
        out.append(
            f"seed {r.seed}: {r.steps} steps, {st['virtual_s']:g}s of cluster time, ok "
            f"({counts}, {_n(st['jobs_acked'], 'job')}, {_n(st['runs'], 'run')}; "
            f"faults: {faults})"
        )
        return
    out.append(f"seed {r.seed}: VIOLATION at step {r.at_step} (t={r.at_s:.3f}s): {r.violation}")
    if r.trace is None:
        out.append("the trace up to it (the last lines):")
        out.extend(f"  {line}" for line in r.tail)
    out.append(f"replay: {_python()} -m leptond.sim --seed {r.seed} --steps {r.steps} --trace")


def _python() -> str:
    """This interpreter, as the replay line names it: relative to where the
    run was started from when it lies below it (`.venv/bin/python`), so the
    line works pasted into the same shell; else its full path."""
    exe = sys.executable or "python"  # empty where the interpreter cannot tell
    try:
        rel = os.path.relpath(exe)
    except ValueError:  # another drive
        rel = exe
    return shlex.quote(exe if rel.startswith("..") else rel)


def _results(seeds: range, steps: int, trace: bool, jobs: int) -> Iterator[SimResult]:
    """Each seed's result, in the order of the seeds. With processes, a few
    seeds per process are handed out at a time (not the whole range at once:
    a range of a billion seeds would be a billion futures)."""
    if jobs <= 1:
        for seed in seeds:
            yield _one((seed, steps, trace))
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        todo = iter(seeds)
        ahead: deque[Future[SimResult]] = deque()
        for seed in itertools.islice(todo, 2 * jobs):
            ahead.append(pool.submit(_one, (seed, steps, trace)))
        while ahead:
            r = ahead.popleft().result()
            more = next(todo, None)
            if more is not None:
                ahead.append(pool.submit(_one, (more, steps, trace)))
            yield r


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.seed is not None:
        if args.jobs is not None or args.minutes is not None:
            p.error("--jobs and --minutes go with --seeds, not --seed")
        out: list[str] = []
        r = _one((args.seed, args.steps, args.trace))
        report(r, out)
        print("\n".join(out))
        print(f"digest {r.digest}")
        return 0 if r.ok else 1
    seeds: range = args.seeds
    jobs = args.jobs or 1
    until = None if args.minutes is None else REAL.monotonic() + 60 * args.minutes
    digests = hashlib.sha256()
    failed = ran = 0
    while True:
        for r in _results(seeds, args.steps, args.trace, jobs):
            out = []
            report(r, out)
            print("\n".join(out), flush=True)
            digests.update(f"{r.seed}:{r.digest}\n".encode())
            failed += not r.ok
            ran += 1
        if until is None or REAL.monotonic() >= until or seeds.stop > MAX_SEED:
            break
        seeds = range(seeds.stop, min(seeds.stop + len(seeds), MAX_SEED + 1))
    print(f"{ran} seeds, {failed} with a violation")
    print(f"digest {digests.hexdigest()[:32]}")
    return 1 if failed else 0


def _pin_hash_seed() -> None:
    """Run again with the string hashing pinned, unless it already is."""
    if os.environ.get("PYTHONHASHSEED") != HASH_SEED:
        env = dict(os.environ, PYTHONHASHSEED=HASH_SEED)
        os.execve(sys.executable, [sys.executable, "-m", "leptond.sim", *sys.argv[1:]], env)


if __name__ == "__main__":
    _pin_hash_seed()
    sys.exit(main())
