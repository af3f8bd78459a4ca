"""Join tokens and node credentials inside apply (Nomad's node SecretID).

An admin makes a join token; an agent trades it, once per node id, for a node
credential bound to that node. Secrets arrive sealed by the proposer, which
also decides every time (`now`, `expires_at`); apply reads no clock. Like the
rest of apply, every check comes before the first write, and a refusal is an
ArgError that becomes an error value.

Rules:
- a join token admits at most `max_uses` distinct node ids, and none once it
  has expired (by the proposer's clock) or been revoked;
- trading again for a node id the token already admitted spends no use, as
  long as that node still holds the credential from this token and has never
  registered with it: an agent that crashed between the master issuing its
  credential and saving it never registered (registering needs the saved
  credential), so it can trade again and the new credential replaces the old
  one. Once the node has registered, its credential is never traded for again:
  a join token left on one host (or a multi-use fleet token) must not buy
  another node's credential. Such a node rejoins only after `node rm`, with a
  new join token;
- a node holds at most one credential; `revoke_node` (from `node rm`) deletes
  it, and the token that admitted the node cannot bring it back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from .cow import CowMap
from .errors import ArgError
from .model import JoinToken, NodeCredential
from .validate import NAME

if TYPE_CHECKING:
    from .state import ClusterState

# Key ids that name no record in the state: the cluster key and the admin token.
RESERVED_KEY_IDS = frozenset({"admin", "cluster"})
MAX_USES = 1_000_000


def key_in_use(s: ClusterState, key_id: str) -> bool:
    """Whether a handshake key id already names a token, join token or credential."""
    return (
        key_id in RESERVED_KEY_IDS
        or key_id in s.tokens
        or key_id in s.join_tokens
        or key_id in s.node_creds
    )


def apply_join_token_create(s: ClusterState, a: dict[str, Any]) -> dict[str, Any]:
    jid = _text(a, "id")
    if key_in_use(s, jid):
        raise ArgError("conflict", f"key id {jid} exists")
    sealed = _sealed(a)
    now = float(a["now"])
    expires_at = a.get("expires_at")
    if expires_at is not None:
        if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
            raise ArgError("bad_request", "join token expiry must be a time in seconds")
        if not math.isfinite(expires_at):
            raise ArgError("bad_request", "join token expiry must be a finite time")
        expires_at = float(expires_at)
    max_uses = a.get("max_uses")
    if max_uses is not None and (
        isinstance(max_uses, bool) or not isinstance(max_uses, int) or not 0 < max_uses <= MAX_USES
    ):
        raise ArgError("bad_request", f"join token uses must be 1-{MAX_USES}, got {max_uses!r}")
    s.join_tokens[jid] = JoinToken(
        id=jid,
        sealed=sealed,
        created_at=now,
        created_by=str(a.get("created_by", ""))[:128],
        expires_at=expires_at,
        max_uses=max_uses,
    )
    return {"id": jid, "expires_at": expires_at, "max_uses": max_uses}


def apply_join_token_revoke(s: ClusterState, a: dict[str, Any]) -> dict[str, Any]:
    jt = s.join_tokens.get(_text(a, "id"))
    if jt is None:
        raise ArgError("not_found", f"no join token {a['id']!r}")
    jt = s.join_tokens.writable(jt.id)  # copy on write (raft/cow.py)
    jt.revoked = True
    return {"id": jt.id, "revoked": True}


def apply_node_join(s: ClusterState, a: dict[str, Any]) -> dict[str, Any]:
    jt = s.join_tokens.get(_text(a, "join_id"))
    if jt is None or jt.revoked:
        raise ArgError("forbidden", f"join token {a['join_id']} was revoked")
    now = float(a["now"])
    if jt.expires_at is not None and now >= jt.expires_at:
        raise ArgError(
            "forbidden", f"join token {jt.id} has expired; create a new one for this host"
        )
    node_id = _text(a, "node_id")
    if not NAME.match(node_id):
        raise ArgError("bad_request", f"node id {node_id!r} is not a valid id")
    cred_id = _text(a, "cred_id")
    if key_in_use(s, cred_id):
        raise ArgError("conflict", f"key id {cred_id} exists")
    sealed = _sealed(a)
    held = s.node_cred_of.get(node_id)
    held_from = s.node_creds[held].join_token if held is not None else None
    again = node_id in jt.nodes
    if again and held_from != jt.id:
        # Admitted by this token once, and its credential is gone: `node rm`.
        raise ArgError(
            "forbidden",
            f"node {node_id} was removed; it needs a new join token to join again",
        )
    if node_id in s.nodes or (held is not None and s.node_creds[held].registered):
        # Registered (or registered once and left): the node holds a saved
        # credential, so a trade now can only be someone else asking for it.
        raise ArgError(
            "conflict",
            f"node {node_id} has registered already, so its credential cannot be traded "
            "for again; to replace it, `leptonctl node rm` the node and join with a new "
            "join token",
        )
    if not again:
        if held is not None:
            raise ArgError(
                "conflict",
                f"node {node_id} already holds a credential from another join token; "
                "remove it with `leptonctl node rm` first",
            )
        if jt.max_uses is not None and len(jt.nodes) >= jt.max_uses:
            raise ArgError(
                "forbidden",
                f"join token {jt.id} is used up ({jt.max_uses} of {jt.max_uses} nodes joined)",
            )
    # Checks done: from here nothing can fail.
    if not again:
        jt = s.join_tokens.writable(jt.id)
        jt.nodes = [*jt.nodes, node_id]  # a new list: views share the old one
    if held is not None:
        del s.node_creds[held]
    s.node_creds[cred_id] = NodeCredential(
        id=cred_id, node_id=node_id, sealed=sealed, issued_at=now, join_token=jt.id
    )
    s.node_cred_of[node_id] = cred_id
    return {"node_id": node_id, "cred_id": cred_id, "again": again, "replaced": held}


def note_registered(s: ClusterState, node_id: str) -> None:
    """The node registered: from now on its credential is never traded for
    again. Called by register_node after its checks; never raises. The record
    is replaced, not changed in place, as published views may share it."""
    cid = s.node_cred_of.get(node_id)
    cred = s.node_creds.get(cid) if cid is not None else None
    if cred is not None and not cred.registered:
        s.node_creds[cred.id] = dataclasses.replace(cred, registered=True)


def revoke_node(s: ClusterState, node_id: str) -> str | None:
    """Delete the node's credential; returns its key id, None when it held none."""
    cred = s.node_cred_of.pop(node_id, None)
    if cred is not None:
        s.node_creds.pop(cred, None)
    return cred


def gc_join_tokens(s: ClusterState, before: float) -> int:
    """Forget join tokens that expired before `before` (the proposer's clock)."""
    gone = [
        jid
        for jid, jt in s.join_tokens.items()
        if jt.expires_at is not None and jt.expires_at < before
    ]
    for jid in gone:
        del s.join_tokens[jid]
    return len(gone)


def reindex(s: ClusterState) -> None:
    s.node_cred_of = CowMap.adopt({c.node_id: cid for cid, c in s.node_creds.items()})


def _text(a: dict[str, Any], key: str) -> str:
    v = a[key]
    if not isinstance(v, str) or not v or len(v) > 256:
        raise ArgError("bad_request", f"{key} must be a non-empty string")
    return v


def _sealed(a: dict[str, Any]) -> bytes:
    sealed = a["sealed"]
    if not isinstance(sealed, bytes) or not 0 < len(sealed) <= 1024:
        raise ArgError("bad_request", "a sealed secret must be bytes")
    return sealed
