"""Compiled or pure: which build of the hot path this process runs.

The modules in ``COMPILED`` are compiled to C extensions by mypyc at install time (setup.py),
by default, whenever a C compiler, the Python headers and mypyc are there; the same .py files
are the fallback.  Rules:
1. All or nothing: compiled modules reach into each other's objects natively, so one pure
   module among compiled ones would not work; if any is missing or stale, or the library
   they share (``redlb__mypyc``, beside the package) is, all run pure.
2. Stale is decided by content, not by time: the build records a digest of the sources it
   compiled (``compiled.sha256``); an edited .py whose old extension is still beside it
   (an editable install) makes the process run pure, with a warning, until rebuilt.
3. ``REDLB_PURE=1`` runs pure whatever is installed.
No import of the rest of redlb here: setup.py reads ``COMPILED`` from this file too.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

# The data path and what it calls per request: parsing, routing, the strategies and their
# in-flight counts, the lease cursor, ejection bookkeeping, counting, the access log.  Pure:
# the healthy snapshot (balancer/snapshot.py, a tuple subclass: mypyc compiles none), built
# when the pool changes, read as a tuple.
COMPILED = (
    "redlb.accesslog",
    "redlb.balancer.base",
    "redlb.balancer.ewma",
    "redlb.balancer.first",
    "redlb.balancer.leased",
    "redlb.balancer.least",
    "redlb.balancer.leastconn",
    "redlb.balancer.load",
    "redlb.balancer.rendezvous",
    "redlb.balancer.random_choice",
    "redlb.balancer.requestkey",
    "redlb.balancer.sticky",
    "redlb.balancer.strict",
    "redlb.balancer.wrr",
    "redlb.health.passive",
    "redlb.metrics.recorder",
    "redlb.proxy.context",
    "redlb.proxy.deadlines",
    "redlb.proxy.downstream",
    "redlb.proxy.errors",
    "redlb.proxy.exchange",
    "redlb.proxy.poolstate",
    "redlb.proxy.replay",
    "redlb.proxy.retry",
    "redlb.proxy.rules",
    "redlb.proxy.upstream",
    "redlb.routing.paths",
    "redlb.routing.table",
    "redlb.store.rotation",
)
DIGEST_FILE = "compiled.sha256"
LIBRARY = "redlb__mypyc"  # mypycify(group_name="redlb"): the compiled code; the modules are shims
PACKAGE_DIR = Path(__file__).resolve().parent

# What this process runs, and why: set once by choose() (imported by redlb/__init__.py).
state = "pure"
reason = "not compiled"


def source_digest(package_dir: Path = PACKAGE_DIR) -> str:
    """One digest over the sources of every compiled module, in COMPILED order."""
    digest = hashlib.sha256()
    for name in COMPILED:
        digest.update(name.encode() + b"\0")
        digest.update(_source(package_dir, name).read_bytes())
    return digest.hexdigest()


def _source(package_dir: Path, name: str) -> Path:
    return package_dir.joinpath(*name.split(".")[1:]).with_suffix(".py")


def _extension(package_dir: Path, name: str) -> Path | None:
    return _built(_source(package_dir, name).with_suffix(""))


def _built(stem: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if candidate.exists():
            return candidate
    return None


def choose(environ: Mapping[str, str] = os.environ) -> None:
    """Decide compiled or pure for this process; pure means the .py files are imported even
    where an extension sits beside them."""
    global state, reason
    built = [_extension(PACKAGE_DIR, name) for name in COMPILED]
    if environ.get("REDLB_PURE", "") not in ("", "0"):
        state, reason = "pure", "REDLB_PURE is set"
    elif not any(built):
        state, reason = "pure", "not compiled"
        return  # nothing to shadow: plain imports are pure already
    elif not all(built) or _built(PACKAGE_DIR.parent / LIBRARY) is None:
        state, reason = "pure", "compiled modules missing (partial build)"
    else:
        try:
            recorded = (PACKAGE_DIR / DIGEST_FILE).read_text().strip()
        except OSError:
            recorded = ""
        if recorded != source_digest():
            state, reason = "pure", "sources changed since they were compiled: run make"
            print(f"redlb: running pure: {reason}", file=sys.stderr)
        else:
            state, reason = "compiled", f"mypyc, {len(COMPILED)} modules"
            return
    sys.meta_path.insert(0, _SourcesFirst())


def missing_toolchain(environ: Mapping[str, str] = os.environ) -> str | None:
    """What compiling needs and is not here (a C compiler, the Python headers, mypyc), or None.
    setup.py installs pure without it; `make test` expects the compiled build with it."""
    command = (environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    compiler = command[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler})"
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").exists():
        return "no Python headers (Python.h)"
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed"
    if not _compiles(command, include):
        # One that is there and cannot compile (CC=/bin/false, a broken cross toolchain)
        # is none: else the install is pure while `make test` expects the compiled build.
        return f"a C compiler that does not compile ({compiler})"
    return None


def _compiles(command: list[str], include: Path) -> bool:
    """Whether ``command`` compiles a C file that includes Python.h."""
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch, "probe.c")
        source.write_text("#include <Python.h>\nint probe(void) { return 0; }\n")
        try:
            done = subprocess.run(
                [*command, "-I", str(include), "-c", str(source), "-o", str(source) + ".o"],
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0


def describe() -> str:
    return f"{state} ({reason})"


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Imports the compiled modules from their .py files (rule 1: every one of them)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, _source(PACKAGE_DIR, fullname))


if __name__ == "__main__":  # the Makefile: which build `make test` expects here
    print("pure" if missing_toolchain() else "compiled")
