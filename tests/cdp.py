"""A minimal Chrome DevTools Protocol client (aiohttp websockets) and a headless Chromium launcher.

Enough for the browser test: navigate, evaluate JavaScript (awaiting promises), capture screenshots and
collect console errors, uncaught exceptions and failed resource loads. No browser is ever downloaded:
Chromium comes from the system (Debian's ``chromium`` package, see scripts/install_browser.sh) or from
``$WLM_CHROMIUM``.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def find_chromium() -> str | None:
    explicit = os.environ.get("WLM_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class JSError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process with a fresh profile; ``page()`` connects to its first tab."""

    def __init__(self, executable: str, width: int = 1600, height: int = 1000):
        self.executable = executable
        self.width, self.height = width, height
        self.profile = Path(tempfile.mkdtemp(prefix="wlm-chromium-"))
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout: float = 60) -> "Browser":
        log = open(self.profile / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {self.log_tail()}")
            if port_file.exists() and port_file.read_text().strip():
                self.port = int(port_file.read_text().splitlines()[0])
                return self
            time.sleep(0.1)
        raise RuntimeError(f"chromium did not open its DevTools port within {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return (self.profile / "chromium.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.profile, ignore_errors=True)

    async def page(self, session: aiohttp.ClientSession) -> "Page":
        async with session.get(f"http://127.0.0.1:{self.port}/json/list") as r:
            targets = await r.json()
        target = next(t for t in targets if t.get("type") == "page")
        ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=256 * 1024 * 1024)
        page = Page(ws)
        await page.open()
        await page.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                        deviceScaleFactor=1, mobile=False)
        return page


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self._next = 0
        self._pending: dict[int, asyncio.Future] = {}
        self.errors: list[str] = []  # console errors, uncaught exceptions, failed loads
        self.console: list[str] = []
        self.requests: list[str] = []  # URLs the page requested
        self._reader: asyncio.Task | None = None

    async def open(self) -> None:
        self._reader = asyncio.create_task(self._read())
        for domain in ("Runtime", "Log", "Page", "Network"):
            await self.call(f"{domain}.enable")

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        await self.ws.close()

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut and not fut.done():
                    fut.set_result(data)
                continue
            self._event(data.get("method", ""), data.get("params", {}))

    def _event(self, method: str, p: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            self.console.append(f"[{p.get('type')}] {text}")
            if p.get("type") in ("error", "assert"):
                self.errors.append(f"console.{p['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            if e.get("level") == "error":
                self.errors.append(f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            self.requests.append(p.get("request", {}).get("url", ""))
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            self.errors.append(f"load failed: {p.get('errorText')} (request {p.get('requestId')})")

    async def call(self, method: str, timeout: float = 60, **params: Any) -> dict:
        self._next += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        await self.ws.send_str(json.dumps({"id": self._next, "method": method, "params": params}))
        data = await asyncio.wait_for(fut, timeout)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """Evaluate an expression (a promise is awaited) and return its JSON value."""
        r = await self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                            returnByValue=True, userGesture=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise JSError(d.get("exception", {}).get("description") or d.get("text"))
        return r.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 60, interval: float = 0.25) -> Any:
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < timeout:
            try:
                last = await self.evaluate(expression)
                if last:
                    return last
            except JSError as e:
                last = e
            await asyncio.sleep(interval)
        raise TimeoutError(f"timed out waiting for {expression!r} (last: {last!r})")

    async def navigate(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def screenshot(self, path: Path) -> Path:
        r = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(r["data"]))
        return path


def report_page_state(html: Path, extra_js: str = "") -> tuple[dict, list[str]]:
    """Open a local report in headless Chromium; returns ``({images: [[src, complete, naturalWidth]...],
    title, ...extra}, console errors)``. ``extra_js`` adds fields to the evaluated object (``"tables: ..."``).
    Fails the test (never skips it) when no Chromium is installed."""
    import pytest

    path = find_chromium()
    if path is None:
        pytest.fail("Chromium not found: install Debian's chromium with `bash scripts/install_browser.sh` "
                    "(apt-get install -y chromium) or point WLM_CHROMIUM at a Chromium/Chrome binary")

    async def check() -> tuple[dict, list[str]]:
        browser = Browser(path).start()
        try:
            async with aiohttp.ClientSession() as http:
                page = await browser.page(http)
                await page.navigate(html.as_uri())
                await page.wait_for("document.readyState === 'complete'", timeout=60)
                state = await page.evaluate(
                    "({images: [...document.images].map((i) => [i.getAttribute('src'), i.complete, i.naturalWidth]),"
                    " title: document.title" + (", " + extra_js if extra_js else "") + "})")
                errors = list(page.errors)
                await page.close()
                return state, errors
        finally:
            browser.stop()

    return asyncio.run(check())
