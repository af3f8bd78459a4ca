"""Every benchmark starts without the test tools: `bench/*.py --help` runs in
an interpreter where pytest and hypothesis cannot be imported (a venv with only
`pip install .` and what the benchmark's docstring names)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted((ROOT / "bench").glob("*.py"))

# Hides the test-only packages, as a plain `pip install .` would.
RUN_WITHOUT_TEST_TOOLS = """
import runpy, sys
for name in ("pytest", "_pytest", "hypothesis", "pytest_asyncio", "pytest_timeout"):
    sys.modules[name] = None
path = sys.argv[1]
sys.argv = [path, "--help"]
runpy.run_path(path, run_name="__main__")
"""


def test_there_are_benchmarks() -> None:
    assert len(BENCHES) >= 5, BENCHES


@pytest.mark.parametrize("bench", BENCHES, ids=[b.name for b in BENCHES])
def test_bench_help_runs_without_pytest(bench: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_TEST_TOOLS, str(bench)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout, out.stdout[-500:]


def test_no_benchmark_shadows_a_standard_module() -> None:
    # `python bench/x.py` puts bench/ first on sys.path: a bench/array.py
    # would be what `socket` gets for `import array`, in every other bench.
    shadowing = [b.name for b in BENCHES if b.stem in sys.stdlib_module_names]
    assert shadowing == []
