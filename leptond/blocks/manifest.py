"""Workdir manifests: plain msgpack-able dicts naming a tree of files (as
lists of content-addressed blocks), symlinks and directories.

A manifest arrives from a client and is replayed on hosts, so
``validate_manifest`` is strict: every path is relative and normalized,
every entry's parent is a listed directory, and every symlink resolves
inside the tree even when its target passes through other symlinks.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Any, TypedDict

import msgpack

MANIFEST_VERSION = 1
DEFAULT_BLOCK_SIZE = 4 * 1024 * 1024
MAX_BLOCK_SIZE = 64 * 1024 * 1024
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_LINK_HOPS = 40  # as Linux's limit on nested symlinks
# A manifest travels in one Raft entry (raft.commands.MAX_ENTRY_BYTES, 1 MiB,
# with room left for the command around it); a test pins the two together.
MAX_MANIFEST_BYTES = 1000 * 1024

_HEX = frozenset("0123456789abcdef")


class WorkdirError(Exception):
    """A working directory or manifest that cannot be used; the message is
    one line saying what is wrong."""


class FileEntry(TypedDict):
    path: str
    mode: int
    size: int
    blocks: list[str]


class LinkEntry(TypedDict):
    path: str
    target: str


class Manifest(TypedDict):
    v: int
    block_size: int
    files: list[FileEntry]
    links: list[LinkEntry]
    dirs: list[str]


def is_block_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and _HEX.issuperset(value)


def block_id(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_id(manifest: Manifest) -> str:
    """sha256 of the canonical encoding: entries sorted by path, map keys
    sorted, msgpack with str/bin types kept apart."""
    canonical = {
        "block_size": manifest["block_size"],
        "dirs": sorted(manifest["dirs"]),
        "files": [
            {"blocks": list(f["blocks"]), "mode": f["mode"], "path": f["path"], "size": f["size"]}
            for f in sorted(manifest["files"], key=lambda f: f["path"])
        ],
        "links": [
            {"path": ln["path"], "target": ln["target"]}
            for ln in sorted(manifest["links"], key=lambda ln: ln["path"])
        ],
        "v": manifest["v"],
    }
    return hashlib.sha256(msgpack.packb(canonical, use_bin_type=True)).hexdigest()


def manifest_blocks(manifest: Manifest) -> list[str]:
    """Distinct block ids in first-use order."""
    return list(dict.fromkeys(b for f in manifest["files"] for b in f["blocks"]))


def check_relative_path(path: object, what: str = "path") -> str:
    """A relative, normalized, NUL-free path of non-empty components."""
    if not isinstance(path, str) or not path:
        raise WorkdirError(f"manifest {what} must be a non-empty string, got {path!r}")
    if "\x00" in path:
        raise WorkdirError(f"manifest {what} {path!r} contains a NUL byte")
    if path.startswith("/"):
        raise WorkdirError(f"manifest {what} {path!r} is absolute")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise WorkdirError(f"manifest {what} {path!r} is not valid UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise WorkdirError(f"manifest {what} is longer than {MAX_PATH_BYTES} bytes")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise WorkdirError(
                f"manifest {what} {path!r} is not normalized (empty, '.' or '..' component)"
            )
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise WorkdirError(f"manifest {what} {path!r} has a name over {MAX_NAME_BYTES} bytes")
    return path


def _expect_int(value: object, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise WorkdirError(f"manifest {what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _expect_list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise WorkdirError(f"manifest {what} must be a list")
    return value


def _expect_keys(value: object, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        found = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
        raise WorkdirError(f"{what} must have exactly the keys {sorted(keys)}, got {found}")
    return value


def resolve_in_tree(links: dict[str, str], link_path: str, max_hops: int = MAX_LINK_HOPS) -> str:
    """Where ``link_path`` finally points, following the tree's own symlinks
    the way the kernel would; raises WorkdirError if that leaves the tree.

    Lexical normalization alone is not enough: with ``a -> .``, the target
    ``a/..`` looks like ``.`` but is the tree's parent.
    """
    hops = 0

    def walk(base: list[str], target: str) -> list[str]:
        nonlocal hops
        if target.startswith("/"):
            raise WorkdirError(f"symlink {link_path!r} has an absolute target")
        stack = list(base)
        parts = [p for p in target.split("/") if p not in ("", ".")]
        for part in parts:
            if part == "..":
                if not stack:
                    raise WorkdirError(
                        f"symlink {link_path!r} points outside the working directory"
                    )
                stack.pop()
                continue
            stack.append(part)
            here = "/".join(stack)
            inner = links.get(here)
            # Links met on the way, the last component included, are
            # followed: a chain of links must end inside the tree too.
            if inner is not None:
                hops += 1
                if hops > max_hops:
                    raise WorkdirError(f"symlink {link_path!r}: too many levels of links")
                stack = walk(stack[:-1], inner)
        return stack

    parent = posixpath.dirname(link_path)
    result = walk(parent.split("/") if parent else [], links[link_path])
    return "/".join(result)


def check_manifest_size(manifest: Manifest) -> None:
    """Raise WorkdirError when the manifest is too large to commit."""
    size = len(msgpack.packb(manifest, use_bin_type=True))
    if size > MAX_MANIFEST_BYTES:
        raise WorkdirError(
            f"the workdir's manifest is {size / 1e6:.1f} MB for {len(manifest['files'])} files; "
            f"the limit is {MAX_MANIFEST_BYTES >> 10} KiB: leave files out with .leptonignore"
        )


def validate_manifest(obj: object) -> Manifest:
    """Check a manifest received from elsewhere; returns it typed, or raises
    WorkdirError naming the first problem."""
    top = _expect_keys(obj, {"v", "block_size", "files", "links", "dirs"}, "manifest")
    if top["v"] != MANIFEST_VERSION:
        raise WorkdirError(
            f"unsupported manifest version {top['v']!r}, expected {MANIFEST_VERSION}"
        )
    block_size = _expect_int(top["block_size"], "block_size", 1, MAX_BLOCK_SIZE)

    seen: dict[str, str] = {}  # path -> kind, to reject duplicates

    def claim(path: str, kind: str) -> None:
        if path in seen:
            raise WorkdirError(f"manifest lists {path!r} twice ({seen[path]} and {kind})")
        seen[path] = kind

    dirs = _expect_list(top["dirs"], "dirs")
    for d in dirs:
        claim(check_relative_path(d, "directory"), "directory")
    for f in _expect_list(top["files"], "files"):
        entry = _expect_keys(f, {"path", "mode", "size", "blocks"}, "manifest file entry")
        path = check_relative_path(entry["path"], "file path")
        claim(path, "file")
        _expect_int(entry["mode"], f"mode of {path!r}", 0, 0o7777)
        size = _expect_int(entry["size"], f"size of {path!r}", 0, 2**63 - 1)
        blocks = _expect_list(entry["blocks"], f"blocks of {path!r}")
        if len(blocks) != -(-size // block_size):
            raise WorkdirError(
                f"file {path!r}: {len(blocks)} blocks do not add up to {size} bytes "
                f"with block_size {block_size}"
            )
        for b in blocks:
            if not is_block_id(b):
                raise WorkdirError(f"file {path!r}: {b!r} is not a sha256 hex block id")
    links: dict[str, str] = {}
    for ln in _expect_list(top["links"], "links"):
        entry = _expect_keys(ln, {"path", "target"}, "manifest link entry")
        path = check_relative_path(entry["path"], "link path")
        claim(path, "symlink")
        target = entry["target"]
        if not isinstance(target, str) or not target or "\x00" in target:
            raise WorkdirError(f"symlink {path!r} has an empty or invalid target")
        if target.startswith("/"):
            raise WorkdirError(f"symlink {path!r} has an absolute target {target!r}")
        links[path] = target

    # Every parent must be a listed directory: nothing is ever created
    # through a file or a symlink, and the tree can be made top-down.
    for path, kind in seen.items():
        parent = posixpath.dirname(path)
        if parent and seen.get(parent) != "directory":
            raise WorkdirError(f"{kind} {path!r}: parent {parent!r} is not a listed directory")
    for path in links:
        resolve_in_tree(links, path)
    return obj  # type: ignore[return-value]
