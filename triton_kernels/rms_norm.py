"""A decoder layer's RMSNorm fused with the residual add in front of it.

Each norm of a Llama layer reads the residual stream right after a block's output was added
to it: `h = h + block(x); x = norm(h)`. In torch that is an add plus the norm's own seven
small ops (cast, square, mean, add eps, rsqrt, scale, cast back, weight): eight launches and
the stream read three times. The kernel reads the block's output and the stream once, writes
the new stream and the normed row, one launch per norm.

Rounding is torch's, as transformers' LlamaRMSNorm does it: the add in the stream's dtype,
the variance and scaling in fp32, the result cast to the stream's dtype, then multiplied by
the weight (the product computed in fp32 and rounded once, which is what torch does for two
16-bit floats and is exact for fp32).
"""
from __future__ import annotations

import torch

from ._utils import HAS_TRITON, native_cpu, next_pow2, require_triton, tl, triton, use_triton

__all__ = ["HAS_TRITON", "add_rms_norm", "add_rms_norm_reference", "add_rms_norm_triton"]

_MAX_BLOCK = 16384  # a whole row in one tile up to this hidden size; beyond, two passes over it


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x), residual + x); without a residual, (norm(x), x)."""
    h = x if residual is None else residual + x
    h32 = h.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h32.to(h.dtype), h


if HAS_TRITON:

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, stride_x, res_ptr, stride_r, w_ptr, out_ptr, stride_o, res_out_ptr, stride_ro,
        hidden, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        # Pass 1: the stream (written back when a residual was added) and its sum of squares.
        sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            cols = start + offs
            mask = cols < hidden
            h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
                h = (r.to(tl.float32) + h.to(tl.float32)).to(h.dtype)
                tl.store(res_out_ptr + row * stride_ro + cols, h, mask=mask)
            hf = h.to(tl.float32)
            sq += hf * hf
        rstd = tl.rsqrt(tl.sum(sq, axis=0) / hidden + eps)
        # Pass 2: the stream again (from L1/L2 when the row spans several tiles; a single tile
        # stays in registers across the loop in practice).
        for start in range(0, hidden, BLOCK):
            cols = start + offs
            mask = cols < hidden
            if HAS_RESIDUAL:
                h = tl.load(res_out_ptr + row * stride_ro + cols, mask=mask, other=0.0)
            else:
                h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
            normed = (h.to(tl.float32) * rstd).to(h.dtype)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0)
            out = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def _check(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, hidden], got shape {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x ({tuple(x.shape)}, {x.dtype}), "
                         f"got {tuple(residual.shape)}, {residual.dtype}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")
    for name, t in (("x", x), ("residual", residual), ("weight", weight)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `add_rms_norm_reference`: one program per row."""
    require_triton()
    _check(x, residual, weight)
    T, hidden = x.shape
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(T, hidden, dtype=out_dtype, device=x.device)
    new_residual = x if residual is None else torch.empty_like(x)
    if T == 0:
        return out, new_residual
    block = min(next_pow2(hidden, 16), _MAX_BLOCK)
    res = residual if residual is not None else x  # unread without a residual
    _add_rms_norm_kernel[(T,)](
        x, x.stride(0), res, res.stride(0), weight, out, out.stride(0), new_residual, new_residual.stride(0),
        hidden, float(eps), HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=8 if block >= 4096 else 4,
    )
    return out, new_residual


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, *, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new residual stream): Triton on CUDA; on the CPU the compiled kernel where
    `exact=False` allows its sum of squares (double, so the last bit may differ from torch's
    fp32 mean), else the torch twin."""
    if use_triton(x):
        return add_rms_norm_triton(x, residual, weight, eps)
    if not exact and x.dim() == 2 and weight.dtype == x.dtype and native_cpu(x, weight):
        normed, stream = torch.ops.arbitrage_fast.add_rms_norm(x, residual, weight, eps)
        return normed, (x if residual is None else stream)
    return add_rms_norm_reference(x, residual, weight, eps)
