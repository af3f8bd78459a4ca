"""Scan a working directory into a manifest and a map of where each block's
bytes live, so an uploader can send only the missing blocks, one at a time.

Two passes: the first walks the tree with lstat only (so refusals — special
files, outside symlinks, a tree over the size limit — come before any file is
read); the second reads each regular file once, in block-size pieces, and
hashes the pieces on a few threads.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .ignore import IGNORE_FILE, IgnoreRules
from .manifest import (
    DEFAULT_BLOCK_SIZE,
    MANIFEST_VERSION,
    MAX_BLOCK_SIZE,
    FileEntry,
    LinkEntry,
    Manifest,
    WorkdirError,
    check_manifest_size,
    validate_manifest,
)

DEFAULT_MAX_BYTES = 10 * 1024**3
SKIPPED_NAMES = frozenset({".git"})


@dataclass(frozen=True, slots=True)
class BlockRef:
    """Where a block's bytes are: ``length`` bytes at ``offset`` of ``path``."""

    block_id: str
    path: str
    offset: int
    length: int


@dataclass(slots=True)
class _Found:
    dirs: list[str]
    files: list[tuple[str, int, int]]  # path, mode, size
    links: list[LinkEntry]
    total: int = 0


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "a special file"


def _link_target(root_real: str, full: str, rel: str) -> str:
    """The in-tree target of the symlink at ``full``.

    An absolute target, or one that leaves the tree and comes back (such as
    ``../wd/x``), is rewritten relative to the link, so the tree still works
    when materialized elsewhere and passes ``validate_manifest``.
    """
    target = os.readlink(full)
    resolved = os.path.realpath(full)
    if resolved != root_real and not resolved.startswith(root_real + os.sep):
        raise WorkdirError(f"symlink {rel!r} points outside the working directory ({target})")
    lexical = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    if os.path.isabs(target) or lexical == ".." or lexical.startswith("../"):
        target = os.path.relpath(resolved, os.path.dirname(os.path.join(root_real, rel)))
    return target


def _walk(root: str, rules: IgnoreRules, max_bytes: int) -> _Found:
    root_real = os.path.realpath(root)
    found = _Found(dirs=[], files=[], links=[])
    pending: list[tuple[str, str]] = [(root, "")]  # (filesystem path, relative path)
    while pending:
        dir_path, rel_dir = pending.pop()
        try:
            with os.scandir(dir_path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise WorkdirError(f"cannot read directory {rel_dir or '.'!r}: {e.strerror}") from None
        subdirs: list[tuple[str, str]] = []
        for entry in entries:
            if entry.name in SKIPPED_NAMES:
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise WorkdirError(f"file name {rel!r} is not valid UTF-8") from None
            st = entry.stat(follow_symlinks=False)
            mode = st.st_mode
            is_dir = stat.S_ISDIR(mode)
            if rules.match(rel, is_dir):
                continue
            if is_dir:
                found.dirs.append(rel)
                subdirs.append((entry.path, rel))
            elif stat.S_ISREG(mode):
                found.files.append((rel, stat.S_IMODE(mode), st.st_size))
                found.total += st.st_size
                if found.total > max_bytes:
                    raise WorkdirError(
                        f"working directory is over the {max_bytes}-byte limit "
                        f"(reached at {rel!r}); add a {IGNORE_FILE} or raise the limit"
                    )
            elif stat.S_ISLNK(mode):
                found.links.append(
                    {"path": rel, "target": _link_target(root_real, entry.path, rel)}
                )
            else:
                raise WorkdirError(
                    f"{rel!r} is {_special_kind(mode)}; only files, directories "
                    "and symlinks can be sent"
                )
        pending.extend(reversed(subdirs))
    return found


def _hash_span(span: tuple[str, str, int, int]) -> str:
    """sha256 of ``length`` bytes at ``offset``; runs on a worker thread
    (pread and sha256 release the GIL, so blocks hash in parallel)."""
    full, rel, offset, length = span
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
    except OSError as e:
        raise WorkdirError(f"cannot read {rel!r}: {e.strerror}") from None
    if len(data) != length:
        raise WorkdirError(f"{rel!r} changed while it was being scanned; try again")
    return hashlib.sha256(data).hexdigest()


def scan_workdir(
    directory: str | os.PathLike[str],
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    workers: int | None = None,
) -> tuple[Manifest, dict[str, BlockRef]]:
    """Manifest of ``directory`` and, for each distinct block, where to read it.

    ``workers`` threads hash blocks in parallel (default: up to 4, one per
    CPU); at most one block per worker is in memory at a time.
    """
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be in [1, {MAX_BLOCK_SIZE}], got {block_size}")
    root = os.fspath(directory)
    if not os.path.isdir(root):
        raise WorkdirError(f"working directory {root!r} does not exist or is not a directory")
    rules = IgnoreRules()
    ignore_path = Path(root, IGNORE_FILE)
    if ignore_path.is_file():
        rules = IgnoreRules.parse(ignore_path.read_text(encoding="utf-8", errors="replace"))

    found = _walk(root, rules, max_bytes)

    spans: list[tuple[str, str, int, int]] = []
    for rel, _, size in found.files:
        full = os.path.join(root, rel)
        for offset in range(0, size, block_size):
            spans.append((full, rel, offset, min(block_size, size - offset)))
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = iter(pool.map(_hash_span, spans))
        files: list[FileEntry] = []
        refs: dict[str, BlockRef] = {}
        spans_iter = iter(spans)
        for rel, mode, size in found.files:
            blocks: list[str] = []
            for _ in range(0, size, block_size):
                digest = next(digests)
                full, _, offset, length = next(spans_iter)
                blocks.append(digest)
                if digest not in refs:
                    refs[digest] = BlockRef(digest, full, offset, length)
            files.append({"path": rel, "mode": mode, "size": size, "blocks": blocks})
    manifest: Manifest = {
        "v": MANIFEST_VERSION,
        "block_size": block_size,
        "files": files,
        "links": found.links,
        "dirs": found.dirs,
    }
    # The scan's own output goes through the same check a receiver applies,
    # so a tree the cluster would refuse fails here, on the submitter's side.
    checked = validate_manifest(manifest)
    check_manifest_size(checked)
    return checked, refs


def read_block(ref: BlockRef) -> bytes:
    """The block's bytes, checked against its id (the file may have changed)."""
    try:
        fd = os.open(ref.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise WorkdirError(f"cannot read {ref.path!r}: {e.strerror}") from None
    try:
        data = os.pread(fd, ref.length, ref.offset)
    except OSError as e:
        raise WorkdirError(f"cannot read {ref.path!r}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) != ref.length or hashlib.sha256(data).hexdigest() != ref.block_id:
        raise WorkdirError(f"{ref.path!r} changed since it was scanned; scan again")
    return data
