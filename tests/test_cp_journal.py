"""A damaged journal on real masters: corruption stops the master with one
line; a torn tail is repaired; the documented way out brings the member back.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from raft.journal import MAGIC
from tests.cp_support import local_job_ids, module_cluster
from tests.harness import Cluster, Master, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from module_cluster(tmp_path_factory, "cp-journal")


def journal(c: Cluster, m: Master) -> Path:
    return c.root / f"master-{m.index}" / "raft" / "raft.journal"


def entry_offsets(path: Path) -> list[int]:
    """File offsets of the log-entry records (type E), in order."""
    data = path.read_bytes()
    out, offset = [], len(MAGIC)
    while offset + 8 <= len(data):
        length = struct.unpack_from("<I", data, offset)[0]
        if data[offset + 8 : offset + 9] == b"E":
            out.append(offset)
        offset += 8 + length
    return out


def holds(c: Cluster, m: Master, ids: set[str]) -> bool:
    return ids <= set(local_job_ids(m.rpc_addr, c.admin_token))


def follower(c: Cluster) -> Master:
    lead = c.wait_leader(60)
    return next(m for m in c.masters if m is not lead)


def new_log(m: Master, since: int) -> list[str]:
    return m.proc.log.read_bytes()[since:].decode(errors="replace").splitlines()


def test_a_flipped_bit_in_entry_2_of_10_stops_the_master_and_rejoining_brings_it_back(
    cluster: Cluster,
) -> None:
    ids = {cluster.submit("--name", f"j{i}", "--", "true") for i in range(10)}
    victim = follower(cluster)
    wait_for(lambda: holds(cluster, victim, ids), 60, "the follower to hold every job")
    victim.proc.stop()
    path = journal(cluster, victim)
    offsets = entry_offsets(path)
    assert len(offsets) >= 10
    data = bytearray(path.read_bytes())
    after = offsets[1] + 8 + struct.unpack_from("<I", data, offsets[1])[0]
    data[offsets[1] + 8 + 3] ^= 0x10  # one bit inside entry 2's index
    path.write_bytes(bytes(data))

    since = victim.proc.log.stat().st_size
    victim.proc.start()
    wait_for(lambda: not victim.proc.alive(), 60, "the damaged master to stop")
    assert victim.proc.popen is not None and victim.proc.popen.returncode == 1
    lines = new_log(victim, since)
    assert not any("Traceback" in ln for ln in lines), "\n".join(lines)
    said = [ln for ln in lines if ln.startswith("leptond: ")]
    assert said == [
        f"leptond: {path} is corrupt at offset {offsets[1]} (a checksum mismatch, with intact "
        f"records after it at offset {after}); refusing to start: remove this member's "
        "data dir and rejoin it from the other masters (README, Operations)"
    ], "\n".join(lines)
    assert path.read_bytes() == bytes(data)  # nothing repaired behind our back

    # The others serve on, and say who is missing.
    lead = cluster.wait_leader(60)
    st = cluster.ctl_json("cluster", "status", addr=lead.rpc_addr)
    assert st["has_quorum"]
    assert {m["addr"]: m["connected"] for m in st["members"]}[victim.raft_addr] is False
    ids.add(cluster.submit("--", "true"))

    # The way out (README, Operations): remove the member, wipe it, add it back.
    cluster.ctl("cluster", "remove-master", victim.raft_addr, addr=lead.rpc_addr)
    shutil.rmtree(cluster.root / f"master-{victim.index}")
    victim.proc.start()
    cluster.ctl("cluster", "add-master", victim.raft_addr)
    wait_for(lambda: holds(cluster, victim, ids), 90, "the rejoined master to catch up")


def test_a_torn_tail_is_repaired_and_the_master_serves_again(cluster: Cluster) -> None:
    ids = {cluster.submit("--", "true") for _ in range(3)}
    victim = follower(cluster)
    wait_for(lambda: holds(cluster, victim, ids), 60, "the follower to hold every job")
    victim.proc.stop()
    path = journal(cluster, victim)
    last = entry_offsets(path)[-1]
    path.write_bytes(path.read_bytes()[: last + 12] + bytes(4096))  # cut mid-record, then zeros
    since = victim.proc.log.stat().st_size
    victim.proc.start()
    more = {cluster.submit("--", "true") for _ in range(2)}
    wait_for(lambda: holds(cluster, victim, ids | more), 90, "the repaired master to catch up")
    assert victim.proc.alive()
    lines = new_log(victim, since)
    assert any("repairing a torn tail" in ln for ln in lines), "\n".join(lines)
