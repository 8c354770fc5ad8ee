"""A WebSocket app in a real browser through redlb (issue 11): headless Chromium loads a page
through redlb, the page opens a WebSocket back through redlb to the echo backend and shows
the echo.  The scheme is a parameter: the https variant runs over the TLS listener."""

from __future__ import annotations

import base64
import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from browser import ensure_chromium, headless
from certs import Pair
from support import ROOT, WsEchoBackend, free_port, wait_for

pytestmark = pytest.mark.timeout(120)

ARTIFACTS = ROOT / "tests" / "artifacts"
PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>redlb WebSocket echo</title></head>
<body style="font: 24px sans-serif; margin: 2em">
<h1>WebSocket through redlb</h1>
<p id="state">connecting</p>
<p id="echo"></p>
<script>
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(scheme + "://" + location.host + "/echo");
  ws.onopen = () => {
    document.getElementById("state").textContent = "open";
    ws.send("hello from chromium \\u2713");
  };
  ws.onmessage = (event) => {
    document.getElementById("echo").textContent = "echoed: " + event.data;
  };
  ws.onerror = () => { document.getElementById("state").textContent = "error"; };
  ws.onclose = (event) => {
    document.getElementById("state").textContent = "closed " + event.code;
  };
</script>
</body></html>
"""


def _proxy(scheme: str, redis_server, start_proxy, tmp_path):  # type: ignore[no-untyped-def]
    """redlb listening for ``scheme``; returns (proxy, base URL, extra browser arguments)."""
    if scheme == "http":
        proxy = start_proxy(redis_server.url)
        return proxy, f"http://127.0.0.1:{proxy.port}", ()
    pair = Pair(trustme.CA(), tmp_path, "site", "localhost", "127.0.0.1")
    port = free_port()
    proxy = start_proxy(redis_server.url, "--tls-listen", f"127.0.0.1:{port}", *pair.args)
    # The browser trusts exactly this certificate's key (the test CA is in no trust store).
    spki = (
        x509.load_pem_x509_certificate(pair.cert.read_bytes())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    return proxy, f"https://localhost:{port}", (f"--ignore-certificate-errors-spki-list={pin}",)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_browser_websocket_echo_through_redlb(
    redis_server, loop_thread, start_proxy, scheme, tmp_path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = ensure_chromium()
    echo = WsEchoBackend(loop_thread, pages={"/page": PAGE}).start()
    try:
        redis_server.cli("RPUSH", "servers", echo.address)
        proxy, base, browser_args = _proxy(scheme, redis_server, start_proxy, tmp_path)
        ARTIFACTS.mkdir(exist_ok=True)
        driver = headless(browser, driver_path, *browser_args)
        try:
            driver.get(f"{base}/page")
            wait = WebDriverWait(driver, 20, poll_frequency=0.1)
            wait.until(lambda d: d.find_element(By.ID, "echo").text != "")
            assert driver.find_element(By.ID, "echo").text == "echoed: hello from chromium ✓"
            assert driver.find_element(By.ID, "state").text == "open"
            shot = ARTIFACTS / f"websocket-echo-{scheme}.png"
            driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 0
        finally:
            driver.quit()
        assert echo.paths == ["/echo"]  # the page came from the same backend, through redlb
        assert "GET /page" in proxy.access_log()
        # The tunnel's line is written when it ends: the browser closed it on quit.
        assert wait_for(lambda: "GET /echo => 101" in proxy.access_log(), 10), proxy.access_log()
    finally:
        echo.stop()
