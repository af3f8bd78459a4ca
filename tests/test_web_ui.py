"""The web UI on the masters' HTTP port, served here by a follower (it reads
through the leader).

Over plain HTTP: pages need a session; sign-in sets a strict cookie; changes
need the page's CSRF token and our own origin; everything the pages load
ships with leptond; the privacy rules are the RPC's; a revoked token ends
its session.

In a headless Chromium (driven over the DevTools protocol, tests/cdp.py):
signing in, following a job from pending to running to succeeded without a
reload, its log tail, cancelling as an admin and being refused as `read`,
draining a node; each page's screenshot is saved under the test's tmp dir.
Those skip, with one line, where Chromium is not installed.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from leptond.web.app import ADMIN_ONLY, static_dir
from leptond.wire.tokens import Token, parse_token
from tests.cdp import Browser, chromium
from tests.harness import Cluster, Master, wait_for
from tests.test_hosts_e2e import module_cluster
from tests.test_metrics_e2e import scrape, value


@pytest.fixture(scope="module")
def web(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    with module_cluster(tmp_path_factory.mktemp("web"), request) as c:
        c.start_agent("h1", gpus="2")
        c.wait_nodes_ready(1)
        yield c


def follower(c: Cluster) -> Master:
    leader = c.wait_leader()
    return next(m for m in c.masters if m is not leader and m.proc.alive())


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:
        return None


class Visitor:
    """A browser without JavaScript: a cookie jar and urllib."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.open = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), NoRedirect()
        ).open

    def request(
        self, path: str, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {})
        try:
            with self.open(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def sign_in(
        self, token: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        form = urllib.parse.urlencode({"token": token}).encode()
        return self.request("/signin", form, headers)

    def json(self, path: str) -> tuple[int, Any]:
        status, _, body = self.request(path)
        return status, json.loads(body)

    def post(self, path: str, headers: dict[str, str]) -> tuple[int, Any]:
        status, _, body = self.request(path, b"{}", {"Content-Type": "application/json", **headers})
        return status, json.loads(body)


def signed_in(c: Cluster, token: str) -> Visitor:
    v = Visitor(f"http://127.0.0.1:{follower(c).http}")
    status, headers, _ = v.sign_in(token)
    assert status == 303 and headers["Location"] == "/", (status, headers)
    return v


def person(c: Cluster, role: str, name: str) -> str:
    return c.ctl(
        "token", "create", "--role", role, "--name", name, "--unix-user", "root"
    ).stdout.strip()


# -- over plain HTTP -------------------------------------------------------------------
def test_pages_need_a_session_and_sign_in_sets_a_strict_cookie(web: Cluster) -> None:
    m = follower(web)
    v = Visitor(f"http://127.0.0.1:{m.http}")
    for page in ("/", "/nodes", "/jobs", "/jobs/j-x", "/queue", "/usage"):
        status, headers, _ = v.request(page)
        assert (status, headers["Location"]) == (303, "/signin"), page
    status, _, _ = v.request("/ui/api/overview")
    assert status == 401
    leader = web.wait_leader()
    fails = value(scrape(m.http), "lepton_auth_failures_total", via="http") or 0
    status, _, body = v.sign_in(str(Token("deadbeef", bytes(32))))  # a token nobody issued
    assert status == 401 and b'data-error="the cluster refused this token"' in body
    status, _, body = v.sign_in("not a token")
    assert status == 401 and b"that is not a leptond token" in body
    assert value(scrape(m.http), "lepton_auth_failures_total", via="http") == fails + 2
    status, headers, _ = v.sign_in(web.admin_token)
    assert status == 303
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    assert v.json("/ui/api/session")[1]["role"] == "admin"
    # Behind a TLS proxy, the cookie is Secure too.
    status, headers, _ = Visitor(v.base).sign_in(web.admin_token, {"X-Forwarded-Proto": "https"})
    assert status == 303 and "Secure" in headers["Set-Cookie"]
    # A sign-in posted from another site is refused.
    status, _, _ = Visitor(v.base).sign_in(web.admin_token, {"Origin": "http://evil.example"})
    assert status == 403
    # The follower answers with the leader's data.
    status, ov = v.json("/ui/api/overview")
    assert status == 200 and ov["cluster"]["leader"] == leader.rpc_addr
    assert [n["name"] for n in ov["nodes"]] == ["h1"]


def test_changes_need_the_csrf_token_and_this_origin(web: Cluster) -> None:
    v = signed_in(web, web.admin_token)
    csrf = v.json("/ui/api/session")[1]["csrf"]
    job = web.submit("--", "sleep", "600")
    web.wait_job(job, {"running", "pending"})
    path = f"/ui/api/jobs/{job}/cancel"
    here = v.base.replace("http://", "http://")
    for headers in (
        {},
        {"X-CSRF-Token": "wrong"},
        {"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
    ):
        status, body = v.post(path, headers)
        assert status == 403 and "CSRF" in body["error"]["message"], (headers, body)
    assert web.status(job)["state"] in ("pending", "running")
    status, body = v.post(path, {"X-CSRF-Token": csrf, "Origin": here})
    assert status == 200 and body["state"] == "cancelled", body
    # Sign-out needs it too.
    status, _, _ = v.request("/signout", b"")
    assert status == 403
    form = urllib.parse.urlencode({"csrf": csrf}).encode()
    status, headers, _ = v.request("/signout", form)
    assert (status, headers["Location"]) == (303, "/signin")
    assert v.request("/ui/api/session")[0] == 401


def test_only_admins_cancel_drain_or_undrain(web: Cluster) -> None:
    bob = person(web, "submit", "bob")
    job = web.submit("--", "sleep", "600", token=bob)
    web.wait_job(job, {"running", "pending"})
    for tok in (bob, person(web, "read", "ivy")):
        v = signed_in(web, tok)
        csrf = {"X-CSRF-Token": v.json("/ui/api/session")[1]["csrf"]}
        # Even the job's owner: in the UI these are an operator's actions.
        for path in (f"/ui/api/jobs/{job}/cancel", "/ui/api/nodes/h1/drain"):
            status, body = v.post(path, csrf)
            assert status == 403 and body["error"]["message"] == ADMIN_ONLY, (path, body)
    assert web.status(job)["state"] in ("pending", "running")
    assert next(n for n in web.nodes() if n["name"] == "h1")["state"] == "ready"
    web.ctl("cancel", job)


def test_a_refused_sign_in_says_the_same_whatever_the_token(web: Cluster) -> None:
    m = follower(web)
    revoked = person(web, "read", "frank")
    web.ctl("token", "revoke", revoked.split("_")[1])
    admin = parse_token(web.admin_token)
    tokens = {
        "never issued": Token("deadbeef", bytes(32)),
        "a real id with a wrong secret": Token(admin.id, bytes(32)),
        "revoked": parse_token(revoked),
        "a host's credential": parse_token((web.root / "agent-h1" / "node.credential").read_text()),
    }
    fails = value(scrape(m.http), "lepton_auth_failures_total", via="http") or 0
    answers = {}
    for what, tok in tokens.items():
        status, _, body = Visitor(f"http://127.0.0.1:{m.http}").sign_in(str(tok))
        answers[what] = (status, tuple(re.findall(rb'data-error="[^"]*"', body)))
    assert set(answers.values()) == {(401, (b'data-error="the cluster refused this token"',))}, (
        answers
    )
    assert value(scrape(m.http), "lepton_auth_failures_total", via="http") == fails + len(tokens)


def test_everything_the_ui_loads_ships_with_leptond(web: Cluster) -> None:
    v = signed_in(web, web.admin_token)
    status, headers, body = v.request("/")
    assert status == 200
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    html = body.decode()
    # What the page loads: its scripts and stylesheets (and no images, fonts, frames).
    refs = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]*)"', html)
    assert sorted(refs) == ["/static/app.js", "/static/style.css"]
    assert not re.search(r"<(img|iframe|object|embed)\b", html)
    for name in ("index.html", "app.js", "style.css"):
        text = (static_dir() / name).read_text()
        assert not re.search(r"https?://|//cdn|@import", text), name
    for name in ("app.js", "style.css"):
        status, headers, body = v.request(f"/static/{name}")
        assert status == 200 and body == (static_dir() / name).read_bytes()
    assert v.request("/static/../http.py")[0] == 404
    assert v.request("/static/index.html")[0] == 404


def test_the_privacy_rules_are_the_rpcs(web: Cluster) -> None:
    bob = person(web, "submit", "bob")
    job = web.submit("--env", "SECRET=hunter2", "--", "sh", "-c", "echo only for bob", token=bob)
    web.wait_job(job, {"succeeded"})
    reader = signed_in(web, person(web, "read", "carol"))
    status, st = reader.json(f"/ui/api/jobs/{job}")
    assert status == 200 and st["spec"]["env"] == {"SECRET": "<redacted>"}
    status, body = reader.json(f"/ui/api/jobs/{job}/logs?rank=0")
    assert status == 403 and "only its owner or an admin" in body["error"]["message"]
    owner = signed_in(web, bob)
    status, body = owner.json(f"/ui/api/jobs/{job}/logs?rank=0")
    assert status == 200 and body["text"] == "only for bob\n"
    assert owner.json(f"/ui/api/jobs/{job}")[1]["spec"]["env"] == {"SECRET": "hunter2"}
    # An admin may read it, and that read is in the leader's audit log.
    admin = signed_in(web, web.admin_token)
    assert admin.json(f"/ui/api/jobs/{job}/logs?rank=0")[1]["text"] == "only for bob\n"
    audit = (web.root / f"master-{web.wait_leader().index}" / "audit.log").read_text()
    assert f'"target": "{job}", "result": "ok: read the job of bob"' in audit
    # Bad input is one clear error.
    status, body = admin.json(f"/ui/api/jobs/{job}/logs?rank=many")
    assert status == 400 and body["error"]["message"] == "rank must be a whole number, got 'many'"
    status, body = admin.json("/ui/api/jobs?state=weird")
    assert status == 400 and "'weird' is not one of pending" in body["error"]["message"]
    assert admin.json("/ui/api/jobs/j-nope")[0] == 404


def test_a_revoked_token_ends_its_session(web: Cluster) -> None:
    tok = person(web, "read", "dave")
    v = signed_in(web, tok)
    assert v.json("/ui/api/overview")[0] == 200
    tid = tok.split("_")[1]
    web.ctl("token", "revoke", tid)
    wait_for(lambda: v.json("/ui/api/overview")[0] == 401, 30, "the session to end")
    assert v.json("/ui/api/session")[0] == 401


# -- in a browser --------------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Browser]:
    """One Chromium for the module's browser tests (each signs in afresh)."""
    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium): browser tests skipped")
    b = Browser(tmp_path_factory.mktemp("chromium"))
    try:
        await b.start()
        yield b
    finally:
        await b.close()


# The browser tests share the browser's event loop.
in_browser = pytest.mark.asyncio(loop_scope="module")


async def sign_in(b: Browser, base: str, token: str) -> None:
    # No session left from an earlier test: the sign-in page would send us on.
    await b.send("Network.clearBrowserCookies")
    await b.goto(base + "/signin")
    await b.type("#token", token)
    await b.click("#signin")
    await b.wait("location.pathname === '/' && document.querySelector('#leader')", "the overview")


async def sign_out(b: Browser) -> None:
    await b.click("#signout")
    await b.wait("location.pathname === '/signin'", "the sign-in page")


@in_browser
async def test_sign_in_and_follow_a_job_to_its_end_without_a_reload(
    web: Cluster, browser: Browser, tmp_path: Path
) -> None:
    b = browser
    base = f"http://127.0.0.1:{follower(web).http}"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    await b.send("Network.clearBrowserCookies")
    await b.goto(base + "/")
    await b.wait("location.pathname === '/signin'", "a redirect to sign in")
    await b.screenshot(shots / "signin.png")
    await b.type("#token", str(Token("deadbeef", bytes(32))))
    await b.click("#signin")
    await b.wait("document.querySelector('#signin-error')", "the refusal")
    assert await b.text("#signin-error") == "the cluster refused this token"
    await sign_in(b, base, web.admin_token)
    await b.wait("document.querySelectorAll('#heatmap .cell').length === 2", "h1's 2 GPUs")
    assert await b.text("#leader") == web.wait_leader().rpc_addr
    assert await b.text("#whoami") == "admin (admin)"
    await b.screenshot(shots / "overview.png")
    # A job that must wait: both GPUs are held.
    blocker = web.submit("--gpus", "2", "--", "sleep", "600")
    web.wait_job(blocker, {"running"})
    await b.goto(base + "/")
    await b.wait("document.querySelectorAll('#heatmap .cell.u9').length === 2", "2 busy GPUs")
    await b.screenshot(shots / "overview-busy.png")
    job = web.submit(
        "--gpus", "1", "--", "sh", "-c", "echo hello from the web ui; sleep 3; echo bye"
    )
    await b.goto(f"{base}/jobs/{job}")
    await b.wait("document.querySelector('#job-state [data-state=pending]')", "pending")
    assert "needs 1 GPU" in await b.text("#job-reason")
    await b.eval("window.sameDocument = true")
    await b.screenshot(shots / "job-pending.png")
    web.ctl("cancel", blocker)
    await b.wait("document.querySelector('#job-state [data-state=running]')", "running")
    await b.wait(
        "document.querySelector('#log').textContent.includes('hello from the web ui')", "the log"
    )
    await b.screenshot(shots / "job-running.png")
    await b.wait("document.querySelector('#job-state [data-state=succeeded]')", "succeeded")
    await b.wait("document.querySelector('#log').textContent.includes('bye')", "the whole log")
    assert await b.eval("window.sameDocument === true"), "the page was reloaded"
    await b.screenshot(shots / "job.png")
    # The other pages, with one job holding both GPUs and one waiting for them.
    held = web.submit("--gpus", "2", "--", "sleep", "600")
    web.wait_job(held, {"running"})
    waiting = web.submit("--gpus", "1", "--", "true")
    try:
        for path, ready, name in (
            ("/nodes", "document.querySelector('section.node[data-node=h1] table a')", "nodes"),
            ("/jobs?state=succeeded", f"document.querySelector('a[href=\"/jobs/{job}\"]')", "jobs"),
            ("/queue", "document.querySelectorAll('main table tbody tr').length > 0", "queue"),
            ("/usage", "document.querySelector('table.usage tbody tr')", "usage"),
        ):
            await b.goto(base + path)
            await b.wait(ready, f"the {name} page")
            await b.screenshot(shots / f"{name}.png")
    finally:
        web.ctl("cancel", held, waiting)
    assert sorted(p.name for p in shots.iterdir()) == sorted(
        f"{n}.png"
        for n in (
            "signin",
            "overview",
            "overview-busy",
            "job-pending",
            "job-running",
            "job",
            "nodes",
            "jobs",
            "queue",
            "usage",
        )
    )
    assert all(p.stat().st_size > 1000 for p in shots.iterdir())


@in_browser
async def test_admins_cancel_and_drain_and_read_tokens_are_refused(
    web: Cluster, browser: Browser, tmp_path: Path
) -> None:
    b = browser
    base = f"http://127.0.0.1:{follower(web).http}"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    job = web.submit("--", "sleep", "600")
    web.wait_job(job, {"running"})
    await sign_in(b, base, person(web, "read", "erin"))
    await b.goto(f"{base}/jobs/{job}")
    await b.wait("document.querySelector('#job-state [data-state=running]')", "the job")
    await b.wait(
        "document.querySelector('#log-note').textContent.includes('only its owner')", "no log"
    )
    await b.click("#cancel")
    await b.wait(
        "document.querySelector('#status').textContent.includes('only admins cancel jobs')",
        "the refusal",
    )
    await b.screenshot(shots / "refused.png")
    assert web.status(job)["state"] == "running"
    await b.goto(base + "/nodes")
    await b.wait("document.querySelector('section.node')", "the nodes page")
    assert not await b.eval("document.querySelector('button.drain')"), "read users get no drain"
    await sign_out(b)
    await sign_in(b, base, web.admin_token)
    await b.goto(f"{base}/jobs/{job}")
    await b.click("#cancel")
    await b.wait("document.querySelector('#job-state [data-state=cancelled]')", "cancelled")
    assert web.status(job)["state"] == "cancelled"
    await b.goto(base + "/nodes")
    await b.type("input.reason[data-node=h1]", "new disks")
    await b.click("button.drain[data-node=h1]")
    await b.wait("document.querySelector('.drain-state')", "the drain")
    assert "drained: new disks" in await b.text(".drain-state")
    assert next(n for n in web.nodes() if n["name"] == "h1")["state"] == "draining"
    await b.screenshot(shots / "drained.png")
    await b.click("button.undrain[data-node=h1]")
    await b.wait("!document.querySelector('.drain-state')", "the undrain")
    assert next(n for n in web.nodes() if n["name"] == "h1")["state"] == "ready"


XSS = "<img src=x onerror=alert(1)>"


@in_browser
async def test_text_from_the_cluster_is_shown_as_text(
    web: Cluster, browser: Browser, tmp_path: Path
) -> None:
    b = browser
    base = f"http://127.0.0.1:{follower(web).http}"
    # A job named after its program (here markup), a command and output with
    # markup, a node label with markup (admins' labels are free text).
    named = web.submit("--", XSS)
    web.wait_job(named, {"failed"})
    noisy = web.submit("--", "sh", "-c", f"echo '{XSS}'; echo '<script>window.pwned=1</script>'")
    web.wait_job(noisy, {"succeeded"})
    web.rpc("node_label", {"node": "h1", "set": {"note": XSS}})
    try:
        # The page shell puts the job id from the address in an attribute.
        v = signed_in(web, web.admin_token)
        status, _, body = v.request("/jobs/" + urllib.parse.quote(XSS))
        assert status == 200 and b"<img" not in body
        assert b'data-job="&lt;img src=x onerror=alert(1)&gt;"' in body
        await sign_in(b, base, web.admin_token)
        no_markup = "!document.querySelector('main img, main script, main b')"
        texts = (
            "[...document.querySelectorAll('main td, main p, main pre')].map(e => e.textContent)"
        )
        await b.goto(base + "/jobs?state=failed")
        await b.wait(f"{texts}.includes({json.dumps(XSS)})", "the job's name as text")
        assert await b.eval(no_markup)
        await b.screenshot(tmp_path / "escaped-jobs.png")
        await b.goto(f"{base}/jobs/{named}")
        await b.wait("document.querySelector('#job-state [data-state=failed]')", "the job")
        assert XSS in await b.text("main section p")
        assert await b.eval(no_markup)
        await b.goto(f"{base}/jobs/{noisy}")
        await b.wait(
            "document.querySelector('#log').textContent.includes('window.pwned')", "the log"
        )
        assert await b.text("#log") == f"{XSS}\n<script>window.pwned=1</script>\n"
        assert await b.eval(no_markup)
        await b.screenshot(tmp_path / "escaped-log.png")
        await b.goto(base + "/nodes")
        await b.wait("document.querySelector('section.node[data-node=h1] .labels')", "labels")
        assert f"note={XSS}" in await b.text("section.node[data-node=h1] .labels")
        assert await b.eval(no_markup)
        assert await b.eval("window.pwned === undefined")
        await b.screenshot(tmp_path / "escaped-nodes.png")
    finally:
        web.rpc("node_label", {"node": "h1", "unset": ["note"]})


@in_browser
async def test_an_array_shows_as_one_job_with_its_counts_and_its_tasks_output_by_index(
    web: Cluster, browser: Browser
) -> None:
    b = browser
    base = f"http://127.0.0.1:{follower(web).http}"
    done = web.submit(
        "--array", "0-2", "--", "sh", "-c",
        'echo "task $LEPTON_ARRAY_INDEX"; exit $((LEPTON_ARRAY_INDEX == 1))',
    )  # fmt: skip
    web.wait_job(done, {"failed"})
    live = web.submit("--array", "0-3", "--cpus", "0.25", "--mem", "64M", "--", "sleep", "600")
    v = signed_in(web, web.admin_token)
    try:
        status, rows = v.json("/ui/api/jobs?state=failed")
        row = next(r for r in rows if r["id"] == done)
        assert status == 200 and row["array"] == "0-2"
        assert row["task_states"] == {"succeeded": 2, "failed": 1}
        status, st = v.json(f"/ui/api/jobs/{done}")
        assert status == 200 and [t["rank"] for t in st["tasks"]] == [1]
        assert v.json(f"/ui/api/jobs/{done}/logs?index=2")[1]["text"] == "task 2\n"
        status, body = v.json(f"/ui/api/jobs/{done}/logs?index=7")
        assert status == 404 and "has no index 7" in body["error"]["message"]

        def running_row() -> Any:
            ov = v.json("/ui/api/overview")[1]
            r = next((r for r in ov["running"] if r["id"] == live), None)
            return r if r is not None and r["task_states"].get("running") == 4 else None

        r = wait_for(running_row, 60, "the array's 4 tasks running")
        assert r["on"] == ["h1"] and r["gpus_held"] == 0 and len(r["placed"]) == 4
        # The job page names the array's counts and reads a task's output by index.
        await sign_in(b, base, web.admin_token)
        await b.goto(f"{base}/jobs/{done}")
        await b.wait("document.querySelector('#job-array')", "the array's counts")
        assert "array 0-2: 2 succeeded, 1 failed" in await b.text("#job-array")
        await b.wait("document.querySelector('#log').textContent === 'task 1\\n'", "index 1")
        await b.goto(base + "/jobs?state=running")
        await b.wait("document.querySelector('.array-note')", "the running array's row")
        assert "array 0-3: 4 running" in await b.text(".array-note")
    finally:
        web.ctl("cancel", live)
