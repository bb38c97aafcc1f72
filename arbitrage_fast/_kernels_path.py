"""Make `arbitrage_fast.triton_kernels` importable from a source checkout.

The kernels live in the repository's top-level folder `triton_kernels/`, which setup.py
installs as `arbitrage_fast.triton_kernels`. An installed wheel needs nothing more. A plain
checkout does: nothing maps that name when the repo root is on sys.path without an install,
or when Python runs in the repo root and the local `arbitrage_fast/` shadows the editable
install's mapping. This finder maps that one name, and only inside our own checkout. It never
makes a top-level `triton_kernels` importable: Triton and vLLM own that name.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_NAME = "arbitrage_fast.triton_kernels"
_CHECKOUT = Path(__file__).resolve().parent.parent
_FOLDER = _CHECKOUT / "triton_kernels"


def _in_checkout() -> bool:
    # Installed, the package sits in site-packages, where a `triton_kernels/` beside it
    # belongs to someone else; only our own pyproject.toml proves this is our checkout.
    try:
        pyproject = (_CHECKOUT / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False
    return 'name = "arbitrage-fast"' in pyproject and (_FOLDER / "__init__.py").is_file()


class _KernelsFinder(importlib.abc.MetaPathFinder):
    """Consulted after the regular finders, so an installed mapping always wins."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _NAME:
            return None
        return importlib.util.spec_from_file_location(
            fullname, _FOLDER / "__init__.py", submodule_search_locations=[str(_FOLDER)]
        )


def install() -> None:
    """Register the finder once, and only when running from our source checkout."""
    if any(isinstance(f, _KernelsFinder) for f in sys.meta_path) or not _in_checkout():
        return
    sys.meta_path.append(_KernelsFinder())
