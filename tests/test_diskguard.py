"""What the agent's disk watchdog measures and frees (agent/diskguard.py),
on real files: sparse files count what they take, symlinks are never
followed, and a file with another hard link is left alone."""

from __future__ import annotations

import os
from pathlib import Path

from agent.diskguard import (
    DiskSpace,
    GiB,
    MiB,
    Usage,
    default_inode_reserve,
    default_reserve,
    eviction_message,
    measure,
    release,
    remove_files,
    usage,
)

TB = 1 << 40


def test_the_default_reserve_is_5_percent_within_its_bounds() -> None:
    assert default_reserve(100 * GiB) == 5 * GiB
    assert default_reserve(10 * GiB) == 1 * GiB  # the floor
    assert default_reserve(4 * TB) == 10 * GiB  # the ceiling
    assert default_reserve(64 * MiB) == 16 * MiB  # a quarter of a small disk


def test_usage_counts_blocks_and_release_frees_them_without_leaving_the_tree(
    tmp_path: Path,
) -> None:
    work, outside = tmp_path / "work", tmp_path / "outside"
    (work / "sub").mkdir(parents=True)
    outside.mkdir()
    big = work / "sub" / "big"
    big.write_bytes(b"\x01" * (4 * MiB))
    sparse = work / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB long, nothing allocated
    precious = outside / "precious"
    precious.write_bytes(b"\x02" * MiB)
    (work / "link").symlink_to(outside)
    (work / "file-link").symlink_to(precious)
    shared = outside / "shared"
    shared.write_bytes(b"\x03" * MiB)
    os.link(shared, work / "shared")
    used = usage(work)
    assert 5 * MiB <= used < 6 * MiB, used  # big and the hard link, not the sparse file
    with open(big, "ab") as held:  # still open in a task: truncation frees it anyway
        freed = release(work)
        assert os.fstat(held.fileno()).st_blocks == 0
    assert 4 * MiB <= freed < 5 * MiB, freed
    assert big.stat().st_size == 0
    assert precious.read_bytes() == b"\x02" * MiB
    assert shared.read_bytes() == b"\x03" * MiB
    assert usage(work) < 2 * MiB


def test_the_agent_refuses_a_reserve_as_big_as_its_disk(tmp_path: Path) -> None:
    import subprocess
    import sys

    total = os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--masters", "127.0.0.1:1",
         "--data-dir", str(tmp_path / "d"), "--disk-reserve", str(total)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lepton-agent: --disk-reserve: "), r.stderr
    assert "never take a task" in lines[0] and not (tmp_path / "d").exists()


def test_the_default_inode_reserve_is_5_percent_within_its_bounds() -> None:
    assert default_inode_reserve(1_000_000) == 50_000
    assert default_inode_reserve(100_000) == 10_000  # the floor
    assert default_inode_reserve(100_000_000) == 1_000_000  # the ceiling
    assert default_inode_reserve(20_000) == 5_000  # a quarter of a small file system
    assert default_inode_reserve(0) == 0  # inodes made as needed: no reserve


def test_inodes_short_or_not_and_which_is_shorter() -> None:
    def disk(free_b: int, free_i: int, inode_reserve: int = 100) -> DiskSpace:
        return DiskSpace("/d", free_b, 100 * MiB, 10 * MiB, free_i, 1000, inode_reserve)

    assert not disk(50 * MiB, 500).low
    only_inodes = disk(50 * MiB, 5)
    assert only_inodes.low and only_inodes.short_of_inodes
    assert only_inodes.reason().startswith("inodes full: 5 of 1000 inodes free in /d")
    assert "had 5 inodes free, under its reserve of 100; this task had 7 files" in (
        eviction_message(only_inodes, Usage(0, 7))
    )
    assert not disk(5 * MiB, 500).short_of_inodes  # bytes are what is short
    assert disk(5 * MiB, 5).short_of_inodes  # 5 % of its inode reserve, 50 % of bytes'
    assert not disk(1 * MiB, 90).short_of_inodes  # 10 % of bytes', 90 % of inodes'
    assert not disk(50 * MiB, 0, inode_reserve=0).low  # no inode reserve


def test_measure_counts_files_and_remove_files_stays_in_the_tree(tmp_path: Path) -> None:
    work, outside = tmp_path / "work", tmp_path / "outside"
    (work / "sub").mkdir(parents=True)
    outside.mkdir()
    for i in range(50):
        (work / "sub" / str(i)).touch()
    precious = outside / "precious"
    precious.write_bytes(b"p")
    (work / "link").symlink_to(outside)
    (work / "file-link").symlink_to(precious)
    assert measure(work).files == 1 + 1 + 50 + 2  # work, sub, the files, the links
    assert measure(work, max_entries=10).files <= 11
    assert remove_files(work) == 52
    assert sorted(p.name for p in work.rglob("*")) == ["sub"]
    assert precious.read_bytes() == b"p" and outside.is_dir()
