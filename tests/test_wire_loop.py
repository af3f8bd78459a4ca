"""Process set-up for the event loop."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import ROOT, env


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux only")
def test_tune_malloc_takes_effect_on_glibc() -> None:
    # In a fresh process, so this test process keeps its own allocator settings.
    code = "from leptond.wire.loop import tune_malloc; print(tune_malloc())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert out.stdout.strip() == "True"
