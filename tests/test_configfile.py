"""redlb serve --config FILE: every flag in TOML, one precedence order, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner

from certs import Pair
from redlb.cli import main, serve
from redlb.configfile import file_keys
from support import request

pytestmark = pytest.mark.timeout(60)


def run(args: list[str], env: dict[str, str] | None = None):
    clean = {k: None for k in os.environ if k.startswith("REDLB_")}
    return CliRunner().invoke(main, args, env={**clean, **(env or {})}, catch_exceptions=False)


def show(args: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    result = run(["config", "show", *args], env)
    assert result.exit_code == 0, result.output
    return {
        k: json.loads(v)
        for k, _, v in (line.partition(" = ") for line in result.output.splitlines())
    }


def test_precedence_flags_env_file_defaults(tmp_path: Path):
    path = tmp_path / "redlb.toml"
    path.write_text('max-body = 1000\nconnect-timeout = 1.5\npool = "web"\n')
    assert show([])["max_body"] == 10 * 1024 * 1024  # default
    shown = show(["--config", str(path)])
    assert (shown["max_body"], shown["connect_timeout"], shown["pool"]) == (1000, 1.5, "web")
    shown = show(["--config", str(path)], {"REDLB_MAX_BODY": "2000"})
    assert (shown["max_body"], shown["pool"]) == (2000, "web")  # env over file
    shown = show([], {"REDLB_CONFIG": str(path)})  # the file itself from the environment
    assert shown["max_body"] == 1000


def test_flags_win_over_env_and_file_in_a_real_serve(redis_server, backends, start_proxy, tmp_path,
                                                     monkeypatch):  # fmt: skip
    redis_server.client().rpush("servers", backends[0].address)
    path = tmp_path / "redlb.toml"
    path.write_text("max-body = 10\nheader-timeout = 5.0\n")
    file_only = start_proxy(redis_server.url, "--config", str(path))
    assert request(file_only.port, "POST", "/", body=b"x" * 11)[0] == 413
    monkeypatch.setenv("REDLB_MAX_BODY", "20")
    env_wins = start_proxy(redis_server.url, "--config", str(path))
    assert request(env_wins.port, "POST", "/", body=b"x" * 11)[0] == 200
    assert request(env_wins.port, "POST", "/", body=b"x" * 21)[0] == 413
    flag_wins = start_proxy(redis_server.url, "--config", str(path), "--max-body", "5")
    assert request(flag_wins.port, "POST", "/", body=b"x" * 6)[0] == 413


def test_every_serve_flag_has_a_key(tmp_path: Path):
    """A file may hold every serve flag: each key, set to its default, checks out."""
    lines = []
    for key, (option, negative) in sorted(file_keys(serve).items()):
        if negative:
            continue
        default = option.default
        if key == "upstream-insecure":
            value = "false"  # it refuses upstream-ca, which is set below
        elif option.is_flag and option.is_bool_flag:
            value = json.dumps(bool(default))
        elif option.multiple:
            value = {"tls-cert": '["site.crt"]', "tls-key": '["site.key"]'}.get(
                key, '["example.com"]'
            )
        elif default is None:
            value = {"workers": "2", "redis": '"redis://127.0.0.1:6379/0"',
                     "health-path": '"/healthz"', "admin-listen": '"127.0.0.1:8200"',
                     "admin-token-file": '"TOKEN"', "sticky-cookie": '"SID"',
                     "tls-listen": '"127.0.0.1:8443"',
                     "upstream-ca": '"CA.pem"', "config": None}.get(key)  # fmt: skip
            if value is None:
                continue
        else:
            value = json.dumps(default)
        lines.append(f"{key} = {value}")
    (tmp_path / "TOKEN").write_text("t" * 32)
    Pair(trustme.CA(), tmp_path, "site", "example.com")  # site.crt and site.key
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "CA.pem"))
    path = tmp_path / "all.toml"
    path.write_text("\n".join(lines) + "\n")
    covered = {file_keys(serve)[line.partition(" =")[0]][0].name for line in lines}
    assert covered == {p.name for p in serve.params if p.name != "config"} - {"help"}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = run(["config", "check", str(path)])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output + path.read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'listen = "127.0.0.1:9000"\n\nmax_bdy = 3\n',
            "redlb.toml:3: unknown key 'max_bdy' (did you mean 'max-body'?)",
        ),
        ('# comment\nworkers = "two"\n', "redlb.toml:2: workers must be an integer, not 'two'"),
        ('rotation = "random"\n', "redlb.toml:1: rotation: 'random' is not one of"),
        ("eject-on-5xx = 1\n", "redlb.toml:1: eject-on-5xx must be true or false"),
        ('[serve]\nlisten = "x"\n', "redlb.toml:1: unknown key 'serve'"),
        ("listen = \n", "redlb.toml: Invalid value (at line 1, column 10)"),
        ('status-listen = "0.0.0.0:8100"\n', "status listener must be on loopback"),
        ('admin-listen = "0.0.0.0:8200"\n', "give a token"),
    ],
)
def test_bad_files_are_refused_with_the_line(tmp_path: Path, text: str, message: str):
    path = tmp_path / "redlb.toml"
    path.write_text(text)
    result = run(["config", "check", str(path)])
    assert result.exit_code != 0
    assert message in result.output.replace(str(tmp_path) + "/", ""), result.output


def test_show_hides_secrets(tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("very-secret-admin-token-123")
    path = tmp_path / "redlb.toml"
    path.write_text(
        f'redis = "redis://:hunter2pass@127.0.0.1:6379/0"\nadmin-token-file = "{token}"\n'
    )
    result = run(["config", "show", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "hunter2pass" not in result.output and "very-secret" not in result.output
    assert 'redis_url = "redis://:***@127.0.0.1:6379/0"' in result.output
    assert 'admin_token = "(set)"' in result.output


def test_json_logs(redis_server, backends, start_proxy):
    redis_server.client().rpush("servers", backends[0].address)
    proxy = start_proxy(redis_server.url, "--log-format", "json")
    assert proxy.get("/hello?x=1")[0] == 200
    proxy.stop()
    lines = [json.loads(line) for line in proxy.access_log().splitlines()]
    assert lines[0]["method"] == "GET" and lines[0]["target"] == "/hello?x=1"
    assert lines[0]["status"] == 200 and lines[0]["backend"] == backends[0].address
    assert lines[0]["bytes"] > 0 and lines[0]["ms"] >= 0
    events = [json.loads(line) for line in proxy.log().splitlines()]
    assert any("listening" in e["message"] and e["level"] == "info" for e in events)


def test_the_readme_example_checks_out(tmp_path: Path):
    from support import ROOT

    readme = (ROOT / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "redlb.toml").write_text(block)
    (tmp_path / "admin.token").write_text("x" * 32)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = run(["config", "check", "redlb.toml"])
        shown = show(["--config", "redlb.toml"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    assert shown["workers"] == 4 and shown["log_format"] == "json"
