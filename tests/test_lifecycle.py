"""Process lifecycle against real processes: signals at any time, exclusive listeners."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from support import Proxy, RedisProcess, free_port, raw_exchange, wait_for


def _serve(tmp_path: Path, redis_url: str, *args: str) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "redlb", "serve", "--redis", redis_url,
        "--listen", f"127.0.0.1:{free_port()}", "--status-listen", f"127.0.0.1:{free_port()}",
        "--drain-timeout", "2", *args,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "serve.err").open("ab"), cwd=tmp_path,
    )  # fmt: skip


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("after", [0.3, 0.8, 1.5])
@pytest.mark.parametrize("workers", ["1", "4"])
def test_signal_during_startup_ends_everything(
    tmp_path: Path, redis_server: RedisProcess, signum: int, after: float, workers: str
) -> None:
    """SIGTERM/SIGINT while the workers are still starting: every process exits within the
    drain timeout plus a second, without a traceback."""
    proc = _serve(tmp_path, redis_server.url, "--workers", workers)
    time.sleep(after)
    workers = _descendants(proc.pid)
    proc.send_signal(signum)
    try:
        proc.wait(timeout=2 + 1 + 2)  # drain timeout + a second, + start-up slack
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("redlb ignored the signal during startup")
    gone, alive = psutil.wait_procs(workers, timeout=3)
    assert not alive, f"workers left behind: {alive}"
    assert "Traceback" not in (tmp_path / "serve.err").read_text()


def test_supervisor_killed_leaves_no_worker(tmp_path: Path, redis_server: RedisProcess) -> None:
    proc = _serve(tmp_path, redis_server.url, "--workers", "2")
    assert wait_for(lambda: len(_descendants(proc.pid)) == 2, 15)
    workers = _descendants(proc.pid)
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=5)
    for p in alive:
        p.kill()
    assert not alive, "workers outlived their supervisor"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_second_instance_cannot_share_the_ports(
    tmp_path: Path, redis_server: RedisProcess, workers: str
) -> None:
    """Only one instance's own workers share its listener and status port."""
    first = Proxy(redis_server.url, "--workers", workers, workdir=tmp_path / "a").start()
    try:
        for clash in (
            ["--listen", f"127.0.0.1:{first.port}", "--status-listen", "off"],
            ["--listen", f"127.0.0.1:{free_port()}", "--status-listen",
             f"127.0.0.1:{first.status_port}"],
        ):  # fmt: skip
            out = subprocess.run(
                [sys.executable, "-m", "redlb", "serve", "--redis", redis_server.url,
                 "--workers", workers, *clash],
                capture_output=True, text=True, timeout=15, cwd=tmp_path,
            )  # fmt: skip
            assert out.returncode != 0, "a second instance joined the first one's port"
            assert "in use" in out.stderr, out.stderr
        assert first.ready()
    finally:
        first.stop()


def test_status_head_has_no_body_and_idle_is_closed(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    proxy = Proxy(redis_server.url, workdir=tmp_path / "p").start()
    try:
        data, _ = raw_exchange(
            proxy.status_port, b"HEAD /-/live HTTP/1.1\r\nHost: x\r\n\r\n", timeout=1
        )
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 5" in head
        assert body == b"", body
        silent = socket.create_connection(("127.0.0.1", proxy.status_port), timeout=15)
        try:
            assert silent.recv(1) == b""  # closed by redlb, not by our timeout
        finally:
            silent.close()
    finally:
        proxy.stop()


# The embedded Redis is shared by every instance of a state directory


def _redis_servers_of(state: Path) -> list[psutil.Process]:
    """redis-server processes working in ``state`` (redis chdirs to --dir and may rewrite
    its command line as a process title)."""
    found = []
    for p in psutil.process_iter(["name", "cwd"]):
        if "redis-server" in (p.info["name"] or "") and p.info["cwd"] == str(state.resolve()):
            found.append(p)
    return found


def _backend_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redlb", "backend", *args],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_embedded_redis_outlives_the_instance_that_started_it(
    tmp_path: Path, backends, how: str
) -> None:
    state = tmp_path / "state"
    first = Proxy(None, "--state-dir", str(state), workdir=tmp_path / "a").start()
    second = Proxy(None, "--state-dir", str(state), workdir=tmp_path / "b").start()
    try:
        if how == "stop":
            first.stop()
        else:
            first.process.kill()  # type: ignore[union-attr]
            first.process.wait()  # type: ignore[union-attr]
        time.sleep(1.5)  # what a watchdog or a dying server would do, it has done
        added = _backend_cli("add", backends[0].address, "--state-dir", str(state))
        assert added.returncode == 0, added.stderr
        assert wait_for(lambda: second.get("/")[0] == 200, 10), second.log()
        assert second.get("/")[1] == b"ok b0\n"
    finally:
        first.stop()
        second.stop()
    assert wait_for(lambda: not _redis_servers_of(state), 5), "orphan redis-server"


def test_embedded_redis_gone_when_the_last_instance_is_killed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proxies = [
        Proxy(None, "--state-dir", str(state), "--workers", n, workdir=tmp_path / n).start()
        for n in ("1", "2")
    ]
    assert len(_redis_servers_of(state)) == 1  # two instances, one server
    for proxy in proxies:
        proxy.process.kill()  # type: ignore[union-attr]
        proxy.process.wait()  # type: ignore[union-attr]
    gone = wait_for(lambda: not _redis_servers_of(state), 5)
    if not gone:
        for p in _redis_servers_of(state):
            p.kill()
    assert gone, "redis-server outlived every redlb using it"
    # and a new instance starts it again from the same data
    again = Proxy(None, "--state-dir", str(state), workdir=tmp_path / "c").start()
    try:
        assert _backend_cli("ls", "--state-dir", str(state)).returncode == 0
    finally:
        again.stop()
    assert wait_for(lambda: not _redis_servers_of(state), 5)


def test_embedded_redis_restarted_when_it_dies(tmp_path: Path, backends) -> None:
    state = tmp_path / "state"
    proxy = Proxy(None, "--state-dir", str(state), workdir=tmp_path / "a").start()
    try:
        assert _backend_cli("add", backends[0].address, "--state-dir", str(state)).returncode == 0
        for p in _redis_servers_of(state):
            p.kill()
        assert wait_for(lambda: _backend_cli("ls", "--state-dir", str(state)).returncode == 0, 15)
        assert backends[0].address in _backend_cli("ls", "--state-dir", str(state)).stdout
        assert wait_for(lambda: proxy.get("/")[0] == 200, 10)
    finally:
        proxy.stop()
    assert wait_for(lambda: not _redis_servers_of(state), 5)


def test_embedded_redis_with_a_state_dir_too_long_for_a_socket(tmp_path: Path, backends) -> None:
    state = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(str(state / "redis.sock")) > 107  # more than sun_path can hold
    proxy = Proxy(None, "--state-dir", str(state), workdir=tmp_path / "a").start()
    try:
        added = _backend_cli("add", backends[0].address, "--state-dir", str(state))
        assert added.returncode == 0, added.stderr
        assert wait_for(lambda: proxy.get("/")[0] == 200, 10)
    finally:
        proxy.stop()
    assert wait_for(lambda: not _redis_servers_of(state), 5)


# A stderr nobody reads never blocks a worker


def test_stderr_nobody_reads_never_blocks_the_worker(redis_server, backends, tmp_path):
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = Proxy(redis_server.url, "-v", workdir=tmp_path / "piped")
    os.mkfifo(proxy.log_path)  # redlb's stderr becomes a pipe that is never read
    reader = os.open(proxy.log_path, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)
    try:
        proxy.start()
        # Every pool edit makes the worker log a line or two: far more than the pipe holds.
        client = redis_server.client()
        stalls = []
        for i in range(150):
            extra = f"127.0.0.1:{20000 + i}"
            client.rpush("servers", extra)
            time.sleep(0.01)
            client.lrem("servers", 0, extra)
            if i % 10 == 0 and proxy.status("/-/live")[0] != 200:
                stalls.append(i)
        time.sleep(1)
        assert proxy.status("/-/live")[0] == 200 and not stalls, stalls
        assert proxy.get("/")[0] == 200
    finally:
        proxy.stop(timeout=10)
        os.close(reader)
