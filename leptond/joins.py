"""RPC methods for node credentials: join tokens (admins) and the trade (agents).

An admin makes a join token (`leptonctl node join-token create`); an agent
connects with it once and trades it for a node credential bound to its node
id (`node_join`), saves that in its data dir and uses nothing else from then
on. Secrets are sealed here, on the proposer; expiry and use counts are decided
in apply against the time proposed here (raft/nodecreds.py).
"""

from __future__ import annotations

import math
import secrets
from typing import Any

from raft.nodecreds import MAX_USES
from raft.validate import SpecError, validate_name

from . import param
from .api import method
from .apictx import ApiContext
from .wire.connection import Connection
from .wire.errors import BAD_REQUEST, RpcError
from .wire.tokens import new_token

MAX_TTL_S = 366 * 86400


@method("join_token_create", "admin", mutating=True)
async def join_token_create(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    m.ensure_leader()
    ttl_s = a.get("ttl_s", 3600)
    if (
        isinstance(ttl_s, bool)
        or not isinstance(ttl_s, int | float)
        or not math.isfinite(ttl_s)
        or not 0 < ttl_s <= MAX_TTL_S
    ):
        raise RpcError(
            BAD_REQUEST, f"join token ttl must be more than 0s and at most 366d, got {ttl_s!r}"
        )
    uses = a.get("uses", 1)
    if uses is not None and (
        isinstance(uses, bool) or not isinstance(uses, int) or not 0 < uses <= MAX_USES
    ):
        raise RpcError(BAD_REQUEST, f"join token uses must be 1-{MAX_USES}, got {uses!r}")
    # "j" is not a hex digit: no user token id (hex) can ever collide with it.
    tok = new_token("j" + secrets.token_hex(6))
    now = m.clock.now()
    res = await m.propose(
        "join_token_create",
        {
            "id": tok.id,
            "sealed": m.keys.seal(tok),
            "now": now,
            "expires_at": now + float(ttl_s),
            "max_uses": uses,
            "created_by": conn.context["user"],
        },
    )
    return {**res, "token": str(tok)}


@method("join_token_ls", "admin")
async def join_token_ls(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    return [
        {
            "id": j.id,
            "created_at": j.created_at,
            "created_by": j.created_by,
            "expires_at": j.expires_at,
            "max_uses": j.max_uses,
            "used": len(j.nodes),
            "revoked": j.revoked,
        }
        for j in m.view().join_tokens.values()
    ]


@method("join_token_revoke", "admin", mutating=True)
async def join_token_revoke(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    m.ensure_leader()
    res = await m.propose("join_token_revoke", {"id": param.string(a, "id")})
    m.close_connections(res["id"])
    return res


@method("node_join", "join", mutating=True)
async def node_join(m: ApiContext, conn: Connection, a: dict[str, Any]) -> Any:
    """Trade the join token this connection authenticated with for a node
    credential bound to `node_id`. Trading again for a node the token already
    admitted spends no use and replaces that node's credential, but only while
    that node has never registered (an agent that died before saving it);
    apply refuses it afterwards (raft/nodecreds.py)."""
    m.ensure_leader()
    try:
        node_id = validate_name(a.get("node_id"), "node id")
    except SpecError as exc:
        raise RpcError(BAD_REQUEST, str(exc)) from None
    jt = m.view().join_tokens.get(conn.key_id)
    expires_at = jt.expires_at if jt is not None else None
    now = m.clock.now()
    if expires_at is not None and now >= expires_at:
        # Apply refuses it too; this says so without a Raft round trip.
        raise RpcError("forbidden", f"join token {conn.key_id} has expired; create a new one")
    # "n" is not a hex digit either; the credential's id is fresh on every trade.
    cred = new_token("n" + secrets.token_hex(8))
    res = await m.propose(
        "node_join",
        {
            "join_id": conn.key_id,
            "node_id": node_id,
            "cred_id": cred.id,
            "sealed": m.keys.seal(cred),
            "now": now,
        },
    )
    if res.get("replaced"):
        # The node's earlier credential is gone: close what it still holds open.
        m.close_connections(res["replaced"])
    return {"node_id": node_id, "credential": str(cred)}
