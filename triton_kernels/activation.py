"""SwiGLU's activation in one pass: silu(gate) * up from the fused gate/up projection's output.

The MLP projects to [T, 2I] in one GEMM (gate | up); torch then needs a split view, a SiLU
and a multiply, two launches and an [T, I] intermediate written and read back. The kernel
reads each row once and writes the product once.

Rounding follows torch's half-precision arithmetic: SiLU in fp32 rounded to the input dtype,
then the product of two values of that dtype, computed in fp32 and rounded once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import HAS_TRITON, native_cpu, next_pow2, require_triton, tl, triton, use_triton

__all__ = ["HAS_TRITON", "silu_and_mul", "silu_and_mul_reference", "silu_and_mul_triton"]

_BLOCK = 1024  # columns per program: rows of an 8B MLP (I = 14336) take 14 programs


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]: silu(gate_up[:, :I]) * gate_up[:, I:], as GatedMLP wrote it."""
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up


if HAS_TRITON:

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, stride_xt, out_ptr, stride_ot, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(x_ptr + row * stride_xt + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_xt + inter + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        out = (act.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_ot + cols, out, mask=mask)


def _check(gate_up: torch.Tensor) -> None:
    if gate_up.dim() != 2 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [tokens, 2 * intermediate], got shape {tuple(gate_up.shape)}")
    if gate_up.stride(-1) != 1:
        raise ValueError("gate_up must be contiguous in its last dimension")


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton twin of `silu_and_mul_reference`: one program per (row, block of columns)."""
    require_triton()
    _check(gate_up)
    T, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(T, inter, dtype=gate_up.dtype, device=gate_up.device)
    if T == 0 or inter == 0:
        return out
    block = min(_BLOCK, next_pow2(inter, 16))
    _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](
        gate_up, gate_up.stride(0), out, out.stride(0), inter, BLOCK=block, num_warps=4)
    return out


def silu_and_mul(gate_up: torch.Tensor, *, exact: bool = True) -> torch.Tensor:
    """silu(gate) * up: Triton on CUDA; on the CPU the compiled kernel where `exact=False`
    allows its vectorised exp (within 2 ulp of torch's), else the torch twin."""
    if use_triton(gate_up):
        return silu_and_mul_triton(gate_up)
    if not exact and gate_up.dim() == 2 and native_cpu(gate_up):
        return torch.ops.arbitrage_fast.silu_and_mul(gate_up)
    return silu_and_mul_reference(gate_up)
