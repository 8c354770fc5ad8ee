"""The hot path as C extensions: the modules src/redlb/build.py names, compiled by mypyc.

Only when it can: no C compiler, no Python headers or no mypyc means the pure package (the
same .py files), never a failed install; so does REDLB_PURE=1, and so does the default for
now: compiling is asked for with REDLB_COMPILE=1.  A module that fails to compile
is left out (optional extensions) and the package then runs pure (build.py rule 1).
Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "src" / "redlb"


def hot_path() -> list[Any]:
    if os.environ.get("REDLB_PURE", "") not in ("", "0"):
        print("redlb: REDLB_PURE is set: the pure package")
        return _pure()
    if os.environ.get("REDLB_COMPILE", "") in ("", "0"):
        # Opt-in for now: compiled, the TLS listener's handshake accounting (a pure subclass
        # of the compiled ClientConnection, watched by weak references) does not work yet.
        print("redlb: the pure package (REDLB_COMPILE=1 compiles the hot path)")
        return _pure()
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if shutil.which(compiler) is None or not headers.exists():
        print("redlb: no C compiler or no Python headers: the pure package")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("redlb: mypyc is not installed: the pure package")
        return []
    build = runpy.run_path(str(PACKAGE / "build.py"))
    # An extension left beside a module no longer compiled (an in-place build) would shadow it.
    for extension in PACKAGE.rglob("*.so"):
        relative = extension.relative_to(PACKAGE.parent).with_suffix("").with_suffix("")
        if ".".join(relative.parts) not in build["COMPILED"]:
            extension.unlink()
    sources = [str(Path("src", *name.split(".")).with_suffix(".py")) for name in build["COMPILED"]]
    # Written before compiling: a module that then fails to build leaves a partial set, which
    # runs pure (build.py rule 1).
    (PACKAGE / build["DIGEST_FILE"]).write_text(build["source_digest"](PACKAGE) + "\n")
    try:
        extensions = mypycify(sources, opt_level="3", group_name="redlb")
    except (Exception, SystemExit) as exc:  # mypy's type check failed: it exits
        print(f"redlb: mypyc cannot compile the hot path ({exc!r}): the pure package")
        return []
    for extension in extensions:
        extension.optional = True
    return extensions


def _pure() -> list[Any]:
    """No extension may be left beside its source from an earlier compiled build."""
    for extension in [*PACKAGE.rglob("*.so"), *PACKAGE.parent.glob("redlb__mypyc*")]:
        extension.unlink()
    (PACKAGE / "compiled.sha256").unlink(missing_ok=True)
    return []


setup(ext_modules=hot_path())
