"""A WebSocket tunnel in the access log and the metrics: one line at its end, with the bytes
it carried each way, its whole duration and why it ended.

A real `websockets` echo server behind a real `redlb serve`; the client is a raw socket, so
the test knows every byte it sent and received after the 101's head.
"""

from __future__ import annotations

import re
import signal
import socket
import struct

import pytest

from support import (
    metric_sum,
    scrape,
    wait_for,
    ws_frame,
    ws_tunnel,
)

# A 101 line at the tunnel's end: ... => 101 REASON  BACKEND MSms TO_CLIENTB route=... from_client=NB end=WHY
END_LINE = re.compile(r" => 101 .* ([\d.]+)ms (\d+)B .*from_client=(\d+)B end=(\S+)$")
MESSAGES = [b"hi", b"x" * 300, b"y" * 70000]


@pytest.fixture
def proxy(redis_server, echo, start_proxy):
    redis_server.cli("RPUSH", "servers", echo.address)
    return start_proxy(redis_server.url, "--drain-timeout", "2")


class Client:
    """A raw tunnel client that counts every byte it sends and receives after the 101."""

    def __init__(self, port: int) -> None:
        self.sock, got = ws_tunnel(port)
        self.sent = 0
        self.received = len(got)

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)
        self.sent += len(frame)

    def read(self, size: int) -> bytes:
        got = b""
        while len(got) < size:
            chunk = self.sock.recv(size - len(got))
            assert chunk, f"end of stream after {len(got)} of {size} bytes"
            got += chunk
        self.received += len(got)
        return got

    def echo_all(self, messages: list[bytes] = MESSAGES) -> None:
        for message in messages:
            self.send(ws_frame(message))
            assert self.read(len(ws_frame(message, masked=False))).endswith(message)

    def read_to_end(self) -> None:
        while chunk := self.sock.recv(65536):
            self.received += len(chunk)

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def end_line(proxy, timeout: float = 10) -> tuple[float, int, int, str]:
    """The one 101 line of the access log, once written: (ms, to client, from client, why)."""

    def lines() -> list[str]:
        return [line for line in proxy.access_log().splitlines() if " => 101 " in line]

    assert wait_for(lambda: len(lines()) >= 1, timeout), proxy.access_log()
    [line] = lines()
    match = END_LINE.search(line)
    assert match, line
    return float(match[1]), int(match[2]), int(match[3]), match[4]


def test_a_closed_tunnel_is_logged_once_at_its_end_with_its_bytes(proxy):
    client = Client(proxy.port)
    client.echo_all()
    client.send(ws_frame(struct.pack("!H", 1000), opcode=8))  # the closing handshake
    client.read_to_end()  # the echo's close frame, then its FIN passed on
    client.sock.close()
    ms, to_client, from_client, why = end_line(proxy)
    assert (to_client, from_client) == (client.received, client.sent)
    assert why == "backend-closed"  # the server closes TCP first (RFC 6455 §7.1.1)


def test_a_backend_killed_mid_tunnel_is_logged_with_what_it_carried(proxy, echo):
    client = Client(proxy.port)
    client.echo_all()
    echo.kill()
    client.read_to_end()  # redlb closes the client's side once the backend is gone
    client.sock.close()
    _, to_client, from_client, why = end_line(proxy)
    assert (to_client, from_client) == (client.received, client.sent)
    assert why == "backend-reset"


def test_a_client_vanishing_is_logged_with_what_it_carried(proxy, echo):
    client = Client(proxy.port)
    client.echo_all()
    client.reset()
    _, to_client, from_client, why = end_line(proxy)
    assert (to_client, from_client) == (client.received, client.sent)
    assert why == "client-reset"
    assert wait_for(lambda: echo.open == 0, 10)


def test_a_tunnel_cut_by_the_drain_is_logged_before_the_worker_exits(proxy):
    client = Client(proxy.port)
    client.echo_all()
    proxy.process.send_signal(signal.SIGTERM)
    client.echo_all([b"during the drain"])  # the tunnel carries on until the drain ends
    client.read_to_end()
    assert wait_for(lambda: not proxy.alive(), 20)
    ms, to_client, from_client, why = end_line(proxy)
    assert (to_client, from_client) == (client.received, client.sent)
    assert why == "drain"
    assert ms >= 2000  # it lived through the whole --drain-timeout


def test_an_idle_tunnel_is_logged_as_such(redis_server, echo, start_proxy):
    redis_server.cli("RPUSH", "servers", echo.address)
    proxy = start_proxy(redis_server.url, "--tunnel-timeout", "1")
    client = Client(proxy.port)
    client.echo_all()
    client.read_to_end()  # redlb ends the idle tunnel
    _, to_client, from_client, why = end_line(proxy)
    assert (to_client, from_client) == (client.received, client.sent)
    assert why == "idle-timeout"


def test_tunnel_bytes_are_counted_in_the_metrics_while_it_is_open_and_after(proxy):
    def counted() -> tuple[float, float]:
        samples = scrape(proxy)
        return (
            metric_sum(samples, "redlb_tunnel_bytes_total", direction="to_client"),
            metric_sum(samples, "redlb_tunnel_bytes_total", direction="from_client"),
        )

    client = Client(proxy.port)
    client.echo_all()
    # The sweeper adds an open tunnel's bytes: a long tunnel shows before it ends.
    assert wait_for(lambda: counted() == (client.received, client.sent), 10), counted()
    client.echo_all([b"more"])
    client.reset()
    assert wait_for(lambda: counted() == (client.received, client.sent), 10), counted()


def test_the_json_access_log_has_the_tunnel_fields(redis_server, echo, start_proxy):
    import json

    redis_server.cli("RPUSH", "servers", echo.address)
    proxy = start_proxy(redis_server.url, "--log-format", "json")
    client = Client(proxy.port)
    client.echo_all()
    client.reset()

    def records() -> list[dict]:  # type: ignore[type-arg]
        lines = proxy.access_log().splitlines()
        return [r for r in map(json.loads, lines) if r.get("status") == 101]

    assert wait_for(lambda: len(records()) == 1, 10), proxy.access_log()
    [record] = records()
    assert record["bytes"] == client.received
    assert record["from_client"] == client.sent
    assert record["end"] == "client-reset"
