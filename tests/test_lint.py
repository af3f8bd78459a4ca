"""Checks over the source tree that keep the suite working on a clean machine."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tests", "bench", "leptond", "agent", "leptonctl", "raft", "scheduler")
# A quoted "python3" or 'python3' as a program name: the system interpreter,
# which on a clean machine has none of our dependencies. Use sys.executable.
SYSTEM_PYTHON = re.compile(r"""["']python3["']""")


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_nothing_launches_the_system_python() -> None:
    me = Path(__file__).resolve()
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _sources()
        if p.resolve() != me
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if SYSTEM_PYTHON.search(line)
    ]
    assert len(_sources()) > 50
    assert not hits, f"use sys.executable, not python3: {hits}"
