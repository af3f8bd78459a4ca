"""Scanning working directories into manifests, and validating manifests
that arrive from elsewhere."""

from __future__ import annotations

import copy
import hashlib
import os
import socket
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest

from leptond.blocks.manifest import (
    MANIFEST_VERSION,
    WorkdirError,
    manifest_blocks,
    manifest_id,
    validate_manifest,
)
from leptond.blocks.scan import read_block, scan_workdir

H = hashlib.sha256(b"x").hexdigest()


def write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    root = tmp_path / "wd"
    write(root / "train.py", b"print('hi')\n", 0o755)
    write(root / "pkg" / "model.py", b"A" * 10 + b"B" * 10 + b"C" * 5)
    write(root / "pkg" / "same.bin", b"A" * 10)  # shares a block with model.py
    write(root / "empty.txt", b"")
    (root / "emptydir").mkdir()
    write(root / ".git" / "HEAD", b"ref: refs/heads/main\n")
    write(root / "out" / "big.ckpt", b"z" * 100)
    write(root / "x.pyc", b"junk")
    write(root / ".leptonignore", b"out/\n*.pyc\n")
    os.symlink("pkg/model.py", root / "link.py")
    os.symlink("../train.py", root / "pkg" / "up.py")
    return root


def test_scan_builds_manifest(workdir: Path) -> None:
    manifest, refs = scan_workdir(workdir, block_size=10)
    files = {f["path"]: f for f in manifest["files"]}
    assert set(files) == {".leptonignore", "train.py", "pkg/model.py", "pkg/same.bin", "empty.txt"}
    assert files["train.py"]["mode"] == 0o755
    assert files["empty.txt"]["blocks"] == [] and files["empty.txt"]["size"] == 0
    model = files["pkg/model.py"]
    assert model["size"] == 25 and len(model["blocks"]) == 3
    assert model["blocks"][0] == hashlib.sha256(b"A" * 10).hexdigest()
    assert files["pkg/same.bin"]["blocks"] == [model["blocks"][0]]
    assert sorted(manifest["dirs"]) == ["emptydir", "pkg"]
    assert {(ln["path"], ln["target"]) for ln in manifest["links"]} == {
        ("link.py", "pkg/model.py"),
        ("pkg/up.py", "../train.py"),
    }
    # One ref per distinct block, and each reads back as its own bytes.
    assert set(refs) == set(manifest_blocks(manifest))
    for block, ref in refs.items():
        assert hashlib.sha256(read_block(ref)).hexdigest() == block
    assert validate_manifest(msgpack.unpackb(msgpack.packb(manifest))) == manifest


def test_manifest_id_is_stable_and_content_sensitive(workdir: Path) -> None:
    first, _ = scan_workdir(workdir, block_size=10)
    again, _ = scan_workdir(workdir, block_size=10)
    assert manifest_id(first) == manifest_id(again)
    shuffled = copy.deepcopy(first)
    shuffled["files"].reverse()
    assert manifest_id(shuffled) == manifest_id(first)  # order of entries is not content
    (workdir / "train.py").chmod(0o700)
    changed, _ = scan_workdir(workdir, block_size=10)
    assert manifest_id(changed) != manifest_id(first)


def test_absolute_symlink_inside_is_made_relative(tmp_path: Path) -> None:
    root = tmp_path / "wd"
    write(root / "a" / "f.txt", b"f")
    os.symlink(root / "a" / "f.txt", root / "abs")
    os.symlink("../../wd/a/f.txt", root / "a" / "round-trip")  # out and back in
    manifest, _ = scan_workdir(root)
    assert sorted(manifest["links"], key=lambda ln: ln["path"]) == [
        {"path": "a/round-trip", "target": "f.txt"},
        {"path": "abs", "target": "a/f.txt"},
    ]


def test_symlink_pointing_outside_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "wd"
    write(root / "ok.txt", b"ok")
    write(tmp_path / "secret", b"s")
    os.symlink("../secret", root / "leak")
    with pytest.raises(WorkdirError, match="'leak' points outside the working directory"):
        scan_workdir(root)


def test_fifo_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "wd"
    root.mkdir()
    os.mkfifo(root / "pipe")
    with pytest.raises(WorkdirError, match="'pipe' is a FIFO"):
        scan_workdir(root)


def test_socket_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "wd"
    root.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "s"))
        with pytest.raises(WorkdirError, match="'s' is a socket"):
            scan_workdir(root)
    finally:
        sock.close()


def test_device_file_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "wd"
    root.mkdir()
    try:
        os.mknod(root / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating device nodes is not permitted here")
    with pytest.raises(WorkdirError, match="'null' is a device file"):
        scan_workdir(root)


def test_ignored_fifo_is_not_a_problem(tmp_path: Path) -> None:
    root = tmp_path / "wd"
    root.mkdir()
    os.mkfifo(root / "pipe")
    write(root / ".leptonignore", b"pipe\n")
    manifest, _ = scan_workdir(root)
    assert [f["path"] for f in manifest["files"]] == [".leptonignore"]


def test_over_limit_is_refused_before_reading(tmp_path: Path) -> None:
    root = tmp_path / "wd"
    write(root / "a.bin", b"a" * 600)
    write(root / "b.bin", b"b" * 600)
    with pytest.raises(WorkdirError, match="over the 1000-byte limit"):
        scan_workdir(root, max_bytes=1000)
    manifest, _ = scan_workdir(root, max_bytes=1200)
    assert len(manifest["files"]) == 2
    # A sparse terabyte: reading it would take hours, so a quick refusal
    # shows the limit is checked on sizes before any hashing.
    with open(root / "huge", "wb") as f:
        f.truncate(1 << 40)
    with pytest.raises(WorkdirError, match="over the"):
        scan_workdir(root)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(WorkdirError, match="does not exist"):
        scan_workdir(tmp_path / "nope")


def test_large_file_blocks_and_refs(tmp_path: Path) -> None:
    root = tmp_path / "wd"
    data = os.urandom(3 * 4096 + 17)
    write(root / "blob", data)
    manifest, refs = scan_workdir(root, block_size=4096)
    blocks = manifest["files"][0]["blocks"]
    assert len(blocks) == 4
    assert b"".join(read_block(refs[b]) for b in blocks) == data
    assert refs[blocks[-1]].length == 17 and refs[blocks[-1]].offset == 3 * 4096


def test_read_block_notices_a_changed_file(tmp_path: Path) -> None:
    root = tmp_path / "wd"
    write(root / "f", b"before")
    _, refs = scan_workdir(root)
    (root / "f").write_bytes(b"after!")
    with pytest.raises(WorkdirError, match="changed since it was scanned"):
        read_block(next(iter(refs.values())))


# -- validation of received manifests ------------------------------------------------


def base() -> dict[str, Any]:
    return {
        "v": MANIFEST_VERSION,
        "block_size": 4,
        "files": [{"path": "d/f", "mode": 0o644, "size": 5, "blocks": [H, H]}],
        "links": [{"path": "d/l", "target": "f"}],
        "dirs": ["d"],
    }


def test_base_manifest_is_valid() -> None:
    assert validate_manifest(base()) == base()


def file_path(p: str) -> dict[str, Any]:
    m = base()
    m["files"][0]["path"] = p
    return m


def link_target(t: str, extra_links: list[dict[str, str]] | None = None) -> dict[str, Any]:
    m = base()
    m["links"][0]["target"] = t
    m["links"].extend(extra_links or [])
    return m


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (file_path("../etc/passwd"), "not normalized"),
        (file_path("d/../../x"), "not normalized"),
        (file_path("/etc/passwd"), "is absolute"),
        (file_path("d//f"), "not normalized"),
        (file_path("d/./f"), "not normalized"),
        (file_path("d/f\x00"), "NUL"),
        (file_path(""), "non-empty string"),
        (file_path("nodir/f"), "parent 'nodir' is not a listed directory"),
        (file_path("d/l/f"), "parent 'd/l' is not a listed directory"),  # through a link
        (link_target("../../etc"), "points outside"),
        (link_target("/etc/passwd"), "absolute target"),
        (link_target("f/../../.."), "points outside"),
        # l2 -> "l1/.." looks harmless, but l1 -> "." makes it the tree's parent.
        (link_target("l1/..", [{"path": "d/l1", "target": ".."}]), "points outside"),
        (link_target("loop", [{"path": "d/loop", "target": "l"}]), "too many levels"),
        ({**base(), "v": 2}, "unsupported manifest version"),
        ({**base(), "extra": 1}, "exactly the keys"),
        ({**base(), "block_size": 0}, "block_size"),
        ({**base(), "dirs": ["d", "d"]}, "twice"),
        ({**base(), "dirs": "d"}, "must be a list"),
        ([], "exactly the keys"),
    ],
)
def test_rejects(manifest: Any, message: str) -> None:
    with pytest.raises(WorkdirError, match=message):
        validate_manifest(manifest)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mode", 0o10000, "mode"),
        ("mode", "644", "mode"),
        ("mode", True, "mode"),
        ("size", -1, "size"),
        ("size", 9, "do not add up"),  # 9 bytes need 3 blocks of 4
        ("size", 4, "do not add up"),
        ("blocks", [H, "zz"], "not a sha256"),
        ("blocks", [H, H.upper()], "not a sha256"),
    ],
)
def test_rejects_bad_file_fields(field: str, value: Any, message: str) -> None:
    m = base()
    m["files"][0][field] = value
    with pytest.raises(WorkdirError, match=message):
        validate_manifest(m)
