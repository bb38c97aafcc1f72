"""NVTX ranges that mark the engine's phases (prefill, decode, routing, escalation).

`nsys profile -t cuda,nvtx` then shows where a step's time goes. The ranges come from the
`nvtx` package when it is importable and cost nothing otherwise (a shared null context);
ARBITRAGE_FAST_NVTX=0 turns them off even when it is. Ranges are host-side markers: they
never synchronise the device.

    from arbitrage_fast import nvtx
    with nvtx.range("draft.decode"):
        ...
"""
from __future__ import annotations

import contextlib
import os

DOMAIN = "arbitrage_fast"

try:  # pragma: no cover - depends on the install
    if os.environ.get("ARBITRAGE_FAST_NVTX", "1") == "0":
        raise ImportError("disabled by ARBITRAGE_FAST_NVTX=0")
    import nvtx as _nvtx
except Exception:  # ImportError, or a broken install: ranges are optional
    _nvtx = None

_NULL = contextlib.nullcontext()

ENABLED = _nvtx is not None


def range(name: str, color: str | None = None):  # noqa: A001 - mirrors nvtx's own name
    """Context manager marking `name` on the profiler timeline (a no-op without nvtx)."""
    if _nvtx is None:
        return _NULL
    return _nvtx.annotate(message=name, color=color, domain=DOMAIN)


def mark(name: str) -> None:
    """An instantaneous marker (a no-op without nvtx)."""
    if _nvtx is not None:
        _nvtx.mark(message=name, domain=DOMAIN)
