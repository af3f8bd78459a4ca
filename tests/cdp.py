"""A headless Chromium driven over the DevTools protocol, for the web UI tests.

No WebDriver: Chromium is started with --remote-debugging-port=0, says its
port in DevToolsActivePort, and this talks to its page over a websocket
(aiohttp, which leptond depends on anyway). Clicks and typing go through
the Input domain, as a person's would; reads go through Runtime.evaluate.
The process is started and stopped by pid, by whoever holds the Browser.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from leptond.clock import REAL


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CdpError(Exception):
    pass


class Browser:
    def __init__(self, root: Path, width: int = 1400, height: int = 1000) -> None:
        self.root = root
        self.profile = root / "profile"
        self.width, self.height = width, height
        self.proc: subprocess.Popen[bytes] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = 0
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 60) -> None:
        exe = chromium()
        assert exe is not None
        self.profile.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "chromium.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
                f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}",
                "about:blank",
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        port_file = self.profile / "DevToolsActivePort"
        deadline = REAL.monotonic() + timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or REAL.monotonic() > deadline:
                raise CdpError(
                    f"chromium did not start: {(self.root / 'chromium.log').read_text()[-2000:]}"
                )
            await REAL.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self._http = aiohttp.ClientSession()
        page = None
        while page is None:
            async with self._http.get(f"http://127.0.0.1:{port}/json/list") as r:
                page = next((t for t in await r.json() if t.get("type") == "page"), None)
            if page is None:
                if REAL.monotonic() > deadline:
                    raise CdpError("chromium has no page")
                await REAL.sleep(0.1)
        self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            fut = self._calls.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                if "error" in data:
                    fut.set_exception(CdpError(str(data["error"])))
                else:
                    fut.set_result(data.get("result", {}))
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(CdpError("the DevTools connection closed"))

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        assert self._ws is not None
        self._ids += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[self._ids] = fut
        await self._ws.send_str(
            json.dumps({"id": self._ids, "method": method, "params": params or {}})
        )
        return await asyncio.wait_for(fut, 60)

    # -- what a test does ---------------------------------------------------------------
    async def eval(self, expr: str) -> Any:
        res = await self.send(
            "Runtime.evaluate",
            {"expression": expr, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in res:
            raise CdpError(
                f"{expr!r}: {res['exceptionDetails'].get('text')} {res['exceptionDetails']}"
            )
        return res.get("result", {}).get("value")

    async def wait(self, expr: str, what: str, timeout_s: float = 60) -> Any:
        """Poll a JavaScript expression until it is truthy; its value (true
        for an element, which does not travel by value)."""
        deadline = REAL.monotonic() + timeout_s
        last: Any = None
        probe = f"(() => {{ const v = ({expr}); return v instanceof Node ? true : v; }})()"
        while True:
            try:
                last = await self.eval(probe)
                if last:
                    return last
            except CdpError as exc:  # the page is between two documents
                last = exc
            if REAL.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s:g}s waiting for {what} (last: {last!r})"
                )
            await REAL.sleep(0.1)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait(
            "document.readyState === 'complete' && location.href !== 'about:blank'",
            f"{url} to load",
        )

    async def text(self, selector: str) -> str:
        return str(
            await self.eval(
                f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent || ''"
            )
        )

    async def click(self, selector: str) -> None:
        box = await self.wait(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return r.width ? {x: r.x + r.width / 2, y: r.y + r.height / 2} : null; })()",
            f"{selector} to be clickable",
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )

    async def type(self, selector: str, text: str) -> None:
        await self.wait(f"document.querySelector({json.dumps(selector)})", f"{selector} to appear")
        await self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", {"text": text})

    async def screenshot(self, path: Path) -> None:
        res = await self.send(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
        )
        path.write_bytes(base64.b64decode(res["data"]))

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
        if self._http is not None:
            await self._http.close()
        if self.proc is not None and self.proc.poll() is None:
            # Its own session: its renderer and helper processes go with it.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
