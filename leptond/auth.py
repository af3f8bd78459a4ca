"""Who is calling: keys for the handshake, roles for each method, the audit log."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from raft.view import StateView

from .audit import AuditLog
from .clock import REAL, Clock
from .ports import StateReader
from .wire.errors import FORBIDDEN, RpcError
from .wire.tokens import ADMIN_TOKEN_ID, CLUSTER_KEY_ID, Token, cluster_psk, derive

# People's roles, in order of power: each may do what the ones below it may.
ROLE_RANK = {"read": 0, "submit": 1, "admin": 2}
# Roles with one purpose each, outside that order; each matches only itself.
# "cluster": masters calling each other (the cluster key lives only on masters).
# "node": one agent's credential, for node RPCs about its own node.
# "join": a join token, good only for trading it for a node credential.
PURPOSE_ROLES = frozenset({"cluster", "node", "join"})


class KeyStore:
    """Maps a handshake key id to its pre-shared key.

    Token secrets live in the replicated state sealed under a key derived from
    the cluster secret, so a leaked snapshot alone gives no working token.
    """

    def __init__(
        self, cluster_secret: bytes, admin: Token, reader: StateReader, clock: Clock = REAL
    ) -> None:
        self._cluster_psk = cluster_psk(cluster_secret)
        self._clock = clock
        self._seal_key = AESGCM(derive(cluster_secret, b"leptond token seal"))
        self._admin = admin
        self._reader = reader
        self._cache: dict[str, bytes] = {}

    def psk(self, key_id: str) -> bytes | None:
        if key_id == CLUSTER_KEY_ID:
            return self._cluster_psk
        if key_id == ADMIN_TOKEN_ID:
            return self._admin.psk
        sealed = self._sealed(self._reader.view(), key_id, self._clock.now())
        if sealed is None:
            self._cache.pop(key_id, None)
            return None
        cached = self._cache.get(key_id)
        if cached is not None:
            return cached
        secret = self._unseal(key_id, sealed)
        if secret is None:
            return None
        psk = Token(key_id, secret).psk
        self._cache[key_id] = psk
        return psk

    def token(self, key_id: str) -> Token | None:
        """The whole user token with this id, unsealed from the replicated state."""
        tok = self._reader.view().tokens.get(key_id)
        if tok is None:
            return None
        secret = self._unseal(key_id, tok.sealed)
        return None if secret is None else Token(key_id, secret)

    def _unseal(self, key_id: str, sealed: bytes) -> bytes | None:
        try:
            return self._seal_key.decrypt(sealed[:12], sealed[12:], key_id.encode())
        except (InvalidTag, ValueError):
            return None

    @staticmethod
    def _sealed(s: StateView, key_id: str, now: float) -> bytes | None:
        """The sealed secret of a live key id.

        A join token that expired or was revoked opens no handshake: every
        frame an authenticated peer sends costs the master work, so a key
        that is good for nothing any more must not buy that. (A connection
        made before the expiry hears it in words from node_join.)
        """
        tok = s.tokens.get(key_id)
        if tok is not None:
            return None if tok.revoked else tok.sealed
        jt = s.join_tokens.get(key_id)
        if jt is not None:
            expired = jt.expires_at is not None and now >= jt.expires_at
            return None if jt.revoked or expired else jt.sealed
        cred = s.node_creds.get(key_id)
        return cred.sealed if cred is not None else None

    def seal(self, token: Token) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._seal_key.encrypt(nonce, token.secret, token.id.encode())

    def unix_user(self, key_id: str) -> str:
        """The Unix account a key's jobs run as: the admin token's is root."""
        if key_id == ADMIN_TOKEN_ID:
            return "root"
        tok = self._reader.view().tokens.get(key_id)
        if tok is None or tok.revoked:
            return ""
        return tok.unix_user or tok.name

    def identity(self, key_id: str) -> tuple[str, str]:
        """(user name, role) for an authenticated key id; ("", "") once revoked.

        A node credential's user is its node id, the one node it speaks for; a
        join token's is its own id.
        """
        if key_id == CLUSTER_KEY_ID:
            return "cluster", "cluster"
        if key_id == ADMIN_TOKEN_ID:
            return "admin", "admin"
        s = self._reader.view()
        tok = s.tokens.get(key_id)
        if tok is not None:
            return ("", "") if tok.revoked else (tok.name, tok.role)
        jt = s.join_tokens.get(key_id)
        if jt is not None:
            return ("", "") if jt.revoked else (jt.id, "join")
        cred = s.node_creds.get(key_id)
        if cred is not None:
            return cred.node_id, "node"
        return "", ""


__all__ = ["AuditLog", "KeyStore", "allowed", "require"]

_REFUSALS = {
    "node": "a node credential may call only its own node's agent RPCs",
    "join": "a join token can only be traded for a node credential (lepton-agent --join-token-file)",
    "cluster": "the cluster key is for masters calling each other; use an admin token",
}


def allowed(have: str, role: str) -> bool:
    """Whether a caller with role `have` may call what needs `role`."""
    if role in ROLE_RANK:
        return ROLE_RANK.get(have, -1) >= ROLE_RANK[role]
    return have == role


def require(ctx: dict[str, Any], role: str, is_revoked: Callable[[], bool] | None = None) -> None:
    have = ctx.get("role", "")
    if not allowed(have, role):
        raise RpcError(
            FORBIDDEN,
            _REFUSALS.get(have)
            or f"this needs a token with role {role}; yours is {have or 'unknown'}",
        )
    if is_revoked is not None and is_revoked():
        raise RpcError("unauthenticated", "this token has been revoked")
