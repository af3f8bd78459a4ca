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
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

from ..clock import REAL
from . import SimResult, run

# Iteration over sets of ids follows their hashes: a replay needs the same
# string hashing as the run it replays.
HASH_SEED = "0"


def _seeds(text: str) -> list[int]:
    lo, sep, hi = text.partition("-")
    try:
        first = int(lo)
        last = int(hi) if sep else first
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are N or FIRST-LAST, not {text!r}") from None
    if first < 0 or last < first:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return list(range(first, last + 1))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m leptond.sim",
        description="Run the seeded simulation of the control plane (docs/simulator.md).",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--seed", type=int, help="the seed to run")
    which.add_argument("--seeds", type=_seeds, help="a range of seeds, FIRST-LAST")
    p.add_argument("--steps", type=int, default=5000, help="steps per seed (default 5000)")
    p.add_argument("--trace", action="store_true", help="print the whole trace of a seed")
    p.add_argument("--jobs", type=int, default=1, help="processes for --seeds (default 1)")
    p.add_argument(
        "--minutes",
        type=float,
        default=0.0,
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
    out.append(f"replay: python -m leptond.sim --seed {r.seed} --steps {r.steps} --trace")


def _results(seeds: list[int], steps: int, trace: bool, jobs: int) -> Iterator[SimResult]:
    work = [(s, steps, trace) for s in seeds]
    if jobs <= 1:
        yield from map(_one, work)
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        yield from pool.map(_one, work)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1:
        print("--steps must be at least 1", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print("--jobs must be at least 1", file=sys.stderr)
        return 2
    if args.seed is not None:
        out: list[str] = []
        r = _one((args.seed, args.steps, args.trace))
        report(r, out)
        print("\n".join(out))
        print(f"digest {r.digest}")
        return 0 if r.ok else 1
    seeds: list[int] = args.seeds
    until = REAL.monotonic() + 60 * args.minutes if args.minutes > 0 else None
    digests = hashlib.sha256()
    failed = ran = 0
    while True:
        for r in _results(seeds, args.steps, args.trace, args.jobs):
            out = []
            report(r, out)
            print("\n".join(out), flush=True)
            digests.update(f"{r.seed}:{r.digest}\n".encode())
            failed += not r.ok
            ran += 1
        if until is None or REAL.monotonic() >= until:
            break
        width = len(seeds)
        seeds = list(range(seeds[-1] + 1, seeds[-1] + 1 + width))
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
