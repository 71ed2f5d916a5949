"""Headless Chromium driven over the DevTools protocol, for tests of the web pages a person
sees (optuna-dashboard, the MLflow UI).

Single-page apps render after their data arrives, so a test navigates, then waits until
the page's text holds what it expects (or a timeout), reads the DOM, clicks, and keeps a
screenshot. Debian's ``chromium`` package runs it (``--headless --no-sandbox
--disable-gpu``); ``websocket-client`` speaks the protocol.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"


class Browser:
    """One headless Chromium with one page; use as a context manager."""

    def __init__(self, width: int = 1400, height: int = 900):
        self.profile = tempfile.mkdtemp(prefix="hpo-chromium-")
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             "--remote-allow-origins=*", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "--no-first-run", "--disable-extensions", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._devtools_port(timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            pages = [t for t in json.load(answer) if t["type"] == "page"]
        import websocket

        self.socket = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self._next_id = 0
        self.send("Page.enable")
        self.send("Runtime.enable")

    def _devtools_port(self, timeout: float) -> int:
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker.is_file() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            if self.process.poll() is not None:
                raise RuntimeError(f"{CHROMIUM} exited with status {self.process.returncode}")
            time.sleep(0.1)
        raise TimeoutError(f"{CHROMIUM} did not open its DevTools port in {timeout} s")

    def send(self, method: str, **params: Any) -> dict:
        """Call a DevTools method and return its result (events in between are dropped)."""
        self._next_id += 1
        self.socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def open(self, url: str, headers: dict[str, str] | None = None) -> None:
        if headers:
            self.send("Network.enable")
            self.send("Network.setExtraHTTPHeaders", headers=headers)
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def text(self) -> str:
        """What the page shows: the body's rendered text."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, check: Callable[[str], bool], timeout: float = 60, what: str = "") -> str:
        """Poll the page's text until ``check(text)``; returns the text, or raises with it."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if check(text):
                return text
            time.sleep(0.5)
        raise AssertionError(f"the page never showed {what or 'what was expected'} in {timeout} s; it showed:\n"
                             f"{text[:3000]}")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
