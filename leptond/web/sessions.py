"""Web UI sessions: a signed-in browser holds a random session id in a cookie;
this master holds the token it signed in with.

Every page's data is an RPC call made with that token (leptond/web/app.py),
so the web UI has exactly the rights of the token, no more: the same role
checks, the same privacy rules (other users' output and env values), the
same audit records. A session lives on the master that made it, in memory:
after a restart of that master people sign in again.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..clock import Clock
from ..wire.client import ClusterClient
from ..wire.tokens import Token

# At most this many sessions at once, and per user; the least recently used
# goes first (so one user signing in again and again evicts only their own).
MAX_SESSIONS = 1000
MAX_SESSIONS_PER_USER = 20
IDLE_S = 12 * 3600.0  # a session not used for this long is over
LIFETIME_S = 7 * 86400.0  # and none lasts longer than this


@dataclass
class Session:
    id: str
    user: str
    role: str
    csrf: str  # sent with every change the page asks for (X-CSRF-Token)
    client: ClusterClient
    created: float
    used: float
    extra: dict[str, Any] = field(default_factory=dict)

    def csrf_ok(self, sent: str | None) -> bool:
        return sent is not None and hmac.compare_digest(sent.encode(), self.csrf.encode())


class Sessions:
    def __init__(self, addrs: Callable[[], Sequence[tuple[str, int]]], clock: Clock) -> None:
        """`addrs`: the masters' RPC addresses, this one first."""
        self._addrs = addrs
        self._clock = clock
        self._by_id: dict[str, Session] = {}

    def client_for(self, token: Token) -> ClusterClient:
        return ClusterClient(self._addrs(), key_id=token.id, psk=token.psk, connect_timeout_s=3.0)

    async def add(self, client: ClusterClient, user: str, role: str) -> Session:
        await self._expire()
        mine = [s for s in self._by_id.values() if s.user == user]
        while len(mine) >= MAX_SESSIONS_PER_USER:
            oldest = min(mine, key=lambda s: s.used)
            mine.remove(oldest)
            await self.drop(oldest.id)
        while len(self._by_id) >= MAX_SESSIONS:
            oldest = min(self._by_id.values(), key=lambda s: s.used)
            await self.drop(oldest.id)
        now = self._clock.monotonic()
        s = Session(
            id=secrets.token_urlsafe(32),
            user=user,
            role=role,
            csrf=secrets.token_urlsafe(32),
            client=client,
            created=now,
            used=now,
        )
        self._by_id[s.id] = s
        return s

    async def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        now = self._clock.monotonic()
        if now - s.used > IDLE_S or now - s.created > LIFETIME_S:
            await self.drop(sid)
            return None
        s.used = now
        return s

    async def drop(self, sid: str) -> None:
        s = self._by_id.pop(sid, None)
        if s is not None:
            with contextlib.suppress(Exception):
                await s.client.close()

    async def _expire(self) -> None:
        now = self._clock.monotonic()
        for sid in [
            s.id
            for s in self._by_id.values()
            if now - s.used > IDLE_S or now - s.created > LIFETIME_S
        ]:
            await self.drop(sid)

    async def close(self) -> None:
        for sid in list(self._by_id):
            await self.drop(sid)

    def __len__(self) -> int:
        return len(self._by_id)
