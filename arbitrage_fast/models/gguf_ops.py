"""Linear layers over GGUF quantized blocks: the formats with a kernel, their torch twins,
and the one entry point that picks between them.

    gguf_linear(x[M, K], blocks[N, row_bytes] uint8, qtype) -> [M, N] in x's dtype
        x @ W.T, W being the GGUF tensor the blocks hold, computed from the blocks as stored.
        As in llama.cpp, x is first quantized to int8 with one scale per block of the weight
        (`activation_group`: 32 inputs, or 256 for the K-quants, as its Q8_1 and Q8_K):
        products are integer dots, summed in fp32.
    gguf_dequantize(blocks, qtype, K) -> [N, K] float32

The compiled ops (`torch.ops.arbitrage_fast.gguf_*`, csrc/gguf_linear.cpp) serve CPU
tensors; everything else runs the references below, which define what is correct:
`linear_reference` dequantises with the `gguf` package (llama.cpp's own Python reader, an
implementation independent of ours) and multiplies in float64 by the activations after the
same int8 round trip the kernels apply.
"""
from __future__ import annotations

import numpy as np
import torch

from arbitrage_fast.kv.ops import native_available

# The GGUF types that run packed: ggml id -> (name, inputs per block, bytes per block). Others
# are dequantised at load. The ids and block sizes are the GGUF format's own (ggml's enum
# ggml_type), written out so that the engine imports without the `gguf` package, which only
# reading a GGUF file needs (the GPU image has none); test_gguf_kernels checks them against
# the package's tables.
_PACKED: dict[int, tuple[str, int, int]] = {
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144), 14: ("Q6_K", 256, 210),
}
PACKED_TYPES: dict[int, str] = {t: name for t, (name, _, _) in _PACKED.items()}
TYPE_IDS: dict[str, int] = {name: t for t, name in PACKED_TYPES.items()}
GROUP = 32  # inputs per activation scale, except against a K-quant (activation_group)
# Byte offsets of each block's fp16 scale fields (d, and dmin or m where the format has one).
SCALE_OFFSETS: dict[int, tuple[int, ...]] = {
    TYPE_IDS[name]: offsets for name, offsets in (("Q4_0", (0,)), ("Q4_1", (0, 2)), ("Q5_0", (0,)),
                                                  ("Q5_1", (0, 2)), ("Q8_0", (0,)), ("Q4_K", (0, 2)),
                                                  ("Q6_K", (208,)))
}


def block_shape(qtype: int) -> tuple[int, int]:
    """(inputs per block, bytes per block) of a ggml type."""
    if qtype in _PACKED:
        return _PACKED[qtype][1:]
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]


def row_bytes(qtype: int, in_features: int) -> int:
    elems, size = block_shape(qtype)
    return in_features // elems * size


def nonfinite_blocks(blocks: torch.Tensor, qtype: int) -> int:
    """How many blocks carry a NaN or infinite scale (a corrupt tensor: every product with
    such a block is NaN)."""
    _, size = block_shape(qtype)
    b = blocks.reshape(-1, size)
    bad = torch.zeros(b.shape[0], dtype=torch.bool)
    for off in SCALE_OFFSETS[qtype]:
        bad |= ~torch.isfinite(b[:, off:off + 2].contiguous().view(torch.float16)[:, 0])
    return int(bad.sum())


def activation_group(qtype: int) -> int:
    """Inputs per activation scale in the product with a weight of this type: its block size."""
    return block_shape(qtype)[0]


def quantize_activations(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [M, K], scale float32 [M, K/group]): q * scale is x rounded as the kernels round
    it (scale = amax / 127 per group, round half to even), so the twin sees the kernels' inputs."""
    xf = x.float().reshape(x.shape[0], -1, group)
    d = xf.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xf * inv)
    return q.to(torch.int8).reshape(x.shape), d.squeeze(-1)


def rounded_activations(x: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """x in float64 after the kernels' int8 round trip (`quantize_activations`): what the
    integer products actually multiply."""
    q, d = quantize_activations(x, group)
    return (q.double().reshape(x.shape[0], -1, group) * d.double()[..., None]).reshape(x.shape)


def dequantize_reference(blocks: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    import gguf

    out = gguf.quants.dequantize(blocks.cpu().numpy(), gguf.GGMLQuantizationType(qtype))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(blocks.shape[0], in_features)


def linear_reference(x: torch.Tensor, blocks: torch.Tensor, qtype: int, *, quantize_x: bool = True) -> torch.Tensor:
    """The torch twin of `gguf_linear` (in float64 before the final cast, so that its own
    rounding does not count against the kernel). `quantize_x=False` gives the product with
    the unrounded activations, the quantity the kernel approximates."""
    K = x.shape[-1]
    w = dequantize_reference(blocks, qtype, K).double()
    xr = rounded_activations(x, activation_group(qtype)) if quantize_x else x.double()
    return (xr @ w.T).to(x.dtype)


def _native(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and native_available("cpu")


def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    if _native(x):
        return torch.ops.arbitrage_fast.gguf_linear(x, blocks, qtype)
    return linear_reference(x, blocks, qtype)


def gguf_dequantize(blocks: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    if _native(blocks) and qtype in PACKED_TYPES:
        return torch.ops.arbitrage_fast.gguf_dequantize(blocks, qtype, in_features)
    return dequantize_reference(blocks, qtype, in_features)


def cpu_paths() -> list[str]:
    """The compiled kernel's code paths this CPU runs, best first ([] without the extension)."""
    try:
        from arbitrage_fast import _C
    except ImportError:
        return []
    return list(_C.gguf_cpu_paths())
