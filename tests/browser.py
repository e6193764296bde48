"""A real headless Chromium (the system package) driven by Selenium, logging every request.

Used by the report tests: they open ``report.html`` as a user would and read what the page
shows, and check that no request leaves the report's folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]


def chromium_paths() -> tuple[str, str]:
    """The Chromium binary and its driver (``apt-get install chromium chromium-driver``;
    ``.ci/run`` installs them)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        raise RuntimeError(
            "chromium and chromedriver are needed: apt-get install -y "
            "chromium chromium-driver (.ci/run does)"
        )
    return binary, driver


@contextmanager
def chromium() -> Iterator:
    """A Selenium driver of headless Chromium with a fresh profile and the performance
    log on (every request the page makes)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths()
    profile = tempfile.mkdtemp(prefix="mediar-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get("about:blank")
        driver.get_log("performance")  # forget the start page's requests
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def requested_urls(driver) -> list[str]:
    """Every URL the page requested since the last call (from the performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def outside(urls: list[str], folder: Path) -> list[str]:
    """The URLs that are neither inline data nor files under ``folder``."""
    root = folder.resolve().as_uri() + "/"
    return [
        u for u in urls if not (u.startswith(root) or u.startswith("data:") or u == "about:blank")
    ]


def script_errors(driver) -> list[dict]:
    """The page's script errors since the last call (console entries of its scripts)."""
    return [e for e in driver.get_log("browser") if e.get("source") == "javascript"]
