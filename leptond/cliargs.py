"""Command lines whose mistakes are one line (DESIGN: bad input gets a clear
one-line error): argparse prints its whole usage before the error, which for
`leptond run` is thirty lines that push the one that matters off the screen."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from .printable import clean

MAX_SHOWN = 500  # characters of an error shown, before its "(see --help)"


class OneLineParser(argparse.ArgumentParser):
    """argparse, with errors as `PROG: error: WHAT (see PROG --help)`, exit 2.
    Subparsers made from it are of the same kind."""

    def error(self, message: str) -> NoReturn:
        # argparse quotes the argument it refuses: an argument can be 128 KiB,
        # and the line is for a person.
        text = clean(f"{self.prog}: error: {message}")
        if len(text) > MAX_SHOWN:
            text = f"{text[:MAX_SHOWN]}... ({len(text) - MAX_SHOWN} more characters)"
        sys.stderr.write(f"{text} (see {self.prog} --help)\n")
        sys.exit(2)


def number(v: str) -> float:
    """A finite number, 0 or more (seconds, rates): `nan` would compare false
    with everything, so a TTL of nan would never let a node go down."""
    try:
        x = float(v)
    except ValueError:
        x = float("nan")
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number, 0 or more, not {v!r}")
    return x


def count(v: str) -> int:
    """A whole number, 0 or more (bytes, entries, connections)."""
    try:
        n = int(v)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, not {v!r}")
    return n
