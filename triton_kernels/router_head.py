"""The router's first layer fused with the draft's final RMSNorm.

The router scores a step from features of the draft's final normed hidden states:
`[h_last, h_mean, mean_logprob, mean_entropy, log1p(n), min_logprob, max_entropy]`. Its feature standardisation is
folded into the first layer, leaving two matrices `W_last`, `W_mean` of shape [F, Hd]. Since
the first layer is linear, `W_last @ h_last + W_mean @ h_mean` can be formed token by token
while the draft decodes: each decode iteration normalises the last layer's residual output
once, hands the normed row to the LM head, adds it to a running per-row sum, and refreshes
the pre-activation as if this token ended the step. At the boundary the score is then one
tiny epilogue away (`router_epilogue_reference`), with no second pass over hidden states.

Callers hand in the running sum and the count of the step's tokens before this one, so the
kernel never has to know about steps: the decode iteration reads both from its per-position
buffers (runtime/decode_iteration.py), so a rolled-back token never leaks into a later one.

The norm matches transformers' LlamaRMSNorm bit for bit in its order of rounding: the
variance and the scaling are done in fp32, the result is cast to the input dtype, and only
then multiplied by the weight (in the weight's dtype, then stored as the input dtype).
"""
from __future__ import annotations

import torch

from ._utils import HAS_TRITON, next_pow2, require_triton, tl, triton, triton_usable, use_triton

__all__ = ["HAS_TRITON", "fused_norm_router", "fused_norm_router_reference", "fused_norm_router_triton",
           "rms_norm_reference", "router_epilogue_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic, returned in x's dtype (the LM head's input)."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * normed).to(x.dtype)


def fused_norm_router_reference(x, norm_weight, eps, w_last, w_mean, h_sum, count, out_hidden, out_pre):
    """Torch twin of the fused kernel, with the same in-place contract."""
    h = rms_norm_reference(x, norm_weight, eps)
    out_hidden.copy_(h)
    hf = h.float()
    h_sum.add_(hf)
    count.add_(1)
    h_mean = h_sum / count.float().unsqueeze(1)
    out_pre.copy_(hf @ w_last.t() + h_mean @ w_mean.t())


def router_epilogue_reference(out_pre: torch.Tensor, w_scalar: torch.Tensor, b1: torch.Tensor,
                              w2: torch.Tensor, b2, mean_logprob: torch.Tensor,
                              mean_entropy: torch.Tensor, step_len: torch.Tensor, min_logprob: torch.Tensor,
                              max_entropy: torch.Tensor) -> torch.Tensor:
    """Escalation score in (0, 1): the router MLP finished from the fused pre-activation.

    `w_scalar` [F, 5] weighs the scalar features (mean log-prob, mean entropy, log1p(step
    length), min log-prob, max entropy); it is tiny, so torch does it once per step at the
    boundary.
    """
    scalars = torch.stack([mean_logprob.float(), mean_entropy.float(), torch.log1p(step_len.float()),
                           min_logprob.float(), max_entropy.float()], dim=-1)
    z = out_pre.float() + scalars @ w_scalar.float().t() + b1.float()
    return torch.sigmoid(torch.nn.functional.silu(z) @ w2.float() + b2)


if HAS_TRITON:

    @triton.jit
    def _fused_norm_router_kernel(
        x_ptr, stride_x, norm_w_ptr, eps, w_last_ptr, stride_wl, w_mean_ptr, stride_wm,
        h_sum_ptr, stride_s, count_ptr, out_hidden_ptr, stride_o, out_pre_ptr, stride_p,
        hidden, features,
        BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK_H)
        x_row = x_ptr + row * stride_x

        # Pass 1: the variance. Pass 2 re-reads x from L1/L2, not DRAM, and keeps registers
        # for the weight tiles, so any hidden size fits one program.
        sq = tl.zeros([BLOCK_H], dtype=tl.float32)
        for start in range(0, hidden, BLOCK_H):
            cols = start + offs
            x = tl.load(x_row + cols, mask=cols < hidden, other=0.0).to(tl.float32)
            sq += x * x
        rstd = tl.rsqrt(tl.sum(sq, axis=0) / hidden + eps)

        count = tl.load(count_ptr + row) + 1
        tl.store(count_ptr + row, count)
        count_f = count.to(tl.float32)

        f = tl.arange(0, BLOCK_F)
        f_mask = f < features
        acc = tl.zeros([BLOCK_F], dtype=tl.float32)
        for start in range(0, hidden, BLOCK_H):
            cols = start + offs
            c_mask = cols < hidden
            x = tl.load(x_row + cols, mask=c_mask, other=0.0)
            normed = (x.to(tl.float32) * rstd).to(x.dtype)
            w = tl.load(norm_w_ptr + cols, mask=c_mask, other=0.0)
            # Torch multiplies in the promoted dtype: the fp32 product is either exact (two
            # 16-bit floats) or torch's own fp32 product, so one cast reproduces it.
            h = (normed.to(tl.float32) * w.to(tl.float32)).to(out_hidden_ptr.dtype.element_ty)
            tl.store(out_hidden_ptr + row * stride_o + cols, h, mask=c_mask)
            hf = h.to(tl.float32)
            s = tl.load(h_sum_ptr + row * stride_s + cols, mask=c_mask, other=0.0) + hf
            tl.store(h_sum_ptr + row * stride_s + cols, s, mask=c_mask)
            tile = f_mask[:, None] & c_mask[None, :]
            w_l = tl.load(w_last_ptr + f[:, None] * stride_wl + cols[None, :], mask=tile, other=0.0)
            w_m = tl.load(w_mean_ptr + f[:, None] * stride_wm + cols[None, :], mask=tile, other=0.0)
            acc += tl.sum(w_l * hf[None, :] + w_m * (s / count_f)[None, :], axis=1)
        tl.store(out_pre_ptr + row * stride_p + f, acc, mask=f_mask)


def _check(x, norm_weight, w_last, w_mean, h_sum, count, out_hidden, out_pre) -> None:
    B, Hd = x.shape
    F = w_last.shape[0]
    if norm_weight.shape != (Hd,):
        raise ValueError(f"norm_weight must be [{Hd}], got {tuple(norm_weight.shape)}")
    if w_last.shape != (F, Hd) or w_mean.shape != (F, Hd):
        raise ValueError(f"w_last and w_mean must both be [F, {Hd}], "
                         f"got {tuple(w_last.shape)} and {tuple(w_mean.shape)}")
    if w_last.dtype != torch.float32 or w_mean.dtype != torch.float32:
        raise ValueError("w_last and w_mean must be fp32 (the standardisation folded into them needs it)")
    if h_sum.shape != (B, Hd) or h_sum.dtype != torch.float32:
        raise ValueError(f"h_sum must be fp32 [{B}, {Hd}]")
    if count.shape != (B,):
        raise ValueError(f"count must be [{B}]")
    if out_hidden.shape != (B, Hd) or out_hidden.dtype != x.dtype:
        raise ValueError(f"out_hidden must be [{B}, {Hd}] in {x.dtype}")
    if out_pre.shape != (B, F) or out_pre.dtype != torch.float32:
        raise ValueError(f"out_pre must be fp32 [{B}, {F}]")
    for name, t in (("x", x), ("norm_weight", norm_weight), ("w_last", w_last), ("w_mean", w_mean),
                    ("h_sum", h_sum), ("out_hidden", out_hidden), ("out_pre", out_pre)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def fused_norm_router_triton(x, norm_weight, eps, w_last, w_mean, h_sum, count, out_hidden, out_pre) -> None:
    """One program per row: x is read from DRAM once, h_sum/count/out_* written in place."""
    require_triton()
    _check(x, norm_weight, w_last, w_mean, h_sum, count, out_hidden, out_pre)
    B, Hd = x.shape
    if B == 0:
        return
    F = w_last.shape[0]
    block_f = next_pow2(F, 16)
    # Two fp32 weight tiles of BLOCK_F x BLOCK_H live in registers per iteration; 8K elements
    # each keeps them resident at 8 warps without spilling.
    block_h = min(next_pow2(Hd, 16), max(16, 8192 // block_f))
    _fused_norm_router_kernel[(B,)](
        x, x.stride(0), norm_weight, float(eps), w_last, w_last.stride(0), w_mean, w_mean.stride(0),
        h_sum, h_sum.stride(0), count, out_hidden, out_hidden.stride(0), out_pre, out_pre.stride(0),
        Hd, F, BLOCK_H=block_h, BLOCK_F=block_f, num_warps=8 if block_f * block_h >= 4096 else 4,
    )


def fused_norm_router(x, norm_weight, eps, w_last, w_mean, h_sum, count, out_hidden, out_pre) -> None:
    """Final RMSNorm + running router pre-activation: Triton on CUDA, the torch twin elsewhere."""
    if use_triton(x):
        fused_norm_router_triton(x, norm_weight, eps, w_last, w_mean, h_sum, count, out_hidden, out_pre)
    else:
        fused_norm_router_reference(x, norm_weight, eps, w_last, w_mean, h_sum, count, out_hidden, out_pre)
