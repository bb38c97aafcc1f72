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


def check_quant_matmul(qw, x: torch.Tensor, device: str) -> None:
    """The Triton quantized matmul of x [M, K] (on the CPU) by a `GroupQuantized` weight, run on
    `device`, against its torch twin, within the bound derived in test_group_quant.py (fp32's
    recursive-summation bound, plus one rounding of each weight and of the output to x's dtype
    below fp32)."""
    qm = load_kernel("quant_matmul")
    args = [t.to(device) if t is not None else None for t in (qw.qweight, qw.scales, qw.mins)]
    got = qm.quant_matmul_triton(x.to(device), *args, qw.bits, qw.group).cpu()
    ref = qm.quant_matmul_reference(x, qw.qweight, qw.scales, qw.mins, qw.bits, qw.group)
    mag = x.double().abs() @ qw.dequantize().double().abs().T
    u = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[x.dtype]
    bound = (x.shape[1] + 2) * 2.0 ** -24 * mag + u * mag + 2 * u * ref.double().abs() + 1e-30
    err = (got.double() - ref.double()).abs()
    assert (err <= bound).all(), f"error {(err / bound).max().item():.2f}x the bound"
