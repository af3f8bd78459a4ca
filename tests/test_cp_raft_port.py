"""Unauthenticated bytes on the Raft port of a real leader.

pysyncobj buffered whatever length a peer announced before checking anything:
a 2 GiB length prefix followed by 60 MiB of zeros grew a master by 160 MiB
that it never gave back, and the copying stalled its Raft thread long enough
to cost a leader change. Now the length is refused before a byte of the frame
is buffered and the connection is closed.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import psutil
import pytest

from tests.cp_support import module_cluster
from tests.harness import Cluster, wait_for

pytestmark = pytest.mark.timeout(300)
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # Election timeouts well above a busy test machine's hiccups, far below
    # the seconds the unbounded buffering used to stall the Raft thread.
    yield from module_cluster(
        tmp_path_factory,
        "cp-raft-port",
        master_args=["--raft-min-timeout", "1.5", "--raft-max-timeout", "3"],
    )


def flood(port: int, prefix: bytes, total: int) -> bool:
    """Send `prefix` and up to `total` zero bytes; True once the master has
    closed the connection (while sending, or soon after)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(prefix)
        chunk = bytes(MiB)
        for _ in range(total // MiB):
            sock.sendall(chunk)
        # Sent it all: the master must still close the connection.
        return sock.recv(1) == b""
    except (BrokenPipeError, ConnectionResetError):
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def test_a_2_gib_length_prefix_and_60_mib_of_zeros_cost_no_memory_and_no_election(
    cluster: Cluster,
) -> None:
    lead = cluster.wait_leader(60)
    before = cluster.rpc("cluster_status", addr=lead.rpc_addr)
    proc = psutil.Process(lead.proc.pid)
    rss_before = proc.memory_info().rss

    # 2 GiB - 1 as pysyncobj reads it (a signed int), and exactly 2 GiB.
    for prefix in (struct.pack("i", 2**31 - 1), struct.pack("I", 2**31)):
        assert flood(lead.raft, prefix, 60 * MiB), "the master kept the connection open"

    grown = proc.memory_info().rss - rss_before
    assert grown < 16 * MiB, f"the leader grew by {grown / MiB:.0f} MiB"
    after = cluster.rpc("cluster_status", addr=lead.rpc_addr)
    assert (after["term"], after["leader"]) == (before["term"], before["leader"])
    assert after["has_quorum"]
    # And it still serves: a write commits on every master.
    job = cluster.submit("--", "true")
    for m in cluster.masters:
        wait_for(
            lambda m=m: (
                job
                in {r["id"] for r in cluster.rpc("jobs", {"local": True, "all": True}, m.rpc_addr)}
            ),
            30,
            f"the job on master-{m.index}",
        )
    log = lead.proc.log.read_text(errors="replace")
    assert "raft port: refused a frame of 2147483647 bytes" in log


def test_idle_strangers_cannot_hold_every_connection_slot(cluster: Cluster) -> None:
    lead = cluster.wait_leader(60)
    before = cluster.rpc("cluster_status", addr=lead.rpc_addr)
    socks = [socket.create_connection(("127.0.0.1", lead.raft), timeout=10) for _ in range(100)]
    try:

        def closed(s: socket.socket) -> bool:
            s.setblocking(False)
            try:
                return s.recv(1) == b""
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True

        # The oldest make room for the newest: at most 64 stay open.
        wait_for(lambda: sum(closed(s) for s in socks[:36]) == 36, 30, "the oldest to be closed")
        assert not any(closed(s) for s in socks[-10:])
    finally:
        for s in socks:
            s.close()
    after = cluster.rpc("cluster_status", addr=lead.rpc_addr)
    assert (after["term"], after["leader"]) == (before["term"], before["leader"])
    assert all(m["connected"] for m in after["members"])
