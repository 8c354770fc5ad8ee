"""Compiled or pure (src/redlb/build.py): the build the suite runs on is the one expected,
REDLB_PURE=1 forces pure, and an edited source never runs as its stale extension."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import redlb
from redlb import build
from support import wait_for

SRC = Path(redlb.__file__).resolve().parent.parent


def _which(env: dict[str, str], pythonpath: Path = SRC) -> tuple[str, str, str]:
    """(state, the file redlb.proxy.downstream came from, stderr) in a fresh interpreter that
    sees that tree only (the editable install puts this one on sys.path too)."""
    elsewhere = [str(SRC), ""] if pythonpath != SRC else []
    code = (
        f"import sys; sys.path = [p for p in sys.path if p not in {elsewhere!r}]; "
        "import redlb.build as b, redlb.proxy.downstream as d; print(b.state); print(d.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, env={**env, "PYTHONPATH": str(pythonpath)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    state, module = out.stdout.split()
    return state, module, out.stderr


def test_the_suite_runs_on_the_expected_build() -> None:
    """`make test` says which build it expects: compiled where a C compiler is found."""
    expected = os.environ.get("REDLB_EXPECT_BUILD")
    if expected is None:
        pytest.skip("REDLB_EXPECT_BUILD is set by make test")
    assert build.state == expected, build.describe()
    downstream = sys.modules.get("redlb.proxy.downstream")
    if downstream is not None:
        assert downstream.__file__ is not None
        assert downstream.__file__.endswith(".py") == (expected == "pure"), downstream.__file__


def test_redlb_pure_forces_the_sources() -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDLB_PURE"}
    state, module, _ = _which({**env, "REDLB_PURE": "1"})
    assert (state, Path(module).suffix) == ("pure", ".py")


def test_an_edited_source_runs_pure_never_its_stale_extension(tmp_path: Path) -> None:
    shared = list(SRC.glob("redlb__mypyc*"))  # the compiled modules' common library
    if not shared:
        pytest.skip("no compiled build here")
    env = {k: v for k, v in os.environ.items() if k != "REDLB_PURE"}
    copy = tmp_path / "src"
    shutil.copytree(SRC / "redlb", copy / "redlb", ignore=shutil.ignore_patterns("__pycache__"))
    for library in shared:
        shutil.copy2(library, copy / library.name)
    state, module, _ = _which(env, copy)
    assert (state, Path(module).suffix) == ("compiled", ".so")
    edited = copy / "redlb" / "routing" / "paths.py"  # any compiled module: all go pure
    edited.write_text(edited.read_text() + "\n# edited\n")
    state, module, stderr = _which(env, copy)
    assert (state, Path(module).suffix) == ("pure", ".py")
    assert "running pure: sources changed" in stderr


def test_a_build_without_its_shared_library_runs_pure(tmp_path: Path) -> None:
    """The modules' extensions are shims over one library (redlb__mypyc): one that failed to
    build (optional extensions) leaves shims that cannot import; the sources run instead."""
    if not list(SRC.glob("redlb__mypyc*")):
        pytest.skip("no compiled build here")
    env = {k: v for k, v in os.environ.items() if k != "REDLB_PURE"}
    copy = tmp_path / "src"
    shutil.copytree(SRC / "redlb", copy / "redlb", ignore=shutil.ignore_patterns("__pycache__"))
    state, module, _ = _which(env, copy)
    assert (state, Path(module).suffix) == ("pure", ".py")


def test_serve_says_which_build_it_runs(redis_server, backends, start_proxy) -> None:  # type: ignore[no-untyped-def]
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(redis_server.url)
    # Logged by a writer thread: it may land just after the proxy answers.
    assert wait_for(lambda: f"hot path {build.state} (" in proxy.log(), 5), proxy.log()
