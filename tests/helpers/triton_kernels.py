"""The Triton kernel modules under test, and the mark that skips where Triton cannot run them.

`tests/conftest.py` has already set TRITON_INTERPRET=1 on machines without CUDA (it must be
set before triton is imported), so on a CPU the kernels run in Triton's interpreter.
"""
from __future__ import annotations

import importlib

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def load_kernel(name: str):
    """`arbitrage_fast.triton_kernels.<name>` (installed there, never as a top-level package)."""
    return importlib.import_module(f"arbitrage_fast.triton_kernels.{name}")


def needs_triton(module) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not module.triton_usable(torch.empty(0, device=DEVICE)),
        reason="triton is not importable, or no GPU and the kernels were imported without TRITON_INTERPRET=1")
