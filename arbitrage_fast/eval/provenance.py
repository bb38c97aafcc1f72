"""Which code produced a result: the package version and a hash of its Python sources.

A hash of the sources rather than `git describe`: it is the same in a checkout and in an
installed wheel, and an uncommitted edit changes it, where a commit id would not.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def code_revision() -> str:
    """"VERSION+src.HASH": HASH is the first 12 hex digits of a SHA-256 over every .py file
    of the package (relative path and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    try:
        version = metadata.version("arbitrage-fast")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        version = "0+unknown"
    return f"{version}+src.{digest.hexdigest()[:12]}"
