"""Adversarial review of session 3's merges: the repeated-read fast paths (rule 5 on both
sides), the compiled-by-default build, the access log formats, the strategy rewrites and the
CLI's exit codes.  Each test here failed before the fix its docstring names."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import redlb
from redlb import build
from support import ScriptedBackend, read_response

SRC = Path(redlb.__file__).resolve().parent.parent

GET = b"GET /same HTTP/1.1\r\nHost: h\r\nUser-Agent: t\r\n\r\n"


def _ask(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return read_response(sock)


# Upstream rule 5: only a read that began a response may be replayed


def test_bytes_of_a_head_begun_after_an_interim_response_are_never_a_repeat(
    redis_server, loop_thread, start_proxy
):
    """A 103 and the start of the final head in one read, the rest of the head and the body
    in the next: that second read began mid-head, yet was kept as a whole response, and the
    next answer made of the same tail bytes (no status line: garbage, a 502 when parsed) was
    relayed as a 200 with the first response's fields."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nX-A: 1\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)  # a read of its own
        writer.write(b"Content-Length: 5\r\n\r\nfirst")
        await writer.drain()
        await backend.read_request(reader)
        writer.write(b"Content-Length: 5\r\n\r\nforge")  # not a response
        await writer.drain()
        await asyncio.sleep(1)

    backend = ScriptedBackend(loop_thread, script).start()
    try:
        redis_server.cli("RPUSH", "servers", backend.address)
        proxy = start_proxy(redis_server.url)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            first = _ask(sock, GET)
            assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"first"), first
            second = _ask(sock, GET)
        assert second.startswith(b"HTTP/1.1 502"), second
    finally:
        backend.stop()


# Compiled by default: a machine whose compiler cannot compile is a machine without one


def test_a_compiler_that_cannot_compile_means_the_pure_build_is_expected() -> None:
    """`CC=/bin/false make test` on a fresh clone: setup.py's compile failed (the install
    was pure, as it should), but build.py told the Makefile to expect the compiled build,
    since /bin/false exists, and test_build failed the run."""
    env = {**os.environ, "CC": "/bin/false"}
    out = subprocess.run(
        [sys.executable, str(SRC / "redlb" / "build.py")],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert out.stdout.strip() == "pure", out.stdout + out.stderr
    assert build.missing_toolchain({"CC": "/bin/false"}) is not None
    if build.missing_toolchain() is None:  # where this machine's compiler works, it still says so
        assert build.missing_toolchain({"CC": os.environ.get("CC", "")}) is None
