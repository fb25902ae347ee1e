"""A real headless Chromium driven over the DevTools protocol (aiohttp's websocket client; no extra
package): open a page, collect console errors and uncaught exceptions, read values out of the
rendered DOM, take a screenshot.

    with Chromium() as browser:
        page = browser.open(Path("report.html"), screenshot=Path("shot.png"))
        page.errors, page.evaluate("document.title")

Chromium comes from Debian's `chromium` package (`make test` installs it when missing); tests skip
when it is absent only if IFCN_ALLOW_NO_BROWSER=1, so CI cannot pass without it silently.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The flags this machine's closed network needs (no background connections, no first-run UI).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--remote-debugging-port=0", "--window-size=1280,900")


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@dataclass
class Page:
    errors: list[str] = field(default_factory=list)  # console.error/assert, uncaught exceptions, failed loads
    values: Any = None


class Chromium:
    """One headless Chromium process with a fresh profile; `open` loads a page in a new target."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s

    def __enter__(self) -> "Chromium":
        exe = chromium_path()
        if exe is None:
            raise FileNotFoundError("chromium not found: apt-get install chromium (Debian)")
        self.profile = tempfile.mkdtemp(prefix="ifcn-chromium-")
        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {self.proc.poll()})")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def open(self, path: Path, expression: str = "null", screenshot: Path | None = None) -> Page:
        """Loads file `path`, waits for the load event, evaluates `expression` (JSON-returning JS)."""
        return asyncio.run(asyncio.wait_for(self._open(path, expression, screenshot), self.timeout_s))

    async def _open(self, path: Path, expression: str, screenshot: Path | None) -> Page:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            async with http.put(f"http://127.0.0.1:{self.port}/json/new?about:blank") as r:
                target = await r.json(content_type=None)
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page, ids = Page(), iter(range(1, 1_000_000))

                async def call(method: str, **params: Any) -> dict[str, Any]:
                    mid = next(ids)
                    await ws.send_str(json.dumps({"id": mid, "method": method, "params": params}))
                    while True:
                        msg = json.loads((await ws.receive()).data)
                        if msg.get("id") == mid:
                            if "error" in msg:
                                raise RuntimeError(f"{method}: {msg['error']}")
                            return msg.get("result", {})
                        _event(page, msg)

                for domain in ("Page", "Runtime", "Log"):
                    await call(f"{domain}.enable")
                await call("Page.navigate", url=path.resolve().as_uri())
                while True:  # until the load event (events in between are recorded)
                    msg = json.loads((await ws.receive()).data)
                    _event(page, msg)
                    if msg.get("method") == "Page.loadEventFired":
                        break
                result = await call("Runtime.evaluate", expression=f"JSON.stringify({expression})",
                                    returnByValue=True)
                page.values = json.loads(result["result"].get("value", "null"))
                if screenshot is not None:
                    shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
                    screenshot.write_bytes(base64.b64decode(shot["data"]))
                await call("Runtime.evaluate", expression="0")  # drain events queued so far
                return page


def _event(page: Page, msg: dict[str, Any]) -> None:
    method, params = msg.get("method"), msg.get("params", {})
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        page.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
    elif method == "Runtime.exceptionThrown":
        d = params["exceptionDetails"]
        page.errors.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
    elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
        page.errors.append("log: " + params["entry"].get("text", ""))


def require_chromium() -> None:
    """Skips the calling test only where the environment says a browser may be missing."""
    import pytest

    if chromium_path() is None:
        if os.environ.get("IFCN_ALLOW_NO_BROWSER") == "1":
            pytest.skip("chromium not installed (IFCN_ALLOW_NO_BROWSER=1)")
        pytest.fail("chromium not installed: apt-get install chromium (Debian; `make test` does), or set IFCN_ALLOW_NO_BROWSER=1")
