"""The lease file on a full disk: renewing it needs no new block, and a
reader never takes a record torn by a write under way for a lease."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from agent import lease
from tests.tmpfs import MiB, fill, free_bytes, tmpfs


def test_the_lease_is_renewed_and_cut_on_a_full_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", 2 * MiB) as disk:
        path = disk / lease.LEASE_FILE
        reader = lease.LeaseReader(path)
        lease.write_lease(path, lease.now() + 5, 5, sent=lease.now(), confirm_s=1.0)
        fill(disk)
        assert free_bytes(disk) == 0
        with pytest.raises(OSError) as full:
            (disk / "more").write_bytes(b"x" * 8192)
        assert full.value.errno == errno.ENOSPC
        try:
            for i in range(3):
                until = lease.now() + 3600 + i
                lease.write_lease(path, until, 3600, sent=lease.now(), confirm_s=1.0)
                assert lease.read_expiry(path) == until
                assert not reader.expired()
            assert lease.cap_lease(path, lease.now() - 1)
            assert reader.expired()
            lease.write_lease(path, lease.now() + 3600, 3600)
            lease.mark_handover(path)  # written without the fast path: not ours to mark
            assert not reader.expired()
        finally:
            reader.close()


def test_a_torn_record_is_never_taken_for_a_lease(tmp_path: Path) -> None:
    """A read that races a pwrite may see the start of one record and the
    end of another: e.g. an expiry of 199.9 rewritten as 200.1 read as 209.9,
    a lease far longer than either. The checksum refuses every such mix."""
    old = lease.encode({"expires": 199.9, "lease_s": 10.0, "boot_id": lease.boot_id()})
    new = lease.encode({"expires": 200.1, "lease_s": 10.0, "boot_id": lease.boot_id()})
    assert lease.decode(old) == {"expires": 199.9, "lease_s": 10.0, "boot_id": lease.boot_id()}
    torn = [
        new[:cut] + old[cut:]
        for cut in range(1, len(new))
        if new[:cut] + old[cut:] not in (old, new)
    ]
    assert torn
    assert all(lease.decode(t) is None for t in torn)
    path = tmp_path / lease.LEASE_FILE
    lease.write_lease(path, lease.now() + 60, 60)
    reader = lease.LeaseReader(path)
    assert not reader.expired()
    path.write_bytes(torn[len(torn) // 2])  # a writer that never finishes
    assert lease.read_expiry(path) is None
