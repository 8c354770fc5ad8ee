"""The live dashboard in a real browser: a backend goes down and comes back, drain is clicked."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from browser import ensure_chromium, headless
from redlb.store.embedded import free_port
from support import ROOT, Load, wait_for

pytestmark = pytest.mark.timeout(120)

TOKEN = "dashboard-test-token-0123456789"
ARTIFACTS = ROOT / "tests" / "artifacts"
README_SHOT = ROOT / "docs" / "dashboard.png"


def test_dashboard_follows_the_fleet_and_drains(redis_server, backends, start_proxy, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = ensure_chromium()
    r = redis_server.client()
    r.rpush("servers", *[b.address for b in backends])
    r.hset("redlb:routes", "/", "servers")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    admin = free_port()
    proxy = start_proxy(
        redis_server.url, "--workers", "2", "--admin-listen", f"127.0.0.1:{admin}",
        "--admin-token-file", str(token_file), "--health-path", "/healthz",
        "--health-interval", "0.3", "--health-fall", "1", "--health-rise", "1",
        "--no-access-log", "--eject-consecutive", "0",  # up and down: the prober's verdict
    )  # fmt: skip
    # The fleet has two instances.
    second = start_proxy(redis_server.url, "--no-access-log", "--eject-consecutive", "0")
    ARTIFACTS.mkdir(exist_ok=True)
    driver = headless(browser, driver_path)
    try:
        with Load(proxy.port, rate=60, connections=3), Load(second.port, rate=30, connections=2):
            # The token travels in the fragment: never sent to a server, never in a log.
            driver.get(f"http://127.0.0.1:{admin}/#token={TOKEN}")
            wait = WebDriverWait(driver, 15, poll_frequency=0.1)

            def state(backend) -> str | None:
                # Read in one script: the table is redrawn every second.
                return driver.execute_script(
                    "const row = document.querySelector(arguments[0]);"
                    "return row ? row.dataset.state : null;",
                    f'tr[data-backend="{backend.address}"]',
                )

            wait.until(lambda _: all(state(b) == "healthy" for b in backends))
            wait.until(
                lambda _: len(driver.find_elements(By.CSS_SELECTOR, "#instances tbody tr")) == 2
            )
            wait.until(lambda _: _rate(driver, backends[0].address) > 0)

            backends[1].stop()  # goes down: the prober marks it, the page shows it
            wait.until(lambda _: state(backends[1]) == "down")
            driver.save_screenshot(str(ARTIFACTS / "dashboard-backend-down.png"))
            backends[1].start()  # and back
            wait.until(lambda _: state(backends[1]) == "healthy")

            row = f'tr[data-backend="{backends[2].address}"]'
            _click(driver, f'{row} button[data-action="drain"]')
            wait.until(lambda _: state(backends[2]) == "draining")
            assert r.smembers("redlb:servers:draining") == {backends[2].address.encode()}
            time.sleep(2.5)  # the rates catch up (heartbeat 1 s + poll 1 s)
            driver.save_screenshot(str(ARTIFACTS / "dashboard-draining.png"))

            _click(driver, f'{row} button[data-action="undrain"]')
            wait.until(lambda _: state(backends[2]) == "healthy")
            assert not r.smembers("redlb:servers:draining")
        logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, logs  # no script errors, no blocked resource (CSP, no CDN)
    finally:
        driver.quit()
    # The README shows the page as this test saw it (refreshed with REDLB_UPDATE_DOCS=1).
    if os.environ.get("REDLB_UPDATE_DOCS") or not README_SHOT.exists():
        README_SHOT.parent.mkdir(exist_ok=True)
        shutil.copy(ARTIFACTS / "dashboard-draining.png", README_SHOT)
    assert wait_for(proxy.alive, 1)


def _rate(driver, address: str) -> float:
    text = driver.execute_script(
        "const cells = document.querySelectorAll(arguments[0]);"
        "return cells.length > 4 ? cells[4].textContent : '0';",
        f'tr[data-backend="{address}"] td',
    )
    try:
        return float(text)
    except ValueError:
        return 0.0


def _click(driver, selector: str) -> None:
    """A real click on the button; the table is redrawn every second, so find it again if so."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            driver.find_element(By.CSS_SELECTOR, selector).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.05)
    raise AssertionError(f"could not click {selector}")


def test_the_dashboard_ships_in_the_package_and_needs_nothing_else():
    static = ROOT / "src" / "redlb" / "admin" / "static"
    html = (static / "index.html").read_text()
    for name in ("app.js", "app.css"):
        assert f"/static/{name}" in html
    for path in static.iterdir():
        text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text, path  # no CDN, nothing remote
    assert Path(ROOT / "pyproject.toml").read_text().count("admin/static/*") == 1
