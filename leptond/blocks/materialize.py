"""Write a manifest's tree into a fresh directory on a host.

The manifest came over the network, so nothing in it is trusted: it is
validated again here, and every file system call is made relative to an
open directory descriptor with O_NOFOLLOW, one path component at a time, so
no name in the manifest can lead a write outside ``dest`` (no ``..``, no
absolute path, no symlink on the way).  Symlinks are created last, after
every file and directory, and only with targets that resolve inside the tree.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import stat
from collections.abc import Callable
from pathlib import Path

from .cache import ByteCache
from .manifest import FileEntry, Manifest, WorkdirError, validate_manifest

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Never hand out privilege through a file mode that came from a client.
_MODE_MASK = 0o7777 & ~(stat.S_ISUID | stat.S_ISGID)


def _os_error(e: OSError, action: str, path: str) -> WorkdirError:
    if e.errno == errno.ENOSPC:
        return WorkdirError(f"no space left on device while writing {path!r}")
    if e.errno == errno.ELOOP:
        return WorkdirError(f"refusing to {action} {path!r}: a symlink is in the way")
    return WorkdirError(f"cannot {action} {path!r}: {e.strerror}")


# Directory descriptors kept open at once: enough for locality, far below
# the usual limit of 1024 open files however many directories a tree has.
_OPEN_DIRS = 64


class _Tree:
    """Directory descriptors of the tree being written, by relative path.

    Only directories this run created can be opened, each one relative to
    its parent's descriptor with O_NOFOLLOW, so a path can never pass
    through a symlink.  Recently used descriptors stay open (LRU).
    """

    def __init__(self, dest: Path) -> None:
        self.root_fd = os.open(dest, _DIR_FLAGS)
        self.created: set[str] = set()
        self.open_dirs: ByteCache[str, int] = ByteCache(
            _OPEN_DIRS, "lru", lambda _path, fd: os.close(fd)
        )

    def close(self) -> None:
        for path in self.open_dirs:
            fd = self.open_dirs.peek(path)
            if fd is not None:
                os.close(fd)
            self.open_dirs.discard(path)
        os.close(self.root_fd)

    def dir_fd(self, path: str) -> int:
        if path == "":
            return self.root_fd
        fd = self.open_dirs.get(path)
        if fd is not None:
            return fd
        if path not in self.created:  # validate_manifest lists parents first
            raise WorkdirError(f"directory {path!r} was not created by this manifest")
        parent_fd, name = self.parent_fd(path)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as e:
            raise _os_error(e, "open directory", path) from None
        # May close the parent's descriptor: it is not used after this.
        self.open_dirs.put(path, fd, 1)
        return fd

    def parent_fd(self, path: str) -> tuple[int, str]:
        parent, name = posixpath.split(path)
        return self.dir_fd(parent), name

    def mkdir(self, path: str) -> None:
        fd, name = self.parent_fd(path)
        try:
            os.mkdir(name, 0o755, dir_fd=fd)
        except OSError as e:
            raise _os_error(e, "create directory", path) from None
        self.created.add(path)


def _write_file(
    tree: _Tree, entry: FileEntry, block_size: int, get_block: Callable[[str], bytes | None]
) -> None:
    path = entry["path"]
    parent, name = tree.parent_fd(path)
    try:
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent)
    except OSError as e:
        raise _os_error(e, "create", path) from None
    try:
        remaining = entry["size"]
        for block in entry["blocks"]:
            data = get_block(block)
            if not isinstance(data, bytes | bytearray | memoryview):
                raise WorkdirError(f"block {block[:12]}… of {path!r} is not available")
            expected = min(block_size, remaining)
            if len(data) != expected or hashlib.sha256(data).hexdigest() != block:
                raise WorkdirError(
                    f"block {block[:12]}… of {path!r} is corrupt or has the wrong size"
                )
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            remaining -= expected
        os.fchmod(fd, entry["mode"] & _MODE_MASK)
    except OSError as e:
        raise _os_error(e, "write", path) from None
    finally:
        os.close(fd)


def materialize(manifest: object, dest: Path, get_block: Callable[[str], bytes | None]) -> None:
    """Create the manifest's tree inside ``dest``, which must be an existing,
    empty directory.  ``get_block`` returns a block's bytes, or None if it
    is not available (``BlockStore.get`` fits).  Raises WorkdirError on any
    problem; what was written so far is left for the caller to remove with
    ``dest``."""
    checked: Manifest = validate_manifest(manifest)
    dest = Path(dest)
    try:
        st = os.lstat(dest)
    except OSError as e:
        raise WorkdirError(f"destination {str(dest)!r} is not usable: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise WorkdirError(f"destination {str(dest)!r} is not a directory (or is a symlink)")
    with os.scandir(dest) as entries:
        occupied = any(entries)
    if occupied:
        raise WorkdirError(f"destination {str(dest)!r} is not empty")

    tree = _Tree(dest)
    try:
        # Parents before children: a parent's path is a prefix, so it is shorter.
        for d in sorted(checked["dirs"], key=lambda p: (p.count("/"), p)):
            tree.mkdir(d)
        for entry in checked["files"]:
            _write_file(tree, entry, checked["block_size"], get_block)
        for link in checked["links"]:
            fd, name = tree.parent_fd(link["path"])
            try:
                os.symlink(link["target"], name, dir_fd=fd)
            except OSError as e:
                raise _os_error(e, "create symlink", link["path"]) from None
    finally:
        tree.close()
