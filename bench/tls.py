"""TLS termination rows of ``make bench``: redlb vs nginx vs HAProxy, one certificate.

The same layout as bench/run.py (proxy alone on its CPU; wrk and the backends on the other),
the same ECDSA P-256 certificate for the three, TLS 1.2/1.3 with the Mozilla intermediate
ciphers, and two client patterns: keep-alive connections (the cost of encrypting requests)
and one connection per request (the cost of handshakes).  CPU per request against nginx's
is the figure the issue asks for (goal: redlb <= 2x nginx with keep-alive clients).

    BENCH_ONLY=tls .venv/bin/python bench/run.py   # these rows alone
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

SCENARIOS = [
    # name, path, connections, one connection per request
    ("TLS ok, 50 keep-alive conns", "/ok", 50, False),
    ("TLS ok, new connection per request", "/ok", 50, True),
]
INTERMEDIATE = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)


def certificate(tmp: Path) -> tuple[Path, Path, Path]:
    """A self-signed certificate for 127.0.0.1: cert, key, and both in one file (HAProxy)."""
    cert, key, both = tmp / "tls.crt", tmp / "tls.key", tmp / "tls.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    for path in (cert, key, both):
        path.chmod(0o644)  # nginx's workers are not root
    return cert, key, both


def nginx_conf(bench: ModuleType, tmp: Path, port: int, backends: list[int], cert: Path,
               key: Path) -> Path:  # fmt: skip
    upstream = " ".join(f"server 127.0.0.1:{p};" for p in backends)
    return bench._nginx_conf(
        tmp, "tls-proxy",
        f"""http {{ access_log off; upstream pool {{ {upstream} keepalive 64; }}
  server {{ listen 127.0.0.1:{port} ssl; keepalive_requests 1000000;
    ssl_certificate {cert}; ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3; ssl_ciphers {INTERMEDIATE}; ssl_prefer_server_ciphers off;
    location / {{ proxy_pass http://pool; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host $host;
      proxy_set_header X-Forwarded-Proto https;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }} }}""",
    )  # fmt: skip


def haproxy_conf(bench: ModuleType, tmp: Path, port: int, backends: list[int], both: Path) -> Path:
    conf = bench.haproxy_conf(tmp, port, backends)
    text = conf.read_text().replace(
        f"bind 127.0.0.1:{port}",
        f"bind 127.0.0.1:{port} ssl crt {both} alpn http/1.1 ssl-min-ver TLSv1.2 "
        f"ciphers {INTERMEDIATE}\n    http-request set-header X-Forwarded-Proto https",
    )
    conf = tmp / "haproxy-tls.cfg"
    conf.write_text(text)
    return conf


def rows(
    bench: ModuleType, tmp: Path, backend_ports: list[int], redis_url: str, client, log
) -> dict:
    cert, key, both = certificate(tmp)

    def redlb(port: int) -> subprocess.Popen:
        return bench.pinned(bench.PROXY_CPU, [sys.executable, "-m", "redlb", "serve", "--listen", "off",
                            "--tls-listen", f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key",
                            str(key), "--redis", redis_url, "--workers", "1", "--status-listen", "off"],
                            stdout=log, stderr=subprocess.DEVNULL)  # fmt: skip

    targets = [
        bench.Target("nginx", lambda port: bench.pinned(bench.PROXY_CPU, ["nginx", "-c", str(nginx_conf(bench, tmp, port, backend_ports, cert, key)), "-e", str(tmp / "tp.err")])),
        bench.Target("haproxy", lambda port: bench.pinned(bench.PROXY_CPU, ["haproxy", "-f", str(haproxy_conf(bench, tmp, port, backend_ports, both))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)),
        bench.Target("redlb", redlb, client, routed=False),
    ]  # fmt: skip
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for scenario, path, connections, close in SCENARIOS:
            rounds: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
            for r in range(bench.ROUNDS):
                for target in targets:
                    target.start()
                    try:
                        rounds[target.name].append(
                            target.measure(path, connections, scheme="https", close=close)
                        )
                    finally:
                        target.stop()
                print(
                    f"  {scenario}: round {r + 1}/{bench.ROUNDS} done", file=sys.stderr, flush=True
                )
            results[scenario] = {
                name: {k: statistics.median(m[k] for m in ms) for k in ms[0]}
                for name, ms in rounds.items()
            }
            bench.print_table(scenario, results[scenario])
    finally:
        for target in targets:
            target.stop()
    return results
