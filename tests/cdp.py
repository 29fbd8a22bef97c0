"""A headless Chromium driven over the Chrome DevTools Protocol: enough to open a page, wait, read and screenshot it.

The OHIF test needs a real browser (WebGL, web workers, the viewer's own JavaScript), but nothing may be
downloaded at run time, so the browser is Debian's ``chromium`` and the driver is this file: one
websocket (``websocket-client``) to the page, ``Runtime.evaluate`` for the DOM, ``Page.captureScreenshot``
for pixels. Every wait polls a JavaScript condition and fails with the step's name and what the page
logged, never a fixed sleep.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
START_TIMEOUT_S = 30.0


class BrowserError(RuntimeError):
    """The browser failed a step; the message says which step and what the page logged."""


def find_chromium() -> str | None:
    """The path of an installed Chromium (or Chrome), or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium with one page. Use as a context manager; ``close()`` ends the process."""

    def __init__(self, width: int = 1400, height: int = 900, executable: str | None = None) -> None:
        import websocket  # websocket-client (requirements-dev.txt)

        executable = executable or find_chromium()
        if executable is None:
            raise BrowserError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}); "
                               "install it with 'apt-get install chromium'")
        self.profile = Path(tempfile.mkdtemp(prefix="medprompt-chromium-"))
        self.log_path = self.profile / "chromium.log"
        self.console: list[str] = []  # console messages and uncaught exceptions of the page, in order
        self._next_id = 0
        args = [
            executable, "--headless=new", "--no-sandbox", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-sync", "--mute-audio",
            "--disable-dev-shm-usage",
            # WebGL (the viewer's renderer) in software: there is no GPU in CI.
            "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
            f"--window-size={width},{height}", f"--user-data-dir={self.profile}",
            "--remote-debugging-port=0", "about:blank",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        try:
            port = self._devtools_port()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
                pages = [t for t in json.load(response) if t.get("type") == "page"]
            if not pages:
                raise BrowserError("Chromium started without a page to drive")
            self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60,
                                                  suppress_origin=True, enable_multithread=False)
            self.send("Page.enable")
            self.send("Runtime.enable")
            self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
            self.send("Emulation.setFocusEmulationEnabled", enabled=True)  # focus and blur as in a window in front
        except BaseException:
            self.close()
            raise

    def _devtools_port(self) -> int:
        """Chromium writes the port it chose to ``DevToolsActivePort`` in its profile."""
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrowserError(f"Chromium exited with {self.process.returncode} at start:\n{self.log_tail()}")
            if marker.is_file():
                lines = marker.read_text().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.1)
        raise BrowserError(f"Chromium did not open its DevTools port within {START_TIMEOUT_S:.0f} s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def console_tail(self, lines: int = 15) -> str:
        return "\n".join(self.console[-lines:]) or "(the page logged nothing)"

    # --- protocol -------------------------------------------------------------------------------
    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call one DevTools method and return its result; events that arrive meanwhile are recorded."""
        self._next_id += 1
        call_id = self._next_id
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise BrowserError(f"{method} failed: {message['error'].get('message')}")
                return message.get("result", {})
            self._record(message)

    def _record(self, event: dict[str, Any]) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {text[:300]}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.console.append(f"exception: {str(text)[:300]}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited); BrowserError if it throws."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript failed: {text}\n  in: {expression[:200]}")
        return result.get("result", {}).get("value")

    # --- what a test does -------------------------------------------------------------------------
    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def wait_for(self, expression: str, step: str, timeout_s: float = 30.0, interval_s: float = 0.25,
                 describe: str | None = None) -> Any:
        """Poll ``expression`` until it is truthy and return its value; on time-out, fail naming ``step``.

        ``describe``: a JavaScript expression whose value the failure message shows (the page's state).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value, last = self.evaluate(expression), None
            except BrowserError as error:  # e.g. the page is navigating
                value, last = None, str(error)
            if value:
                return value
            if time.monotonic() > deadline:
                state = ""
                if describe:
                    try:
                        state = f"; page state: {self.evaluate(describe)!r}"
                    except BrowserError as error:
                        state = f"; page state unknown ({error})"
                raise BrowserError(f"step '{step}' timed out after {timeout_s:.0f} s (last value: "
                                   f"{last or value!r}{state}); the page logged:\n{self.console_tail()}")
            time.sleep(interval_s)

    def click(self, x: float, y: float) -> None:
        """A left click at page point (x, y), through the input pipeline as a person's."""
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def wheel(self, x: float, y: float, delta_y: float) -> None:
        """Turn the mouse wheel over page point (x, y), as a person scrolling."""
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        self.send("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=delta_y)

    def screenshot(self, path: str | Path, clip: tuple[float, float, float, float] | None = None) -> Path:
        """Save the page (or its part ``clip`` = x0, y0, x1, y1 in page pixels) as a PNG; return its path."""
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            x0, y0, x1, y1 = clip
            params["clip"] = {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0, "scale": 1}
        data = self.send("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """End Chromium (politely, then by force) and remove its profile."""
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                ws.send(json.dumps({"id": 0, "method": "Browser.close"}))
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            ws.close()
            self.ws = None
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own group: the renderers go with it
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
