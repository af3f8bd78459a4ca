"""The agent's node credential: kept in its data dir, got once for a join token.

The agent holds no cluster-wide secret. At its first registration it connects
with a join token (`leptonctl node join-token create`) and trades it for a
node credential bound to its node id; from then on it uses only that. The file
is 0600 in the agent's 0700 data dir, so a task running as a user cannot read
it. It is written atomically and durably before first use; an agent that dies
after the trade but before the write trades again for the same node id, which
the masters allow without spending a second use of the token.
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

log = logging.getLogger("lepton.agent")
CREDENTIAL_FILE = "node.credential"
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
) -> Token | None:
    """Trade the join token for this node's credential and save it.

    Retries with backoff while the masters cannot answer; a refusal no retry
    can fix (an unknown, revoked, expired or used-up token) is logged once and
    retried slowly, so an admin can see it and act. None if stopped first.
    """
    delay = 0.2
    refused = False  # the refusal is logged once, not once per retry
    while not stopping.is_set():
        client = ClusterClient(addrs, key_id=join.id, psk=join.psk)
        try:
            res = await client.call("node_join", {"node_id": node_id}, timeout_s=30)
            tok = parse_token(str(res["credential"]))
            save_credential(data_dir, tok)
            log.info("joined the cluster as node %s; its credential is saved", node_id)
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
