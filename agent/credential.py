"""The agent's node credential: kept in its data dir, got once for a join token.

The agent holds no cluster-wide secret. At its first registration it connects
with a join token (`leptonctl node join-token create`) and trades it for a
node credential bound to its node id; from then on it uses only that. The file
is 0600 in the agent's 0700 data dir, so a task running as a user cannot read
it. It is written atomically and durably before first use; an agent that dies
after the trade but before the write trades again for the same node id, which
the masters allow without spending a second use of the token, as long as the
node never registered (it cannot have: registering needs the saved credential).

Once the credential is saved the join token file is deleted: a token left on
a host (a multi-use one above all) could admit other hosts until it expires.
The id of the token being traded is written first (`joined.json`), so an
agent that dies between saving its credential and deleting the file deletes
it at its next start, while a newer token an admin put there is left alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import stat
from collections.abc import Sequence
from pathlib import Path

from leptond.wire.client import ClusterClient
from leptond.wire.errors import RpcError
from leptond.wire.tokens import SecretError, Token, parse_token, read_token_file

from .taskdir import atomic_write_json, read_json

log = logging.getLogger("lepton.agent")
CREDENTIAL_FILE = "node.credential"
# The id of the join token this node traded (or is trading) for its credential.
JOINED_FILE = "joined.json"
# Refusals that a retry cannot fix: the token is unknown, revoked, expired or used up.
FINAL = frozenset({"unauthenticated", "forbidden", "conflict", "bad_request"})


def credential_path(data_dir: Path) -> Path:
    return data_dir / CREDENTIAL_FILE


def load_credential(data_dir: Path) -> Token | None:
    """The saved credential, or None before the first trade."""
    p = credential_path(data_dir)
    if not p.exists():
        return None
    tok = read_token_file(p)
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        # Someone widened it: a task running as a user must never read it.
        log.warning("%s had mode %o; making it 0600", p, mode)
        os.chmod(p, 0o600)
    return tok


def save_credential(data_dir: Path, tok: Token) -> None:
    """Write the credential 0600, atomically and durably (file, then directory)."""
    p = credential_path(data_dir)
    tmp = p.with_name(p.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (str(tok) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    dfd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def discard_join_token(path: Path | None, join_id: str) -> None:
    """Delete the join token file once this node's credential is saved, if it
    still holds the token that was traded; a failure is said, not fatal."""
    if path is None:
        return
    try:
        tok = read_token_file(path)
    except SecretError:
        return  # gone already, or not a token: nothing of ours to delete
    if tok.id != join_id:
        log.warning(
            "%s holds join token %s, which this node does not use (it has its credential); "
            "delete it: it can admit other hosts until it expires",
            path,
            tok.id,
        )
        return
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        log.error(
            "cannot delete the used join token file %s (%s); delete it by hand: it can admit "
            "other hosts until it expires",
            path,
            exc.strerror or exc,
        )
        return
    log.info("deleted the join token file %s: this node has its credential", path)


def joined_with(data_dir: Path) -> str | None:
    """The id of the join token this node traded (or began to trade), if any."""
    jid = (read_json(data_dir / JOINED_FILE) or {}).get("join_token")
    return jid if isinstance(jid, str) else None


def read_join_token(path: Path | None) -> Token:
    if path is None:
        raise SecretError(
            "this node has no credential yet: give --join-token-file "
            "(an admin makes one with `leptonctl node join-token create`)"
        )
    return read_token_file(path)


async def trade(
    addrs: Sequence[tuple[str, int]],
    join: Token,
    node_id: str,
    data_dir: Path,
    stopping: asyncio.Event,
    join_file: Path | None = None,
) -> Token | None:
    """Trade the join token for this node's credential, save it, and delete
    the join token file (`join_file`).

    Retries with backoff while the masters cannot answer; a refusal no retry
    can fix (an unknown, revoked, expired or used-up token) is logged once and
    retried slowly, so an admin can see it and act. None if stopped first.
    """
    # Before the trade: whatever happens next, a restart knows which token
    # file is this node's to delete.
    atomic_write_json(data_dir / JOINED_FILE, {"join_token": join.id})
    delay = 0.2
    refused = False  # the refusal is logged once, not once per retry
    while not stopping.is_set():
        client = ClusterClient(addrs, key_id=join.id, psk=join.psk)
        try:
            res = await client.call("node_join", {"node_id": node_id}, timeout_s=30)
            tok = parse_token(str(res["credential"]))
            save_credential(data_dir, tok)
            log.info("joined the cluster as node %s; its credential is saved", node_id)
            discard_join_token(join_file, join.id)
            return tok
        except RpcError as exc:
            if exc.code in FINAL:
                if not refused:
                    log.error("the masters refused this agent's join token: %s", exc)
                refused = True
                delay = 5.0
            else:
                log.warning("cannot trade the join token yet (%s); retrying", exc)
        except (SecretError, KeyError, OSError) as exc:
            log.error("cannot keep the node credential: %s", exc)
        finally:
            await client.close()
        try:
            await asyncio.wait_for(stopping.wait(), delay * (0.5 + random.random()))
        except TimeoutError:
            pass
        delay = min(delay * 2, 5.0)
    return None
