"""The SDK's type hints are checked by mypy, as users of it would run it: the
documented example passes, and a misuse of a typed result is caught."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mypy(*paths: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # No cache: mypy would find a module of the same name from an earlier run.
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir=/dev/null", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_sdk_and_its_example_type_check(tmp_path: Path) -> None:
    misuse = tmp_path / "misuse.py"
    misuse.write_text(
        "from leptond.client import Client\n"
        "with Client() as c:\n"
        "    code: int = c.status('j-1').state\n"
        "    c.submit(['python', 'train.py'], gpus='2')\n"
    )
    out = mypy("leptond/client", "examples/sdk.py", str(misuse))
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    # The package and the example are clean; both mistakes in the misuse are found.
    assert all(line.startswith(str(misuse)) for line in errors), (str(misuse), out.stdout)
    assert len(errors) == 2, out.stdout
    assert "Incompatible types in assignment" in errors[0]
    assert 'Argument "gpus" to "submit" of "Client" has incompatible type "str"' in errors[1]
