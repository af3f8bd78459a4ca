"""The web UI on the masters' HTTP port: pages, sign-in, and the JSON the
pages read, with no build step and nothing fetched from elsewhere.

- Pages (/, /nodes, /jobs, /jobs/ID, /queue, /usage) are one HTML shell and
  leptond/web/static/app.js, which draws each page from the JSON under
  /ui/api/ and polls it for live updates. The shell names the page in a
  data attribute; the Content-Security-Policy allows only our own files.
- Sign-in trades a token (what leptonctl uses) for a session cookie:
  HttpOnly, SameSite=Strict, Secure when the request came over TLS (directly
  or through a proxy that says X-Forwarded-Proto: https).
- Every /ui/api/ call is the RPC call leptonctl would make, with the
  session's token (sessions.py): roles, privacy and audit are the RPC's. A
  follower serves the UI as well: the RPC client follows the leader.
- Changes (cancel, drain, undrain, sign-out) are POSTs that must carry the
  session's CSRF token in X-CSRF-Token and, when the browser sends one, an
  Origin of this very host. Cancel, drain and undrain are for admins only.
- A token that does not sign in gets one answer whatever the reason, so
  the form tells nobody which token ids exist.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from ..clock import Clock
from ..wire.errors import RpcError
from ..wire.tokens import SecretError, parse_token
from .sessions import Session, Sessions

log = logging.getLogger("lepton.web")
COOKIE = "lepton_session"
PAGES = ("overview", "nodes", "jobs", "job", "queue", "usage")
MAX_LOG_BYTES = 256 * 1024  # of a log tail the page shows
LOG_TAIL_LINES = 200
CALL_TIMEOUT_S = 15.0
# What the pages may load: our own files, nothing inline, nothing elsewhere.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
HTTP_STATUS = {
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "bad_request": 400,
    "conflict": 409,
    "not_started": 409,
    "unavailable": 503,
    "no_quorum": 503,
    "not_leader": 503,
    "timeout": 504,
    "too_many_connections": 429,
}
# RPC errors that mean "not this token" at sign-in (leptond/wire/connection.py:
# an unknown or revoked key id and a wrong secret are both unauthenticated;
# a host's credential may not call whoami).
REFUSED = frozenset({"unauthenticated", "forbidden"})
ADMIN_ONLY = (
    "only admins cancel jobs and drain or undrain nodes in the web UI "
    "(leptonctl cancel cancels your own jobs)"
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def static_dir() -> Path:
    return Path(str(resources.files("leptond.web") / "static"))


class WebUI:
    def __init__(
        self,
        addrs: Callable[[], Sequence[tuple[str, int]]],
        clock: Clock,
        on_auth_failure: Callable[[], None],
    ) -> None:
        """`addrs`: the masters' RPC addresses, this one first."""
        self.sessions = Sessions(addrs, clock)
        self._auth_failed = on_auth_failure
        self._static = static_dir()
        self._shell = (self._static / "index.html").read_text()

    def routes(self) -> list[web.RouteDef]:
        page = self._page
        return [
            web.get("/", page("overview")),
            web.get("/nodes", page("nodes")),
            web.get("/jobs", page("jobs")),
            web.get("/jobs/{job}", page("job")),
            web.get("/queue", page("queue")),
            web.get("/usage", page("usage")),
            web.get("/signin", self.signin_page),
            web.post("/signin", self.signin),
            web.post("/signout", self.signout),
            web.get("/static/{name}", self.static),
            web.get("/ui/api/session", self.api(self.session_info)),
            web.get("/ui/api/overview", self.api(self.overview)),
            web.get("/ui/api/jobs", self.api(self.jobs)),
            web.get("/ui/api/jobs/{job}", self.api(self.job)),
            web.get("/ui/api/jobs/{job}/logs", self.api(self.logs)),
            web.get("/ui/api/queue", self.api(self.queue)),
            web.get("/ui/api/usage", self.api(self.usage)),
            web.post("/ui/api/jobs/{job}/cancel", self.api(self.cancel, change=True)),
            web.post("/ui/api/nodes/{node}/drain", self.api(self.drain, change=True)),
            web.post("/ui/api/nodes/{node}/undrain", self.api(self.undrain, change=True)),
        ]

    async def close(self) -> None:
        await self.sessions.close()

    # -- pages --------------------------------------------------------------------
    def _page(self, name: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            if await self._session(request) is None:
                raise web.HTTPSeeOther("/signin")
            job = request.match_info.get("job", "")
            return self._html(name, job=job)

        return handler

    def _html(self, page: str, job: str = "", error: str = "", status: int = 200) -> web.Response:
        body = self._shell
        for key, val in (("page", page), ("job", job), ("error", error)):
            body = body.replace("{{" + key + "}}", _attr(val))
        resp = web.Response(text=body, content_type="text/html", status=status)
        _secure_headers(resp)
        return resp

    async def signin_page(self, request: web.Request) -> web.StreamResponse:
        if await self._session(request) is not None:
            raise web.HTTPSeeOther("/")
        return self._html("signin")

    async def signin(self, request: web.Request) -> web.StreamResponse:
        if not _same_origin(request):
            return self._html("signin", error="sign-in from another site refused", status=403)
        form = await request.post()
        text = str(form.get("token", "")).strip()
        try:
            token = parse_token(text)
        except SecretError:
            self._auth_failed()
            return self._html("signin", error="that is not a leptond token (ltk_...)", status=401)
        client = self.sessions.client_for(token)
        try:
            who = await client.call("whoami", {}, timeout_s=CALL_TIMEOUT_S)
        except RpcError as exc:
            await client.close()
            if exc.code in REFUSED:
                return self._refused()
            return self._html("signin", error=f"cannot sign in: {exc.message}", status=503)
        if not isinstance(who, dict) or who.get("role") not in ("read", "submit", "admin"):
            await client.close()
            return self._refused()
        s = await self.sessions.add(client, str(who["user"]), str(who["role"]))
        resp = web.HTTPSeeOther("/")
        resp.set_cookie(
            COOKIE, s.id, httponly=True, samesite="Strict", secure=_tls(request), path="/"
        )
        log.info("web UI: %s (%s) signed in", s.user, s.role)
        raise resp

    def _refused(self) -> web.Response:
        """One answer for every token that does not sign in: unknown, revoked,
        a wrong secret, a host's credential. Which it was is not said, so the
        form cannot be used to learn which token ids exist."""
        self._auth_failed()
        return self._html("signin", error="the cluster refused this token", status=401)

    async def signout(self, request: web.Request) -> web.StreamResponse:
        s = await self._session(request)
        if s is not None:
            if not (_same_origin(request) and s.csrf_ok(await _form_csrf(request))):
                raise web.HTTPForbidden(text="sign-out needs the page's CSRF token")
            await self.sessions.drop(s.id)
        resp = web.HTTPSeeOther("/signin")
        resp.del_cookie(COOKIE, path="/")
        raise resp

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in ("app.js", "style.css"):
            raise web.HTTPNotFound()
        ctype = "text/javascript" if name.endswith(".js") else "text/css"
        resp = web.Response(
            body=(self._static / name).read_bytes(), content_type=ctype, charset="utf-8"
        )
        resp.headers["Cache-Control"] = "no-cache"
        _secure_headers(resp)
        return resp

    # -- the JSON the pages read -----------------------------------------------------
    def api(
        self,
        fn: Callable[[Session, web.Request], Awaitable[Any]],
        change: bool = False,
    ) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            s = await self._session(request)
            if s is None:
                return _error("unauthenticated", "sign in first", 401)
            if change and not (
                _same_origin(request) and s.csrf_ok(request.headers.get("X-CSRF-Token"))
            ):
                return _error("forbidden", "this change needs the page's CSRF token", 403)
            if change and s.role != "admin":
                # The UI's actions are an operator's (leptonctl cancels one's own jobs).
                return _error("forbidden", ADMIN_ONLY, 403)
            try:
                out = await fn(s, request)
            except RpcError as exc:
                if exc.code == "unauthenticated":  # the token was revoked
                    await self.sessions.drop(s.id)
                return _error(exc.code, exc.message, HTTP_STATUS.get(exc.code, 500))
            resp = web.json_response(out, dumps=_dumps)
            resp.headers["Cache-Control"] = "no-store"
            _secure_headers(resp)
            return resp

        return handler

    async def _session(self, request: web.Request) -> Session | None:
        return await self.sessions.get(request.cookies.get(COOKIE))

    @staticmethod
    async def _call(s: Session, method: str, args: dict[str, Any]) -> Any:
        return await s.client.call(method, args, timeout_s=CALL_TIMEOUT_S)

    async def session_info(self, s: Session, request: web.Request) -> Any:
        return {"user": s.user, "role": s.role, "csrf": s.csrf}

    async def overview(self, s: Session, request: web.Request) -> Any:
        return await self._call(s, "overview", {})

    async def jobs(self, s: Session, request: web.Request) -> Any:
        q = request.query
        args: dict[str, Any] = {"limit": 500}
        state = q.get("state")
        if state:
            args["state"] = [state]
            args["all"] = state in ("succeeded", "failed", "cancelled")
        if q.get("user"):
            args["user"] = q["user"]
        return await self._call(s, "jobs", args)

    async def job(self, s: Session, request: web.Request) -> Any:
        # brief: without the spec (env values), so not an audited read; what
        # the job page polls.
        args: dict[str, Any] = {"job_id": request.match_info["job"]}
        if request.query.get("brief") == "1":
            args["brief"] = True
        return await self._call(s, "status", args)

    async def logs(self, s: Session, request: web.Request) -> Any:
        jid = request.match_info["job"]
        args: dict[str, Any] = {"job_id": jid, "tail_lines": LOG_TAIL_LINES, "follow": False}
        # A task of a job array is named by its index; of other jobs, by rank.
        if "index" in request.query:
            args["index"] = _int(request.query["index"], "index")
        else:
            args["rank"] = _int(request.query.get("rank", "0"), "rank")
        chunks: list[bytes] = []
        size = 0
        # aclosing: a tail cut short ends its stream now, not at garbage
        # collection (the leader holds a relay slot per user while it runs).
        stream = s.client.stream("logs", args, item_timeout_s=CALL_TIMEOUT_S)
        try:
            # An async generator, though typed as the AsyncIterator it is used as.
            async with contextlib.aclosing(stream) as items:  # type: ignore[type-var]
                async for item in items:
                    data = item.get("data", b"") if isinstance(item, dict) else b""
                    if isinstance(data, bytes):
                        chunks.append(data)
                        size += len(data)
                        if size > MAX_LOG_BYTES:
                            break
        except RpcError as exc:
            if exc.code == "not_started":
                return {"text": "", "note": exc.message}
            raise
        text = b"".join(chunks)[-MAX_LOG_BYTES:].decode("utf-8", "replace")
        return {"text": text, "note": ""}

    async def queue(self, s: Session, request: web.Request) -> Any:
        return await self._call(s, "queue", {})

    async def usage(self, s: Session, request: web.Request) -> Any:
        days = _int(request.query.get("days", "7"), "days")
        by = request.query.get("by", "user")
        return await self._call(s, "usage", {"since_s": days * 86400.0, "by": by})

    async def cancel(self, s: Session, request: web.Request) -> Any:
        return await self._call(s, "cancel", {"job_id": request.match_info["job"]})

    async def drain(self, s: Session, request: web.Request) -> Any:
        body = await _json_body(request)
        args: dict[str, Any] = {"node": request.match_info["node"]}
        if body.get("reason"):
            args["reason"] = body["reason"]
        return await self._call(s, "node_drain", args)

    async def undrain(self, s: Session, request: web.Request) -> Any:
        return await self._call(s, "node_undrain", {"node": request.match_info["node"]})


# -- helpers ---------------------------------------------------------------------------
def _attr(text: str) -> str:
    """Text safe inside a double-quoted HTML attribute."""
    return (
        text.replace("&", "&amp;")
        .replace('"', "&quot;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&#39;")
    )


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=lambda o: o.hex() if isinstance(o, bytes) else str(o))


def _error(code: str, message: str, status: int) -> web.Response:
    resp = web.json_response({"error": {"code": code, "message": message}}, status=status)
    _secure_headers(resp)
    return resp


def _secure_headers(resp: web.StreamResponse) -> None:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    # Not no-referrer: with it browsers send "Origin: null" on our own POSTs.
    resp.headers["Referrer-Policy"] = "same-origin"
    resp.headers["X-Frame-Options"] = "DENY"


def _tls(request: web.Request) -> bool:
    """Whether the browser reached us over TLS: directly, or through a proxy."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


def _same_origin(request: web.Request) -> bool:
    """No Origin (an old browser, curl): allowed, the CSRF token still holds.
    With one, it must name this host."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    host = request.headers.get("Host", "")
    return any(hmac.compare_digest(origin, f"{s}://{host}") for s in ("http", "https"))


async def _form_csrf(request: web.Request) -> str | None:
    header = request.headers.get("X-CSRF-Token")
    if header:
        return header
    form = await request.post()
    v = form.get("csrf")
    return v if isinstance(v, str) else None


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise RpcError("bad_request", "the body must be JSON") from None
    if not isinstance(body, dict):
        raise RpcError("bad_request", "the body must be a JSON object")
    return body


def _int(text: str, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise RpcError("bad_request", f"{what} must be a whole number, got {text[:20]!r}") from None
    if not 0 <= n <= 1 << 20:
        raise RpcError("bad_request", f"{what} out of range: {n}")
    return n
