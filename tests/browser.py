"""Headless Chromium for the dashboard test: Debian's chromium + chromium-driver, via selenium.

`make test` installs them (apt-get) when missing, as `make bench` does for nginx; run
alone, this installs them too when it can (root), and otherwise fails saying what to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess

PACKAGES = ("chromium", "chromium-driver")


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing them with apt-get when missing."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(
            "the dashboard test needs chromium and chromedriver: "
            "run `make test` as root, or apt-get install chromium chromium-driver"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver
    return browser, driver


def headless(browser: str, driver: str, *extra_args: str):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run",
                *extra_args):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


if __name__ == "__main__":  # `make test` runs this first
    browser, driver = ensure_chromium()
    print(f"chromium: {browser}, chromedriver: {driver}")
