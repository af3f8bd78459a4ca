"""Who a task runs as on this host: the Unix account its token maps to.

The leader sends the account's name (`unix_user` in the launch spec); this
host's passwd and group databases decide its uid, primary gid, supplementary
groups, home and shell, as slurmstepd does. A name this host does not know
fails the task at once, and uid 0 is refused unless the masters allow root
tasks. An agent that is not root cannot switch users: its tasks run as the
agent's own account.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path


class IdentityError(Exception):
    """The task cannot run as the account it asks for; one line for `status`."""


@dataclass(frozen=True)
class TaskUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, the primary one included
    home: str
    shell: str

    @staticmethod
    def of_passwd(pw: pwd.struct_passwd) -> TaskUser:
        try:
            groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
        except OSError:
            groups = (pw.pw_gid,)
        return TaskUser(
            name=pw.pw_name,
            uid=pw.pw_uid,
            gid=pw.pw_gid,
            groups=groups,
            home=pw.pw_dir or "/",
            shell=pw.pw_shell or "/bin/sh",
        )


def can_switch_users() -> bool:
    return os.geteuid() == 0


def agent_user() -> TaskUser:
    """The account this agent runs as (what a non-root agent's tasks run as)."""
    uid = os.geteuid()
    try:
        return TaskUser.of_passwd(pwd.getpwuid(uid))
    except KeyError:
        gid = os.getegid()
        return TaskUser(str(uid), uid, gid, (gid,), os.environ.get("HOME") or "/", "/bin/sh")


def resolve(name: object, allow_root: bool, host: str) -> TaskUser:
    """The account named `name` on this host, ready to run a task as."""
    if not isinstance(name, str) or not name:
        raise IdentityError("the leader sent no Unix user for this task")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise IdentityError(f"user {name!r} does not exist on host {host}") from None
    if pw.pw_uid == 0 and not allow_root:
        raise IdentityError(
            f"user {name!r} is uid 0 on host {host}, and tasks may not run as root "
            "(the masters need --allow-root-tasks)"
        )
    return TaskUser.of_passwd(pw)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def unreachable(path: Path, user: TaskUser) -> str | None:
    """None when `user` can search every directory above `path`, else which one
    stops it. (Read from the mode bits; the kernel's check is the same for
    accounts without capabilities, which is what a task runs as.)"""
    if user.uid == 0:
        return None
    p = Path(os.path.abspath(path))
    for d in reversed(p.parents):
        try:
            st = d.stat()
        except OSError as e:
            return f"{d}: {e.strerror}"
        if st.st_uid == user.uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in user.groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            return f"{d} (mode {stat.S_IMODE(st.st_mode):04o}) is not searchable by {user.name}"
    return None


def give_tree(root: Path, user: TaskUser) -> None:
    """Make a tree the agent just wrote (a task's workdir) the user's own.

    Symlinks are changed themselves, never followed. The top directory goes
    last, so the user cannot reach the tree before all of it is theirs.
    """
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in [*filenames, *dirnames]:
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(dirpath, n), user.uid, user.gid, follow_symlinks=False)
    os.chown(root, user.uid, user.gid, follow_symlinks=False)
    os.chmod(root, 0o700)


def open_path_for_others(d: Path) -> None:
    """Let other accounts pass through a directory of the agent (mode 0711),
    so a task can reach its own directory below it; nothing in it becomes
    listable or readable by that."""
    with contextlib.suppress(OSError):
        st = d.stat()
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o011 != 0o011:
            os.chmod(d, stat.S_IMODE(st.st_mode) | 0o011)


def close_to_others(data_dir: Path, passable: frozenset[str]) -> None:
    """Nothing directly below the agent's data dir may be listed or read by
    another account: directories become 0700, or 0711 for those in `passable`
    (where tasks reach their own directories), and files lose every group and
    other bit. The block cache, above all, would tell a task which workdir
    blocks other users' tasks have (ids it could name in a manifest)."""
    with os.scandir(data_dir) as entries:
        for e in entries:
            with contextlib.suppress(OSError):
                st = e.stat(follow_symlinks=False)
                if st.st_uid != os.geteuid():
                    continue  # not ours to change
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISDIR(st.st_mode):
                    want = 0o711 if e.name in passable else 0o700
                    want |= mode & 0o700
                elif stat.S_ISREG(st.st_mode):
                    want = mode & 0o700
                else:
                    continue
                if want != mode:
                    os.chmod(e.path, want)
