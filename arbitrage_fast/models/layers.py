"""Building blocks of a Llama-family decoder, written to match transformers numerically.

The arithmetic lives in the kernel modules' ops (Triton on CUDA, their torch twins, which are
transformers' arithmetic, elsewhere): one launch per norm with its residual add, one for the
MLP's activation. A norm or MLP whose `exact` is False (LlamaDecoder.set_exact_arithmetic) lets
those ops run the compiled CPU kernels, which round within an ulp of transformers, not to it.
"""
from __future__ import annotations

import torch
from torch import nn

from arbitrage_fast.triton_kernels.activation import silu_and_mul
from arbitrage_fast.triton_kernels.rms_norm import add_rms_norm


class RMSNorm(nn.Module):
    """RMSNorm in fp32, cast back before the weight multiply (transformers' exact order)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.exact = True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); given the residual stream, (norm(residual + x), residual + x) in one pass."""
        normed, stream = add_rms_norm(x, residual, self.weight, self.eps, exact=self.exact)
        return normed if residual is None else (normed, stream)


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary positions, so ragged batches need no padding."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


class GatedMLP(nn.Module):
    """SwiGLU with gate and up fused into one GEMM (one weight read, one launch), then one
    activation kernel for silu(gate) * up."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.exact = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), exact=self.exact))
