"""Materializing manifests: an exact round trip of a scanned tree, and
hostile manifests that try to write outside the destination."""

from __future__ import annotations

import errno
import hashlib
import importlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from leptond.blocks.manifest import MANIFEST_VERSION, WorkdirError
from leptond.blocks.materialize import materialize
from leptond.blocks.scan import read_block, scan_workdir
from leptond.blocks.store import BlockStore


def snapshot(root: Path) -> dict[str, tuple[str, Any]]:
    """Every entry under root: kind plus content/target/mode."""
    out: dict[str, tuple[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = str(full.relative_to(root))
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None)
            else:
                out[rel] = ("file", (full.read_bytes(), stat.S_IMODE(st.st_mode)))
    return out


def test_round_trip_through_a_block_store(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o750)
    (src / "pkg" / "data.bin").write_bytes(os.urandom(10_000))
    (src / "pkg" / "sub" / "ro.txt").write_bytes(b"read only\n")
    (src / "pkg" / "sub" / "ro.txt").chmod(0o444)
    (src / "pkg" / "zero").write_bytes(b"")
    os.symlink("sub/ro.txt", src / "pkg" / "link")
    os.symlink("pkg", src / "dirlink")

    manifest, refs = scan_workdir(src, block_size=4096)
    store = BlockStore(tmp_path / "store")
    for block in store.missing(refs):
        store.put(block, read_block(refs[block]))

    dest = tmp_path / "dest"
    dest.mkdir()
    materialize(manifest, dest, store.get)
    assert snapshot(dest) == snapshot(src)


def test_setuid_and_setgid_bits_are_stripped(tmp_path: Path) -> None:
    data = b"x"
    manifest = {
        "v": MANIFEST_VERSION,
        "block_size": 16,
        "files": [{"path": "suid", "mode": 0o6755, "size": 1, "blocks": [sha(data)]}],
        "links": [],
        "dirs": [],
    }
    dest = tmp_path / "dest"
    dest.mkdir()
    materialize(manifest, dest, lambda b: data)
    assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o755


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PAYLOAD = b"pwned"


def hostile(files: list[str], links: list[tuple[str, str]], dirs: list[str]) -> dict[str, Any]:
    return {
        "v": MANIFEST_VERSION,
        "block_size": 64,
        "files": [
            {"path": p, "mode": 0o644, "size": len(PAYLOAD), "blocks": [sha(PAYLOAD)]}
            for p in files
        ],
        "links": [{"path": p, "target": t} for p, t in links],
        "dirs": dirs,
    }


@pytest.mark.parametrize(
    "manifest",
    [
        hostile(["../outside.txt"], [], []),
        hostile(["ok/../../outside.txt"], [], ["ok"]),
        hostile(["/tmp/outside.txt"], [], []),
        # A symlinked parent directory: "esc" -> "..", then "esc/outside.txt".
        hostile(["esc/outside.txt"], [("esc", "..")], []),
        hostile(["esc/outside.txt"], [("esc", "..")], ["esc"]),
        # Listed as a directory, but a link of the same name comes first.
        hostile(["d/outside.txt"], [("d", "../victim")], ["d"]),
        # Links whose targets only escape when followed.
        hostile([], [("a", "."), ("b", "a/..")], []),
        hostile([], [("abs", "/etc")], []),
    ],
)
def test_hostile_manifest_writes_nothing_outside(tmp_path: Path, manifest: Any) -> None:
    outer = tmp_path / "outer"
    dest = outer / "dest"
    victim = outer / "victim"
    victim.mkdir(parents=True)
    dest.mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(WorkdirError):
        materialize(manifest, dest, lambda b: PAYLOAD)
    after = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("outer/dest/")}
    assert after == before
    assert not Path("/tmp/outside.txt").exists()


def test_existing_symlink_in_dest_is_not_followed(tmp_path: Path) -> None:
    # dest is "fresh" only if empty; a pre-planted link makes it refuse.
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(tmp_path, dest / "d")
    with pytest.raises(WorkdirError, match="not empty"):
        materialize(hostile(["d/x"], [], ["d"]), dest, lambda b: PAYLOAD)
    link_dest = tmp_path / "linkdest"
    os.symlink(tmp_path / "elsewhere", link_dest)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(WorkdirError, match="not a directory"):
        materialize(hostile(["x"], [], []), link_dest, lambda b: PAYLOAD)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_corrupt_or_missing_block_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(WorkdirError, match="corrupt or has the wrong size"):
        materialize(hostile(["f"], [], []), dest, lambda b: b"other")
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    with pytest.raises(WorkdirError, match="not available"):
        materialize(hostile(["f"], [], []), dest2, lambda b: None)


def test_full_disk_is_a_clear_error(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()

    def no_space(block: str) -> bytes:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WorkdirError, match="no space left on device while writing 'f'"):
        materialize(hostile(["f"], [], []), dest, no_space)


@pytest.mark.parametrize(
    "manifest",
    [
        hostile(["../outside.txt"], [], []),
        hostile(["ok/../../outside.txt"], [], ["ok"]),
        hostile(["/tmp/outside.txt"], [], []),
        hostile(["esc/outside.txt"], [("esc", "..")], []),
        hostile(["ok/../../outside.txt"], [], ["ok", "ok/../.."]),
    ],
)
def test_writes_stay_inside_even_without_validation(
    tmp_path: Path, manifest: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defence in depth: the descriptor-relative writes alone must hold the
    # line if validation ever lets something through.
    module = importlib.import_module("leptond.blocks.materialize")
    monkeypatch.setattr(module, "validate_manifest", lambda m: m)
    outer = tmp_path / "outer"
    dest = outer / "dest"
    dest.mkdir(parents=True)
    before = snapshot(tmp_path)
    with pytest.raises(WorkdirError):
        materialize(manifest, dest, lambda b: PAYLOAD)
    after = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("outer/dest/")}
    assert after == before
    assert not Path("/tmp/outside.txt").exists()


def test_many_directories_do_not_exhaust_file_descriptors(tmp_path: Path) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    dirs = [f"d{i}" for i in range(600)] + [f"d0/sub{i}" for i in range(50)]
    manifest = hostile([f"{d}/f" for d in dirs], [], dirs)
    dest = tmp_path / "dest"
    dest.mkdir()
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        materialize(manifest, dest, lambda b: PAYLOAD)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (dest / "d599" / "f").read_bytes() == PAYLOAD
    assert (dest / "d0" / "sub49" / "f").read_bytes() == PAYLOAD
