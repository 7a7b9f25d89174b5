"""Headless Chromium for the browser tests: a local server, request and console recording.

Pages are served by a throwaway HTTP server on 127.0.0.1 (as a reader's browser would load them,
not from file://). Chromium resolves every other host to nothing (``--host-resolver-rules``), so
a page that would reach the network fails fast here, and the performance log still records the
request for the test to name it. Debian's ``chromium`` and ``chromium-driver`` drive it; Selenium
is pointed at /usr/bin/chromedriver, so it never downloads a driver.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

DRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LOCAL_SCHEMES = ("data:", "blob:", "about:", "chrome:", "devtools:")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the test reports what matters
        pass


class Server:
    """A static file server for ``root`` on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.root = Path(root)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: Path) -> str:
        return self.base + Path(path).relative_to(self.root).as_posix()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def chromium(width: int, height: int):
    """(driver, profile dir): headless Chromium recording requests and console messages."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not DRIVER.is_file() or not Path(CHROMIUM).exists():
        pytest.skip("headless Chromium needs Debian's chromium and chromium-driver "
                    f"(apt-get install chromium chromium-driver); missing {DRIVER} or {CHROMIUM}")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lorabook-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--hide-scrollbars",
                "--disable-features=MediaRouter,OptimizationHints,Translate",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=options)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(60)
    set_viewport(driver, width, height)
    return driver, profile


def set_viewport(driver, width: int, height: int) -> None:
    """An exact viewport (CSS px). Set again before each page: a capture beyond the viewport can
    leave the next page laid out for another size."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def requests_made(driver) -> list[str]:
    """URLs the page asked for since the last call (performance log: Network.requestWillBeSent)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def remote_requests(urls: list[str], base: str) -> list[str]:
    """The URLs of ``urls`` that go anywhere but the local server ``base``."""
    return [u for u in urls if not u.startswith(base) and not u.startswith(LOCAL_SCHEMES)]


def console_errors(driver) -> list[str]:
    """Console messages of level SEVERE since the last call (errors, failed loads)."""
    return [e["message"][:300] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot(driver, path: Path, width: int, max_height: int, part: int = 8000) -> list[Path]:
    """JPEGs of the whole page (up to ``max_height`` px), ``part`` px each: name_1.jpg, name_2.jpg, ..."""
    # a capture beyond the viewport resizes it for a moment: with transitions on, the theme's
    # sidebars would be caught sliding
    driver.execute_script(
        "const s = document.createElement('style'); s.textContent = "
        "'*, *::before, *::after { transition: none !important; animation: none !important; }'; "
        "document.head.appendChild(s);")
    height = min(driver.execute_script("return document.documentElement.scrollHeight;"), max_height)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f"{path.stem}_*{path.suffix}"):
        old.unlink()
    paths = []
    for k, top in enumerate(range(0, height, part), start=1):
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "jpeg", "quality": 70, "captureBeyondViewport": True,
            "clip": {"x": 0, "y": top, "width": width, "height": min(part, height - top), "scale": 1}})
        out = path.with_name(f"{path.stem}_{k}{path.suffix}")
        out.write_bytes(base64.b64decode(shot["data"]))
        paths.append(out)
    driver.execute_script("window.scrollTo(0, 0);")
    return paths


def viewport_screenshot(driver, path: Path) -> Path:
    """A JPEG of what the window shows now."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "jpeg", "quality": 75})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
