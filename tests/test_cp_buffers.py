"""A master's memory under authenticated connections that each hold a partly
sent frame of the largest size (16 MiB): with `--max-buffered-bytes`, what
they make it buffer stays within that budget, and it keeps answering.

Before the cap, 60 such connections took a leader from 145 MiB to 992 MiB.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
import urllib.request
from collections.abc import Iterator

import psutil
import pytest

from leptond.wire.codec import MAX_FRAME
from leptond.wire.tokens import parse_token
from tests.harness import Cluster, Master
from tests.wire_raw import RawPeer

MiB = 1024 * 1024
BUDGET = 32 * MiB
CONNECTIONS = 60
# Besides the budget: each paused connection may hold one socket read (at most
# 256 KiB) of its frame, and the allocator keeps some slack.
BOUND = BUDGET + CONNECTIONS * 256 * 1024 + 48 * MiB


@pytest.fixture(scope="module")
def one_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Master]]:
    c = Cluster(
        tmp_path_factory.mktemp("cp-buffers") / "cluster",
        n_masters=1,
        master_args=["--max-buffered-bytes", f"{BUDGET // MiB}M"],
    )
    try:
        m = c.start_masters(timeout_s=60)
        yield c, m
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def metric(m: Master, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{m.http}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def test_partial_frames_stay_within_the_buffer_budget(one_master: tuple[Cluster, Master]) -> None:
    c, m = one_master
    tok = parse_token(c.admin_token)
    peers = [RawPeer.connect(m.rpc, psk=tok.psk, key_id=tok.id) for _ in range(CONNECTIONS)]
    try:
        assert peers[0].call("whoami", {})["role"] == "admin"
        base = rss(m.proc.pid)
        chunk = memoryview(bytes(MiB))
        left: dict[int, int] = {}  # peer index -> bytes still to send
        for k, p in enumerate(peers):
            # A frame of the largest size, of which all but the last MiB is sent.
            p.sock.sendall(MAX_FRAME.to_bytes(4, "big"))
            p.sock.setblocking(False)
            left[k] = MAX_FRAME - MiB
        peak = base
        last_progress = time.monotonic()
        while left and time.monotonic() - last_progress < 3.0:
            progressed = False
            for k in list(left):
                try:
                    n = peers[k].sock.send(chunk[: min(len(chunk), left[k])])
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                        raise
                    continue
                progressed = progressed or n > 0
                left[k] -= n
                if left[k] == 0:
                    del left[k]
            if progressed:
                last_progress = time.monotonic()
            else:
                time.sleep(0.05)
            peak = max(peak, rss(m.proc.pid))
            if peak - base > BOUND:
                break  # no point making an uncapped master take a gigabyte
        # What was sent has been read (or is held back by TCP); look a while longer.
        settle = time.monotonic() + 2.0
        while time.monotonic() < settle:
            peak = max(peak, rss(m.proc.pid))
            time.sleep(0.1)
        grew = peak - base
        assert grew < BOUND, (
            f"the master grew by {grew / MiB:.0f} MiB under {CONNECTIONS} partial frames "
            f"(budget {BUDGET / MiB:.0f} MiB, bound {BOUND / MiB:.0f} MiB)"
        )
        # Held back, not refused: most senders are blocked by TCP, not closed.
        assert len(left) >= CONNECTIONS - BUDGET // MAX_FRAME - 2, len(left)
        assert 0 < metric(m, "lepton_rpc_partial_frame_bytes") <= BUDGET
        assert metric(m, "lepton_rpc_partial_frame_waiting") >= CONNECTIONS - BUDGET // MAX_FRAME
        # Meanwhile it answers everyone else.
        st = c.rpc("cluster_status", addr=m.rpc_addr, timeout_s=20)
        assert st["is_leader"]
        job = c.rpc("submit", {"spec": {"argv": ["true"]}, "rid": "buffers-0001"})["id"]
        assert c.status(job)["state"] == "pending"
    finally:
        for p in peers:
            with contextlib.suppress(OSError):
                p.sock.shutdown(socket.SHUT_RDWR)
            p.close()
    # With the senders gone, a frame of nearly the largest size gets through.
    blob = bytes(MAX_FRAME - 1024)
    out = c.rpc("whoami", {"pad": blob}, addr=m.rpc_addr, timeout_s=60)
    assert out["role"] == "admin"
