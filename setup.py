"""The hot path as C extensions: the modules src/redlb/build.py names, compiled by mypyc.

Compiled by default, pure only when it must: no C compiler, no Python headers or no mypyc
means the pure package (the same .py files), never a failed install; REDLB_PURE=1 asks for
it.  A module that fails to compile is left out (optional extensions) and the package then
runs pure (build.py rule 1).
Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path
from typing import Any

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "src" / "redlb"


def hot_path() -> list[Any]:
    if os.environ.get("REDLB_PURE", "") not in ("", "0"):
        print("redlb: REDLB_PURE is set: the pure package")
        return _pure()
    build = runpy.run_path(str(PACKAGE / "build.py"))
    missing = build["missing_toolchain"]()
    if missing is not None:
        print(f"redlb: {missing}: the pure package")
        return _pure()
    from mypyc.build import mypycify

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
        return _pure()
    for extension in extensions:
        extension.optional = True
    return extensions


def _pure() -> list[Any]:
    """No extension may be left beside its source from an earlier compiled build."""
    for extension in [*PACKAGE.rglob("*.so"), *PACKAGE.parent.glob("redlb__mypyc*.so")]:
        extension.unlink()
    (PACKAGE / "compiled.sha256").unlink(missing_ok=True)
    return []


setup(ext_modules=hot_path())
