"""The master's open-file limit fits its RPC connection cap (leptond/fdlimit.py).

Each case runs in its own interpreter: the limits are the process's, and a
lowered hard limit cannot be raised again.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, logging, resource, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
from leptond.fdlimit import fit_connections
soft, hard = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
fits = fit_connections(int(sys.argv[3]), reserved=100)
print(json.dumps({"fits": fits, "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}))
"""


def probe(soft: int, hard: int, want: int) -> tuple[dict[str, int], str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(soft), str(hard), str(want)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout), out.stderr


def hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else int(hard)


def test_soft_limit_is_raised_to_fit_the_cap() -> None:
    hard = hard_limit()
    assert hard >= 1000, "this host's hard open-file limit is too low for the test"
    res, err = probe(64, hard, 500)
    assert res == {"fits": 500, "soft": 600}
    assert err == ""


def test_a_low_hard_limit_shrinks_the_cap_with_one_line() -> None:
    hard = min(hard_limit(), 400)
    res, err = probe(64, hard, 5000)
    assert res == {"fits": hard - 100, "soft": hard}
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"fits {hard - 100} RPC connections, not the 5000 configured" in lines[0]


def test_leptond_refuses_a_tiny_connection_cap_in_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "leptond.cli", "run", "--data-dir", str(tmp_path / "data"),
         "--secret-file", str(tmp_path / "cluster.key"),
         "--admin-token-file", str(tmp_path / "admin.token"), "--max-connections", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip() == "leptond: --max-connections must be at least 16"
    assert not (tmp_path / "data").exists()
