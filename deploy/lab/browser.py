"""Headless Chromium (Debian's chromium + chromium-driver) driven by selenium, for the dashboard's browser tests and
its latency benchmark. Nothing is downloaded: the driver and the browser are the Debian packages (Makefile
APT_PACKAGES), selenium's own driver manager is kept offline.

The lab dashboard's certificate is self-signed: the browser is told to accept certificate errors. TLS itself (the
certificate and its verification) is tested with a verifying client in tests/integration/test_dashboard.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def missing() -> str | None:
    """Why a browser cannot run here (None when it can)."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if shutil.which(path) is None:
            return f"{path} not installed (Debian package {package}; make setup installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (make setup)"
    return None


@contextmanager
def chromium(workdir: Path, width: int = 1300, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium session (selenium WebDriver) whose console is logged; quit on exit, also on failure."""
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = workdir / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--ignore-certificate-errors", f"--window-size={width},{height}", f"--user-data-dir={profile}",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(workdir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The browser console's errors since the last call (SEVERE entries: uncaught errors, failed loads, CSP)."""
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
